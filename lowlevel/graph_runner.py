"""CUDAGraphRunner: replay the graph captured for a batch descriptor, capturing on first use."""
from __future__ import annotations

import operator
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from . import _runtime as rt
from .cudagraph_dispatch import BatchDescriptor, CudagraphDispatcher, CUDAGraphMode, as_cudagraph_mode
from .device import require_cuda
from .errors import check_bool, check_int, describe
from .graphs import Graph, GraphPool, PoolBytes, capture, capture_stream, torch_reserved_bytes
from .stream import use_stream

__all__ = ["CUDAGraphRunner", "CaptureStats", "MemoryEstimate"]

@dataclass
class CaptureStats:
    """Where the time of the last :meth:`CUDAGraphRunner.capture_all` went (seconds, host
    wall clock) and what it reserved. ``warmup_s``: the eager warm-up runs; ``capture_s``: the
    captured calls of ``fn``; ``instantiate_s``: instantiations and in-place updates;
    ``other_s``: the rest (argument making, stream ordering, bookkeeping). ``updated``: how
    many graphs were updated in place instead of instantiated. ``pool``: the runner's pool
    bytes at the end."""

    graphs: int = 0
    total_s: float = 0.0
    warmup_s: float = 0.0
    capture_s: float = 0.0
    instantiate_s: float = 0.0
    other_s: float = 0.0
    updated: int = 0
    pool: PoolBytes = field(default_factory=lambda: PoolBytes(0, 0))


@dataclass
class MemoryEstimate:
    """What capturing every descriptor would take, from capturing the largest few
    (:meth:`CUDAGraphRunner.estimate_memory`). ``sampled``: how many were captured;
    ``first_bytes``: what the largest took (warm-up included: its temporaries set the pool's
    peak); ``per_token_bytes``: what each later graph took per token of its descriptor (mean
    over the other samples: outputs and whatever is not reused); ``total_bytes``:
    ``first_bytes`` plus ``per_token_bytes`` times the tokens of every other descriptor."""

    graphs: int
    sampled: int
    first_bytes: int
    per_token_bytes: float
    total_bytes: int


def _clear_cublas_workspaces() -> None:
    """Drop torch's cached cuBLAS workspaces (re-made on the next matmul): one made on the
    capture stream during a warm-up or capture lives in the graph pool and would pin it."""
    clear = getattr(rt.bind().torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


def _alias(obj: Any) -> Any:
    """A view of a CUDA tensor (or CuPy array) that does not keep its memory alive."""
    cp = rt.cp
    if isinstance(obj, cp.ndarray):
        mem = cp.cuda.UnownedMemory(obj.data.ptr, max(obj.nbytes, 1), None, obj.device.id)
        return cp.ndarray(obj.shape, obj.dtype, cp.cuda.MemoryPointer(mem, 0), obj.strides)
    torch = rt.bind().torch
    if not isinstance(obj, torch.Tensor) or not obj.is_cuda:
        return obj
    if obj.numel() == 0:
        return obj
    span = 1 + sum((n - 1) * st for n, st in zip(obj.shape, obj.stride()))
    nbytes = span * obj.element_size()
    mem = cp.cuda.UnownedMemory(obj.data_ptr(), nbytes, None, obj.device.index)
    raw = cp.ndarray((nbytes,), cp.uint8, cp.cuda.MemoryPointer(mem, 0))
    flat = torch.from_dlpack(raw).view(obj.dtype)
    return flat.as_strided(obj.shape, obj.stride(), 0)


def _weak_outputs(out: Any) -> Any:
    try:
        from torch.utils import _pytree as pytree
    except ImportError:  # pragma: no cover
        return _alias(out)
    return pytree.tree_map(_alias, out)


class CUDAGraphRunner:
    """Wraps ``fn`` for one runtime mode (FULL or PIECEWISE).

    ``runner(mode, desc, *args, num_tokens=None, **kwargs)``:

    * ``mode`` (a :class:`CUDAGraphMode` or its int value) is NONE or not this runner's mode:
      calls ``fn(*args, **kwargs)`` (a bypass);
    * a graph exists for ``desc``: replays it on the current stream and returns the static
      output of its capture (the same objects every time: clone them to keep a result);
    * otherwise: on lowlevel's capture stream, after the caller's pending work, runs ``fn``
      ``warmup`` times eagerly (compilation, lazy allocations, per-stream state), then captures
      it into a graph for ``desc`` in the runner's pool, replays it and returns its output;
      once :attr:`capturing_enabled` is False this raises RuntimeError.

    ``desc`` must be a :class:`BatchDescriptor` on every path (``TypeError``; the bypass
    included). ``num_tokens`` (the real tokens in the padded batch) must be ``0 <= num_tokens <=
    desc.num_tokens`` (``ValueError``); it only feeds the :attr:`padded_tokens` counter.

    The contract that makes replay correct: ``fn`` reads its inputs from, and writes its
    outputs to, buffers that are the same at every call for a given ``desc`` (e.g. views of
    persistent input buffers). Arguments are passed to ``fn`` only at warm-up and capture.
    Warm-up runs allocate from the runner's pool too, so they reserve nothing outside it.

    ``weak_outputs=True`` (vLLM's choice) lets graphs share the memory of their outputs: an
    output is valid until the next replay of *any* graph of the pool, and the pool then holds
    about one output instead of one per graph. Default False: each graph keeps its own.

    Memory: :meth:`memory` per graph and in total; :meth:`estimate_memory` before capturing;
    :meth:`clear` forgets the graphs (the pool keeps its memory for re-capture);
    :meth:`release` gives every byte back (``torch.cuda.empty_cache()`` then returns torch's
    reserved memory to its level before the captures) and re-captures on the next call,
    updating the kept instantiations in place when the topology is unchanged.

    Counters (plain ints): :attr:`hits`, :attr:`captures`, :attr:`bypasses` (eager runs that
    returned), :attr:`padded_tokens` (the sum
    of ``desc.num_tokens - num_tokens`` over replays that passed ``num_tokens=``).
    Not thread-safe: one runner per thread.
    """

    def __init__(self, fn: Callable[..., Any], runtime_mode: CUDAGraphMode | int = CUDAGraphMode.FULL, *,
                 pool: GraphPool | None = None, warmup: int = 1, weak_outputs: bool = False) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        mode = as_cudagraph_mode(runtime_mode, "runtime_mode", runtime=True)
        if mode not in (CUDAGraphMode.FULL, CUDAGraphMode.PIECEWISE):
            raise ValueError(f"runtime_mode must be FULL or PIECEWISE (a runner wraps graphs), got {mode.name}")
        if pool is not None and not isinstance(pool, GraphPool):
            raise TypeError(f"pool must be a lowlevel.GraphPool or None, got {type(pool).__name__} {pool!r}")
        check_int(warmup, "warmup", 0)
        weak_outputs = check_bool(weak_outputs, "weak_outputs")
        self.fn = fn
        self.runtime_mode = mode
        self._pool = pool
        self.warmup = int(warmup)
        self.weak_outputs = weak_outputs
        self.capturing_enabled = True
        self.graphs: dict[Hashable, tuple[Graph, Any]] = {}
        self._templates: dict[Hashable, Graph] = {}  # released graphs, kept for in-place update
        self.hits = self.captures = self.bypasses = self.padded_tokens = 0
        self.last_capture = CaptureStats()

    @property
    def pool(self) -> GraphPool:
        """The pool every graph of this runner is captured into (created on first capture)."""
        if self._pool is None:
            self._pool = GraphPool()
        return self._pool

    def __call__(self, mode: CUDAGraphMode | int, desc: BatchDescriptor, *args: Any, num_tokens: int | None = None,
                 **kwargs: Any) -> Any:
        if mode is not self.runtime_mode:
            m = as_cudagraph_mode(mode, "mode", runtime=True)
            if m is not self.runtime_mode:
                if not isinstance(desc, BatchDescriptor):
                    raise TypeError(f"desc must be a BatchDescriptor, got {describe(desc)}")
                if num_tokens is not None:
                    self._check_tokens(num_tokens, desc)
                out = self.fn(*args, **kwargs)
                self.bypasses += 1  # calls that ran fn eagerly to the end
                return out
        if type(desc) is not BatchDescriptor and not isinstance(desc, BatchDescriptor):
            # also a plain tuple equal to a key: a named tuple hashes and compares like one
            raise TypeError(f"desc must be a BatchDescriptor, got {describe(desc)}")
        entry = self.graphs.get(desc)
        if entry is None:
            if num_tokens is not None and (type(num_tokens) is not int or not 0 <= num_tokens <= desc.num_tokens):
                num_tokens = self._check_tokens(num_tokens, desc)  # raises unless a NumPy integer in range
            entry = self._capture(desc, args, kwargs)
            rt.order(capture_stream().ptr, rt.current_handle())  # replays follow the warm-up and capture
        else:
            if num_tokens is not None and (type(num_tokens) is not int or not 0 <= num_tokens <= desc.num_tokens):
                num_tokens = self._check_tokens(num_tokens, desc)  # raises unless a NumPy integer in range
            self.hits += 1
        tl = rt.tracer
        if tl is None:
            entry[0].replay()
        else:
            with tl.span(f"graph {desc.num_tokens}"):
                entry[0].replay()
        if num_tokens is not None:
            self.padded_tokens += desc.num_tokens - num_tokens
        return entry[1]

    @staticmethod
    def _check_tokens(num_tokens: Any, desc: Any) -> int:
        if isinstance(num_tokens, bool):
            raise TypeError("num_tokens must be an int or None, got a bool")
        try:
            n = operator.index(num_tokens)
        except TypeError:
            raise TypeError(f"num_tokens must be an int or None, got {type(num_tokens).__name__}") from None
        cap = getattr(desc, "num_tokens", None)
        if n < 0 or (cap is not None and n > cap):
            raise ValueError(f"num_tokens must be in [0, desc.num_tokens={cap}] (a graph pads a batch up, never "
                             f"down), got {n}")
        return n

    # --- capture ------------------------------------------------------------------------------
    def _capture_one(self, desc: Hashable, args: tuple[Any, ...], kwargs: dict[str, Any], pool: GraphPool,
                     template: Graph | None, stats: CaptureStats | None) -> tuple[Graph, Any]:
        """Warm up and capture ``fn`` for ``desc`` on lowlevel's capture stream, into ``pool``."""
        s = capture_stream()
        t0 = time.perf_counter()
        # torch caches one cuBLAS workspace per stream; dropping it here makes this capture's
        # workspace come from ``pool`` (as torch's own capture does), so no graph points into
        # another pool's memory, which that pool's release would free.
        _clear_cublas_workspaces()
        r0, c0 = torch_reserved_bytes(), pool.cupy_bytes()
        rt.order(rt.current_handle(), s.ptr)  # warm up after the caller's pending work ...
        if self.warmup:
            with pool.active(), use_stream(s):  # ... on the capture stream, in the pool
                for _ in range(self.warmup):
                    w = self.fn(*args, **kwargs)
                    del w
        t1 = time.perf_counter()
        with capture(stream=s, pool=pool, update=template) as g:
            out = self.fn(*args, **kwargs)
        if self.weak_outputs:
            out = _weak_outputs(out)  # the graph's own output tensors are freed into the pool here
        g.keep(args, kwargs)
        if not self.weak_outputs:
            g.keep(out)
        g.pool_growth = PoolBytes(torch_reserved_bytes() - r0, pool.cupy_bytes() - c0)
        if stats is not None:
            stats.warmup_s += t1 - t0
            stats.capture_s += g.capture_s
            stats.instantiate_s += g.instantiate_s
            stats.updated += g.updated
        return g, out

    def _capture(self, desc: BatchDescriptor, args: tuple[Any, ...], kwargs: dict[str, Any],
                 stats: CaptureStats | None = None) -> tuple[Graph, Any]:
        if not isinstance(desc, BatchDescriptor):
            raise TypeError(f"desc must be a BatchDescriptor, got {describe(desc)}")
        if not self.capturing_enabled:
            raise RuntimeError(f"no graph was captured for {desc} and capturing is disabled "
                               "(capture it at start-up with capture_all)")
        template = self._templates.pop(desc, None)
        try:
            entry = self._capture_one(desc, args, kwargs, self.pool, template, stats)
        except BaseException:
            if template is not None:
                self._templates[desc] = template  # left as it was: still a template
            raise
        self.graphs[desc] = entry
        self.captures += 1
        return entry

    def _descs(self, dispatcher: Any) -> list[BatchDescriptor]:
        if not isinstance(dispatcher, CudagraphDispatcher):
            raise TypeError(f"dispatcher must be a lowlevel.CudagraphDispatcher, got {type(dispatcher).__name__}")
        if not dispatcher.keys_initialized:
            raise ValueError("the dispatcher has no keys yet, so there is nothing to capture: call "
                             "dispatcher.initialize_cudagraph_keys(mode) before capture_all")
        descs = [d for mode, ds in dispatcher.get_capture_descs() if mode is self.runtime_mode for d in ds]
        if not descs:
            raise ValueError(f"the dispatcher has no {self.runtime_mode.name} keys (its mode is "
                             f"{dispatcher.cudagraph_mode.name}), so this {self.runtime_mode.name} runner has "
                             "nothing to capture")
        return descs

    def capture_all(self, dispatcher: CudagraphDispatcher, make_args: Callable[[BatchDescriptor], tuple[Any, ...]],
                    *, progress: bool = False) -> int:
        """Capture a graph for every descriptor of this runner's mode in
        ``dispatcher.get_capture_descs()`` that has none yet, largest first, into the runner's
        pool. ``make_args(desc)`` returns the positional arguments for ``fn``. ``progress``:
        show a tqdm bar with the pool's running memory (when tqdm is installed). Returns how
        many graphs were captured now; :attr:`last_capture` says where the time went.

        ``ValueError`` when the dispatcher's keys are not initialised or it has no key of this
        runner's mode (nothing to capture), ``TypeError`` for a wrong dispatcher or a
        ``make_args`` that is not callable; nothing changes then."""
        descs = self._descs(dispatcher)
        if not callable(make_args):
            raise TypeError(f"make_args must be callable, got {type(make_args).__name__}")
        progress = check_bool(progress, "progress")
        todo = [d for d in descs if d not in self.graphs]
        if todo:
            require_cuda()
        bar: Any = None
        if progress and todo:
            try:
                from tqdm import tqdm

                bar = tqdm(total=len(todo), desc=f"capturing {self.runtime_mode.name} graphs", unit="graph")
            except ImportError:  # pragma: no cover
                bar = None
        stats = CaptureStats()
        t0 = time.perf_counter()
        was = self.capturing_enabled
        self.capturing_enabled = True
        grown = 0
        try:
            for d in todo:
                g, _ = self._capture(d, tuple(make_args(d)), {}, stats)
                stats.graphs += 1
                grown += g.pool_growth.total
                if bar is not None:
                    bar.set_postfix_str(f"{grown / 2**20:.0f} MiB", refresh=False)
                    bar.update(1)
        finally:
            self.capturing_enabled = was
            if bar is not None:
                bar.close()
            if todo:
                rt.order(capture_stream().ptr, rt.current_handle())  # replays follow the captures
        stats.total_s = time.perf_counter() - t0
        stats.other_s = max(0.0, stats.total_s - stats.warmup_s - stats.capture_s - stats.instantiate_s)
        if self._pool is not None:
            stats.pool = PoolBytes(self._pool.torch_bytes(), self._pool.cupy_bytes())
        self.last_capture = stats
        return stats.graphs

    def estimate_memory(self, dispatcher: CudagraphDispatcher,
                        make_args: Callable[[BatchDescriptor], tuple[Any, ...]], *, sample: int = 2) -> MemoryEstimate:
        """Estimate the pool bytes :meth:`capture_all` would reserve, by capturing the
        ``sample`` largest descriptors into a throwaway pool (then freed; the runner's own
        graphs and counters are untouched), as vLLM sizes its KV cache before capturing: the
        largest graph's growth (warm-up included: it sets the pool's peak), the others'
        growth, and for each remaining descriptor the others' growth per token times its
        tokens (what a graph keeps, its outputs, scales with its batch). Instantiated graphs'
        own device memory is not counted. Errors as :meth:`capture_all`; ``ValueError`` for ``sample < 1``."""
        descs = self._descs(dispatcher)
        if not callable(make_args):
            raise TypeError(f"make_args must be callable, got {type(make_args).__name__}")
        check_int(sample, "sample", 1)
        pool = GraphPool()
        graphs: list[Graph] = []
        growth: list[int] = []
        try:
            for d in descs[:sample]:
                g, out = self._capture_one(d, tuple(make_args(d)), {}, pool, None, None)
                graphs.append(g)
                growth.append(g.pool_growth.total)
                del out
        finally:
            rt.order(capture_stream().ptr, rt.current_handle())
            for g in graphs:
                g.close()
            graphs.clear()
            _clear_cublas_workspaces()  # they may have been allocated in the throwaway pool
            pool.release()
        first = growth[0]
        toks = [max(d.num_tokens, 1) for d in descs]
        if len(growth) > 1:
            per_token = sum(growth[1:]) / sum(toks[1:len(growth)])
        else:
            per_token = first / toks[0]
        total = first + sum(growth[1:]) + int(per_token * sum(toks[len(growth):]))
        return MemoryEstimate(len(descs), len(growth), first, per_token, total)

    # --- memory and lifecycle --------------------------------------------------------------------
    def memory(self) -> dict[str, Any]:
        """Graph memory of this runner: ``graphs`` (count), ``torch_bytes`` and ``cupy_bytes``
        held by its pool now, ``total_bytes``, and ``per_graph``: ``{desc: PoolBytes}`` of what
        each capture (warm-up included) grew the pool by, in capture order."""
        pb = self._pool.memory() if self._pool is not None else PoolBytes(0, 0)
        return {"mode": self.runtime_mode.name, "graphs": len(self.graphs), "torch_bytes": pb.torch,
                "cupy_bytes": pb.cupy, "total_bytes": pb.total,
                "per_graph": {d: g.pool_growth for d, (g, _) in self.graphs.items()}}

    def clear(self) -> None:
        """Forget every graph: free their instantiations, drop their outputs and kept
        arguments. The pool keeps its memory (re-captures reuse it); the next call of a
        descriptor captures again. Counters are kept."""
        for g, _ in self.graphs.values():
            g.close()
        for g in self._templates.values():
            g.close()
        self.graphs.clear()
        self._templates.clear()

    def release(self, *, keep_execs: bool = True) -> None:
        """Give every byte of graph memory back (sleep): drop the graphs' outputs and kept
        arguments, free the pool's torch and CuPy memory (after ``torch.cuda.empty_cache()``
        torch's reserved memory is back where it was before the captures, unless the caller
        still holds an output) and torch's cuBLAS workspaces (which the pool may hold). The
        next call of a descriptor, or :meth:`capture_all`, captures again (wake); with
        ``keep_execs`` (default) the instantiated graphs are kept and updated in place then.

        ``RuntimeError`` (nothing changed) when the pool is shared with graphs of another
        owner that can still be replayed: release those first; ``TypeError`` when ``keep_execs``
        is not a bool."""
        keep_execs = check_bool(keep_execs, "keep_execs")
        pool = self._pool
        if pool is not None:
            mine = {id(g) for g, _ in self.graphs.values()}
            others = [g for g in pool.live_graphs() if id(g) not in mine]
            if others:
                raise RuntimeError(f"this runner's pool also holds {len(others)} live graph(s) of another owner "
                                   "(a runner sharing the pool?); release those first")
        for d, (g, _) in self.graphs.items():
            if keep_execs:
                g.release_memory()
                self._templates[d] = g
            else:
                g.close()
        self.graphs.clear()
        if not keep_execs:
            for g in self._templates.values():
                g.close()
            self._templates.clear()
        if pool is not None:
            _clear_cublas_workspaces()
            pool.release()
