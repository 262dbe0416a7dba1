"""Where the CUDA device comes from: one cached probe, visible and resettable.

CuPy is the driver of record: lowlevel creates its streams and events through CuPy's runtime
bindings and hands the raw handles to torch where torch needs them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

from .errors import CudaUnavailableError

__all__ = ["cuda_available", "require_cuda", "device_count"]


# cudaErrorInsufficientDriver and cudaErrorNoDevice: what the CUDA runtime reports both for an
# old driver and for no driver at all (the runtime cannot tell them apart).
_DRIVER_CODES = (35, 100)


def _driver_present() -> bool:
    """Whether an NVIDIA driver is installed: its kernel module (``/proc/driver/nvidia``) or its
    user-space library (``libcuda`` / ``nvcuda.dll``) can be found."""
    if os.path.exists("/proc/driver/nvidia"):
        return True
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            pass
    return ctypes.util.find_library("cuda") is not None


def _no_device_reason(exc: BaseException) -> str:
    """Why ``getDeviceCount`` raised ``exc``: "no NVIDIA driver found" when the runtime's
    driver error comes from a machine without any driver, else the runtime's own words."""
    status = getattr(exc, "status", None)
    if (status in _DRIVER_CODES or "driver" in str(exc).lower()) and not _driver_present():
        return "no CUDA device was found: no NVIDIA driver found (no /proc/driver/nvidia, no libcuda)"
    return f"no CUDA device was found ({type(exc).__name__}: {exc})"


@functools.cache
def probe() -> tuple[int, str]:
    """(device count, reason when zero). Cached; reset with ``cuda_available.cache_clear()``."""
    try:
        import cupy
    except Exception as exc:  # pragma: no cover - cupy is a hard requirement of the GPU tier
        return 0, f"CuPy is not importable ({exc!r}); install lowlevel-streams[cuda12] or [cuda13]"
    try:
        n = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:
        return 0, _no_device_reason(exc)
    if n == 0:
        return 0, "no CUDA device was found (the driver reports 0 devices)"
    return n, ""


def device_count() -> int:
    """Number of CUDA devices the driver reports (0 without a GPU or driver)."""
    return probe()[0]


def cuda_available() -> bool:
    """True when at least one CUDA device can be used. The probe runs once per process."""
    return probe()[0] > 0


cuda_available.cache_clear = probe.cache_clear  # type: ignore[attr-defined]


def require_cuda() -> None:
    """Raise :class:`CudaUnavailableError` (saying why) when no CUDA device can be used."""
    n, why = probe()
    if n == 0:
        raise CudaUnavailableError(why)
