"""The thread runtime of microbatch overlap: microbatch threads that take turns on a ring.

:func:`make_ubatch_contexts` returns one :class:`UBatchContext` per microbatch thread. A CPU
turn (a :class:`Baton`) goes around the ring, so exactly one microbatch thread runs Python at a
time; at a switch point a microbatch hands the turn on and continues on the compute or the
comm stream. Code inside a microbatch reaches its context through the ``dbo_*`` helpers of
:mod:`lowlevel.ubatching`.

Ordering at a switch from compute to comm (and mirrored): the microbatch's compute work so far
is captured by an event on the compute stream, and the comm stream waits on it before the
microbatch's next comm work. Streams are not ordered otherwise, so microbatches must not read
each other's data. On a normal exit each microbatch joins the comm stream back into compute.

Abort: an exception in one microbatch wakes the others, which raise :class:`UBatchAbort` at
their next switch point; :func:`first_ubatch_error` gives the exception that started it.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from . import _runtime as rt
from .errors import LowlevelError, check_int, check_timeout, describe
from .event import Event
from .stream import Stream, StreamLike, adopt_arg

__all__ = ["UBatchAbort", "UBatchContext", "make_ubatch_contexts", "start_ubatches", "first_ubatch_error",
           "abort_ubatches",
           "active_ubatch_contexts", "any_ubatch_active", "current_ubatch_context"]


class UBatchAbort(LowlevelError):
    """Raised inside a microbatch when another microbatch of the same step failed."""


class Baton:
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
    """The shared state of one set of microbatch contexts: a turn per microbatch, the abort
    flag and the first error."""

    def __init__(self, n: int) -> None:
        self.cpu_events = [Baton() for _ in range(n)]
        self.abort = threading.Event()
        self.error: BaseException | None = None
        self.contexts: list[UBatchContext] = []


# thread id -> context of the microbatch running on that thread (see active_ubatch_contexts)
_THREAD_CTX: dict[int, UBatchContext] = {}
_registry_lock = threading.Lock()


def active_ubatch_contexts() -> dict[int, UBatchContext]:
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
        tl = rt.tracer
        if tl is not None:
            self._span = tl.span(f"ub{self.id}.{self._stage}", self._current)
            self._span.__enter__()
        self._stage += 1

    def _close(self) -> None:
        if self._span is not None:
            self._span.__exit__(None, None, None)
            self._span = None

    # --- entry and exit ------------------------------------------------------------------------
    def __enter__(self) -> UBatchContext:
        with _registry_lock:
            _THREAD_CTX[threading.get_ident()] = self
        self._prev = rt.save()
        try:
            if self._barrier is not None:
                self._barrier.wait(self._timeout)
            self._wait_turn()
        except BaseException:
            self._unregister()
            raise
        self._current = self.compute_stream
        rt.make_current(self.compute_stream)
        self._open()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        ring = self._ring
        try:
            if exc is None:
                self.maybe_run_recv_hook()
                # Join the comm stream back into compute from this thread, the one whose events
                # brought the comm stream into the work (and into a capture, when capturing).
                rt.order(self.comm_stream.ptr, self.compute_stream.ptr)
        finally:
            self._close()
            self._unregister()
            if self._prev is not None:
                rt.restore(self._prev)
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
        rt.make_current(s)
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
        rt.make_current(self.comm_stream)
        self._open()

    def switch_to_compute(self) -> None:
        """Continue on the compute stream with no ordering against the comm stream."""
        self._close()
        self._current = self.compute_stream
        rt.make_current(self.compute_stream)
        self._open()

    def _to(self, s: Stream, after: Event) -> None:
        self._current = s
        rt.make_current(s)
        after.wait(s)
        self._open()

    # --- receive hooks -------------------------------------------------------------------------
    def register_recv_hook(self, hook: Callable[[], Any]) -> None:
        """Hand ``hook`` to the next microbatch, which runs it at its next
        :meth:`maybe_run_recv_hook` (or when it finishes). ``TypeError`` if it is not callable."""
        if not callable(hook):
            raise TypeError(f"hook must be callable, got {describe(hook)}")
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
    with :func:`start_ubatches`; ``timeout_s`` (finite, positive seconds, or None) bounds every
    wait. Bad arguments raise ``TypeError`` / ``ValueError`` naming them."""
    num_micro_batches = check_int(num_micro_batches, "num_micro_batches", 2)
    timeout_s = check_timeout(timeout_s, "timeout_s")
    if ready_barrier is not None and not isinstance(ready_barrier, threading.Barrier):
        raise TypeError(f"ready_barrier must be a threading.Barrier or None, got {describe(ready_barrier)}")
    compute, comm = adopt_arg(compute_stream, "compute_stream"), adopt_arg(comm_stream, "comm_stream")
    if compute.ptr == comm.ptr:
        raise ValueError("the compute and comm streams must differ")
    ring = _Ring(num_micro_batches)
    ring.contexts = [UBatchContext(i, ring, compute, comm, ready_barrier, timeout_s) for i in range(num_micro_batches)]
    return list(ring.contexts)


def _ring_of(contexts: Any) -> _Ring:
    if isinstance(contexts, (str, bytes)) or not isinstance(contexts, Sequence) or not contexts:
        raise TypeError(f"contexts must be the non-empty list make_ubatch_contexts returned, got {describe(contexts)}")
    c = contexts[0]
    if not isinstance(c, UBatchContext):
        raise TypeError(f"contexts[0] must be a UBatchContext, got {describe(c)}")
    return c._ring


def start_ubatches(contexts: Sequence[UBatchContext]) -> None:
    """Give the CPU turn to microbatch 0 of ``contexts`` (once every thread is parked in its
    context's entry)."""
    _ring_of(contexts).cpu_events[0].set()


def first_ubatch_error(contexts: Sequence[UBatchContext]) -> BaseException | None:
    """The exception that aborted the ring of ``contexts`` (the first microbatch error), or None."""
    return _ring_of(contexts).error


def abort_ubatches(contexts: Sequence[UBatchContext]) -> None:
    """Abort the ring of ``contexts``: every microbatch wakes and raises :class:`UBatchAbort` at
    its next switch point (a launcher whose threads hung calls this)."""
    ring = _ring_of(contexts)
    ring.abort.set()
    for ev in ring.cpu_events:
        ev.set()


def any_ubatch_active() -> bool:
    """True while any microbatch thread is inside its context."""
    return bool(_THREAD_CTX)


def current_ubatch_context() -> UBatchContext | None:
    """The context of the microbatch running on the calling thread, or None outside one."""
    return _THREAD_CTX.get(threading.get_ident())
