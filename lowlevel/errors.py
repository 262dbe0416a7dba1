"""Exceptions raised by lowlevel, and the argument checks every public entry point shares.

The checks follow one convention: the wrong *type* raises ``TypeError`` (the message shows the
value and its type), a value of the right type out of range raises ``ValueError``; both name the
argument and say what it must be. Each check has an exact-type fast path so that validating a
well-formed argument costs a type comparison or two.
"""
from __future__ import annotations

import math
import operator
import os
import typing
from collections.abc import Iterable
from typing import Any

__all__ = ["LowlevelError", "CudaUnavailableError", "CaptureError"]
# The checks below are shared by every layer but are not public API (not in __all__).


def describe(value: Any) -> str:
    """``value`` as an error message shows it when its type is the problem."""
    return f"{value!r} ({type(value).__qualname__})"


def is_bool(value: Any) -> bool:
    """A Python or NumPy bool (``numpy.bool_`` is named ``bool`` in NumPy 2)."""
    cls = type(value)
    return cls is bool or (cls.__module__ == "numpy" and cls.__name__ in ("bool", "bool_"))


def _int_what(minimum: int | None, maximum: int | None) -> str:
    if maximum is not None:
        return f"an int <= {maximum}" if minimum is None else f"an int in [{minimum}, {maximum}]"
    return {None: "an int", 0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")


def check_int(value: Any, name: str, minimum: int | None = None, maximum: int | None = None,
              *, types: Any = None) -> int:
    """``value`` as a plain ``int``.

    Integers are whatever :func:`operator.index` accepts (``int``, NumPy integers, 0-d integer
    arrays, any ``__index__``), never ``bool`` (nor ``numpy.bool_``). Raises ``TypeError``
    for any other type, ``ValueError`` when the value is below ``minimum`` or above
    ``maximum`` (each inclusive, ``None`` for unbounded); the message names ``name``.
    ``types`` is accepted for compatibility and ignored: every integer type is accepted."""
    if type(value) is int:
        v = value
    else:
        if isinstance(value, bool) or is_bool(value):
            raise TypeError(f"{name} must be {_int_what(minimum, maximum)}, got a bool: {describe(value)}")
        try:
            v = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be {_int_what(minimum, maximum)}, got {describe(value)}") from None
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        raise ValueError(f"{name} must be {_int_what(minimum, maximum)}, got {v}")
    return v


def check_bool(value: Any, name: str) -> bool:
    """``value`` as a plain ``bool``: a ``bool`` or ``numpy.bool_``; anything else (``0``,
    ``1``, ``None``, strings) raises ``TypeError`` naming ``name``."""
    if value is True or value is False:
        return value
    if is_bool(value):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {describe(value)}")


_CHOICES: dict[Any, tuple[Any, ...]] = {}


def choices_of(choices: Any) -> tuple[Any, ...]:
    """The valid values of a ``typing.Literal[...]`` (via :func:`typing.get_args`), or of an
    iterable of values; cached per ``Literal``."""
    try:
        return _CHOICES[choices]
    except (KeyError, TypeError):
        pass
    args = typing.get_args(choices) if typing.get_origin(choices) is typing.Literal else tuple(choices)
    if not args:
        raise ValueError(f"no valid values in {choices!r}")
    try:
        _CHOICES[choices] = args
    except TypeError:  # an unhashable iterable of values
        pass
    return args


def check_choice(value: Any, name: str, choices: Any) -> Any:
    """``value`` if it is one of ``choices`` (a ``typing.Literal[...]`` or an iterable of
    values), compared by type and value, so ``True`` is not ``1`` and ``1`` is not ``'1'``.

    Raises ``TypeError`` when no choice has ``value``'s type, ``ValueError`` when none equals
    it; both messages list the valid values."""
    args = choices_of(choices)
    cls = type(value)
    for a in args:
        if type(a) is cls and a == value:
            return value
    valid = ", ".join(repr(a) for a in args)
    if any(type(a) is cls for a in args):
        raise ValueError(f"{name} must be one of {valid}; got {value!r}")
    raise TypeError(f"{name} must be one of {valid}; got {describe(value)}")


def _not_a_real(value: Any) -> bool:
    """Types a real-number argument refuses although ``float()`` may take them: bools, text,
    complex numbers and arrays of one or more dimensions (a size-1 array included)."""
    return (isinstance(value, (bool, str, bytes, complex)) or is_bool(value)
            or type(value).__name__.startswith("complex") or getattr(value, "ndim", 0) != 0)


def _too_large(name: str, what: str) -> ValueError:
    """The error for a real number past the float range (``float(10**400)`` raises
    ``OverflowError``, which names nothing)."""
    return ValueError(f"{name} must be {what}, got a value too large for a float")


def check_real(value: Any, name: str, what: str = "a finite real number", *, positive: bool = False) -> float:
    """``value`` as a finite ``float`` (``int``, ``float``, NumPy reals, 0-d arrays, anything
    ``float()`` takes; never ``bool``, ``str``, complex or an array with a dimension), and
    ``> 0`` when ``positive``. ``TypeError`` for the wrong type, ``ValueError`` for NaN,
    infinities and (``positive``) values ``<= 0``; messages say ``name`` must be ``what``."""
    cls = type(value)
    if cls is float or cls is int:
        try:
            v = float(value)
        except OverflowError:  # an int past the float range
            raise _too_large(name, what) from None
    else:
        if value is None or _not_a_real(value):
            raise TypeError(f"{name} must be {what}, got {describe(value)}")
        try:
            v = float(value)
        except OverflowError:
            raise _too_large(name, what) from None
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be {what}, got {describe(value)}") from None
    if not math.isfinite(v) or (positive and not v > 0):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return v


def check_timeout(value: Any, name: str, allow_none: bool = True) -> float | None:
    """``value`` as a float number of seconds: finite and positive (``int``, ``float``, a
    NumPy real or a 0-d array; never ``bool`` nor an array with a dimension, even of size 1),
    or ``None`` when ``allow_none`` ("wait without a bound").

    Raises ``TypeError`` for other types (``None`` included when not allowed), ``ValueError``
    for zero, negative, NaN and infinite values."""
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{name} must be a finite positive number of seconds, got None")
    return check_real(value, name, "a finite positive number of seconds", positive=True)


def check_path(value: Any, name: str) -> str | os.PathLike[str]:
    """``value`` if it is a file path (a ``str`` or ``os.PathLike``); anything else, an int
    (which ``open`` would take as a file descriptor) or ``bytes`` included, raises
    ``TypeError`` naming ``name``."""
    if type(value) is str or isinstance(value, (str, os.PathLike)):
        return value
    raise TypeError(f"{name} must be a str or os.PathLike file path, got {describe(value)}")


def check_ints(values: Any, name: str, minimum: int | None = None) -> list[int]:
    """Every element of the iterable ``values`` through :func:`check_int` (messages name
    ``name[i]``); ``TypeError`` when ``values`` is not an iterable (a ``str`` is refused)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be an iterable of ints, got {describe(values)}")
    try:
        items = list(values)
    except TypeError:  # e.g. a 0-d array
        raise TypeError(f"{name} must be an iterable of ints, got {describe(values)}") from None
    return [check_int(v, f"{name}[{i}]", minimum) for i, v in enumerate(items)]


class LowlevelError(RuntimeError):
    """Base class of the errors that lowlevel raises itself."""


class CudaUnavailableError(LowlevelError):
    """No CUDA device (or no driver) was found, so no stream, event or graph can be made."""


class CaptureError(LowlevelError):
    """A CUDA graph capture failed; the message names the cause."""

