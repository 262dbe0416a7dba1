"""Exceptions raised by lowlevel."""
from __future__ import annotations

__all__ = ["LowlevelError", "CudaUnavailableError", "CaptureError"]


class LowlevelError(RuntimeError):
    """Base class of the errors that lowlevel raises itself."""


class CudaUnavailableError(LowlevelError):
    """No CUDA device (or no driver) was found, so no stream, event or graph can be made."""


class CaptureError(LowlevelError):
    """A CUDA graph capture failed; the message names the cause."""
