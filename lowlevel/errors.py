"""Exceptions raised by lowlevel, and the argument check they share."""
from __future__ import annotations

from typing import Any

__all__ = ["LowlevelError", "CudaUnavailableError", "CaptureError"]


def check_int(value: Any, name: str, minimum: int, *, types: tuple[type, ...] = (int,)) -> int:
    """``value`` as an int if it is one of ``types`` (never a bool) and at least ``minimum``;
    otherwise ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, types) or value < minimum:
        what = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


class LowlevelError(RuntimeError):
    """Base class of the errors that lowlevel raises itself."""


class CudaUnavailableError(LowlevelError):
    """No CUDA device (or no driver) was found, so no stream, event or graph can be made."""


class CaptureError(LowlevelError):
    """A CUDA graph capture failed; the message names the cause."""
