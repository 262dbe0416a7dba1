"""CpuGpuEvent: a device event handed from one thread to another with the CPU-side ordering
that a bare CUDA event lacks (waiting on a never-recorded event is a no-op)."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import check_real, describe
from .event import Event
from .stream import StreamLike

__all__ = ["CpuGpuEvent"]


class CpuGpuEvent:
    """A device event plus a CPU gate, for exactly one producer thread and one consumer thread.

    ``record(stream)`` (producer) records a *fresh* device event on ``stream`` (default: the
    current stream) and opens the gate; ``wait(stream)`` (consumer) blocks until the gate is
    open, makes ``stream`` wait on that device event, closes the gate and returns True. So the
    consumer's stream is always ordered after the producer's work, whichever thread runs first.
    A second ``record`` before the ``wait`` that consumes the first raises ``RuntimeError``.
    More than two threads is not supported.
    """

    _POLL_S = 0.001

    def __init__(self, event_factory: Callable[[], Any] = Event) -> None:
        if not callable(event_factory):
            raise TypeError(f"event_factory must be callable, got {describe(event_factory)}")
        self._factory = event_factory
        self._event: Any = None
        self._recorded = threading.Event()

    def record(self, stream: StreamLike | None = None) -> None:
        """Record a fresh device event on ``stream`` and release the waiting thread."""
        if self._recorded.is_set():
            raise RuntimeError("CpuGpuEvent.record() called before the previous record was consumed by wait()")
        ev = self._factory()
        ev.record(stream)
        self._event = ev
        self._recorded.set()

    def wait(self, stream: StreamLike | None = None, *, timeout: float | None = None,
             stop_event: threading.Event | None = None) -> bool:
        """Block until :meth:`record`, then make ``stream`` wait on the recorded device event.

        Returns True after a normal wait; False (with nothing enqueued and the gate untouched)
        when ``stop_event`` is set first or ``timeout`` seconds pass."""
        if timeout is not None:  # finite and >= 0 (0 polls once): NumPy reals too, never bools or arrays
            timeout = check_real(timeout, "timeout", "a finite number of seconds >= 0 (0 polls once) or None")
            if timeout < 0:
                raise ValueError(f"timeout must be a finite number of seconds >= 0 (0 polls once) or None, "
                                 f"got {timeout!r}")
        if stop_event is not None and not hasattr(stop_event, "is_set"):
            raise TypeError(f"stop_event must be a threading.Event or None, got {describe(stop_event)}")
        if stop_event is None:
            if not self._recorded.wait(timeout):
                return False
        else:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._recorded.is_set():
                if stop_event.is_set():
                    return False
                step = self._POLL_S
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    step = min(step, left)
                self._recorded.wait(step)
        self._event.wait(stream)
        self._recorded.clear()
        return True

    def is_recorded(self) -> bool:
        """True between a record and the wait that consumes it."""
        return self._recorded.is_set()
