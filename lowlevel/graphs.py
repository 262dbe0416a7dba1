"""CUDA graph capture through CuPy, with memory that stays valid as long as the graph.

``with lowlevel.capture() as g:`` captures what CuPy, torch and Triton enqueue on the capture
stream (current for all three inside the block) into ``g``, a :class:`Graph`. Memory that CuPy
or torch allocate during the capture comes from a :class:`GraphPool` that the graph keeps
alive, so a temporary freed after the capture is never handed to someone else while replays
still write into it (cupy#9655). Streams forked from the capture stream with events (e.g.
:func:`lowlevel.execute_in_parallel`) become parallel branches of the graph.

Ordering: the capture stream first waits for the work enqueued on the caller's current stream
(so the capture may read what was produced before it); :meth:`Graph.replay` enqueues the whole
graph on a stream, ordered like any kernel launch on that stream.

Not capturable: host synchronisation (``torch.cuda.synchronize``, ``.item()``, ``cupy.asnumpy``)
and torch's random number generators (use pre-drawn random buffers).
"""
from __future__ import annotations

import contextlib
import gc
from typing import Any, Iterator

from . import _runtime as rt
from .errors import CaptureError
from .stream import Stream, StreamLike, adopt, use_stream

__all__ = ["Graph", "GraphPool", "capture"]


class GraphPool:
    """Device memory for graphs: a CuPy memory pool and a torch ``MemPool`` that graph captures
    allocate from. Graphs sharing one pool reuse each other's freed temporaries; capture the
    largest first, and never replay two graphs of one pool concurrently. A pool lives as long
    as any graph captured into it (each graph holds a reference)."""

    def __init__(self) -> None:
        rt.bind()
        self.cupy_pool = rt.cp.cuda.MemoryPool()
        import torch

        self.torch_pool = torch.cuda.MemPool()

    @contextlib.contextmanager
    def active(self) -> Iterator["GraphPool"]:
        """Inside the block, route the calling thread's CuPy allocations and *every* thread's
        torch allocations to the pool (torch lets one recorder per pool at a time; a capture
        may have helper threads). Threads that enqueue work into a capture also enter
        :meth:`cupy_active`. One capture at a time per pool."""
        import torch

        begin = getattr(torch._C, "_cuda_beginAllocateToPool", None)
        with self.cupy_active():
            if begin is None:  # pragma: no cover - older torch: this thread only
                with torch.cuda.use_mem_pool(self.torch_pool):
                    yield self
                return
            dev = torch.cuda.current_device()
            begin(dev, self.torch_pool.id)
            try:
                yield self
            finally:
                torch._C._cuda_endAllocateToPool(dev, self.torch_pool.id)
                torch._C._cuda_releasePool(dev, self.torch_pool.id)

    @contextlib.contextmanager
    def cupy_active(self) -> Iterator["GraphPool"]:
        """Route the calling thread's CuPy allocations to the pool inside the block."""
        with rt.cp.cuda.using_allocator(self.cupy_pool.malloc):
            yield self

    def cupy_bytes(self) -> int:
        """Bytes the CuPy side of the pool holds from the device."""
        return int(self.cupy_pool.total_bytes())

    def release_free(self) -> None:
        """Give the pool's unused CuPy blocks back to the device."""
        self.cupy_pool.free_all_blocks()


class Graph:
    """An instantiated CUDA graph. :meth:`replay` launches it; the graph keeps its pool (and
    anything passed as ``keep``) alive."""

    __slots__ = ("_g", "_exec", "pool", "_keep", "__weakref__")

    def __init__(self) -> None:
        self._g: Any = None
        self._exec = 0
        self.pool: GraphPool | None = None
        self._keep: list[Any] = []

    def _set(self, cupy_graph: Any, pool: GraphPool) -> None:
        self._g = cupy_graph
        self._exec = int(getattr(cupy_graph, "graphExec", 0) or 0)
        self.pool = pool

    @property
    def captured(self) -> bool:
        return self._g is not None

    def keep(self, *objs: Any) -> None:
        """Keep ``objs`` (static input/output buffers, events) alive as long as the graph."""
        self._keep.extend(objs)

    def replay(self, stream: StreamLike | None = None) -> None:
        """Enqueue the graph on ``stream`` (default: the current stream)."""
        h = rt.current_handle() if stream is None else rt.stream_handle(stream)
        if self._exec:
            rt.cp.cuda.runtime.graphLaunch(self._exec, h)
        elif self._g is None:
            raise RuntimeError("this graph was never captured (the capture failed or is still open)")
        else:
            self._g.launch(adopt(h).cupy)

    def upload(self, stream: StreamLike | None = None) -> None:
        """Upload the graph to the device ahead of its first replay, on ``stream``."""
        if self._g is None:
            raise RuntimeError("this graph was never captured")
        self._g.upload(adopt(stream if stream is not None else rt.current_handle()).cupy)


_capture_streams: dict[int, Stream] = {}


def _capture_stream() -> Stream:
    """One reusable capture stream per device (the legacy default stream cannot capture)."""
    dev = rt.cp.cuda.runtime.getDevice()
    s = _capture_streams.get(dev)
    if s is None:
        s = _capture_streams[dev] = Stream()
    return s


@contextlib.contextmanager
def capture(stream: StreamLike | None = None, pool: GraphPool | None = None, *,
            mode: str = "relaxed") -> Iterator[Graph]:
    """Capture the work enqueued inside the block into a :class:`Graph` (yielded at entry,
    usable after the block).

    ``stream``: the capture stream (default: a per-device capture stream of lowlevel's; never
    the legacy default stream). ``pool``: a :class:`GraphPool` to allocate from (default: a new
    one, owned by the graph). ``mode``: CUDA's capture mode, ``"relaxed"`` (default: lets the
    pools grow with cudaMalloc during capture), ``"thread_local"`` or ``"global"``.

    If the block raises, or the capture is invalidated by an illegal call, the capture is ended
    and discarded, no stream is left capturing, a pool created here is freed, and
    :class:`~lowlevel.CaptureError` names the cause; the next capture works normally.
    """
    cp = rt.cp
    modes = {"relaxed": cp.cuda.runtime.streamCaptureModeRelaxed,
             "thread_local": cp.cuda.runtime.streamCaptureModeThreadLocal,
             "global": cp.cuda.runtime.streamCaptureModeGlobal}
    if mode not in modes:
        raise ValueError(f"mode must be one of {sorted(modes)}, got {mode!r}")
    if pool is not None and not isinstance(pool, GraphPool):
        raise TypeError(f"pool must be a lowlevel.GraphPool, got {type(pool).__qualname__}")
    s = _capture_stream() if stream is None else adopt(stream)
    if s.ptr in (0, 1, 2):
        raise ValueError("cannot capture on the default stream; pass a stream made with lowlevel.Stream()")
    if s.is_capturing():
        raise CaptureError(f"stream 0x{s.ptr:x} is already capturing")
    own_pool = pool is None
    gpool = GraphPool() if pool is None else pool
    graph = Graph()
    rt.order(rt.current_handle(), s.ptr)  # the capture follows the caller's pending work
    failure: BaseException | None = None
    # No cyclic garbage collection inside the capture: a collected object's destructor (a
    # memory pool returning blocks, say) may call CUDA in ways a capture forbids.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with gpool.active(), use_stream(s):
            s.cupy.begin_capture(modes[mode])
            try:
                yield graph
            except BaseException as exc:
                failure = exc
            cupy_graph = None
            end_error: BaseException | None = None
            try:
                cupy_graph = s.cupy.end_capture()
            except Exception as exc:  # invalidated capture: the end reports it
                end_error = exc
    finally:
        if gc_was_enabled:
            gc.enable()
    if failure is None and end_error is None:
        graph._set(cupy_graph, gpool)
        return
    del cupy_graph
    if own_pool:
        gpool.release_free()
    if failure is not None and not isinstance(failure, Exception):
        raise failure  # KeyboardInterrupt and friends pass through unchanged
    cause = failure if failure is not None else end_error
    where = "an exception in the captured block" if failure is not None else "the capture was invalidated"
    raise CaptureError(f"CUDA graph capture failed ({where}): {type(cause).__name__}: {cause}") from cause
