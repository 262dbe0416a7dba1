"""The runtime layer: the CUDA and torch calls every part of lowlevel is built on.

Everything here works on raw handles (``cudaStream_t`` and ``cudaEvent_t`` as ints) and is
called on hot paths, so each name is either a runtime function bound once or a few lines
around one. The public faces are :mod:`lowlevel.stream` and :mod:`lowlevel.event`; the
runtimes (fork/join, graphs, microbatches, DP sync), interop, the kernels and the tests' CPU
fakes use this module, and only this module, for what lies under those faces. Call these names
through the module (``_runtime.current_handle()``), never ``from _runtime import name``: the
torch calls are bound late and the CPU tests replace names here.

**The binding invariant.** ``torch_get_device``, ``torch_get_current``, ``torch_set_current``
and ``torch_get_raw`` are torch's private current-stream calls (about 0.1 µs each, against
about 5 µs for the public ones). They are ``None`` until :func:`bind` runs (``torch_get_raw``
is a function that binds, then answers), and :func:`bind` runs before any
:class:`lowlevel.Stream` exists (``Stream`` calls it when it is made), so code that holds a
Stream may call them unchecked. Code that may run before any Stream exists calls :func:`bind`
first, or goes through :func:`current_handle` or ``torch_get_raw``, which bind on first use.

**Which stream is current** (lowlevel's rule): torch's current stream (the one Triton launches
use), unless torch is on its default stream and CuPy is not, in which case CuPy's. Both
frameworks keep their current stream per thread (and per device).

**Ordering.** :func:`event_record` captures the work enqueued on a stream so far;
:func:`stream_wait_event` makes work enqueued on a stream *afterwards* wait for the last record
made before the call. :func:`order` is the two together: "stream B waits for the work so far
on stream A". Nothing here synchronises the host.

**Tracing.** :data:`tracer` is the active :class:`lowlevel.Timeline` or None. It is
process-wide, not per thread: parked microbatch threads and fork/join branches record their
spans into the timeline the launching thread activated. ``Timeline.activate`` sets it; the
runtimes read it once per call.
"""
from __future__ import annotations

import operator
import threading
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from .device import require_cuda

try:  # CuPy imports without a GPU; its absence is reported by require_cuda().
    import cupy as cp
except ImportError:  # pragma: no cover
    cp = None

__all__: list[str] = []  # a private layer: nothing here is public API (stream.py re-exports StreamLike)


@runtime_checkable
class HasCudaStream(Protocol):
    """Anything that speaks the CUDA stream protocol (``__cuda_stream__() -> (0, handle)``)."""

    def __cuda_stream__(self) -> tuple[int, int]: ...


StreamLike = HasCudaStream | int | Any
"""A lowlevel Stream, a ``torch.cuda.Stream``, a CuPy stream, a raw handle, or any
object implementing ``__cuda_stream__``."""

# --- torch's current-stream calls, bound once --------------------------------------------------


class TorchOps:
    """torch's private stream calls, bound once."""

    __slots__ = ("from_dlpack", "get_device", "get_current", "get_raw", "set_current", "torch")

    def __init__(self) -> None:
        import torch

        torch.cuda.init()
        c = torch._C
        self.torch = torch
        self.from_dlpack: Callable[[Any], Any] = torch.utils.dlpack.from_dlpack
        self.get_device: Callable[[], int] = c._cuda_getDevice
        self.get_current: Callable[[int], tuple[int, int, int]] = c._cuda_getCurrentStream
        self.set_current: Callable[..., None] = c._cuda_setStream
        raw = c._cuda_getCurrentRawStream
        try:  # -1 means "the current device" to c10; saves a call where the binding allows it
            ok = raw(-1) == raw(c._cuda_getDevice())
        except Exception:
            ok = False
        self.get_raw: Callable[[int], int] = raw if ok else (lambda _d: raw(c._cuda_getDevice()))


torch_ops: TorchOps | None = None
_bind_lock = threading.Lock()
# Bound by bind(); see the binding invariant in the module docstring.
torch_get_device: Callable[[], int] = None  # type: ignore[assignment]
torch_get_current: Callable[[int], tuple[int, int, int]] = None  # type: ignore[assignment]
torch_set_current: Callable[..., None] = None  # type: ignore[assignment]


def _get_raw_unbound(device: int) -> int:
    """What :data:`torch_get_raw` is until :func:`bind` runs: binds, then answers."""
    return bind().get_raw(device)


torch_get_raw: Callable[[int], int] = _get_raw_unbound


def bind() -> TorchOps:
    """Bind torch's stream calls (once; thread-safe) and return them. Raises
    :class:`~lowlevel.CudaUnavailableError` without a usable GPU."""
    global torch_ops, torch_get_device, torch_get_current, torch_set_current, torch_get_raw
    ops = torch_ops
    if ops is None:
        require_cuda()
        with _bind_lock:
            if torch_ops is None:
                ops = TorchOps()
                torch_get_device, torch_get_current = ops.get_device, ops.get_current
                torch_set_current, torch_get_raw = ops.set_current, ops.get_raw
                torch_ops = ops
            ops = torch_ops
    return ops


# --- CUDA runtime calls (CuPy's Cython bindings: no Python frame of ours in between) ----------

def _unbound(*_: Any) -> Any:
    require_cuda()
    raise RuntimeError("CuPy is not importable")  # pragma: no cover


cupy_get_current: Callable[[], Any] = cp.cuda.get_current_stream if cp is not None else _unbound
"""CuPy's current stream object of this thread."""
event_record: Callable[[int, int], None] = cp.cuda.runtime.eventRecord if cp is not None else _unbound
"""``event_record(event, stream)``: capture the work enqueued on ``stream`` so far."""
stream_wait_event: Callable[[int, int, int], None] = (
    cp.cuda.runtime.streamWaitEvent if cp is not None else _unbound)
"""``stream_wait_event(stream, event, 0)``: later work on ``stream`` waits for ``event``'s last record."""


def create_event(*, timing: bool = False, blocking: bool = False) -> Any:
    """A new CuPy event (``.ptr`` is its handle); the caller keeps the object alive."""
    require_cuda()
    return cp.cuda.Event(block=blocking, disable_timing=not timing)


def use_device(device: int) -> None:
    """Make ``device`` the calling thread's current device for torch and CuPy (a no-op when it
    already is: one call to torch's binding)."""
    ops = torch_ops if torch_ops is not None else bind()
    if ops.get_device() != device:
        ops.torch.cuda.set_device(device)
        cp.cuda.runtime.setDevice(device)


def current_handle() -> int:
    """Raw handle of lowlevel's current stream (see "Which stream is current" above)."""
    h = torch_get_raw(-1)  # binds on first use
    if h == 0:
        h = cupy_get_current().ptr
    return h


def is_capturing(stream: int) -> bool:
    """True while the stream with handle ``stream`` is being captured into a CUDA graph."""
    return bool(cp.cuda.runtime.streamIsCapturing(stream))


_tls = threading.local()


def order(producer: int, consumer: int) -> None:
    """Make stream ``consumer`` wait for the work enqueued so far on stream ``producer`` (raw
    handles); nothing when they are the same stream. One reused event per thread: a wait binds
    to the record that precedes it, so reuse is safe, in a graph capture too."""
    if producer == consumer:
        return
    ev = getattr(_tls, "event", None)
    if ev is None:
        ev = _tls.event = create_event()
    event_record(ev.ptr, producer)
    stream_wait_event(consumer, ev.ptr, 0)


# --- the two-framework stream switch ------------------------------------------------------------
# A "stream" here is a lowlevel.Stream: ``._cupy`` (a CuPy stream object) and its torch key.

def save() -> tuple[Any, Any]:
    """torch's and CuPy's current streams of this thread, for :func:`restore`."""
    return torch_get_current(-1), cupy_get_current()


def make_current(s: Any) -> None:
    """Make the lowlevel Stream ``s`` current for CuPy and torch (hence Triton) in this thread."""
    s._cupy.use()
    torch_set_current(*(s._torch_key or s._key()))


def restore(saved: tuple[Any, Any]) -> None:
    """Make current again what :func:`save` returned."""
    torch_set_current(*saved[0])
    saved[1].use()


# --- handles of foreign stream objects -----------------------------------------------------------

class Handle:
    """The smallest object that speaks the CUDA stream protocol."""

    __slots__ = ("handle",)

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


def cupy_external(handle: int) -> Any:
    """A CuPy stream object for a foreign handle (CuPy does not own it)."""
    cls = cp.cuda.Stream
    if hasattr(cls, "from_external"):
        return cls.from_external(Handle(handle))
    return cp.cuda.ExternalStream(handle, cp.cuda.runtime.getDevice())  # pragma: no cover - CuPy < 14


_handle_getters: dict[type, Callable[[Any], int]] = {}
class _NoStreamYet:
    """What :data:`stream_class` is until lowlevel.Stream registers (no object has this type)."""


stream_class: type = _NoStreamYet
"""``lowlevel.Stream`` once :mod:`lowlevel.stream` is imported: the hot paths below the stream
module compare ``type(s) is rt.stream_class`` and read ``s.ptr`` without a look-up."""


def register_stream_type(cls: type, get_handle: Callable[[Any], int]) -> None:
    """Teach :func:`stream_handle` a stream class (``lowlevel.Stream`` registers itself, and
    becomes :data:`stream_class`)."""
    global stream_class
    _handle_getters[cls] = get_handle
    if stream_class is _NoStreamYet:
        stream_class = cls


def stream_handle(stream: Any) -> int:
    """The raw ``cudaStream_t`` of a lowlevel, torch or CuPy stream, an int handle, or an object
    with ``__cuda_stream__``; lowlevel's current stream for None. ``TypeError`` otherwise."""
    if stream is None:
        return current_handle()
    cls = type(stream)
    if cls is int:
        if not 0 <= stream < 1 << 64:
            raise ValueError(f"stream: a stream handle is an int in [0, 2**64), got {stream}")
        return stream
    get = _handle_getters.get(cls)
    if get is None:
        get = _handle_getter_for(stream)
        _handle_getters[cls] = get
    return get(stream)


def _handle_getter_for(stream: Any) -> Callable[[Any], int]:
    for base, get in list(_handle_getters.items()):
        if isinstance(stream, base):
            return get
    if isinstance(stream, bool) or type(stream).__name__ in ("bool", "bool_"):
        raise TypeError("stream: a bool is not a stream handle")
    if isinstance(stream, int) or hasattr(type(stream), "__index__"):
        return _int_handle
    if type(stream).__module__.startswith("torch") and hasattr(stream, "cuda_stream"):
        return lambda s: s.cuda_stream
    if type(stream).__module__.startswith("cupy") and hasattr(stream, "ptr"):
        return lambda s: s.ptr
    if hasattr(stream, "__cuda_stream__"):
        return _protocol_handle
    raise TypeError(
        f"stream: cannot use {type(stream).__module__}.{type(stream).__qualname__} as a CUDA stream: expected a "
        "lowlevel.Stream, torch.cuda.Stream, cupy stream, int handle or an object with __cuda_stream__")


def _protocol_handle(stream: Any) -> int:
    """The handle of a ``__cuda_stream__`` object: the protocol's ``(version, handle)`` tuple,
    the handle an int (not a bool, str or float) in [0, 2**64)."""
    v = stream.__cuda_stream__()
    if not (isinstance(v, tuple) and len(v) == 2):
        raise TypeError(f"stream: __cuda_stream__() must return a (version, handle) tuple, got {v!r}")
    h = v[1]
    if isinstance(h, bool) or not isinstance(h, int):
        raise TypeError(f"stream: __cuda_stream__()'s handle must be an int, got {type(h).__name__} {h!r}")
    return _in_range(h)


def _int_handle(stream: Any) -> int:
    return _in_range(operator.index(stream))  # NumPy integers and other __index__ types


def _in_range(h: int) -> int:
    """``h`` if it can be a stream handle (an int in [0, 2**64)), else ValueError."""
    if not 0 <= h < 1 << 64:
        raise ValueError(f"stream: a stream handle is an int in [0, 2**64), got {h}")
    return h


def torch_stream(handle: int) -> Any:
    """A torch stream object for the raw handle (torch's own object when it is torch's current
    stream). For the slow paths that need one: torch events that were never recorded."""
    torch = bind().torch
    if handle == torch_get_raw(-1):
        return torch.cuda.current_stream()
    if handle == 0:
        return torch.cuda.default_stream()
    return torch.cuda.ExternalStream(handle)


# --- tracing hook ---------------------------------------------------------------------------------

tracer: Any = None
"""The active :class:`lowlevel.Timeline` (process-wide), or None; see the module docstring."""


def set_tracer(timeline: Any) -> Any:
    """Make ``timeline`` (or None) the active tracer; return the previous one."""
    global tracer
    prev, tracer = tracer, timeline
    return prev
