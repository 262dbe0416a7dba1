"""What the kernels share: input coercion and validation, and a cached launch path.

``FastLauncher`` keeps the compiled kernel per specialisation key and launches it through the C
entry point of Triton's launcher (:class:`_Entry`) with the arguments as given, skipping
Triton's per-call binder (most of its ~15 µs launch cost). The key is computed here from what
Triton specialises on (:func:`spec_key`): dtypes, the integer width Triton gives each integer
argument (i32 / i64 / u64 by value), which integers equal 1 or are multiples of 16, which
pointers are 16-byte aligned, and the constexprs. Under ``TRITON_INTERPRET=1`` it simply calls
``kernel[grid]``.

The C entry point is Triton's private interface. :func:`check_launcher` checks, once per
launcher class at the first launch, that it has the shape this module was written against
(Triton 3.6: ``launch(gridX, gridY, gridZ, stream, function, launch_cooperative_grid,
launch_pdl, global_scratch, profile_scratch, packed_metadata, launch_metadata, enter_hook,
exit_hook, *args)``); where it does not, launches go through ``kernel[grid](...)`` (slower, still
correct) after a one-time :class:`LauncherFallbackWarning`.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import _runtime as rt
from ..interop import as_cupy, as_torch, overlaps
from ..sm_control import capped as _capped
from ..sm_control import caps as _caps
from ..sm_control import device_sm_count, get_num_sms

__all__ = ["INTERPRET", "FastLauncher", "LauncherFallbackWarning", "Plan", "PreparedLaunch", "StreamLaunch",
           "MAX_SPINS_LIMIT", "check_device", "check_dot_dtype", "check_stream", "check_launcher", "check_writes",
           "like_input", "overlap_error", "spec_key", "to_torch"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

MAX_SPINS_LIMIT = (1 << 31) - 1
"""The largest ``max_spins`` of the kernels that poll flags (tile overlap, the NVLink
all-to-all): a program counts its polls in a 32-bit integer, which a larger limit would let
wrap around (and the guard would never fire)."""

_I32_MIN, _I32_END, _I64_END = -(1 << 31), 1 << 31, 1 << 63


class LauncherFallbackWarning(RuntimeWarning):
    """Triton's compiled-kernel launcher does not have the shape lowlevel's fast launch path was
    written against: launches use ``kernel[grid](...)`` instead (correct, slower)."""


def to_torch(x: Any, name: str) -> tuple[Any, bool]:
    """(torch view of ``x``, whether ``x`` was a CuPy array). No copies. ``TypeError`` for
    another type, ``ValueError`` for a nested tensor (it reports the strided layout but has no
    sizes or strides for the kernels' checks), naming ``name``."""
    if isinstance(x, torch.Tensor):
        if x.is_nested:
            raise ValueError(f"{name} must be a dense tensor, got a nested tensor")
        return x, False
    if rt.cp is not None and isinstance(x, rt.cp.ndarray):
        return as_torch(x), True
    raise TypeError(f"{name} must be a torch.Tensor or cupy.ndarray, got {type(x).__qualname__}")


def like_input(t: Any, was_cupy: bool) -> Any:
    return as_cupy(t) if was_cupy else t


def check_dot_dtype(dtype: Any, name: str) -> None:
    """``TypeError`` naming ``name`` for a bfloat16 ``tl.dot`` under Triton's interpreter
    (``TRITON_INTERPRET=1``): triton 3.6's interpreter computes it wrong (errors of 1e10 on
    random data), so it is refused rather than returned; float16 and float32 are right there."""
    if INTERPRET and dtype == torch.bfloat16:
        raise TypeError(f"{name}: bfloat16 products are wrong under Triton's interpreter (TRITON_INTERPRET=1, "
                        "triton 3.6): use float16 or float32 there, or a GPU")


def check_device(name: str, *ts: Any) -> None:
    if INTERPRET:
        return
    for t in ts:
        if not t.is_cuda:
            raise ValueError(f"{name}: tensors must be on a CUDA device, got one on {t.device}")
    dev = ts[0].get_device()
    for t in ts[1:]:
        if t.get_device() != dev:
            raise ValueError(f"{name}: tensors are on different devices ({ts[0].device} and {t.device})")


def _int_width(v: int) -> str:
    """Triton's type for a Python int argument: i32 where it fits, else i64, else u64."""
    if _I32_MIN <= v < _I32_END:
        return "i32"
    return "i64" if v < _I64_END else "u64"


def spec_key(v: Any, specialize: bool = True) -> Any:
    """What Triton compiles a kernel argument ``v`` for (the part of its cache key that depends
    on the value): for an int its width (``"i32"``, ``"i64"``, ``"u64"``) and, when
    ``specialize``, whether it equals 1 or is a multiple of 16; for a tensor its dtype and
    whether its data pointer is 16-byte aligned; ``"u1"`` for a bool, ``"fp32"`` for a float.
    Two calls whose arguments have equal keys run the same compiled kernel."""
    if isinstance(v, bool):
        return "u1"
    if isinstance(v, int):
        w = _int_width(v)
        if not specialize:
            return w
        return (w, 1 if v == 1 else (16 if v % 16 == 0 else 0))
    if isinstance(v, float):
        return "fp32"
    dp = getattr(v, "data_ptr", None)
    if dp is not None:
        return (v.dtype, dp() % 16 == 0)
    return v


# --- the launcher check ------------------------------------------------------------------------

def _squash(src: str) -> str:
    return re.sub(r"\s+", "", src)


# Triton 3.6's CudaLauncher.__call__ and JITFunction.run, in the calls the _Entry prefix mirrors
_LAUNCHER_CALL = _squash("self.launch(gridX, gridY, gridZ, stream, function, self.launch_cooperative_grid, "
                         "self.launch_pdl, global_scratch, profile_scratch, *args)")
_LAUNCHER_PARAMS = ["self", "gridX", "gridY", "gridZ", "stream", "function", "args"]
_RUN_CALL = _squash("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, "
                    "launch_metadata, knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, "
                    "*bound_args.values())")
_checked: dict[type, str | None] = {}
_warned: set[str] = set()


def _jit_run_source() -> str:
    from triton.runtime.jit import JITFunction

    return inspect.getsource(JITFunction.run)


def check_launcher(ck: Any, run_source: Callable[[], str] = _jit_run_source) -> str | None:
    """Why the fast launch path cannot drive the compiled kernel ``ck`` (``None`` when it can).

    Checks, once per launcher class (cached), that ``ck`` has ``function`` and
    ``packed_metadata``; that its launcher ``ck.run`` has ``launch``, ``launch_cooperative_grid``,
    ``launch_pdl``, ``global_scratch_size`` and ``profile_scratch_size``; that the launcher's
    ``__call__(self, gridX, gridY, gridZ, stream, function, *args)`` forwards as
    ``self.launch(gridX, gridY, gridZ, stream, function, self.launch_cooperative_grid,
    self.launch_pdl, global_scratch, profile_scratch, *args)``; and that Triton's
    ``JITFunction.run`` calls ``kernel.run(..., kernel.function, kernel.packed_metadata,
    launch_metadata, enter_hook, exit_hook, *args)`` (Triton 3.6)."""
    for attr in ("function", "packed_metadata", "run"):
        if not hasattr(ck, attr):
            return f"the compiled kernel has no {attr!r}"
    run = ck.run
    for attr in ("launch", "launch_cooperative_grid", "launch_pdl", "global_scratch_size", "profile_scratch_size"):
        if not hasattr(run, attr):
            return f"the kernel's launcher ({type(run).__qualname__}) has no {attr!r}"
    cls = type(run)
    if cls in _checked:
        return _checked[cls]
    why: str | None = None
    try:
        call = cls.__call__
        params = list(inspect.signature(call).parameters)
        if params != _LAUNCHER_PARAMS:
            why = f"{cls.__qualname__}.__call__ takes {params}, expected {_LAUNCHER_PARAMS}"
        elif _LAUNCHER_CALL not in _squash(inspect.getsource(call)):
            why = f"{cls.__qualname__}.__call__ no longer calls self.launch(grid, stream, function, coop, pdl, " \
                  "scratch, scratch, *args)"
        elif _RUN_CALL not in _squash(run_source()):
            why = "JITFunction.run no longer calls kernel.run(grid, stream, function, packed_metadata, " \
                  "launch_metadata, hooks, *args)"
    except (OSError, TypeError, ValueError) as exc:  # no source to read: do not guess
        why = f"cannot read Triton's launcher source ({type(exc).__name__}: {exc})"
    _checked[cls] = why
    return why


def _warn_fallback(why: str) -> None:
    if why in _warned:
        return
    _warned.add(why)
    import triton

    warnings.warn(f"lowlevel.kernels: Triton {triton.__version__}'s launcher differs from the one the fast launch "
                  f"path was checked against (Triton 3.6): {why}; launching through kernel[grid](...) instead",
                  LauncherFallbackWarning, stacklevel=4)


class _Entry:
    """The cheapest way into one compiled kernel: the C entry point of Triton's launcher for it
    (what ``CompiledKernel.run`` calls after allocating scratch memory), with the arguments that
    never change as a prefix. Kernels that need scratch memory go through ``run`` itself.
    Triton's launch hooks (``knobs.runtime.launch_enter_hook``, used by profilers) are not called.

    ``entry.launch(grid_x, 1, 1, stream, *entry.prefix, *kernel_args)`` launches. ``slow``
    entries (the launcher check failed) are launched through ``kernel[grid](...)``."""

    __slots__ = ("launch", "prefix", "slow")

    def __init__(self, ck: Any) -> None:
        self.slow = False
        run = ck.run  # Triton's launcher object for this kernel
        if run.global_scratch_size == 0 and run.profile_scratch_size == 0:
            self.launch = run.launch
            self.prefix: tuple[Any, ...] = (ck.function, run.launch_cooperative_grid, run.launch_pdl, None, None,
                                            ck.packed_metadata, None, None, None)
        else:
            self.launch = run
            self.prefix = (ck.function, ck.packed_metadata, None, None, None)

    @classmethod
    def fallback(cls) -> _Entry:
        e = cls.__new__(cls)
        e.slow, e.launch, e.prefix = True, None, ()
        return e


def _on_current_stream() -> contextlib.AbstractContextManager:
    """torch's current stream set to lowlevel's (which Triton's own launch path uses)."""
    h = rt.current_handle()
    if h != rt.torch_get_raw(-1):
        return torch.cuda.stream(torch.cuda.ExternalStream(h))
    return contextlib.nullcontext()


class FastLauncher:
    """Launch ``jit_fn`` on lowlevel's current stream, reusing its compiled kernel."""

    def __init__(self, jit_fn: Any, unspecialized: Sequence[str] = ()) -> None:
        self.fn = jit_fn
        names = list(getattr(jit_fn, "arg_names", []))
        self._free = frozenset(names.index(n) for n in unspecialized)  # do_not_specialize arguments
        self.cache: dict[tuple[Any, ...], _Entry] = {}
        self.compiles = 0  # kernels this launcher obtained from Triton (one per key)
        self.interpret = INTERPRET
        self.check: Callable[[Any], str | None] = check_launcher

    def key(self, args: Sequence[Any], constexprs: dict[str, Any], num_warps: int, num_stages: int) -> tuple:
        """The cache key of a launch: :func:`spec_key` of each argument (the integer width alone
        for the do-not-specialise ones, as Triton does), the constexprs and options."""
        free = self._free
        return (tuple(spec_key(a, i not in free) for i, a in enumerate(args)), tuple(constexprs.values()),
                num_warps, num_stages)

    def _key_and_ptrs(self, args: Sequence[Any], constexprs: dict[str, Any], num_warps: int,
                      num_stages: int) -> tuple[tuple, list[Any]]:
        """:meth:`key`, and the arguments with each tensor replaced by its data pointer (the
        launcher then skips its own pointer look-ups), in one pass."""
        free = self._free
        spec: list[Any] = []
        flat: list[Any] = []
        for i, a in enumerate(args):
            dp = getattr(a, "data_ptr", None)
            if dp is not None:
                p = dp()
                flat.append(p)
                spec.append((a.dtype, p % 16 == 0))
            else:
                flat.append(a)
                spec.append(spec_key(a, i not in free))
        return (tuple(spec), tuple(constexprs.values()), num_warps, num_stages), flat

    def _slow(self, grid: int, args: Sequence[Any], constexprs: dict[str, Any], num_warps: int,
              num_stages: int) -> Any:
        with _on_current_stream():
            return self.fn[(grid,)](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)

    def __call__(self, grid: int, args: Sequence[Any], constexprs: dict[str, Any], num_warps: int,
                 num_stages: int) -> None:
        if self.interpret:
            self.fn[(grid,)](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
            return
        key, flat = self._key_and_ptrs(args, constexprs, num_warps, num_stages)
        e = self.cache.get(key)
        if e is None:
            # the first launch goes through Triton (on torch's current stream, set to ours)
            ck = self._slow(grid, args, constexprs, num_warps, num_stages)
            why = self.check(ck)
            if why is None:
                self.cache[key] = _Entry(ck)
            else:
                _warn_fallback(why)
                self.cache[key] = _Entry.fallback()
            self.compiles += 1
            return
        if e.slow:
            self._slow(grid, args, constexprs, num_warps, num_stages)
            return
        e.launch(grid, 1, 1, rt.current_handle(), *e.prefix, *flat, *constexprs.values())


def overlap_error(op: str, out_name: str, in_name: str) -> ValueError:
    """The error for an output whose memory meets an operand's (a kernel would read what it is
    overwriting, in an order no one chose)."""
    return ValueError(f"{op}: {out_name} overlaps {in_name} in memory (the kernel would read elements it is "
                      f"overwriting); write to a separate tensor")


def check_writes(op: str, out_name: str, out: Any, *inputs: tuple[str, Any], same_ok: tuple[str, ...] = ()) -> None:
    """``ValueError`` where the torch tensor ``out`` overlaps itself (a dimension of size > 1
    with stride 0, as from ``expand``: two threads would write one element) or overlaps one of
    ``inputs`` (``(name, tensor)`` pairs; a None tensor, an argument not given, is skipped) in
    memory (:func:`lowlevel.interop.overlaps`); an input named in ``same_ok`` may
    be exactly ``out`` (same address, shape and strides: the op is safe in place). Every
    message names ``op`` and the tensors."""
    if any(d > 1 and st == 0 for d, st in zip(out.shape, out.stride())):
        raise ValueError(f"{op}: {out_name} has a dimension of size > 1 with stride 0 (an expanded view): several "
                         f"results would land on one element")
    for name, t in inputs:
        if t is not None and overlaps(out, t):
            if (name in same_ok and t.data_ptr() == out.data_ptr() and t.shape == out.shape
                    and t.stride() == out.stride() and t.dtype == out.dtype):
                continue
            raise overlap_error(op, out_name, name)


def with_grid(args: Sequence[Any], grid_at: int, grid: int) -> tuple[Any, ...]:
    """``args`` with the program count ``grid`` at index ``grid_at``."""
    return (*args[:grid_at], grid, *args[grid_at + 1:])


class Plan:
    """One validated launch: the work in tiles, the arguments (``args[grid_at]`` is the program
    count, filled in at launch), the constexprs and options, and the value to return."""

    __slots__ = ("args", "constexprs", "grid_at", "launcher", "num_stages", "num_warps", "result", "tiles")

    def __init__(self, launcher: FastLauncher, tiles: int, args: tuple[Any, ...], grid_at: int,
                 constexprs: dict[str, Any], num_warps: int, num_stages: int, result: Any) -> None:
        self.launcher, self.tiles, self.args, self.grid_at = launcher, tiles, args, grid_at
        self.constexprs, self.num_warps, self.num_stages, self.result = constexprs, num_warps, num_stages, result

    def launch(self) -> Any:
        """Launch now with ``min(cap, tiles)`` programs; return the result."""
        if self.tiles:
            grid = max(1, min(get_num_sms(), self.tiles))
            self.launcher(grid, with_grid(self.args, self.grid_at, grid), self.constexprs, self.num_warps,
                          self.num_stages)
        return self.result

    def prepare(self, stream: Any = None) -> PreparedLaunch:
        """The launch fixed: on lowlevel's current stream at each call (``stream`` None), or
        always on ``stream`` (a :class:`StreamLaunch`: no current-stream look-up per call)."""
        if stream is None:
            return PreparedLaunch(self.launcher, self.tiles, self.args, self.grid_at, self.constexprs,
                                  self.num_warps, self.num_stages)
        return StreamLaunch(self.launcher, self.tiles, self.args, self.grid_at, self.constexprs,
                            self.num_warps, self.num_stages, stream)


class PreparedLaunch:
    """A kernel launch with its arguments fixed: calling it re-reads the SM cap, sets the grid
    and launches the compiled kernel on lowlevel's current stream, with no validation, no
    argument parsing and no specialisation lookup. Keep the arrays it was prepared with alive
    (it holds references) and unchanged in shape, or prepare again. Preparing launches the
    kernel once (it compiles, if needed, and writes the output): prepare when the output may
    be overwritten.

    A call goes straight into the kernel's :class:`_Entry` with the argument tuple built once
    per grid size. ``tiles``: the units of work, i.e. the programs one full wave would take
    (the grid is ``min(cap, tiles)``)."""

    __slots__ = (
        "_args",
        "_argv",
        "_constexprs",
        "_entry",
        "_grid",
        "_grid_at",
        "_keep",
        "_launcher",
        "_limit",
        "_opts",
        "_prefix",
        "_tiles",
        "_total",
    )

    def __init__(self, launcher: FastLauncher, tiles: int, args: Sequence[Any], grid_at: int,
                 constexprs: dict[str, Any], num_warps: int, num_stages: int) -> None:
        dev = next((a.device.index for a in args if hasattr(a, "device") and a.device.type == "cuda"), None)
        self._total = device_sm_count(dev)
        grid = max(1, min(_capped(self._total), tiles))
        call_args = list(args)
        call_args[grid_at] = grid
        self._first_launch(launcher, grid, call_args, constexprs, num_warps, num_stages)
        self._keep = args
        self._tiles = max(1, tiles)  # at least one program (a kernel with no work returns at once)
        self._limit = min(self._total, self._tiles)  # the grid without a cap
        self._grid_at = grid_at
        self._launcher, self._constexprs, self._opts = launcher, constexprs, (num_warps, num_stages)
        self._grid = grid
        self._entry: Any = None
        self._prefix: tuple[Any, ...] = ()
        # pointers as ints: the launcher takes them as they are, skipping data_ptr() calls
        self._args = [a.data_ptr() if hasattr(a, "data_ptr") else a for a in call_args] + list(constexprs.values())
        self._argv: tuple[Any, ...] = ()
        if launcher.interpret:
            return
        e = launcher.cache[launcher.key(call_args, constexprs, num_warps, num_stages)]
        if e.slow:
            return
        self._entry, self._prefix = e.launch, e.prefix
        self._argv = self._prefix + tuple(self._args)

    def _first_launch(self, launcher: FastLauncher, grid: int, args: list[Any], constexprs: dict[str, Any],
                      num_warps: int, num_stages: int) -> None:
        launcher(grid, args, constexprs, num_warps, num_stages)  # compiles if needed, launches once

    def _regrid(self, grid: int) -> None:
        self._grid = grid
        self._args[self._grid_at] = grid
        self._argv = self._prefix + tuple(self._args)

    def __call__(self) -> None:
        # the fewest Python operations in front of the C entry: each costs about 30-100 ns, against
        # about 5 µs for the C launch itself
        stack = _caps.stack  # sm_control.capped(), inline
        cap = stack[-1] if stack else _caps.global_cap
        grid = self._limit
        if cap is not None and cap < grid:
            grid = cap
        if grid != self._grid:
            self._regrid(grid)
        entry = self._entry
        if entry is None:  # the interpreter, or Triton's own launch path
            self._launcher(grid, with_grid(self._keep, self._grid_at, grid),
                           self._constexprs, *self._opts)
        else:
            # lowlevel's current stream, as rt.current_handle() finds it
            entry(grid, 1, 1, rt.torch_get_raw(-1) or rt.cupy_get_current().ptr, *self._argv)

    @property
    def tiles(self) -> int:
        """Units of work (output tiles, times K slices for split-K; at least 1, a launch with no
        work being one program that returns at once): a grid of this many programs runs every
        unit in one wave; a cap of ``P`` SMs takes ``ceil(tiles / P)``."""
        return self._tiles


def check_stream(stream: Any) -> Any:
    """``stream`` of a ``prepare_*(..., stream=)`` call as a :class:`lowlevel.Stream` (None
    stays None), checked before anything is planned: ``TypeError`` / ``ValueError`` naming
    ``stream``."""
    if stream is None:
        return None
    from ..stream import adopt_arg

    return adopt_arg(stream, "stream")


class StreamLaunch(PreparedLaunch):
    """A :class:`PreparedLaunch` bound to one stream: every call (the launch made while
    preparing included) is enqueued on ``stream``, whatever stream is current, so a call skips
    the current-stream look-up (0.3 to 0.5 µs of the prepared path's host time on an H200
    host). Ordering is the
    caller's: the launch is ordered after earlier work on ``stream`` only. Holds a reference to
    ``stream``. Raises ``TypeError`` / ``ValueError`` naming ``stream`` for what is no stream.

    ``launch`` (attribute): the same launch as calling the object, as a plain function (no
    bound-method call; its state in closure cells), the cheapest way in: same cap reading,
    same stream, same arguments."""

    __slots__ = ("_handle", "_stream", "launch")

    def __init__(self, launcher: FastLauncher, tiles: int, args: Sequence[Any], grid_at: int,
                 constexprs: dict[str, Any], num_warps: int, num_stages: int, stream: Any) -> None:
        from ..stream import adopt_arg

        self._stream = adopt_arg(stream, "stream")  # checked before anything launches
        self._handle = self._stream.ptr
        super().__init__(launcher, tiles, args, grid_at, constexprs, num_warps, num_stages)
        self.launch: Callable[[], None] = self._fast() if self._entry is not None else self._through_triton

    def _fast(self) -> Callable[[], None]:
        """:attr:`launch` on the C entry: its state in closure cells, holding the arrays and the
        stream but not ``self`` (no reference cycle); the whole argument tuple is built once per
        grid size and passed as it is."""
        caps, limit, entry, handle = _caps, self._limit, self._entry, self._handle
        head, args, at = self._prefix, list(self._args), self._grid_at
        state: list[Any] = [self._grid, (self._grid, 1, 1, handle, *head, *args)]

        def launch() -> None:
            stack = caps.stack  # sm_control.capped(), inline
            cap = stack[-1] if stack else caps.global_cap
            grid = limit if cap is None or cap >= limit else cap
            if grid != state[0]:
                args[at] = grid
                state[0], state[1] = grid, (grid, 1, 1, handle, *head, *args)
            entry(*state[1])

        launch.keep = (self._keep, self._stream)  # type: ignore[attr-defined]  # alive while the function is
        return launch

    def _through_triton(self) -> None:
        """:attr:`launch` where there is no C entry (the interpreter, a launcher that failed the
        check): Triton's own launch path, on the bound stream."""
        from ..stream import use_stream

        grid = max(1, min(_capped(self._total), self._tiles))
        with use_stream(self._stream):
            self._launcher(grid, with_grid(self._keep, self._grid_at, grid),
                           self._constexprs, *self._opts)

    def _first_launch(self, launcher: FastLauncher, grid: int, args: list[Any], constexprs: dict[str, Any],
                      num_warps: int, num_stages: int) -> None:
        from ..stream import use_stream

        with use_stream(self._stream):
            launcher(grid, args, constexprs, num_warps, num_stages)

    def __call__(self) -> None:
        self.launch()

    @property
    def stream(self) -> Any:
        """The :class:`lowlevel.Stream` every call launches on."""
        return self._stream
