"""One stream model for CuPy, torch and Triton.

A :class:`Stream` owns (or adopts) one CUDA stream handle and can present it as a CuPy stream,
a torch stream, or a raw handle. :func:`use_stream` makes a stream current for CuPy *and* torch
at once; Triton launches follow torch's current stream, so they land on it too.

Which stream is "current" for lowlevel: torch's current stream, unless torch is on its default
stream and CuPy is not, in which case CuPy's. Inside :func:`use_stream` the two always agree.
Both are per thread (and per device), so :func:`use_stream` affects the calling thread only.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Protocol, Union, runtime_checkable

from .device import require_cuda

__all__ = ["Stream", "StreamLike", "current_stream", "use_stream", "stream_handle"]


@runtime_checkable
class _HasCudaStream(Protocol):
    def __cuda_stream__(self) -> tuple[int, int]: ...


StreamLike = Union["Stream", "Any", int, _HasCudaStream]
"""A lowlevel Stream, a ``torch.cuda.Stream``, a CuPy stream, a raw handle, or any
object implementing ``__cuda_stream__``."""


class _TorchOps:
    """torch's private stream calls, bound once (they cost ~0.1 µs; the public ones ~5 µs)."""

    __slots__ = ("get_device", "get_current", "get_raw", "set_current", "torch")

    def __init__(self) -> None:
        import torch

        torch.cuda.init()
        c = torch._C
        self.torch = torch
        self.get_device: Callable[[], int] = c._cuda_getDevice
        self.get_current: Callable[[int], tuple[int, int, int]] = c._cuda_getCurrentStream
        self.set_current: Callable[..., None] = c._cuda_setStream
        raw = c._cuda_getCurrentRawStream
        try:  # -1 means "the current device" to c10; saves a call where the binding allows it
            ok = raw(-1) == raw(c._cuda_getDevice())
        except Exception:
            ok = False
        self.get_raw: Callable[[int], int] = raw if ok else (lambda _d: raw(c._cuda_getDevice()))


_torch_ops: _TorchOps | None = None
_bind_lock = threading.Lock()
# Bound by _tops(): the hot paths call these module globals directly.
_t_get_raw: Callable[[int], int]
_t_get_current: Callable[[int], tuple[int, int, int]]
_t_set_current: Callable[..., None]


def _tops() -> _TorchOps:
    global _torch_ops, _t_get_raw, _t_get_current, _t_set_current
    ops = _torch_ops
    if ops is None:
        require_cuda()
        with _bind_lock:
            if _torch_ops is None:
                ops = _TorchOps()
                _t_get_raw, _t_get_current, _t_set_current = ops.get_raw, ops.get_current, ops.set_current
                _torch_ops = ops
            ops = _torch_ops
    return ops


try:  # CuPy imports without a GPU; its absence is reported by require_cuda().
    import cupy as _cp
except ImportError:  # pragma: no cover
    _cp = None  # type: ignore[assignment]


def _cupy() -> Any:
    return _cp


_OWNED: list[Any] = []  # every CUDA stream lowlevel created (see Stream.__init__)


class Stream:
    """A CUDA stream usable from CuPy, torch and Triton.

    ``Stream()`` creates a new stream (non-blocking by default: it does not synchronise with the
    legacy default stream); like torch's streams, it is never destroyed before the process ends,
    so create streams once and reuse them. ``priority`` follows CUDA: lower numbers are higher priority.
    :meth:`from_external` adopts a stream made elsewhere without taking ownership of it.

    The handle is ``.ptr``; ``.cupy`` is a CuPy stream object and ``.torch`` a cached torch
    stream object for the same handle. A Stream implements ``__cuda_stream__``.
    """

    __slots__ = ("_cupy", "ptr", "device_id", "_torch", "_torch_key", "__weakref__")

    def __init__(self, *, non_blocking: bool = True, priority: int | None = None) -> None:
        require_cuda()
        cp = _cupy()
        s = cp.cuda.Stream(non_blocking=non_blocking, priority=priority)
        # Streams made here live until the process exits, as torch's pool streams do: torch's
        # allocators may record events on a stream's handle after its Python objects are gone
        # (a pinned buffer used by a non_blocking copy, a record_stream), and a destroyed
        # handle there crashes the process.
        _OWNED.append(s)
        self._init(s, None)

    def _init(self, cupy_stream: Any, torch_stream: Any) -> None:
        _tops()  # every Stream implies bound torch calls, so the hot paths need not check
        self._cupy = cupy_stream
        self.ptr: int = int(cupy_stream.ptr)
        dev = cupy_stream.device_id
        if dev is None or dev < 0:
            dev = _cupy().cuda.runtime.getDevice()
        self.device_id: int = int(dev)
        self._torch = torch_stream
        self._torch_key: tuple[int, int, int] | None = None

    @classmethod
    def _wrap(cls, cupy_stream: Any, torch_stream: Any = None) -> "Stream":
        self = cls.__new__(cls)
        self._init(cupy_stream, torch_stream)
        return self

    @classmethod
    def from_external(cls, obj: StreamLike) -> "Stream":
        """Adopt ``obj``: a lowlevel Stream (returned as is), a ``torch.cuda.Stream``, a CuPy
        stream, an int handle, or anything with ``__cuda_stream__``. The caller keeps
        ownership; the returned Stream must not outlive the stream it adopts."""
        if isinstance(obj, Stream):
            return obj
        require_cuda()
        cp = _cupy()
        if isinstance(obj, cp.cuda.stream._BaseStream):
            return cls._wrap(obj)
        mod = type(obj).__module__
        if mod.startswith("torch") and hasattr(obj, "cuda_stream"):
            return cls._wrap(_cupy_external(int(obj.cuda_stream)), obj)
        if isinstance(obj, bool):
            raise TypeError("a bool is not a stream handle")
        if isinstance(obj, int):
            return cls._wrap(_cupy_external(obj))
        proto = getattr(obj, "__cuda_stream__", None)
        if proto is not None:
            val = proto() if callable(proto) else proto
            handle = int(val[1])
            return cls._wrap(_cupy_external(handle))
        raise TypeError(
            f"cannot use {type(obj).__module__}.{type(obj).__qualname__} as a CUDA stream: expected a "
            "lowlevel.Stream, torch.cuda.Stream, cupy stream, int handle or an object with __cuda_stream__"
        )

    @property
    def cupy(self) -> Any:
        """The CuPy stream object for this handle."""
        return self._cupy

    @property
    def torch(self) -> Any:
        """A torch stream object for this handle (created once, then cached)."""
        t = self._torch
        if t is None:
            torch = _tops().torch
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

    def wait(self, event: Any) -> None:
        """Make future work on this stream wait for ``event`` (lowlevel, CuPy or torch)."""
        from .event import wait_event

        wait_event(event, self)

    def is_capturing(self) -> bool:
        """True while this stream is being captured into a CUDA graph."""
        return bool(_cupy().cuda.runtime.streamIsCapturing(self.ptr))


def _current_handle() -> int:
    """Raw handle of lowlevel's current stream (see the module docstring for the rule)."""
    if _torch_ops is None:
        _tops()
    h = _t_get_raw(-1)
    if h == 0:
        h = _cp.cuda.get_current_stream().ptr
    return h


_handle_getters: dict[type, Callable[[Any], int]] = {}


def stream_handle(stream: StreamLike | None) -> int:
    """The raw ``cudaStream_t`` of ``stream`` (lowlevel's current stream for None)."""
    if stream is None:
        return _current_handle()
    cls = type(stream)
    if cls is Stream:
        return stream.ptr  # type: ignore[union-attr]
    if cls is int:
        return stream  # type: ignore[return-value]
    get = _handle_getters.get(cls)
    if get is None:
        get = _handle_getter_for(stream)
        _handle_getters[cls] = get
    return get(stream)


def _handle_getter_for(stream: Any) -> Callable[[Any], int]:
    if isinstance(stream, Stream):
        return lambda s: s.ptr
    if isinstance(stream, bool):
        raise TypeError("a bool is not a stream handle")
    if isinstance(stream, int):
        return int
    if type(stream).__module__.startswith("torch") and hasattr(stream, "cuda_stream"):
        return lambda s: s.cuda_stream
    if type(stream).__module__.startswith("cupy") and hasattr(stream, "ptr"):
        return lambda s: s.ptr
    if hasattr(stream, "__cuda_stream__"):
        return lambda s: int(s.__cuda_stream__()[1])
    raise TypeError(f"cannot use {type(stream).__qualname__} as a CUDA stream")


_adopted: dict[tuple[type, int], Stream] = {}


def adopt(obj: StreamLike) -> Stream:
    """:meth:`Stream.from_external`, cached by (type, handle) so that hot paths which are handed
    foreign streams on every call create nothing after the first call."""
    if type(obj) is Stream:
        return obj  # type: ignore[return-value]
    key = (type(obj), stream_handle(obj))
    s = _adopted.get(key)
    if s is None:
        s = Stream.from_external(obj)
        if len(_adopted) < 1024:
            _adopted[key] = s
    return s


_current_cache: dict[tuple[int, int], Stream] = {}


def current_stream() -> Stream:
    """lowlevel's current stream on the current device, as a :class:`Stream`.

    torch's current stream, unless torch is on its default stream and CuPy is not."""
    t = _tops()
    dev = t.get_device()
    sid, didx, dtype = t.get_current(dev)
    h = t.get_raw(dev)
    cp = _cupy()
    if h == 0:
        cs = cp.cuda.get_current_stream()
        if cs.ptr != 0:
            return Stream._wrap(cs)
    key = (dev, h)
    s = _current_cache.get(key)
    if s is None:
        # A stream torch created; CuPy can only see it as an external stream.
        tstream = t.torch.cuda.Stream(stream_id=sid, device_index=didx, device_type=dtype)
        s = Stream._wrap(_cupy_external(h) if h else cp.cuda.Stream.null, tstream)
        if len(_current_cache) < 256:
            _current_cache[key] = s
    return s


class use_stream:
    """Make ``stream`` current for CuPy and torch (hence Triton) in the calling thread.

    On exit, normal or by exception, both frameworks' current streams are restored to what
    they were on entry; uses nest. Entering orders nothing on the device: work enqueued before
    the block is not waited for (use an :class:`~lowlevel.Event` for that). The stream must
    belong to the current device.

    >>> with lowlevel.use_stream(s):
    ...     y = x @ w        # torch, CuPy and Triton work all go to ``s``
    """

    __slots__ = ("_stream", "_prev_cupy", "_prev_torch")

    def __init__(self, stream: StreamLike) -> None:
        self._stream = stream if type(stream) is Stream else adopt(stream)

    def __enter__(self) -> Stream:
        s = self._stream
        key = s._torch_key or s._key()
        self._prev_torch = _t_get_current(key[1])
        self._prev_cupy = _c_get_current()
        s._cupy.use()
        _t_set_current(*key)
        return s

    def __exit__(self, *exc: object) -> None:
        _t_set_current(*self._prev_torch)
        self._prev_cupy.use()


_c_get_current: Callable[[], Any] = _cp.cuda.get_current_stream if _cp is not None else None  # type: ignore


# The stream switch of the fork/join and microbatch runtimes (use_stream inlines the same steps).
def _save_current() -> tuple[Any, Any]:
    """torch's and CuPy's current streams of this thread, for :func:`_restore_current`."""
    return _t_get_current(-1), _c_get_current()


def _make_current(s: Stream) -> None:
    """Make ``s`` current for CuPy and torch (hence Triton) in this thread."""
    s._cupy.use()
    _t_set_current(*(s._torch_key or s._key()))


def _restore_current(prev: tuple[Any, Any]) -> None:
    _t_set_current(*prev[0])
    prev[1].use()


def _cupy_external(handle: int) -> Any:
    """A CuPy stream object for a foreign handle (CuPy does not own it)."""
    cls = _cp.cuda.Stream
    if hasattr(cls, "from_external"):
        return cls.from_external(_Handle(handle))
    return _cp.cuda.ExternalStream(handle, _cp.cuda.runtime.getDevice())  # pragma: no cover - CuPy < 14


class _Handle:
    """The smallest object that speaks the CUDA stream protocol."""

    __slots__ = ("handle",)

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)
