"""CUDAGraphRunner: replay the graph captured for a batch descriptor, capturing on first use."""
from __future__ import annotations

from typing import Any, Callable, Hashable

from . import _runtime as rt
from .cudagraph_dispatch import BatchDescriptor, CUDAGraphMode, CudagraphDispatcher
from .graphs import Graph, GraphPool, capture
from .stream import Stream, use_stream

__all__ = ["CUDAGraphRunner"]


class CUDAGraphRunner:
    """Wraps ``fn`` for one runtime mode (FULL or PIECEWISE).

    ``runner(mode, desc, *args, **kwargs)``:

    * ``mode`` is NONE or not this runner's mode: calls ``fn(*args, **kwargs)`` (a bypass);
    * a graph exists for ``desc``: replays it on the current stream and returns the static
      output of its capture (the same objects every time: clone them to keep a result);
    * otherwise: runs ``fn`` once eagerly on a side stream (warm-up: compilation, lazy
      allocations), captures it into a graph for ``desc`` in the runner's pool, replays it and
      returns its output; once :attr:`capturing_enabled` is False this raises RuntimeError.

    The contract that makes replay correct: ``fn`` reads its inputs from, and writes its
    outputs to, buffers that are the same at every call for a given ``desc`` (e.g. views of
    persistent input buffers). Arguments are passed to ``fn`` only at warm-up and capture.

    Counters: :attr:`hits`, :attr:`captures`, :attr:`bypasses`, :attr:`padded_tokens` (the sum
    of ``desc.num_tokens - num_tokens`` over replays that passed ``num_tokens=``).
    Not thread-safe: one runner per thread.
    """

    def __init__(self, fn: Callable[..., Any], runtime_mode: CUDAGraphMode = CUDAGraphMode.FULL, *,
                 pool: GraphPool | None = None, warmup: int = 1) -> None:
        if runtime_mode not in (CUDAGraphMode.FULL, CUDAGraphMode.PIECEWISE):
            raise ValueError(f"a runner wraps FULL or PIECEWISE graphs, got {runtime_mode}")
        if not callable(fn):
            raise TypeError("fn must be callable")
        if warmup < 0:
            raise ValueError("warmup must be >= 0")
        self.fn = fn
        self.runtime_mode = runtime_mode
        self._pool = pool
        self.warmup = warmup
        self.capturing_enabled = True
        self.graphs: dict[Hashable, tuple[Graph, Any]] = {}
        self.hits = self.captures = self.bypasses = self.padded_tokens = 0
        self._side: Stream | None = None

    @property
    def pool(self) -> GraphPool:
        """The pool every graph of this runner is captured into (created on first capture)."""
        if self._pool is None:
            self._pool = GraphPool()
        return self._pool

    def __call__(self, mode: CUDAGraphMode, desc: BatchDescriptor, *args: Any, num_tokens: int | None = None,
                 **kwargs: Any) -> Any:
        if mode is not self.runtime_mode:
            self.bypasses += 1
            return self.fn(*args, **kwargs)
        entry = self.graphs.get(desc)
        if entry is None:
            entry = self._capture(desc, args, kwargs)
        else:
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

    def _capture(self, desc: BatchDescriptor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Graph, Any]:
        if not self.capturing_enabled:
            raise RuntimeError(f"no graph was captured for {desc} and capturing is disabled "
                               "(capture it at start-up with capture_all)")
        if self._side is None:
            self._side = Stream()
        cur = rt.current_handle()
        rt.order(cur, self._side.ptr)  # warm up on the side stream, after the caller's work ...
        with use_stream(self._side):
            for _ in range(self.warmup):
                self.fn(*args, **kwargs)
        rt.order(self._side.ptr, cur)  # ... and capture after the warm-up
        with capture(pool=self.pool) as g:
            out = self.fn(*args, **kwargs)
        g.keep(args, kwargs, out)
        self.graphs[desc] = (g, out)
        self.captures += 1
        return self.graphs[desc]

    def capture_all(self, dispatcher: CudagraphDispatcher, make_args: Callable[[BatchDescriptor], tuple[Any, ...]],
                    *, progress: bool = True) -> int:
        """Capture a graph for every descriptor of this runner's mode in
        ``dispatcher.get_capture_descs()``, largest first, into the runner's pool.
        ``make_args(desc)`` returns the positional arguments for ``fn``. Returns how many
        graphs were captured now."""
        descs = [d for mode, ds in dispatcher.get_capture_descs() if mode is self.runtime_mode for d in ds]
        todo = [d for d in descs if d not in self.graphs]
        it: Any = todo
        if progress:
            try:
                from tqdm import tqdm

                it = tqdm(todo, desc=f"capturing {self.runtime_mode} graphs", unit="graph")
            except ImportError:  # pragma: no cover
                pass
        n = 0
        was = self.capturing_enabled
        self.capturing_enabled = True
        try:
            for d in it:
                self._capture(d, tuple(make_args(d)), {})
                n += 1
        finally:
            self.capturing_enabled = was
        return n
