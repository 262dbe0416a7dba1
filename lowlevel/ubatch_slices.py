"""Microbatch thresholds and slices (vLLM's ``ubatch_utils``), pure NumPy."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import check_bool, check_int, describe

__all__ = ["UBatchSlice", "maybe_create_ubatch_slices"]


def _index_slice(s: Any, name: str) -> slice:
    """``s`` as ``slice(start, stop)`` with ints ``0 <= start <= stop`` and no step."""
    if type(s) is not slice:
        raise TypeError(f"{name} must be a slice, got {describe(s)}")
    start, stop = s.start, s.stop
    if not (type(start) is int and type(stop) is int):
        start = check_int(start, f"{name}.start")
        stop = check_int(stop, f"{name}.stop")
    if not 0 <= start <= stop:
        raise ValueError(f"{name} must have 0 <= start <= stop, got {s}")
    if s.step is not None and s.step != 1:
        raise ValueError(f"{name} must have no step, got {s}")
    return s if type(s.start) is int and type(s.stop) is int and s.step is None else slice(start, stop)


@dataclass(frozen=True)
class UBatchSlice:
    """The requests and tokens of one microbatch. A request split between two microbatches
    appears in both ``request_slice``s.

    Both are ``slice(start, stop)`` with integer bounds, ``0 <= start <= stop`` and no step
    (NumPy integer bounds are converted); anything else raises ``TypeError`` /
    ``ValueError`` at construction."""

    request_slice: slice
    token_slice: slice

    def __post_init__(self) -> None:
        r = _index_slice(self.request_slice, "request_slice")
        t = _index_slice(self.token_slice, "token_slice")
        if r is not self.request_slice:
            object.__setattr__(self, "request_slice", r)
        if t is not self.token_slice:
            object.__setattr__(self, "token_slice", t)

    @property
    def num_tokens(self) -> int:
        return self.token_slice.stop - self.token_slice.start

    def is_empty(self) -> bool:
        return (self.request_slice.start == self.request_slice.stop
                or self.token_slice.start == self.token_slice.stop)


def _token_counts(num_scheduled_tokens: Any) -> np.ndarray:
    what = "num_scheduled_tokens must be a non-empty 1-D sequence of positive integer token counts"
    if num_scheduled_tokens is None or isinstance(num_scheduled_tokens, (str, bytes)) \
            or not hasattr(num_scheduled_tokens, "__len__"):
        raise TypeError(f"{what}, got {describe(num_scheduled_tokens)}")
    tokens = np.asarray(num_scheduled_tokens)
    if tokens.ndim != 1 or tokens.size == 0:
        raise ValueError(f"{what}, got shape {tokens.shape}")
    if tokens.dtype.kind not in "iu":
        raise ValueError(f"{what}, got {tokens.dtype} values {tokens.tolist()}")
    if (tokens <= 0).any():
        raise ValueError(f"{what}, got {tokens.tolist()}")
    return tokens.astype(np.int64, copy=False)


def maybe_create_ubatch_slices(should_ubatch: bool, num_scheduled_tokens: Sequence[int] | np.ndarray,
                               num_tokens_padded: int, num_reqs_padded: int, num_ubatches: int = 2,
                               split_point: int | Sequence[int] | None = None,
                               ) -> tuple[list[UBatchSlice] | None, list[UBatchSlice] | None]:
    """Split a batch into ``num_ubatches`` microbatches; ``(None, None)`` if not ``should_ubatch``.

    ``num_scheduled_tokens``: each request's token count (positive ints, 1-D, any integer
    dtype), ``total`` their sum. Token boundaries are at ``split_point`` (default
    ``num_tokens_padded // num_ubatches``) and its multiples, or at the ``num_ubatches - 1``
    points of a sequence (a list, tuple or 1-D integer array; a NumPy integer or 0-d array is
    a scalar); the last slice ends at ``total``. The split points must be strictly
    increasing inside ``(0, total]`` (so every slice but the last has tokens, and the slices
    tile the scheduled tokens). A split at ``total`` leaves the last microbatch all padding:
    :class:`~lowlevel.UBatchRunner` refuses such an empty microbatch, and vLLM's DP vote does
    not microbatch that step (its ``is_last_ubatch_empty`` rule, which
    :func:`~lowlevel.coordinate_batch_across_dp` applies too). A request cut by a boundary
    appears in both slices. The second list is a copy whose last slice is
    extended to ``num_reqs_padded`` requests and ``num_tokens_padded`` tokens.

    Raises ``TypeError`` for arguments of the wrong type (``bool`` for an int, floats, ...),
    ``ValueError`` for values out of range (``num_ubatches < 2``, padded counts below the
    scheduled ones, split points outside the rule), naming the argument. The scalar
    arguments are checked even when ``should_ubatch`` is false."""
    should_ubatch = check_bool(should_ubatch, "should_ubatch")
    num_ubatches = check_int(num_ubatches, "num_ubatches", 2)
    num_tokens_padded = check_int(num_tokens_padded, "num_tokens_padded", 0)
    num_reqs_padded = check_int(num_reqs_padded, "num_reqs_padded", 0)
    if not should_ubatch:
        return None, None
    tokens = _token_counts(num_scheduled_tokens)
    cu = np.zeros(len(tokens) + 1, dtype=np.int64)
    np.cumsum(tokens, out=cu[1:])
    total = int(cu[-1])
    if num_tokens_padded < total:
        raise ValueError(f"num_tokens_padded must be >= the scheduled tokens ({total}), got {num_tokens_padded}")
    if num_reqs_padded < len(tokens):
        raise ValueError(f"num_reqs_padded must be >= the scheduled requests ({len(tokens)}), got {num_reqs_padded}")
    if split_point is None:
        step = num_tokens_padded // num_ubatches
        bounds = [step * i for i in range(1, num_ubatches)]
    elif (hasattr(split_point, "__index__") and getattr(split_point, "ndim", 0) == 0) or _scalar_like(split_point):
        step = check_int(split_point, "split_point")
        bounds = [step * i for i in range(1, num_ubatches)]
    elif hasattr(split_point, "__iter__") and not isinstance(split_point, (str, bytes)):
        if getattr(split_point, "ndim", 1) != 1:
            raise TypeError(f"split_point must be None, an int or a 1-D sequence of ints, got an array of shape "
                            f"{np.shape(split_point)}")
        bounds = [check_int(b, f"split_point[{i}]") for i, b in enumerate(split_point)]
        if len(bounds) != num_ubatches - 1:
            raise ValueError(f"split_point must have num_ubatches - 1 = {num_ubatches - 1} points, got {bounds}")
    else:
        raise TypeError(f"split_point must be None, an int or a sequence of ints, got {describe(split_point)}")
    prev = 0
    for b in bounds:
        if not prev < b <= total:
            what = "split_point" if split_point is not None else \
                f"split_point (default num_tokens_padded // num_ubatches = {num_tokens_padded // num_ubatches})"
            raise ValueError(f"{what} must give split points strictly increasing inside (0, {total}] (the "
                             f"scheduled tokens), got {bounds}")
        prev = b
    bounds.append(total)
    slices = []
    start = 0
    for end in bounds:
        req_start = int(np.searchsorted(cu, start, side="right")) - 1
        req_stop = int(np.searchsorted(cu, end, side="left"))
        slices.append(UBatchSlice(slice(req_start, req_stop), slice(start, end)))
        start = end
    last = slices[-1]
    padded = slices[:-1] + [UBatchSlice(slice(last.request_slice.start, num_reqs_padded),
                                        slice(last.token_slice.start, num_tokens_padded))]
    return slices, padded


def _scalar_like(x: Any) -> bool:
    """A number that is not an int (a float, a NumPy float): refused by check_int with its type."""
    return isinstance(x, (float, complex, np.number, np.bool_, bool))
