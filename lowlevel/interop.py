"""Zero-copy views between CuPy arrays and torch tensors.

Both directions keep the pointer, shape, strides and dtype (bfloat16 included where the CuPy
build supports it). The stream contract follows the array-API DLPack rule: the *consumer*
stream (``stream=``, default the consumer framework's current stream) is ordered after the
work pending on the *producer* framework's current stream, with an event record and wait
when the two differ; nothing is synchronised on the host. Inside :func:`lowlevel.use_stream`
the two current streams are the same, so a conversion enqueues nothing at all.

Also where a torch tensor's memory lies (:func:`extent`, :func:`byte_span`, :func:`overlaps`),
which the kernels and the collectives check before they write.
"""
from __future__ import annotations

from typing import Any

from . import _runtime as rt
from .stream import StreamLike

__all__ = ["as_torch", "as_cupy"]  # the memory helpers below serve lowlevel's own checks


def extent(t: Any) -> int:
    """Elements between the first and one past the last element of the torch tensor ``t``: the
    largest offset a kernel computes into it, plus one (2**31 or more needs 64-bit offsets)."""
    return 1 + sum((d - 1) * abs(s) for d, s in zip(t.shape, t.stride())) if t.numel() else 0


def byte_span(t: Any) -> int:
    """Bytes from the first element of the torch tensor ``t`` to one past its last: its memory
    is ``[t.data_ptr(), t.data_ptr() + byte_span(t))`` (0 for an empty tensor)."""
    return extent(t) * t.element_size()


def overlaps(a: Any, b: Any) -> bool:
    """Whether the memory ranges of the torch tensors ``a`` and ``b`` (:func:`byte_span`) meet,
    as torch's own overlap check compares them (an empty tensor meets nothing)."""
    pa, na, pb, nb = a.data_ptr(), byte_span(a), b.data_ptr(), byte_span(b)
    return bool(na and nb and pa < pb + nb and pb < pa + na)


_torch_to_np: dict[Any, Any] = {}


def _np_dtype(tdtype: Any) -> Any:
    """NumPy dtype for a torch dtype, or None when CuPy needs DLPack for it (bf16 and friends)."""
    try:
        return _torch_to_np[tdtype]
    except KeyError:
        pass
    import numpy as np
    import torch

    table = {
        torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64,
        torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64,
        torch.uint8: np.uint8, torch.bool: np.bool_, torch.complex64: np.complex64,
        torch.complex128: np.complex128,
    }
    for k, v in table.items():
        _torch_to_np[k] = np.dtype(v)
    _torch_to_np.setdefault(tdtype, None)
    return _torch_to_np[tdtype]


def as_cupy(x: Any, stream: StreamLike | None = None) -> Any:
    """A CuPy view of ``x`` (a torch CUDA tensor, or a pinned CPU tensor, which the device reads
    through unified addressing; a CuPy array is returned as is).

    The view shares memory with ``x`` and keeps it alive. ``stream`` (default CuPy's current
    stream) is ordered after the work pending on torch's current stream.
    """
    cp = rt.cp
    if isinstance(x, cp.ndarray):
        return x
    ops = rt.torch_ops
    torch = ops.torch if ops is not None else _import_torch()
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"as_cupy expects a torch.Tensor or cupy.ndarray, got {type(x).__qualname__}")
    if x.is_cuda:
        pinned = False
        device_index = x.get_device()
    else:
        pinned = x.device.type == "cpu" and x.is_pinned()
        if not pinned:
            raise ValueError(f"as_cupy needs a CUDA tensor or a pinned CPU tensor, got one on {x.device}")
        device_index = cp.cuda.runtime.getDevice()
    t = ops if ops is not None else rt.bind()
    producer = t.get_raw(device_index)
    consumer = cp.cuda.get_current_stream().ptr if stream is None else rt.stream_handle(stream)
    if producer != consumer:
        rt.order(producer, consumer)
    dt = _torch_to_np.get(x.dtype, _UNKNOWN)
    if dt is _UNKNOWN:
        dt = _np_dtype(x.dtype)
    if dt is None:
        arr = _cupy_from_dlpack(x)
        _torch_to_np[x.dtype] = arr.dtype  # e.g. bfloat16: CuPy's own dtype, fast path next time
        return arr
    itemsize = dt.itemsize
    shape = tuple(x.shape)
    stride = x.stride()
    if x.numel() == 0:
        return cp.ndarray(shape, dt)
    extent = 1
    for i in range(len(shape)):
        extent += (shape[i] - 1) * stride[i]
    # A pinned host tensor is addressable from the device at the same pointer (unified addressing).
    mem = cp.cuda.UnownedMemory(x.data_ptr(), extent * itemsize, x, device_index)
    return cp.ndarray(shape, dt, cp.cuda.MemoryPointer(mem, 0), tuple([s * itemsize for s in stride]))


_UNKNOWN = object()


def _import_torch() -> Any:
    import torch

    return torch


def _cupy_from_dlpack(x: Any) -> Any:
    try:
        return rt.cp.from_dlpack(x.detach())
    except Exception as exc:
        raise TypeError(
            f"CuPy {rt.cp.__version__} cannot import a {x.dtype} tensor through DLPack ({exc}); "
            "for bfloat16 use CuPy >= 14, or pass the bits: as_cupy(t.view(torch.int16))"
        ) from exc


def as_torch(x: Any, stream: StreamLike | None = None) -> Any:
    """A torch view of ``x`` (a CuPy array; a torch tensor is returned as is).

    The view shares memory with ``x`` and keeps it alive. ``stream`` (default torch's current
    stream) is ordered after the work pending on CuPy's current stream.
    """
    cp = rt.cp
    if cp is None or not isinstance(x, cp.ndarray):
        ops = rt.torch_ops
        torch = ops.torch if ops is not None else _import_torch()
        if isinstance(x, torch.Tensor):
            return x
        raise TypeError(f"as_torch expects a cupy.ndarray or torch.Tensor, got {type(x).__qualname__}")
    t = rt.torch_ops
    if t is None:
        t = rt.bind()
    consumer = t.get_raw(x.device.id) if stream is None else rt.stream_handle(stream)
    producer = cp.cuda.get_current_stream().ptr
    if producer != consumer:
        rt.order(producer, consumer)
    # stream=-1: export without a stream handshake (DLPack's "no synchronisation"); the
    # ordering was done just above.
    return t.from_dlpack(x.__dlpack__(stream=-1))
