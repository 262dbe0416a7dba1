"""One stream model for CuPy, torch and Triton.

A :class:`Stream` owns (or adopts) one CUDA stream handle and can present it as a CuPy stream,
a torch stream, or a raw handle. :func:`use_stream` makes a stream current for CuPy *and* torch
at once; Triton launches follow torch's current stream, so they land on it too.

Which stream is "current" for lowlevel: torch's current stream, unless torch is on its default
stream and CuPy is not, in which case CuPy's. Inside :func:`use_stream` the two always agree.
Both are per thread (and per device), so :func:`use_stream` affects the calling thread only.
"""
from __future__ import annotations

import operator
import sys
import threading
from typing import Any

from . import _runtime as rt
from ._runtime import StreamLike
from .device import require_cuda
from .errors import LowlevelError, check_bool, check_int, describe
from .event import Event, EventLike, record_event, wait_event

__all__ = ["Stream", "StreamLike", "adopt", "current_stream", "use_stream", "stream_handle"]


_OWNED: list[Any] = []  # every CUDA stream lowlevel created (see Stream.__init__)


class Stream:
    """A CUDA stream usable from CuPy, torch and Triton.

    ``Stream()`` creates a new stream (non-blocking by default: it does not synchronise with the
    legacy default stream); like torch's streams, it is never destroyed before the process ends,
    so create streams once and reuse them. ``priority`` follows CUDA: lower numbers are higher priority.
    :meth:`from_external` adopts a stream made elsewhere without taking ownership of it.

    The handle is ``.ptr``; ``.cupy`` is a CuPy stream object and ``.torch`` a cached torch
    stream object for the same handle. A Stream implements ``__cuda_stream__``.

    Ordering (CUDA's, as in ``torch.cuda.Stream`` and ``cuda.core``): :meth:`record` captures
    the work enqueued on this stream so far; :meth:`wait` makes work enqueued here *afterwards*
    wait for an event's last record or for the work enqueued so far on another stream.
    """

    __slots__ = ("_cupy", "ptr", "device_id", "_torch", "_torch_key", "__weakref__")

    def __init__(self, *, non_blocking: bool = True, priority: int | None = None) -> None:
        non_blocking = check_bool(non_blocking, "non_blocking")
        if priority is not None:
            priority = check_int(priority, "priority")
        require_cuda()
        s = rt.cp.cuda.Stream(non_blocking=non_blocking, priority=priority)
        # Streams made here live until the process exits, as torch's pool streams do: torch's
        # allocators may record events on a stream's handle after its Python objects are gone
        # (a pinned buffer used by a non_blocking copy, a record_stream), and a destroyed
        # handle there crashes the process.
        _OWNED.append(s)
        self._init(s, None)

    def _init(self, cupy_stream: Any, torch_stream: Any) -> None:
        rt.bind()  # every Stream implies bound torch calls (the binding invariant of _runtime)
        self._cupy = cupy_stream
        self.ptr: int = int(cupy_stream.ptr)
        dev = cupy_stream.device_id
        if dev is None or dev < 0:
            dev = rt.cp.cuda.runtime.getDevice()
        self.device_id: int = int(dev)
        self._torch = torch_stream
        self._torch_key: tuple[int, int, int] | None = None

    @classmethod
    def _wrap(cls, cupy_stream: Any, torch_stream: Any = None) -> Stream:
        self = cls.__new__(cls)
        self._init(cupy_stream, torch_stream)
        return self

    @classmethod
    def from_external(cls, obj: StreamLike) -> Stream:
        """Adopt ``obj``: a lowlevel Stream (returned as is), a ``torch.cuda.Stream``, a CuPy
        stream, an int handle, or anything with ``__cuda_stream__``. The caller keeps
        ownership; the returned Stream must not outlive the stream it adopts. ``TypeError``
        for anything else (a bool included)."""
        if isinstance(obj, Stream):
            return obj
        if isinstance(obj, bool):
            raise TypeError("a bool is not a stream handle")
        require_cuda()
        cp = rt.cp
        if isinstance(obj, cp.cuda.stream._BaseStream):
            return cls._wrap(obj)
        mod = type(obj).__module__
        if mod.startswith("torch") and hasattr(obj, "cuda_stream"):
            return cls._wrap(rt.cupy_external(int(obj.cuda_stream)), obj)
        return cls._wrap(rt.cupy_external(rt.stream_handle(obj)))

    @property
    def cupy(self) -> Any:
        """The CuPy stream object for this handle."""
        return self._cupy

    @property
    def torch(self) -> Any:
        """A torch stream object for this handle (created once, then cached)."""
        t = self._torch
        if t is None:
            torch = rt.bind().torch
            if self.ptr == 0:
                t = torch.cuda.default_stream(self.device_id)
            else:
                t = torch.cuda.ExternalStream(self.ptr, device=self.device_id)
            self._torch = t
        return t

    def _key(self) -> tuple[int, int, int]:
        k = self._torch_key
        if k is None:
            t = self.torch
            k = self._torch_key = (t.stream_id, t.device_index, t.device_type)
        return k

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stream) and other.ptr == self.ptr

    def __hash__(self) -> int:
        return hash(self.ptr)

    def __repr__(self) -> str:
        return f"<lowlevel.Stream 0x{self.ptr:x} (device {self.device_id})>"

    def synchronize(self) -> None:
        """Block the calling thread until all work enqueued on this stream has finished."""
        self._cupy.synchronize()

    def query(self) -> bool:
        """True when all work enqueued on this stream has finished."""
        return bool(self._cupy.done)

    def record(self, event: EventLike | None = None) -> EventLike:
        """Record ``event`` (a lowlevel, CuPy or torch event; a new :class:`~lowlevel.Event` if
        None) on this stream, capturing the work enqueued here so far; return the event."""
        if event is None:
            event = Event()
        if type(event) is Event:
            rt.event_record(event.ptr, self.ptr)
        else:
            record_event(event, self.ptr)
        return event

    def wait(self, event_or_stream: EventLike | StreamLike) -> None:
        """Make work enqueued on this stream from now on wait for ``event_or_stream``: an
        event's last record (lowlevel, CuPy or torch event; a never-recorded event is a no-op),
        or the work enqueued so far on another stream (anything :func:`stream_handle` takes).
        Nothing is synchronised on the host."""
        if type(event_or_stream) is Event:
            rt.stream_wait_event(self.ptr, event_or_stream.ptr, 0)
        elif _is_stream(event_or_stream):
            rt.order(rt.stream_handle(event_or_stream), self.ptr)
        else:
            wait_event(event_or_stream, self.ptr)

    def is_capturing(self) -> bool:
        """True while this stream is being captured into a CUDA graph."""
        return rt.is_capturing(self.ptr)


rt.register_stream_type(Stream, operator.attrgetter("ptr"))


def _is_stream(obj: Any) -> bool:
    if isinstance(obj, (Stream, int)) and not isinstance(obj, bool):
        return True
    if hasattr(obj, "__cuda_stream__"):
        return True
    mod = type(obj).__module__
    return (mod.startswith("torch") and hasattr(obj, "cuda_stream")) or (
        mod.startswith("cupy") and isinstance(obj, rt.cp.cuda.stream._BaseStream))


def stream_handle(stream: StreamLike | None) -> int:
    """The raw ``cudaStream_t`` of ``stream`` (lowlevel's current stream for None): a lowlevel,
    torch or CuPy stream, an int handle, or an object with ``__cuda_stream__``. ``TypeError``
    for anything else (a bool included)."""
    return rt.stream_handle(stream)


_adopted: dict[tuple[type, int], Stream] = {}


def adopt(obj: StreamLike) -> Stream:
    """:meth:`Stream.from_external`, cached by (type, handle) so that hot paths which are handed
    foreign streams on every call create nothing after the first call."""
    if type(obj) is Stream:
        return obj
    key = (type(obj), rt.stream_handle(obj))
    s = _adopted.get(key)
    if s is None:
        s = Stream.from_external(obj)
        if len(_adopted) < 1024:
            _adopted[key] = s
    return s


def adopt_arg(obj: StreamLike, name: str) -> Stream:
    """:func:`adopt` for the public argument ``name`` (construction paths): its ``TypeError`` /
    ``ValueError`` for what is no stream names the argument and shows the value."""
    try:
        return adopt(obj)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{name} must be a CUDA stream (a lowlevel.Stream, torch.cuda.Stream, CuPy stream, "
                        f"int handle in [0, 2**64) or an object with __cuda_stream__), got {describe(obj)} "
                        f"({exc})") from None


_current_cache: dict[tuple[int, int], Stream] = {}


def current_stream() -> Stream:
    """lowlevel's current stream on the current device, as a :class:`Stream`.

    torch's current stream, unless torch is on its default stream and CuPy is not."""
    t = rt.bind()
    dev = t.get_device()
    sid, didx, dtype = t.get_current(dev)
    h = t.get_raw(dev)
    cp = rt.cp
    if h == 0:
        cs = cp.cuda.get_current_stream()
        if cs.ptr != 0:
            return Stream._wrap(cs)
    key = (dev, h)
    s = _current_cache.get(key)
    if s is None:
        # A stream torch created; CuPy can only see it as an external stream.
        tstream = t.torch.cuda.Stream(stream_id=sid, device_index=didx, device_type=dtype)
        s = Stream._wrap(rt.cupy_external(h) if h else cp.cuda.Stream.null, tstream)
        if len(_current_cache) < 256:
            _current_cache[key] = s
    return s


# Where use_stream keeps the streams it restores. An object entered once at a time (the common
# ``with use_stream(s):``) keeps them in its own slots: no per-thread look-up, no allocation.
# An object entered again while active (nested in one thread, or from another thread) keeps
# the extra entries on a per-thread stack, as CuPy's own stream contexts do; ``_nested`` counts
# those entries process-wide, and while it is not 0 every exit looks at its thread's stack first.
# Claiming the slots is a test and a store with no call in between, which the GIL makes atomic;
# without a GIL (free-threaded builds) the slots are never claimed and every entry is stacked.
_saved = threading.local()
_nested_lock = threading.Lock()
_GIL = bool(getattr(sys, "_is_gil_enabled", lambda: True)())
_nested = 0 if _GIL else 1  # never 0 without a GIL: every exit takes the stacked path


class _Taken:
    """The initial slot value of a use_stream without a GIL: never free, never a saved stream."""


_SLOT_INIT: Any = None if _GIL else _Taken()


class use_stream:
    """Make ``stream`` current for CuPy and torch (hence Triton) in the calling thread.

    On exit, normal or by exception, both frameworks' current streams are restored to what
    they were on entry. Uses nest, and one object may be entered again while it is active, or
    from several threads: each exit restores what its own thread's matching entry saved, as
    CuPy's own stream contexts do. Entering orders nothing on the device: work enqueued before
    the block is not waited for (use :meth:`Stream.wait` for that). The stream must belong to
    the current device.

    >>> with lowlevel.use_stream(s):
    ...     y = x @ w        # torch, CuPy and Triton work all go to ``s``
    """

    __slots__ = ("_stream", "_prev_torch", "_prev_cupy")

    def __init__(self, stream: StreamLike) -> None:
        self._stream = stream if type(stream) is Stream else adopt_arg(stream, "stream")
        self._prev_torch: Any = _SLOT_INIT  # None: not entered (see _saved above)

    def __enter__(self) -> Stream:
        s = self._stream
        key = s._torch_key or s._key()
        prev_torch = rt.torch_get_current(key[1])
        prev_cupy = rt.cupy_get_current()
        s._cupy.use()
        try:
            rt.torch_set_current(*key)
        except BaseException:
            prev_cupy.use()  # nothing half-switched: CuPy back too
            raise
        if self._prev_torch is None:  # not active anywhere: claim the slots (atomic under the GIL)
            self._prev_torch = prev_torch
            self._prev_cupy = prev_cupy
        else:
            _push(self, prev_torch, prev_cupy)
        return s

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            prev_torch = self._prev_torch
        except AttributeError:  # made without __init__
            prev_torch = None
        if prev_torch is None or _nested:
            prev_torch, prev_cupy = _pop(self)
            rt.torch_set_current(*prev_torch)
            prev_cupy.use()
            return
        self._prev_torch = None  # the slots are free again
        rt.torch_set_current(*prev_torch)
        self._prev_cupy.use()


def _no_entry() -> LowlevelError:
    return LowlevelError("use_stream.__exit__ without a matching __enter__ in this thread")


def _push(u: use_stream, prev_torch: Any, prev_cupy: Any) -> None:
    """Keep an entry of ``u`` made while ``u`` was active on this thread's stack."""
    global _nested
    try:
        stack = _saved.stack
    except AttributeError:
        stack = _saved.stack = []
    with _nested_lock:
        stack.append((u, prev_torch, prev_cupy))
        _nested += 1


def _pop(u: use_stream) -> tuple[Any, Any]:
    """The streams to restore on an exit of ``u`` while some entries are stacked: this thread's
    latest stacked entry when it is ``u``'s, else ``u``'s slots."""
    global _nested
    stack = getattr(_saved, "stack", None)
    if stack and stack[-1][0] is u:
        with _nested_lock:
            _, prev_torch, prev_cupy = stack.pop()
            _nested -= 1
        return prev_torch, prev_cupy
    prev_torch = getattr(u, "_prev_torch", None)
    if prev_torch is None or type(prev_torch) is _Taken:
        raise _no_entry()
    prev_cupy = u._prev_cupy
    u._prev_torch = None
    return prev_torch, prev_cupy
