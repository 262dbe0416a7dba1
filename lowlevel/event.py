"""CUDA events that order work across streams, whichever framework made them.

:class:`Event` is a thin object over one CUDA event handle. The module functions
:func:`record_event` and :func:`wait_event` accept lowlevel, CuPy and torch events alike, so
that callers can pass whatever events they already hold.

Ordering contract (CUDA's): ``ev.record(s)`` captures the work enqueued on ``s`` so far;
``ev.wait(t)`` makes work enqueued on ``t`` *afterwards* wait for that captured work. A wait
sees the most recent record made before the wait call; recording the event again later does
not move an earlier wait. Waiting on a never-recorded event is a no-op (CUDA's rule).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import _runtime as rt
from ._runtime import StreamLike
from .errors import check_bool

__all__ = ["Event", "EventLike", "record_event", "wait_event"]

EventLike = Any
"""A lowlevel :class:`Event`, a ``cupy.cuda.Event``, a ``torch.cuda.Event`` or ``torch.Event``."""

_NOT_READY = 600  # cudaErrorNotReady


class Event:
    """A CUDA event. ``timing=True`` makes it usable with :meth:`elapsed_ms` (slightly costlier
    to record); ``blocking=True`` makes :meth:`synchronize` yield the CPU instead of spinning.

    Recording and waiting make no allocation and go straight to the CUDA runtime.
    """

    __slots__ = ("_cupy", "ptr", "timing", "__weakref__")

    def __init__(self, timing: bool = False, *, blocking: bool = False) -> None:
        timing, blocking = check_bool(timing, "timing"), check_bool(blocking, "blocking")
        self._cupy = rt.create_event(timing=timing, blocking=blocking)
        self.ptr: int = int(self._cupy.ptr)
        self.timing = bool(timing)

    def record(self, stream: StreamLike | None = None) -> Event:
        """Record the work enqueued so far on ``stream`` (default: the current stream)."""
        if stream is None:
            rt.event_record(self.ptr, rt.current_handle())
        elif type(stream) is rt.stream_class:
            rt.event_record(self.ptr, stream.ptr)  # type: ignore[attr-defined]
        else:
            rt.event_record(self.ptr, rt.stream_handle(stream))
        return self

    def wait(self, stream: StreamLike | None = None) -> None:
        """Make later work on ``stream`` (default: the current stream) wait for the last record."""
        if stream is None:
            rt.stream_wait_event(rt.current_handle(), self.ptr, 0)
        elif type(stream) is rt.stream_class:
            rt.stream_wait_event(stream.ptr, self.ptr, 0)  # type: ignore[attr-defined]
        else:
            rt.stream_wait_event(rt.stream_handle(stream), self.ptr, 0)

    def synchronize(self) -> None:
        """Block the calling thread until the recorded work has finished."""
        rt.cp.cuda.runtime.eventSynchronize(self.ptr)

    def query(self) -> bool:
        """True when the recorded work has finished (or the event was never recorded)."""
        return rt.cp.cuda.runtime.eventQuery(self.ptr) != _NOT_READY

    def elapsed_ms(self, end: Event) -> float:
        """Milliseconds between this event's record and ``end``'s; both need ``timing=True`` and
        both must have completed."""
        if not (self.timing and getattr(end, "timing", False)):
            raise ValueError("elapsed_ms needs two events created with timing=True")
        return float(rt.cp.cuda.runtime.eventElapsedTime(self.ptr, end.ptr))

    @property
    def cupy(self) -> Any:
        """The underlying ``cupy.cuda.Event``."""
        return self._cupy

    def __repr__(self) -> str:
        return f"<lowlevel.Event 0x{self.ptr:x}{' timing' if self.timing else ''}>"


# --- foreign events ---------------------------------------------------------------------------

def _torch_stream_for(stream: StreamLike | None) -> Any:
    return rt.torch_stream(rt.stream_handle(stream))


def _record_torch(ev: Any, stream: StreamLike | None) -> None:
    ev.record(_torch_stream_for(stream))


def _wait_torch(ev: Any, stream: StreamLike | None) -> None:
    handle = getattr(ev, "cuda_event", 0)
    if handle:
        rt.stream_wait_event(rt.stream_handle(stream), handle, 0)
    else:  # torch.Event, or a torch.cuda.Event never recorded (a no-op by torch's rule)
        ev.wait(_torch_stream_for(stream))


def _record_ptr(ev: Any, stream: StreamLike | None) -> None:
    rt.event_record(ev.ptr, rt.stream_handle(stream))


def _wait_ptr(ev: Any, stream: StreamLike | None) -> None:
    rt.stream_wait_event(rt.stream_handle(stream), ev.ptr, 0)


def _record_duck(ev: Any, stream: StreamLike | None) -> None:
    ev.record(stream)


def _wait_duck(ev: Any, stream: StreamLike | None) -> None:
    ev.wait(stream)


_ops: dict[type, tuple[Callable[[Any, Any], None], Callable[[Any, Any], None]]] = {}


def event_ops(ev: Any) -> tuple[Callable[[Any, Any], None], Callable[[Any, Any], None]]:
    """The (record, wait) functions for an event of ``ev``'s type (lowlevel, CuPy, torch, or an
    object with ``record(stream)`` and ``wait(stream)``), cached per type. ``TypeError`` for
    anything else: the check that :func:`record_event` and :func:`wait_event` make."""
    cls = type(ev)
    ops = _ops.get(cls)
    if ops is None:
        mod = cls.__module__
        if isinstance(ev, Event) or (mod.startswith("cupy") and hasattr(ev, "ptr")):
            ops = (_record_ptr, _wait_ptr)
        elif mod.startswith("torch") and hasattr(ev, "record") and hasattr(ev, "wait"):
            ops = (_record_torch, _wait_torch)
        elif callable(getattr(ev, "record", None)) and callable(getattr(ev, "wait", None)):
            ops = (_record_duck, _wait_duck)  # any object with record(stream) and wait(stream)
        else:
            raise TypeError(
                f"cannot use {mod}.{cls.__qualname__} as a CUDA event: expected a lowlevel.Event, "
                "cupy.cuda.Event, torch.cuda.Event, torch.Event, or an object with record(stream) and wait(stream)"
            )
        _ops[cls] = ops
    return ops


def record_event(event: EventLike, stream: StreamLike | None = None) -> None:
    """Record ``event`` (lowlevel, CuPy or torch) on ``stream`` (default: the current stream)."""
    if type(event) is Event:
        rt.event_record(event.ptr, rt.current_handle() if stream is None else rt.stream_handle(stream))
    else:
        event_ops(event)[0](event, stream)


def wait_event(event: EventLike, stream: StreamLike | None = None) -> None:
    """Make later work on ``stream`` (default: the current stream) wait for ``event``'s last record."""
    if type(event) is Event:
        rt.stream_wait_event(rt.current_handle() if stream is None else rt.stream_handle(stream), event.ptr, 0)
    else:
        event_ops(event)[1](event, stream)
