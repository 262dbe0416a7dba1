"""Microbatch overlap (dual-batch overlap): microbatches that take turns on a compute stream and
a communication stream, so one microbatch's communication runs under another's compute.

Two runtimes over the same streams and events:

* threads (vLLM-compatible): one thread per microbatch; :func:`make_ubatch_contexts` returns
  :class:`UBatchContext` objects that pass a CPU token around a ring, so exactly one
  microbatch thread runs Python at a time. Code inside a microbatch calls the module helpers
  (:func:`dbo_yield`, :func:`dbo_yield_and_switch_from_compute_to_comm`, ...), which do nothing
  outside a microbatch thread.
* generators (no threads): each microbatch is a generator that yields :data:`TO_COMM`,
  :data:`TO_COMPUTE` or :data:`YIELD` at its switch points; :func:`run_generators` steps them in
  turn on the calling thread.

Ordering at a switch from compute to comm (and mirrored): the microbatch's compute work so far
is captured by an event on the compute stream, and the comm stream waits on it before the
microbatch's next comm work. Streams are not ordered otherwise, so microbatches must not read
each other's data.

Abort: an exception in one microbatch wakes the others, which raise :class:`UBatchAbort` at
their next switch point; the runner restores the streams and re-raises the first exception.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Generator, Iterable, Sequence

from .errors import LowlevelError, check_int
from .event import Event, _order
from . import stream as _st
from . import timeline as _timeline
from .stream import Stream, StreamLike, adopt

__all__ = [
    "UBatchAbort", "UBatchContext", "make_ubatch_contexts", "run_generators", "TO_COMM", "TO_COMPUTE", "YIELD",
    "dbo_enabled", "dbo_current_ubatch_id", "dbo_yield", "dbo_yield_and_switch_from_compute_to_comm",
    "dbo_yield_and_switch_from_comm_to_compute", "dbo_switch_to_comm", "dbo_switch_to_compute",
    "dbo_switch_to_comm_sync", "dbo_switch_to_compute_sync", "dbo_register_recv_hook", "dbo_maybe_run_recv_hook",
    "active_ubatch_contexts", "thread_fn_from_generator",
]

TO_COMM = "to_comm"
TO_COMPUTE = "to_compute"
YIELD = "yield"


class UBatchAbort(LowlevelError):
    """Raised inside a microbatch when another microbatch of the same step failed."""


# The stream switches (the CPU tests replace these names with logging fakes).
_switch = _st._make_current
_save = _st._save_current
_restore = _st._restore_current


def _join(comm: Stream, compute: Stream) -> None:
    """Order later work on ``compute`` after everything enqueued on ``comm``."""
    _order(comm.ptr, compute.ptr)


class _Baton:
    """A microbatch's turn to run Python: ``set`` gives it (again: no effect), ``take`` waits for
    it and takes it back in one step. A bare lock, so that a hand-over between threads costs one
    futex wake-up rather than ``threading.Event``'s condition-variable machinery."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:  # already given and not taken yet
            pass

    def take(self, timeout: float) -> bool:
        return self._lock.acquire(True, timeout)


class _Ring:
    def __init__(self, n: int) -> None:
        self.cpu_events = [_Baton() for _ in range(n)]
        self.abort = threading.Event()
        self.error: BaseException | None = None
        self.contexts: list[UBatchContext] = []


# thread id -> context of the microbatch running on that thread (see active_ubatch_contexts)
_THREAD_CTX: dict[int, "UBatchContext"] = {}
_registry_lock = threading.Lock()


def active_ubatch_contexts() -> dict[int, "UBatchContext"]:
    """A copy of the live registry: thread id -> the microbatch context running on it."""
    with _registry_lock:
        return dict(_THREAD_CTX)


class UBatchContext:
    """One microbatch's view of the ring: its id, the shared compute and comm streams, and its
    events. Enter it on the microbatch's own thread; it waits for its turn on entry."""

    POLL_S = 0.05

    def __init__(self, ubatch_id: int, ring: _Ring, compute: Stream, comm: Stream,
                 ready_barrier: threading.Barrier | None, timeout_s: float | None) -> None:
        self.id = ubatch_id
        self._ring = ring
        self.compute_stream = compute
        self.comm_stream = comm
        self._barrier = ready_barrier
        self._timeout = timeout_s
        self.gpu_compute_done = Event()
        self.gpu_comm_done = Event()
        self.recv_hook: Callable[[], Any] | None = None
        self._current = compute
        self._prev: tuple[Any, Any] | None = None
        self._span: Any = None
        self._stage = 0

    # --- timeline: one span per stage (between two switch points), when a Timeline is active ---
    def _open(self) -> None:
        tl = _timeline._ACTIVE
        if tl is not None:
            self._span = tl.span(f"ub{self.id}.{self._stage}", self._current)
            self._span.__enter__()
        self._stage += 1

    def _close(self) -> None:
        if self._span is not None:
            self._span.__exit__(None, None, None)
            self._span = None

    # --- entry and exit ------------------------------------------------------------------------
    def __enter__(self) -> "UBatchContext":
        with _registry_lock:
            _THREAD_CTX[threading.get_ident()] = self
        self._prev = _save()
        try:
            if self._barrier is not None:
                self._barrier.wait(self._timeout)
            self._wait_turn()
        except BaseException:
            self._unregister()
            raise
        self._current = self.compute_stream
        _switch(self.compute_stream)
        self._open()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        ring = self._ring
        try:
            if exc is None:
                self.maybe_run_recv_hook()
                # Join the comm stream back into compute from this thread, the one whose events
                # brought the comm stream into the work (and into a capture, when capturing).
                _join(self.comm_stream, self.compute_stream)
        finally:
            self._close()
            self._unregister()
            if self._prev is not None:
                _restore(self._prev)
            if exc is not None or ring.abort.is_set():
                if exc is not None and not isinstance(exc, UBatchAbort) and ring.error is None:
                    ring.error = exc
                ring.abort.set()
                for ev in ring.cpu_events:  # wake everyone: they see the abort and stop
                    ev.set()
            else:
                ring.cpu_events[(self.id + 1) % len(ring.cpu_events)].set()

    def _unregister(self) -> None:
        with _registry_lock:
            if _THREAD_CTX.get(threading.get_ident()) is self:
                del _THREAD_CTX[threading.get_ident()]

    def _wait_turn(self) -> None:
        baton, ring = self._ring.cpu_events[self.id], self._ring
        waited = 0.0
        while not baton.take(self.POLL_S):
            waited += self.POLL_S
            if ring.abort.is_set():
                break
            if self._timeout is not None and waited >= self._timeout:
                ring.abort.set()
                raise UBatchAbort(f"microbatch {self.id} waited {self._timeout} s for its turn")
        if ring.abort.is_set():
            raise UBatchAbort(f"microbatch {self.id} stopped: another microbatch failed")

    def _cpu_yield(self) -> None:
        ring = self._ring
        ring.cpu_events[(self.id + 1) % len(ring.cpu_events)].set()
        self._wait_turn()

    # --- switch points -------------------------------------------------------------------------
    def yield_(self) -> None:
        """Let the next microbatch run Python; resume on the same stream."""
        self._close()
        s = self._current
        self._cpu_yield()
        _switch(s)
        self._open()

    def yield_and_switch_from_compute_to_comm(self) -> None:
        """Record this microbatch's compute work, let the next microbatch run, then continue on
        the comm stream after that compute work."""
        self._close()
        self.gpu_compute_done.record(self.compute_stream)
        self._cpu_yield()
        self._to(self.comm_stream, self.gpu_compute_done)

    def yield_and_switch_from_comm_to_compute(self) -> None:
        """Record this microbatch's comm work, let the next microbatch run, then continue on the
        compute stream after that comm work."""
        self._close()
        self.gpu_comm_done.record(self.comm_stream)
        self._cpu_yield()
        self._to(self.compute_stream, self.gpu_comm_done)

    def switch_to_comm_sync(self) -> None:
        """Continue on the comm stream, after this microbatch's compute work (no CPU yield)."""
        self._close()
        self.gpu_compute_done.record(self.compute_stream)
        self._to(self.comm_stream, self.gpu_compute_done)

    def switch_to_compute_sync(self) -> None:
        """Continue on the compute stream, after this microbatch's comm work (no CPU yield)."""
        self._close()
        self.gpu_comm_done.record(self.comm_stream)
        self._to(self.compute_stream, self.gpu_comm_done)

    def switch_to_comm(self) -> None:
        """Continue on the comm stream with no ordering against the compute stream."""
        self._close()
        self._current = self.comm_stream
        _switch(self.comm_stream)
        self._open()

    def switch_to_compute(self) -> None:
        """Continue on the compute stream with no ordering against the comm stream."""
        self._close()
        self._current = self.compute_stream
        _switch(self.compute_stream)
        self._open()

    def _to(self, s: Stream, after: Event) -> None:
        self._current = s
        _switch(s)
        after.wait(s)
        self._open()

    # --- receive hooks -------------------------------------------------------------------------
    def register_recv_hook(self, hook: Callable[[], Any]) -> None:
        """Hand ``hook`` to the next microbatch, which runs it at its next
        :meth:`maybe_run_recv_hook` (or when it finishes)."""
        ring = self._ring
        ring.contexts[(self.id + 1) % len(ring.contexts)].recv_hook = hook

    def maybe_run_recv_hook(self) -> None:
        hook, self.recv_hook = self.recv_hook, None
        if hook is not None:
            hook()


def make_ubatch_contexts(num_micro_batches: int, compute_stream: StreamLike, comm_stream: StreamLike,
                         ready_barrier: threading.Barrier | None = None, *,
                         timeout_s: float | None = None) -> list[UBatchContext]:
    """``num_micro_batches`` (>= 2) contexts sharing one compute and one comm stream. Context
    ``i`` runs after context ``i - 1`` yields. ``ready_barrier`` (for n threads plus the
    launching thread) lets the launcher know every thread is parked before it starts the ring
    with :func:`start`; ``timeout_s`` bounds every wait."""
    check_int(num_micro_batches, "num_micro_batches", 2)
    compute, comm = adopt(compute_stream), adopt(comm_stream)
    if compute.ptr == comm.ptr:
        raise ValueError("the compute and comm streams must differ")
    ring = _Ring(num_micro_batches)
    ring.contexts = [UBatchContext(i, ring, compute, comm, ready_barrier, timeout_s) for i in range(num_micro_batches)]
    return list(ring.contexts)


def start(contexts: Sequence[UBatchContext]) -> None:
    """Give the CPU token to microbatch 0."""
    contexts[0]._ring.cpu_events[0].set()


def first_error(contexts: Sequence[UBatchContext]) -> BaseException | None:
    return contexts[0]._ring.error


# --- module helpers: no-ops outside a microbatch thread ---------------------------------------

def _ctx() -> UBatchContext | None:
    return _THREAD_CTX.get(threading.get_ident())


def dbo_enabled() -> bool:
    """True while any microbatch thread is running."""
    return bool(_THREAD_CTX)


def dbo_current_ubatch_id() -> int:
    """The calling microbatch's id; 0 outside a microbatch thread."""
    c = _ctx()
    return 0 if c is None else c.id


def _helper(name: str) -> Callable[[], None]:
    def f() -> None:
        c = _ctx()
        if c is not None:
            getattr(c, name)()
    f.__name__ = f"dbo_{name.rstrip('_')}"
    f.__doc__ = f"``UBatchContext.{name}`` of the calling microbatch; nothing outside one."
    return f


dbo_yield = _helper("yield_")
dbo_yield_and_switch_from_compute_to_comm = _helper("yield_and_switch_from_compute_to_comm")
dbo_yield_and_switch_from_comm_to_compute = _helper("yield_and_switch_from_comm_to_compute")
dbo_switch_to_comm = _helper("switch_to_comm")
dbo_switch_to_compute = _helper("switch_to_compute")
dbo_switch_to_comm_sync = _helper("switch_to_comm_sync")
dbo_switch_to_compute_sync = _helper("switch_to_compute_sync")
dbo_maybe_run_recv_hook = _helper("maybe_run_recv_hook")


def dbo_register_recv_hook(hook: Callable[[], Any]) -> None:
    """Hand ``hook`` to the next microbatch; outside a microbatch thread, nothing."""
    c = _ctx()
    if c is not None:
        c.register_recv_hook(hook)


def thread_fn_from_generator(gen_fn: Callable[..., Generator[str, None, Any]]) -> Callable[..., Any]:
    """Turn a generator-style microbatch (yielding TO_COMM / TO_COMPUTE / YIELD) into a
    thread-style one that calls the matching ``dbo_*`` helper at each marker, so one body serves
    both runtimes (and, run outside a microbatch thread, runs sequentially on one stream)."""
    actions = {TO_COMM: dbo_yield_and_switch_from_compute_to_comm,
               TO_COMPUTE: dbo_yield_and_switch_from_comm_to_compute, YIELD: dbo_yield}

    def run(*args: Any) -> Any:
        g = gen_fn(*args)
        try:
            while True:
                marker = next(g)
                act = actions.get(marker)
                if act is None:
                    raise ValueError(f"microbatch yielded {marker!r}; expected TO_COMM, TO_COMPUTE or YIELD")
                act()
        except StopIteration as stop:
            return stop.value
    return run


# --- generators -----------------------------------------------------------------------------------

def run_generators(gens: Iterable[Generator[str, None, Any]], compute_stream: StreamLike,
                   comm_stream: StreamLike, *, stage_offset: int = 1) -> list[Any]:
    """Step microbatch generators in turn on the calling thread; return their return values.

    A generator yields :data:`TO_COMM`, :data:`TO_COMPUTE` or :data:`YIELD` at a switch point.
    Microbatch ``i`` starts once microbatch 0 has taken ``i * stage_offset`` steps; then they
    take one step each in turn. Streams and events are as in the thread runtime; the calling
    thread's current streams are restored at the end, and the comm stream is joined into the
    compute stream. An exception in one generator closes the others and propagates."""
    check_int(stage_offset, "stage_offset", 0)
    gs = list(gens)
    n = len(gs)
    compute, comm = adopt(compute_stream), adopt(comm_stream)
    on: list[Stream] = [compute] * n
    pending: list[Event | None] = [None] * n  # event the microbatch's stream must wait on at resume
    done_ev = [(Event(), Event()) for _ in range(n)]  # (compute done, comm done)
    results: list[Any] = [None] * n
    finished = [False] * n
    started = [False] * n
    steps = [0] * n  # steps each microbatch has taken
    prev = _save()
    try:
        while not all(finished):
            for i in range(n):
                if finished[i]:
                    continue
                if not started[i]:
                    if i and steps[0] < i * stage_offset and not finished[0]:
                        continue
                    started[i] = True
                s = on[i]
                _switch(s)
                if pending[i] is not None:
                    pending[i].wait(s)  # type: ignore[union-attr]
                    pending[i] = None
                tl = _timeline._ACTIVE
                try:
                    if tl is None:
                        marker = next(gs[i])
                    else:
                        with tl.span(f"ub{i}.{steps[i]}", s):
                            marker = next(gs[i])
                    steps[i] += 1
                except StopIteration as stop:
                    results[i] = stop.value
                    finished[i] = True
                    continue
                if marker == TO_COMM:
                    pending[i] = done_ev[i][0].record(compute)
                    on[i] = comm
                elif marker == TO_COMPUTE:
                    pending[i] = done_ev[i][1].record(comm)
                    on[i] = compute
                elif marker != YIELD:
                    raise ValueError(f"microbatch {i} yielded {marker!r}; expected TO_COMM, TO_COMPUTE or YIELD")
    except BaseException:
        for g in gs:
            g.close()
        raise
    finally:
        _restore(prev)
        _join(comm, compute)
    return results
