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

Lifecycle: :meth:`Graph.close` frees the instantiated graph, drops the objects it keeps and
frees a pool the graph owns (a graph that is garbage-collected does the same).
:meth:`Graph.release_memory` drops the memory but keeps the instantiated graph as a template:
capturing again with ``capture(update=graph)`` then updates it in place
(``cuGraphExecUpdate``) when the topology is unchanged, which costs less than instantiating.
:meth:`GraphPool.release` gives a pool's memory back to the device.

Workspace aliasing (true of torch's own graphs too): inside a capture, the pool hands a block
that a temporary of the capture freed to the next allocation of the capture. A buffer allocated
after that free shares the temporary's memory, so every replay writes the temporary's values
into it. That is harmless for values the graph itself rewrites after the temporary's last use
(outputs), and wrong for anything meant to keep its contents across replays or to be written
from outside the graph (state, a buffer filled between replays). Allocate such buffers before
the capture, or inside it under :meth:`GraphPool.outside`, which takes them from the
frameworks' ordinary pools.

Not capturable: host synchronisation (``torch.cuda.synchronize``, ``.item()``, ``cupy.asnumpy``)
and torch's random number generators (use pre-drawn random buffers).
"""
from __future__ import annotations

import contextlib
import gc
import time
import weakref
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

from . import _runtime as rt
from .device import require_cuda
from .errors import CaptureError, check_choice, describe
from .stream import Stream, StreamLike, adopt, use_stream

__all__ = ["Graph", "GraphPool", "PoolBytes", "capture", "live_pools"]

CaptureMode = Literal["relaxed", "thread_local", "global"]
_MODE_NAMES: dict[str, str] = {"relaxed": "streamCaptureModeRelaxed",
                               "thread_local": "streamCaptureModeThreadLocal",
                               "global": "streamCaptureModeGlobal"}

_POOLS: weakref.WeakSet[GraphPool] = weakref.WeakSet()


def live_pools() -> list[GraphPool]:
    """Every :class:`GraphPool` of this process that is still alive (for memory reports)."""
    return list(_POOLS)


class PoolBytes(NamedTuple):
    """Device bytes a graph pool holds: ``torch`` in its torch ``MemPool`` (reserved segments),
    ``cupy`` in its CuPy memory pool (used and cached blocks)."""

    torch: int
    cupy: int

    @property
    def total(self) -> int:
        return self.torch + self.cupy


def torch_reserved_bytes() -> int:
    """torch's reserved bytes on the current device (all pools), read without building
    :func:`torch.cuda.memory_stats`' flattened dict."""
    torch = rt.bind().torch
    try:
        return int(torch._C._cuda_memoryStats(torch.cuda.current_device())["reserved_bytes"]["all"]["current"])
    except (AttributeError, KeyError, TypeError):  # pragma: no cover - other torch versions
        return int(torch.cuda.memory_reserved())


class GraphPool:
    """Device memory for graphs: a CuPy memory pool and a torch ``MemPool`` that graph captures
    allocate from. Graphs sharing one pool reuse each other's freed temporaries; capture the
    largest first, and never replay two graphs of one pool concurrently. A pool lives as long
    as any graph captured into it (each graph holds a reference).

    Raises :class:`~lowlevel.CudaUnavailableError` without a usable GPU."""

    def __init__(self) -> None:
        ops = rt.bind()
        self.cupy_pool = rt.cp.cuda.MemoryPool()
        self.torch_pool = ops.torch.cuda.MemPool()
        self._graphs: weakref.WeakSet[Graph] = weakref.WeakSet()
        self._routed_device: int | None = None  # set while active() routes torch allocations here
        _POOLS.add(self)

    @contextlib.contextmanager
    def active(self) -> Iterator[GraphPool]:
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
            pid = self.torch_pool.id
            begin(dev, pid)
            self._routed_device = dev
            try:
                yield self
            finally:
                self._routed_device = None
                torch._C._cuda_endAllocateToPool(dev, pid)
                torch._C._cuda_releasePool(dev, pid)

    @contextlib.contextmanager
    def outside(self) -> Iterator[GraphPool]:
        """Inside a capture into this pool (relaxed mode, the default), take the allocations
        of the block from the frameworks' ordinary pools instead: torch's default caching
        allocator (every thread, as :meth:`active` routes every thread) and CuPy's default
        pool (the calling thread). Such a buffer never shares memory with a temporary the
        capture freed, so replays leave its contents alone; the caller owns it and keeps it
        alive as long as a replay may use it. Kernels launched in the block are still
        captured. Outside a capture the block changes nothing."""
        torch = rt.bind().torch
        routed = self._routed_device
        if routed is not None:
            torch._C._cuda_endAllocateToPool(routed, self.torch_pool.id)
        try:
            with rt.cp.cuda.using_allocator(rt.cp.get_default_memory_pool().malloc):
                yield self
        finally:
            if routed is not None:
                pid = self.torch_pool.id
                torch._C._cuda_beginAllocateToPool(routed, pid)  # routes again; takes a pool reference ...
                torch._C._cuda_releasePool(routed, pid)  # ... which the one taken by active() already holds

    @contextlib.contextmanager
    def cupy_active(self) -> Iterator[GraphPool]:
        """Route the calling thread's CuPy allocations to the pool inside the block."""
        with rt.cp.cuda.using_allocator(self.cupy_pool.malloc):
            yield self

    def cupy_bytes(self) -> int:
        """Bytes the CuPy side of the pool holds from the device (used and cached blocks)."""
        return int(self.cupy_pool.total_bytes())

    def torch_bytes(self) -> int:
        """Bytes the torch side of the pool holds from the device: the sum of its reserved
        segments, from the allocator's snapshot of this pool (costs about a millisecond)."""
        return sum(seg["total_size"] for seg in self._torch_segments())

    def torch_used_bytes(self) -> int:
        """Bytes of the torch side in live tensors (graph outputs, kept buffers)."""
        return sum(seg["allocated_size"] for seg in self._torch_segments())

    def _torch_segments(self) -> list[dict[str, Any]]:
        torch = rt.bind().torch
        pid = tuple(self.torch_pool.id)
        segs: Any = None
        for args, kw in (((pid,), {"include_traces": False}), ((pid,), {}), ((), {})):
            try:
                segs = torch.cuda.memory_snapshot(*args, **kw)
                break
            except TypeError:  # pragma: no cover - older signatures: filter all segments below
                continue
        if isinstance(segs, dict):  # pragma: no cover - snapshot dicts of some versions
            segs = segs.get("segments", [])
        return [s for s in segs or () if tuple(s.get("segment_pool_id", ())) == pid]

    def memory(self) -> PoolBytes:
        """:class:`PoolBytes` (torch, cupy) this pool holds now."""
        return PoolBytes(self.torch_bytes(), self.cupy_bytes())

    def live_graphs(self) -> list[Graph]:
        """Graphs captured into this pool that can still be replayed."""
        return [g for g in self._graphs if g._exec]

    def release_free(self) -> None:
        """Give the pool's unused CuPy blocks back to the device."""
        self.cupy_pool.free_all_blocks()

    def release(self) -> None:
        """Give all of the pool's memory back to the device: CuPy blocks now, torch segments
        now for the free ones and at the next ``torch.cuda.empty_cache()`` for blocks still
        held by tensors that are dropped later. The pool stays usable (later captures get
        fresh memory). ``RuntimeError`` if a graph captured into it can still be replayed
        (close or release those first: their replays would write into freed memory)."""
        live = self.live_graphs()
        if live:
            raise RuntimeError(f"{len(live)} graph(s) captured into this pool can still be replayed; "
                               "close() or release_memory() them before releasing the pool")
        torch = rt.bind().torch
        self.cupy_pool.free_all_blocks()
        self.torch_pool = torch.cuda.MemPool()  # the old MemPool frees its free segments when dropped


class _Exec:
    """Owns one instantiated graph handle (``cudaGraphExec_t``); destroyed once."""

    __slots__ = ("handle",)

    def __init__(self) -> None:
        self.handle = 0

    def destroy(self) -> None:
        h, self.handle = self.handle, 0
        if h:
            try:
                rt.cp.cuda.runtime.graphExecDestroy(h)
            except Exception:  # pragma: no cover - CUDA context already torn down
                pass


_exec_update: Any = None


def _exec_updater() -> Any:
    """``update(exec, graph) -> bool``: update the instantiated ``exec`` in place from the
    captured ``graph``; False when CUDA refuses (other topology, other kernels). None when
    cuda.bindings is missing. The driver API is used so that a refusal leaves no "last error"
    behind in the runtime that torch checks after its launches. Resolved once."""
    global _exec_update
    if _exec_update is None:
        try:
            from cuda.bindings import driver
        except ImportError:  # pragma: no cover - cuda.bindings not installed
            try:
                from cuda import cuda as driver
            except ImportError:
                _exec_update = False
                return None
        ok = driver.CUresult.CUDA_SUCCESS
        call = driver.cuGraphExecUpdate

        def update(e: int, g: int) -> bool:
            try:
                res = call(e, g)
            except Exception:  # pragma: no cover - binding mismatch: instantiate instead
                return False
            return (res[0] if isinstance(res, tuple) else res) == ok

        _exec_update = update
    return _exec_update or None


class Graph:
    """An instantiated CUDA graph. :meth:`replay` launches it; the graph keeps its pool (and
    anything passed as ``keep``) alive until :meth:`close`.

    After a capture, ``updated`` tells whether it updated an earlier instantiation in place,
    ``capture_s`` is the host time of the captured block and ``instantiate_s`` that of the
    instantiation (or update); ``pool_growth`` is the :class:`PoolBytes` the pool grew by."""

    __slots__ = ("_exec", "_box", "pool", "_owns_pool", "_keep", "_fin", "updated", "capture_s",
                 "instantiate_s", "pool_growth", "__weakref__")

    def __init__(self) -> None:
        self._exec = 0
        self._box = _Exec()
        self.pool: GraphPool | None = None
        self._owns_pool = False
        self._keep: list[Any] = []
        self._fin: Any = None
        self.updated = False
        self.capture_s = 0.0
        self.instantiate_s = 0.0
        self.pool_growth = PoolBytes(0, 0)

    def _install(self, cgraph: int, pool: GraphPool, owns_pool: bool) -> None:
        """Make the captured ``cgraph`` (a ``cudaGraph_t``, still owned by the caller) this
        graph's executable: update the old one in place when CUDA allows, else instantiate."""
        old = self._box.handle
        update = _exec_updater() if old else None
        t0 = time.perf_counter()
        if update is not None and update(old, cgraph):
            self.updated = True
        else:
            new = rt.cp.cuda.runtime.graphInstantiate(cgraph)
            self._box.destroy()
            self._box.handle = new
            self.updated = False
        self.instantiate_s = time.perf_counter() - t0
        if self._fin is None:
            self._fin = weakref.finalize(self, self._box.destroy)
            self._fin.atexit = False  # the process exit frees the device anyway
        if self.pool is not None and self.pool is not pool:
            self.pool._graphs.discard(self)
        self.pool = pool
        self._owns_pool = owns_pool
        pool._graphs.add(self)
        self._exec = self._box.handle

    @property
    def captured(self) -> bool:
        """True while the graph can be replayed (captured, not closed or released)."""
        return bool(self._exec)

    def keep(self, *objs: Any) -> None:
        """Keep ``objs`` (static input/output buffers, events) alive as long as the graph."""
        self._keep.extend(objs)

    def replay(self, stream: StreamLike | None = None) -> None:
        """Enqueue the graph on ``stream`` (default: the current stream). ``RuntimeError`` if
        the graph was never captured, or was closed or released."""
        e = self._exec
        if not e:
            raise RuntimeError("this graph cannot be replayed: it was never captured, or it was closed or "
                               "its memory released (capture it again)")
        rt.cp.cuda.runtime.graphLaunch(e, rt.current_handle() if stream is None else rt.stream_handle(stream))

    def upload(self, stream: StreamLike | None = None) -> None:
        """Upload the graph to the device ahead of its first replay, on ``stream``."""
        if not self._exec:
            raise RuntimeError("this graph was never captured (or was closed)")
        rt.cp.cuda.runtime.graphUpload(self._exec, rt.current_handle() if stream is None else rt.stream_handle(stream))

    def release_memory(self) -> None:
        """Drop the kept objects and the pool (so that the pool can be released) but keep the
        instantiated graph as a template: ``capture(update=this)`` then updates it in place.
        The graph cannot be replayed until captured again."""
        self._exec = 0
        self._keep = []
        pool, self.pool = self.pool, None
        if pool is not None:
            pool._graphs.discard(self)
            if self._owns_pool:
                pool.release()
        self._owns_pool = False

    def close(self) -> None:
        """Free everything: the instantiated graph, the kept objects, and the pool if the graph
        owns it (made by :func:`capture` without ``pool=``). Idempotent."""
        self.release_memory()
        self._box.destroy()


_capture_streams: dict[int, Stream] = {}


def capture_stream() -> Stream:
    """One reusable capture stream per device (the legacy default stream cannot capture)."""
    dev = rt.cp.cuda.runtime.getDevice()
    s = _capture_streams.get(dev)
    if s is None:
        s = _capture_streams[dev] = Stream()
    return s


def _check_capture_args(stream: Any, pool: Any, mode: Any, update: Any) -> None:
    check_choice(mode, "mode", CaptureMode)
    if stream is not None:
        try:
            rt.stream_handle(stream)  # TypeError / ValueError for what is no stream, GPU or not
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"stream must be a CUDA stream or None ({exc}), got {describe(stream)}") from None
    if pool is not None and not isinstance(pool, GraphPool):
        raise TypeError(f"pool must be a lowlevel.GraphPool or None, got {type(pool).__qualname__}")
    if update is not None and not isinstance(update, Graph):
        raise TypeError(f"update must be a lowlevel.Graph or None, got {type(update).__qualname__}")


@contextlib.contextmanager
def capture(stream: StreamLike | None = None, pool: GraphPool | None = None, *,
            mode: CaptureMode = "relaxed", update: Graph | None = None) -> Iterator[Graph]:
    """Capture the work enqueued inside the block into a :class:`Graph` (yielded at entry,
    usable after the block).

    ``stream``: the capture stream (default: a per-device capture stream of lowlevel's; never
    the legacy default stream). ``pool``: a :class:`GraphPool` to allocate from (default: a new
    one, owned by the graph). ``mode``: CUDA's capture mode, ``"relaxed"`` (default: lets the
    pools grow with cudaMalloc during capture), ``"thread_local"`` or ``"global"``.
    ``update``: a graph captured before (possibly released with :meth:`Graph.release_memory`);
    it is yielded and re-captured in place, its instantiation updated when CUDA accepts the
    new capture as the same topology (``update.updated`` is then True), else instantiated anew.

    If the block raises, or the capture is invalidated by an illegal call, the capture is ended
    and discarded, no stream is left capturing, a pool created here is freed, ``update`` is left
    as it was, and :class:`~lowlevel.CaptureError` names the cause; the next capture works
    normally. :class:`~lowlevel.CudaUnavailableError` without a usable GPU; ``ValueError`` /
    ``TypeError`` for a bad ``mode`` / ``pool`` / ``update``.
    """
    _check_capture_args(stream, pool, mode, update)
    require_cuda()
    cp = rt.cp
    s = capture_stream() if stream is None else adopt(stream)
    if s.ptr in (0, 1, 2):
        raise ValueError("cannot capture on the default stream; pass a stream made with lowlevel.Stream()")
    if s.is_capturing():
        raise CaptureError(f"stream 0x{s.ptr:x} is already capturing")
    own_pool = pool is None
    gpool = GraphPool() if pool is None else pool
    graph = Graph() if update is None else update
    old_keep, graph._keep = graph._keep, []
    rt.order(rt.current_handle(), s.ptr)  # the capture follows the caller's pending work
    runtime = cp.cuda.runtime
    failure: BaseException | None = None
    end_error: BaseException | None = None
    cgraph = 0
    funcargs: Any = None
    t_reserved = torch_reserved_bytes()
    c_held = gpool.cupy_bytes()
    # No cyclic garbage collection inside the capture: a collected object's destructor (a
    # memory pool returning blocks, say) may call CUDA in ways a capture forbids.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with gpool.active(), use_stream(s):
            cs = s.cupy
            cs.begin_capture(getattr(runtime, _MODE_NAMES[mode]))
            t0 = time.perf_counter()
            try:
                yield graph
            except BaseException as exc:
                failure = exc
            t1 = time.perf_counter()
            funcargs = getattr(cs, "_graph_host_funcargs", None)  # CuPy host callbacks of the capture
            if funcargs is not None:
                cs._graph_host_funcargs = None
            try:
                cgraph = runtime.streamEndCapture(s.ptr)
            except Exception as exc:  # invalidated capture: the end reports it
                end_error = exc
    finally:
        if gc_was_enabled:
            gc.enable()
    stage = "the capture was invalidated"
    if failure is None and end_error is None:
        try:
            graph._install(cgraph, gpool, own_pool)
        except Exception as exc:
            end_error, stage = exc, "instantiation failed"
        finally:
            runtime.graphDestroy(cgraph)
            cgraph = 0
    if failure is None and end_error is None:
        graph.capture_s = t1 - t0
        graph.pool_growth = PoolBytes(torch_reserved_bytes() - t_reserved, gpool.cupy_bytes() - c_held)
        if funcargs:
            graph._keep.append(funcargs)
        return
    if cgraph:
        runtime.graphDestroy(cgraph)
    graph._keep = old_keep
    if own_pool:
        gpool.release_free()
    if failure is not None and not isinstance(failure, Exception):
        raise failure  # KeyboardInterrupt and friends pass through unchanged
    cause = failure if failure is not None else end_error
    where = "an exception in the captured block" if failure is not None else stage
    raise CaptureError(f"CUDA graph capture failed ({where}): {type(cause).__name__}: {cause}") from cause
