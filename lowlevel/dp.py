"""DP padding sync: data-parallel ranks agree on batch shape, microbatching and graph mode.

Every rank calls :func:`coordinate_batch_across_dp` once per step, with its own token counts;
exactly one collective (a SUM all-reduce of an int32 ``[5, dp_size]`` table in which each rank
fills its own column) makes the table identical everywhere, and every rank derives the same
plan from it:

* mode = the minimum of the ranks' graph modes (0 NONE, 1 PIECEWISE, 2 FULL: lower is safer);
* microbatch only if every rank wants to and the rank with the fewest real tokens would not get
  an all-padding last microbatch;
* pad every rank to the largest padded count when microbatching, or when every rank allows DP
  padding and the synced mode is not NONE; otherwise each rank keeps its own padded count.

Backends: gloo on CPU tensors (default; no GPU synchronisation, fit for async scheduling) or
NCCL on device tensors (``use_device_collective=True``) on a dedicated stream. The staging
buffers are allocated once per :class:`DPConfig` and reused.
"""
from __future__ import annotations

import datetime
import threading
from typing import Any

import numpy as np

from .errors import LowlevelError, check_int
from .ubatch_slices import check_ubatch_thresholds

__all__ = ["DPConfig", "DPSyncError", "coordinate_batch_across_dp", "post_process_dp_table"]

ROWS = 5  # unpadded, padded, wants to microbatch, allows DP padding, graph mode


class DPSyncError(LowlevelError):
    """The DP collective failed or timed out; the message names the step and this rank. After
    it, the process group is in an unknown state: tear it down."""


def _pos_int(name: str, v: Any, minimum: int = 0) -> int:
    return check_int(v, name, minimum, types=(int, np.integer))


class DPConfig:
    """What a rank needs to take part in DP padding sync, plus the buffers it reuses each step.

    ``group`` is a ``torch.distributed`` process group (default: the world group); with
    ``use_device_collective=False`` it must be able to all-reduce CPU tensors (gloo).
    ``timeout_s`` bounds the wait for peers (None: the group's own timeout). Not thread-safe:
    one DPConfig per rank and thread.
    """

    def __init__(self, dp_size: int, dp_rank: int, group: Any = None, *, num_ubatches: int = 2,
                 enable_microbatching: bool = False, decode_token_threshold: int = 32,
                 prefill_token_threshold: int = 512, use_device_collective: bool = False,
                 timeout_s: float | None = None) -> None:
        self.dp_size = _pos_int("dp_size", dp_size, 1)
        self.dp_rank = _pos_int("dp_rank", dp_rank)
        if self.dp_rank >= self.dp_size:
            raise ValueError(f"dp_rank {dp_rank} is out of range for dp_size {dp_size}")
        self.num_ubatches = _pos_int("num_ubatches", num_ubatches, 2)
        self.decode_token_threshold = _pos_int("decode_token_threshold", decode_token_threshold)
        self.prefill_token_threshold = _pos_int("prefill_token_threshold", prefill_token_threshold)
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.group = group
        self.enable_microbatching = bool(enable_microbatching)
        self.use_device_collective = bool(use_device_collective)
        self.timeout_s = timeout_s
        self.step = 0
        self._bufs: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def _buffers(self) -> dict[str, Any]:
        if self._bufs is None:
            import torch

            pin = torch.cuda.is_available()
            host = torch.zeros((ROWS, self.dp_size), dtype=torch.int32, pin_memory=pin)
            bufs: dict[str, Any] = {"host": host, "np": host.numpy()}
            if self.use_device_collective:
                from .stream import Stream

                bufs["device"] = torch.zeros((ROWS, self.dp_size), dtype=torch.int32, device="cuda")
                bufs["stream"] = Stream()
            self._bufs = bufs
        return self._bufs


def post_process_dp_table(table: np.ndarray, num_ubatches: int) -> tuple[bool, list[int], int, bool]:
    """The plan every rank derives from the reduced ``[5, dp_size]`` table:
    ``(should_ubatch, padded counts per rank, synced mode, padded to the max)``."""
    unpadded, padded, wants, allows, modes = (table[i] for i in range(ROWS))
    mode = int(modes.min())
    should_ubatch = bool((wants == 1).all())
    if should_ubatch:
        max_padded = int(padded.max())
        # The rank with the fewest real tokens would get an all-padding last microbatch.
        if (max_padded // num_ubatches) * (num_ubatches - 1) >= int(unpadded.min()):
            should_ubatch = False
    pad = should_ubatch or (bool((allows == 1).all()) and mode != 0)
    counts = [int(padded.max())] * table.shape[1] if pad else [int(x) for x in padded]
    return should_ubatch, counts, mode, pad


def coordinate_batch_across_dp(num_tokens_unpadded: int, allow_microbatching: bool, allow_dp_padding: bool,
                               config: DPConfig, num_tokens_padded: int | None = None,
                               uniform_decode: bool | None = None, cudagraph_mode: int = 0,
                               ) -> tuple[bool, Any, int]:
    """Agree with the other DP ranks on this step's plan.

    Returns ``(should_ubatch, num_tokens_after_padding, synced_cudagraph_mode)``:
    ``num_tokens_after_padding`` is a CPU int32 torch tensor of length ``dp_size`` (pinned where
    a GPU exists; ``.numpy()`` and :func:`lowlevel.as_cupy` views of it work), or None with
    ``dp_size == 1`` (no collective: ``(False, None, cudagraph_mode)``).

    Bad input raises ``ValueError`` before any collective, so a bad rank fails alone and fast
    (its peers then time out, if ``timeout_s`` is set). Collective errors and timeouts raise
    :class:`DPSyncError`.
    """
    unp = _pos_int("num_tokens_unpadded", num_tokens_unpadded)
    pad = unp if num_tokens_padded is None else _pos_int("num_tokens_padded", num_tokens_padded)
    if pad < unp:
        raise ValueError(f"num_tokens_padded ({pad}) < num_tokens_unpadded ({unp})")
    mode = getattr(cudagraph_mode, "value", cudagraph_mode)  # a CUDAGraphMode or its int
    if isinstance(cudagraph_mode, bool) or isinstance(mode, tuple) or mode not in (0, 1, 2):
        raise ValueError(f"cudagraph_mode must be 0, 1 or 2 (a runtime mode), got {cudagraph_mode!r}")
    mode = int(mode)
    if allow_microbatching and uniform_decode is None:
        raise ValueError("uniform_decode must be given when allow_microbatching is True")
    if config.dp_size == 1:
        return False, None, mode
    wants = bool(allow_microbatching) and check_ubatch_thresholds(config, unp, bool(uniform_decode))
    with config._lock:
        table = _all_reduce(config, (unp, pad, int(wants), int(bool(allow_dp_padding)), mode))
        should_ubatch, counts, synced, _ = post_process_dp_table(table, config.num_ubatches)
        config.step += 1
    import torch

    out = torch.tensor(counts, dtype=torch.int32)
    if torch.cuda.is_available():
        out = out.pin_memory()
    return should_ubatch, out, synced


def _all_reduce(config: DPConfig, column: tuple[int, int, int, int, int]) -> np.ndarray:
    """One SUM all-reduce of the ``[5, dp_size]`` table with this rank's column filled."""
    import torch.distributed as dist

    b = config._buffers()
    host, table = b["host"], b["np"]
    table.fill(0)
    table[:, config.dp_rank] = column
    group = config.group
    timeout = None if config.timeout_s is None else datetime.timedelta(seconds=config.timeout_s)
    where = f"DP sync step {config.step} on dp_rank {config.dp_rank} of {config.dp_size}"
    try:
        if config.use_device_collective:
            from .stream import use_stream

            dev, s = b["device"], b["stream"]
            with use_stream(s):  # the collective and both copies are ordered on one stream
                dev.copy_(host, non_blocking=True)
                work = dist.all_reduce(dev, group=group, async_op=True)
                _wait(work, timeout, where)
                host.copy_(dev, non_blocking=True)
            s.synchronize()
        else:
            work = dist.all_reduce(host, group=group, async_op=True)
            _wait(work, timeout, where)
    except DPSyncError:
        raise
    except Exception as exc:
        raise DPSyncError(f"{where} failed: {type(exc).__name__}: {exc}") from exc
    return table


def _wait(work: Any, timeout: datetime.timedelta | None, where: str) -> None:
    try:
        ok = work.wait() if timeout is None else work.wait(timeout)
    except Exception as exc:
        if "timeout" in str(exc).lower() or "timed out" in str(exc).lower():
            raise DPSyncError(f"{where} timed out after {timeout}: a peer never joined ({exc})") from exc
        raise
    if ok is False:
        raise DPSyncError(f"{where} timed out after {timeout}: a peer never joined")
