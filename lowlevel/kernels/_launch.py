"""What the kernels share: input coercion and validation, and a cached launch path.

``FastLauncher`` keeps the compiled kernel per specialisation key and launches it through the C
entry point of Triton's launcher (:class:`_Entry`) with the arguments as given, skipping
Triton's per-call binder (most of its ~15 µs launch cost). The key is computed here from what
Triton specialises on: dtypes, which integer arguments equal 1 or are multiples of 16, which
pointers are 16-byte aligned, and the constexprs. Under ``TRITON_INTERPRET=1`` it simply calls
``kernel[grid]``.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from .. import _runtime as rt
from ..interop import as_cupy, as_torch
from ..sm_control import capped as _capped
from ..sm_control import device_sm_count, get_num_sms

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def to_torch(x: Any, name: str) -> tuple[Any, bool]:
    """(torch view of ``x``, whether ``x`` was a CuPy array). No copies."""
    if isinstance(x, torch.Tensor):
        return x, False
    if rt.cp is not None and isinstance(x, rt.cp.ndarray):
        return as_torch(x), True
    raise TypeError(f"{name} must be a torch.Tensor or cupy.ndarray, got {type(x).__qualname__}")


def like_input(t: Any, was_cupy: bool) -> Any:
    return as_cupy(t) if was_cupy else t


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


def _spec(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool):
        return 1 if v == 1 else (16 if v % 16 == 0 else 0)
    dp = getattr(v, "data_ptr", None)
    if dp is not None:
        return (v.dtype, dp() % 16 == 0)
    return v


class _Entry:
    """The cheapest way into one compiled kernel: the C entry point of Triton's launcher for it
    (what ``CompiledKernel.run`` calls after allocating scratch memory), with the arguments that
    never change as a prefix. Kernels that need scratch memory go through ``run`` itself.
    Triton's launch hooks (``knobs.runtime.launch_enter_hook``, used by profilers) are not called.

    ``entry.launch(grid_x, 1, 1, stream, *entry.prefix, *kernel_args)`` launches."""

    __slots__ = ("launch", "prefix")

    def __init__(self, ck: Any) -> None:
        run = ck.run  # Triton's launcher object for this kernel
        if (getattr(run, "global_scratch_size", 1) == 0 and getattr(run, "profile_scratch_size", 1) == 0
                and hasattr(run, "launch")):
            self.launch = run.launch
            self.prefix: tuple[Any, ...] = (ck.function, run.launch_cooperative_grid, run.launch_pdl, None, None,
                                            ck.packed_metadata, None, None, None)
        else:
            self.launch = run
            self.prefix = (ck.function, ck.packed_metadata, None, None, None)


class FastLauncher:
    """Launch ``jit_fn`` on lowlevel's current stream, reusing its compiled kernel."""

    def __init__(self, jit_fn: Any, unspecialized: Sequence[str] = ()) -> None:
        self.fn = jit_fn
        names = list(getattr(jit_fn, "arg_names", []))
        self._free = frozenset(names.index(n) for n in unspecialized)  # arguments left out of the key
        self.cache: dict[tuple[Any, ...], _Entry] = {}
        self.compiles = 0  # kernels this launcher obtained from Triton (one per key)

    def key(self, args: Sequence[Any], constexprs: dict[str, Any], num_warps: int, num_stages: int) -> tuple:
        free = self._free
        return (tuple(None if i in free else _spec(a) for i, a in enumerate(args)), tuple(constexprs.values()),
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
                spec.append(None if i in free else (a.dtype, p % 16 == 0))
            else:
                flat.append(a)
                spec.append(None if i in free else _spec(a))
        return (tuple(spec), tuple(constexprs.values()), num_warps, num_stages), flat

    def __call__(self, grid: int, args: Sequence[Any], constexprs: dict[str, Any], num_warps: int,
                 num_stages: int) -> None:
        if INTERPRET:
            self.fn[(grid,)](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
            return
        key, flat = self._key_and_ptrs(args, constexprs, num_warps, num_stages)
        e = self.cache.get(key)
        if e is None:
            # the first launch goes through Triton (on torch's current stream, set to ours)
            h = rt.current_handle()
            with torch.cuda.stream(torch.cuda.ExternalStream(h)) if h != rt.torch_get_raw(-1) else _nullctx():
                ck = self.fn[(grid,)](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
            self.cache[key] = _Entry(ck)
            self.compiles += 1
            return
        e.launch(grid, 1, 1, rt.current_handle(), *e.prefix, *flat, *constexprs.values())


class Plan:
    """One validated launch: the work in tiles, the arguments (``args[grid_at]`` is the program
    count, filled in at launch), the constexprs and options, and the value to return."""

    __slots__ = ("launcher", "tiles", "args", "grid_at", "constexprs", "num_warps", "num_stages", "result")

    def __init__(self, launcher: "FastLauncher", tiles: int, args: tuple[Any, ...], grid_at: int,
                 constexprs: dict[str, Any], num_warps: int, num_stages: int, result: Any) -> None:
        self.launcher, self.tiles, self.args, self.grid_at = launcher, tiles, args, grid_at
        self.constexprs, self.num_warps, self.num_stages, self.result = constexprs, num_warps, num_stages, result

    def launch(self) -> Any:
        """Launch now with ``min(cap, tiles)`` programs; return the result."""
        if self.tiles:
            grid = max(1, min(get_num_sms(), self.tiles))
            args = self.args[:self.grid_at] + (grid,) + self.args[self.grid_at + 1:]
            self.launcher(grid, args, self.constexprs, self.num_warps, self.num_stages)
        return self.result

    def prepare(self) -> "PreparedLaunch":
        return PreparedLaunch(self.launcher, self.tiles, self.args, self.grid_at, self.constexprs,
                              self.num_warps, self.num_stages)


class PreparedLaunch:
    """A kernel launch with its arguments fixed: calling it re-reads the SM cap, sets the grid
    and launches the compiled kernel on lowlevel's current stream, with no validation, no
    argument parsing and no specialisation lookup. Keep the arrays it was prepared with alive
    (it holds references) and unchanged in shape, or prepare again.

    A call goes straight into the kernel's :class:`_Entry` with the argument tuple built once
    per grid size."""

    __slots__ = ("_keep", "_tiles", "_grid_at", "_launcher", "_constexprs", "_opts", "_total", "_grid",
                 "_entry", "_prefix", "_args", "_argv")

    def __init__(self, launcher: "FastLauncher", tiles: int, args: Sequence[Any], grid_at: int,
                 constexprs: dict[str, Any], num_warps: int, num_stages: int) -> None:
        dev = next((a.device.index for a in args if hasattr(a, "device") and a.device.type == "cuda"), None)
        self._total = device_sm_count(dev)
        grid = max(1, min(_capped(self._total), tiles))
        call_args = list(args)
        call_args[grid_at] = grid
        launcher(grid, call_args, constexprs, num_warps, num_stages)  # compiles if needed, launches once
        self._keep = args
        self._tiles = tiles
        self._grid_at = grid_at
        self._launcher, self._constexprs, self._opts = launcher, constexprs, (num_warps, num_stages)
        self._grid = grid
        self._entry: Any = None
        self._prefix: tuple[Any, ...] = ()
        # pointers as ints: the launcher takes them as they are, skipping data_ptr() calls
        self._args = [a.data_ptr() if hasattr(a, "data_ptr") else a for a in call_args] + list(constexprs.values())
        if INTERPRET:
            return
        e = launcher.cache[launcher.key(call_args, constexprs, num_warps, num_stages)]
        self._entry, self._prefix = e.launch, e.prefix
        self._argv = self._prefix + tuple(self._args)

    def _regrid(self, grid: int) -> None:
        self._grid = grid
        self._args[self._grid_at] = grid
        self._argv = self._prefix + tuple(self._args)

    def __call__(self) -> None:
        grid = _capped(self._total)
        if grid > self._tiles:
            grid = self._tiles
        if grid != self._grid:
            self._regrid(grid)
        if self._entry is None:  # the interpreter
            self._launcher(grid, self._keep[:self._grid_at] + (grid,) + tuple(self._keep[self._grid_at + 1:]),
                           self._constexprs, *self._opts)
            return
        h = rt.torch_get_raw(-1)  # lowlevel's current stream, as rt.current_handle() finds it
        if not h:
            h = rt.cupy_get_current().ptr
        self._entry(grid, 1, 1, h, *self._argv)


class _nullctx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None
