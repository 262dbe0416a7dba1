"""Microbatch thresholds and slices (vLLM's ``ubatch_utils``), pure NumPy."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["UBatchSlice", "maybe_create_ubatch_slices"]


@dataclass(frozen=True)
class UBatchSlice:
    """The requests and tokens of one microbatch. A request split between two microbatches
    appears in both ``request_slice``s."""

    request_slice: slice
    token_slice: slice

    @property
    def num_tokens(self) -> int:
        return self.token_slice.stop - self.token_slice.start

    def is_empty(self) -> bool:
        return (self.request_slice.start == self.request_slice.stop
                or self.token_slice.start == self.token_slice.stop)


def maybe_create_ubatch_slices(should_ubatch: bool, num_scheduled_tokens: Sequence[int] | np.ndarray,
                               num_tokens_padded: int, num_reqs_padded: int, num_ubatches: int = 2,
                               split_point: int | Sequence[int] | None = None,
                               ) -> tuple[list[UBatchSlice] | None, list[UBatchSlice] | None]:
    """Split a batch into ``num_ubatches`` microbatches; ``(None, None)`` if not ``should_ubatch``.

    Token boundaries are at ``split_point`` (default ``num_tokens_padded // num_ubatches``) and
    its multiples, the last one at the *unpadded* total. A request cut by a boundary appears in
    both slices. The second list is a copy whose last slice is extended to the padded request
    and token counts."""
    if not should_ubatch:
        return None, None
    if num_ubatches < 2:
        raise ValueError(f"num_ubatches must be >= 2, got {num_ubatches}")
    tokens = np.asarray(num_scheduled_tokens, dtype=np.int64)
    if tokens.ndim != 1 or (tokens < 0).any():
        raise ValueError("num_scheduled_tokens must be a 1-D array of non-negative counts")
    cu = np.zeros(len(tokens) + 1, dtype=np.int64)
    np.cumsum(tokens, out=cu[1:])
    total = int(cu[-1])
    if num_tokens_padded < total:
        raise ValueError(f"num_tokens_padded ({num_tokens_padded}) < scheduled tokens ({total})")
    if num_reqs_padded < len(tokens):
        raise ValueError(f"num_reqs_padded ({num_reqs_padded}) < scheduled requests ({len(tokens)})")
    if split_point is None:
        split_point = num_tokens_padded // num_ubatches
    if isinstance(split_point, (int, np.integer)):
        bounds = [int(split_point) * i for i in range(1, num_ubatches)]
    else:
        bounds = [int(b) for b in split_point]
        if len(bounds) != num_ubatches - 1:
            raise ValueError(f"split_point needs {num_ubatches - 1} boundaries, got {len(bounds)}")
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
    if sum(s.num_tokens for s in padded) != num_tokens_padded:
        raise ValueError(f"split points {bounds[:-1]} do not tile {num_tokens_padded} padded tokens")
    return slices, padded
