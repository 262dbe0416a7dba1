"""DP padding sync: data-parallel ranks agree on batch shape, microbatching and graph mode.

Every rank calls :func:`coordinate_batch_across_dp` once per step, with its own token counts;
exactly one collective (a SUM all-reduce of an int32 ``[ROWS, group size]`` table in which each
process fills its own column, the column of its rank in the group) makes the table identical
everywhere, and every rank derives the same plan from it:

* mode = the minimum of the ranks' graph modes (0 NONE, 1 PIECEWISE, 2 FULL: lower is safer);
* microbatch only if every rank wants to and the rank with the fewest real tokens would not get
  an all-padding last microbatch;
* pad every rank to the largest padded count when microbatching, or when every rank allows DP
  padding and the synced mode is not NONE; otherwise each rank keeps its own padded count.

The same table carries each rank's configuration, so the one collective also checks it: a
presence row (each rank writes 1 in the column of its ``dp_rank``), and every rank's
``dp_rank``, ``dp_size``, ``num_ubatches`` and step number (the generation). A duplicate or
missing ``dp_rank``, a ``dp_size`` other than the group's size, different ``num_ubatches`` or a
rank a step ahead or behind raises :class:`DPSyncError` on *every* rank, naming the mismatch.
The table's shape depends only on the group's size, never on a rank's beliefs, so ranks that
disagree still meet in the same collective (no rank is killed inside gloo).

Backends: gloo on CPU tensors (default; no GPU synchronisation, fit for async scheduling: a
step writes six values and enqueues the all-reduce; the rest of the bookkeeping runs while it is
in flight, and where the process has 8 cores or more the wait spins on the work for up to 0.5 ms,
holding the GIL, before it blocks) or NCCL on device tensors (``use_device_collective=True``),
enqueued on a dedicated cached stream (so it never waits for the model's queued work), the
result copied back into pinned memory and an event polled against the deadline.
:func:`coordinate_batch_across_dp_async` (or :meth:`DPConfig.start`) starts the vote and
returns a :class:`DPVote` at once; its :meth:`DPVote.result` gives the plan the blocking call
would have given. Buffers, stream and event are made once per :class:`DPConfig` and reused.
"""
from __future__ import annotations

import datetime
import math
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from .cudagraph_dispatch import CUDAGraphMode, as_cudagraph_mode
from .device import cuda_available, probe
from .errors import CudaUnavailableError, LowlevelError, check_bool, check_int, check_ints, check_timeout, describe

__all__ = ["DPConfig", "DPSyncError", "DPConfigError", "DPVote", "check_ubatch_thresholds",
           "coordinate_batch_across_dp", "coordinate_batch_across_dp_async", "post_process_dp_table"]

# Rows of the table. The first five are the plan's inputs (vLLM's layout plus the DP-padding row);
# the rest check the configuration. Every row but PRESENT is written in the process's column
# (its rank in the group); PRESENT is written in the column of the rank's dp_rank.
R_UNPADDED, R_PADDED, R_WANTS, R_ALLOWS, R_MODE, R_PRESENT, R_DP_RANK, R_DP_SIZE, R_NUM_UBATCHES, R_STEP = range(10)
PLAN_ROWS = 5
ROWS = 10
_STEP_MOD = 1 << 31  # the step is sent modulo 2**31 (int32 table)


class DPSyncError(LowlevelError):
    """The DP collective failed, timed out, or showed ranks that disagree (configuration or
    step); the message names the step, this rank and the mismatch. After a failure or timeout
    the process group is in an unknown state: tear it down. After a mismatch the collective
    itself completed and the step counter was not advanced."""


class DPConfigError(DPSyncError, ValueError):
    """This rank's own configuration does not fit the group (``dp_size`` other than the group's
    size). Raised after this rank joined the collective, so its peers raise too instead of
    waiting for it."""


# --- configuration ------------------------------------------------------------------------------

_MAX_TIMEOUT_S = 10**9  # torch counts a collective's timeout in int64 nanoseconds (~9.2e9 s): keep well below


class _State:
    """The mutable part of a DPConfig: step counter, cached group facts, buffers, the vote in flight."""

    __slots__ = ("step", "group_size", "group_rank", "bufs", "inflight", "broken", "lock")

    def __init__(self) -> None:
        self.step = 0
        self.group_size = 0  # the group's size, known once the buffers exist
        self.group_rank = 0
        self.bufs: dict[str, Any] = {}  # made at the first call
        self.inflight: DPVote | None = None
        self.broken: str | None = None
        self.lock = threading.Lock()


@dataclass(frozen=True, eq=False, init=False)
class DPConfig:
    """What a rank needs to take part in DP padding sync (validated at construction; immutable),
    plus the state it keeps between steps (step counter, buffers) apart from it.

    ``dp_size``: the number of DP ranks, which must equal the group's size (checked at the first
    call; ``dp_size=1`` makes no collective at all, so it is not checked against any group);
    ``dp_rank`` in ``[0, dp_size)``; ints are anything ``operator.index`` accepts (NumPy ints
    included), never bool. ``group`` is a ``torch.distributed`` process group (default: the
    world group); with ``use_device_collective=False`` it must all-reduce CPU tensors (gloo),
    with True device tensors (NCCL). ``timeout_s`` (finite, > 0, or None for no bound of ours)
    bounds each wait for the peers. One wait it cannot bound: the first collective of a fresh
    NCCL communicator, which NCCL (2.22 and later, ``NCCL_RUNTIME_CONNECT=1`` by default) uses
    to connect the peers, blocking the host inside the launch until they all arrive; seen on
    H200 pairs, where a first vote with ``timeout_s=2`` returned after the late peer joined
    4 s later. Run one collective on the group before the first vote (as a server's warm-up
    step does), or set ``NCCL_RUNTIME_CONNECT=0`` to connect at initialisation.
    ``num_ubatches`` >= 2 must be the same on every rank.
    Wrong types raise ``TypeError``, out-of-range values ``ValueError``, naming the argument.
    Not thread-safe: one DPConfig per rank and thread.
    """

    dp_size: int
    dp_rank: int
    group: Any = None
    num_ubatches: int = 2
    enable_microbatching: bool = False
    decode_token_threshold: int = 32
    prefill_token_threshold: int = 512
    use_device_collective: bool = False
    timeout_s: float | None = None
    _state: _State = field(init=False, repr=False, compare=False)

    def __init__(self, dp_size: int, dp_rank: int, group: Any = None, *, num_ubatches: int = 2,
                 enable_microbatching: bool = False, decode_token_threshold: int = 32,
                 prefill_token_threshold: int = 512, use_device_collective: bool = False,
                 timeout_s: float | None = None) -> None:
        size = check_int(dp_size, "dp_size", 1)
        rank = check_int(dp_rank, "dp_rank", 0)
        if rank >= size:
            raise ValueError(f"dp_rank must be in [0, dp_size={size}), got {rank}")
        if group is not None:
            import torch.distributed as dist

            if not isinstance(group, dist.ProcessGroup):
                raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {describe(group)}")
        timeout = check_timeout(timeout_s, "timeout_s")
        if timeout is not None and timeout > _MAX_TIMEOUT_S:
            raise ValueError(f"timeout_s must be at most {_MAX_TIMEOUT_S} s (torch counts a collective's "
                             f"timeout in int64 nanoseconds), got {timeout_s!r}")
        device = check_bool(use_device_collective, "use_device_collective")
        if device and not cuda_available():
            raise CudaUnavailableError("use_device_collective=True needs a CUDA device: " + probe()[1])
        values = dict(dp_size=size, dp_rank=rank, group=group,
                      num_ubatches=check_int(num_ubatches, "num_ubatches", 2),
                      enable_microbatching=check_bool(enable_microbatching, "enable_microbatching"),
                      decode_token_threshold=check_int(decode_token_threshold, "decode_token_threshold", 0),
                      prefill_token_threshold=check_int(prefill_token_threshold, "prefill_token_threshold", 0),
                      use_device_collective=device, timeout_s=timeout, _state=_State())
        for k, v in values.items():
            object.__setattr__(self, k, v)

    @property
    def step(self) -> int:
        """Votes completed with this config that made a collective (the generation the next vote
        sends, modulo 2**31); with ``dp_size == 1`` no collective is made and it stays 0."""
        return self._state.step

    @property
    def vote_in_flight(self) -> DPVote | None:
        """The vote started with this config whose :meth:`DPVote.result` has not returned or
        raised yet, or None. Read-only; a dropped vote stays reachable here: call
        ``config.vote_in_flight.result()`` to finish it and free the config for the next one."""
        return self._state.inflight

    def start(self, num_tokens_unpadded: int, allow_microbatching: bool, allow_dp_padding: bool,
              num_tokens_padded: int | None = None, uniform_decode: bool | None = None,
              cudagraph_mode: Any = 0) -> DPVote:
        """:func:`coordinate_batch_across_dp_async` with this config."""
        return coordinate_batch_across_dp_async(num_tokens_unpadded, allow_microbatching, allow_dp_padding, self,
                                                num_tokens_padded, uniform_decode, cudagraph_mode)


def check_ubatch_thresholds(config: DPConfig, num_tokens: int, uniform_decode: bool) -> bool:
    """Whether a batch is large enough to be worth microbatching: ``num_tokens >=`` the decode
    threshold for a uniform-decode batch, the prefill threshold otherwise; always False when
    microbatching is not enabled. ``TypeError`` / ``ValueError`` naming the argument for a
    ``config`` that is no :class:`DPConfig`, a ``num_tokens`` that is no non-negative int, or a
    ``uniform_decode`` that is no bool."""
    if not isinstance(config, DPConfig):
        raise TypeError(f"config must be a DPConfig, got {describe(config)}")
    if type(num_tokens) is not int or num_tokens < 0:
        num_tokens = check_int(num_tokens, "num_tokens", 0)
    if uniform_decode is not True and uniform_decode is not False:
        uniform_decode = check_bool(uniform_decode, "uniform_decode")
    if not config.enable_microbatching:
        return False
    if uniform_decode:
        return num_tokens >= config.decode_token_threshold
    return num_tokens >= config.prefill_token_threshold


def post_process_dp_table(table: Any, num_ubatches: int) -> tuple[bool, list[int], int, bool]:
    """The plan every rank derives from the reduced table (its first five rows, columns in
    ``dp_rank`` order; a NumPy array or a list of rows): ``(should_ubatch, padded counts per
    rank, synced mode, padded to the max)``.

    ``TypeError`` / ``ValueError`` for a table without five rows of one length of integers,
    negative token counts, a padded count below its unpadded one, flags other than 0/1, modes
    other than 0/1/2, or ``num_ubatches`` that is no int >= 2."""
    num_ubatches = check_int(num_ubatches, "num_ubatches", 2)
    rows = table.tolist() if hasattr(table, "tolist") else table
    if isinstance(rows, (str, bytes)) or not isinstance(rows, (list, tuple)) or len(rows) < PLAN_ROWS:
        raise TypeError(f"table must have at least {PLAN_ROWS} rows (a NumPy array or a list of rows), "
                        f"got {describe(table)}")
    plan = [check_ints(r, f"table[{i}]") for i, r in enumerate(rows[:PLAN_ROWS])]
    w = len(plan[0])
    if w == 0 or any(len(r) != w for r in plan):
        raise ValueError(f"table rows must have one non-zero length, got lengths {[len(r) for r in plan]}")
    unp, pad, wants, allows, modes = plan
    if min(unp) < 0 or any(p < u for p, u in zip(pad, unp)):
        raise ValueError(f"table: token counts must be >= 0 and padded >= unpadded, got {unp} and {pad}")
    if any(x not in (0, 1) for x in wants + allows) or any(m not in (0, 1, 2) for m in modes):
        raise ValueError(f"table: flags must be 0 or 1 and modes 0, 1 or 2, got {wants}, {allows}, {modes}")
    return _plan_of(plan, num_ubatches)


def _plan_of(rows: Any, num_ubatches: int) -> tuple[bool, list[int], int, bool]:
    """:func:`post_process_dp_table` of rows already known to be well formed (the reduced table)."""
    unpadded, padded, wants, allows, modes = rows[:PLAN_ROWS]
    mode = min(modes)
    max_padded = max(padded)
    should_ubatch = all(x == 1 for x in wants)
    # The rank with the fewest real tokens would get an all-padding last microbatch.
    if should_ubatch and (max_padded // num_ubatches) * (num_ubatches - 1) >= min(unpadded):
        should_ubatch = False
    pad = should_ubatch or (all(x == 1 for x in allows) and mode != 0)
    counts = [max_padded] * len(padded) if pad else list(padded)
    return should_ubatch, counts, mode, pad


def check_dp_table(table: Any) -> list[str]:
    """The mismatches a reduced ``[ROWS, group size]`` table (a NumPy array or a list of rows)
    shows, as sentences (empty: all ranks agree). Columns are group ranks. Identical on every
    rank, since the table is."""
    rows = table.tolist() if hasattr(table, "tolist") else table
    present, ranks, sizes, nubs, steps = rows[R_PRESENT:ROWS]
    w = len(ranks)
    if (present.count(1) == w and sizes.count(w) == w and nubs.count(nubs[0]) == w
            and steps.count(steps[0]) == w):  # all agree (the common case)
        return []
    problems = []
    if any(s != w for s in sizes):
        problems.append(f"dp_size differs from the group's size {w}: "
                        + ", ".join(f"group rank {c} has dp_size {s}" for c, s in enumerate(sizes) if s != w))
    if any(p != 1 for p in present):
        dup = [r for r, p in enumerate(present) if p > 1]
        missing = [r for r, p in enumerate(present) if p == 0]
        out = [(c, r) for c, r in enumerate(ranks) if not 0 <= r < w]
        parts = []
        if dup:
            parts.append("duplicate dp_rank " + ", ".join(
                f"{r} (group ranks {[c for c, x in enumerate(ranks) if x == r]})" for r in dup))
        if missing:
            parts.append(f"missing dp_rank {missing}")
        if out:
            parts.append("out-of-range dp_rank " + ", ".join(f"{r} on group rank {c}" for c, r in out))
        problems.append("; ".join(parts))
    if len(set(nubs)) > 1:
        problems.append("num_ubatches differs: " + ", ".join(f"dp_rank {r} has {n}" for r, n in zip(ranks, nubs)))
    if len(set(steps)) > 1:
        problems.append("ranks are at different steps (one is ahead or behind): "
                        + ", ".join(f"dp_rank {r} at step {s}" for r, s in zip(ranks, steps)))
    return problems


# --- the vote -------------------------------------------------------------------------------------

class DPVote:
    """A DP vote in flight (from :func:`coordinate_batch_across_dp_async`). :meth:`result` waits
    for it (at most the config's ``timeout_s``) and returns the plan; later calls return the same
    plan. Until :meth:`result` returns or raises, the config takes no other vote."""

    __slots__ = ("config", "_mode", "_work", "_t0", "_plan", "_error")

    def __init__(self, config: DPConfig, mode: int, work: Any) -> None:
        if type(config) is not DPConfig and not isinstance(config, DPConfig):
            raise TypeError(f"config must be a DPConfig, got {describe(config)}")
        if type(mode) is not int or not 0 <= mode <= 2:
            mode = as_cudagraph_mode(mode, "mode", runtime=True).value
        self.config = config
        self._mode = mode
        self._work = work  # gloo: the async work; NCCL: None (the config's event); dp_size 1: None
        self._t0 = time.perf_counter()
        self._plan: tuple[bool, Any, int] | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        """Whether :meth:`result` would return without waiting for the peers."""
        if self._plan is not None or self._error is not None or self.config.dp_size == 1:
            return True
        if self.config.use_device_collective:
            return bool(self.config._state.bufs["event"].query())
        return bool(self._work.is_completed())

    def result(self) -> tuple[bool, Any, int]:
        """``(should_ubatch, num_tokens_after_padding, synced_cudagraph_mode)``, as
        :func:`coordinate_batch_across_dp` returns it. Raises :class:`DPSyncError` on a
        timeout, a failed collective or a mismatch between ranks (on every rank)."""
        if self._plan is not None:
            return self._plan
        if self._error is not None:
            raise self._error
        config, st = self.config, self.config._state
        try:
            if config.dp_size == 1:
                self._plan = (False, None, self._mode)
            else:
                self._plan = _finish(config, self._work)
                st.step += 1
            return self._plan
        except BaseException as exc:
            # The finished frames of the wait (kept by the traceback) hold the collective's work
            # object; a stored error would keep it alive past destroy_process_group(), and gloo
            # aborts the process when a work object outlives its group. Drop their locals.
            traceback.clear_frames(exc.__traceback__)
            self._error = exc
            raise
        finally:
            self._work = None
            st.inflight = None


def _where(config: DPConfig) -> str:
    return f"DP sync step {config._state.step} on dp_rank {config.dp_rank} of {config.dp_size}"


_MODE_FULL, _MODE_PIECEWISE, _MODE_NONE = CUDAGraphMode.FULL, CUDAGraphMode.PIECEWISE, CUDAGraphMode.NONE


def _check_args(num_tokens_unpadded: Any, allow_microbatching: Any, allow_dp_padding: Any, config: Any,
                num_tokens_padded: Any, uniform_decode: Any, cudagraph_mode: Any) -> tuple[int, int, int, int, int]:
    # Fast path: plain ints and bools, all valid (the common call); anything else takes the full
    # checks below, which raise the messages.
    unp, pad, m = num_tokens_unpadded, num_tokens_padded, cudagraph_mode
    if pad is None:
        pad = unp
    if (type(unp) is int and type(pad) is int and 0 <= unp <= pad < _STEP_MOD
            and (allow_dp_padding is True or allow_dp_padding is False)
            and (uniform_decode is True or uniform_decode is False
                 or (uniform_decode is None and allow_microbatching is False))
            and (allow_microbatching is True or allow_microbatching is False)
            and type(config) is DPConfig):
        if type(m) is int:
            mode = m if 0 <= m <= 2 else -1
        else:
            mode = 2 if m is _MODE_FULL else 1 if m is _MODE_PIECEWISE else 0 if m is _MODE_NONE else -1
        if mode >= 0:
            wants = (allow_microbatching and config.enable_microbatching
                     and unp >= (config.decode_token_threshold if uniform_decode
                                 else config.prefill_token_threshold))
            return unp, pad, 1 if wants else 0, 1 if allow_dp_padding else 0, mode
    if not isinstance(config, DPConfig):
        raise TypeError(f"config must be a DPConfig, got {type(config).__qualname__}")
    unp = check_int(num_tokens_unpadded, "num_tokens_unpadded", 0)
    pad = unp if num_tokens_padded is None else check_int(num_tokens_padded, "num_tokens_padded", 0)
    if pad < unp:
        raise ValueError(f"num_tokens_padded must be >= num_tokens_unpadded ({unp}), got {pad}")
    if pad >= _STEP_MOD:
        raise ValueError(f"num_tokens_padded must be < 2**31 (an int32 table), got {pad}")
    mode = as_cudagraph_mode(cudagraph_mode, "cudagraph_mode", runtime=True).value
    ubatch = check_bool(allow_microbatching, "allow_microbatching")
    allows = check_bool(allow_dp_padding, "allow_dp_padding")
    if ubatch and uniform_decode is None:
        raise ValueError("uniform_decode must be given (a bool) when allow_microbatching is True")
    uniform = False if uniform_decode is None else check_bool(uniform_decode, "uniform_decode")
    wants = ubatch and check_ubatch_thresholds(config, unp, uniform)
    return unp, pad, int(wants), int(allows), mode


def coordinate_batch_across_dp_async(num_tokens_unpadded: int, allow_microbatching: bool, allow_dp_padding: bool,
                                     config: DPConfig, num_tokens_padded: int | None = None,
                                     uniform_decode: bool | None = None, cudagraph_mode: Any = 0) -> DPVote:
    """Start this step's vote and return at once; :meth:`DPVote.result` gives the plan that
    :func:`coordinate_batch_across_dp` would have given, so the host can prepare the next step
    while the collective runs. One vote in flight per config: a second start before the first
    one's ``result()`` raises ``RuntimeError`` (nothing changed). Bad input raises
    ``TypeError``/``ValueError`` before any collective."""
    column = _check_args(num_tokens_unpadded, allow_microbatching, allow_dp_padding, config, num_tokens_padded,
                         uniform_decode, cudagraph_mode)
    st = config._state
    with st.lock:
        if st.inflight is not None:
            raise RuntimeError(f"a DP vote is already in flight for this DPConfig (step {st.step}): "
                               "call config.vote_in_flight.result() before starting another")
        if st.broken is not None:
            raise DPSyncError(f"{_where(config)}: an earlier vote failed ({st.broken}); the group is in an "
                              "unknown state: tear it down")
        if config.dp_size == 1:
            vote = DPVote(config, column[4], None)
        else:
            vote = DPVote(config, column[4], _start(config, column))
        st.inflight = vote
    return vote


def coordinate_batch_across_dp(num_tokens_unpadded: int, allow_microbatching: bool, allow_dp_padding: bool,
                               config: DPConfig, num_tokens_padded: int | None = None,
                               uniform_decode: bool | None = None, cudagraph_mode: Any = 0,
                               ) -> tuple[bool, Any, int]:
    """Agree with the other DP ranks on this step's plan.

    ``cudagraph_mode`` is a runtime :class:`~lowlevel.CUDAGraphMode` (NONE, PIECEWISE, FULL) or
    its int (NumPy ints too); token counts are non-negative ints (never bool), flags bools.
    Returns ``(should_ubatch, num_tokens_after_padding, synced_cudagraph_mode)``:
    ``num_tokens_after_padding`` is a CPU int32 torch tensor of length ``dp_size`` in
    ``dp_rank`` order, never reused by a later step (a row of a block of results allocated
    256 steps at a time; pinned where a GPU exists; ``.numpy()`` and :func:`lowlevel.as_cupy`
    views of it work), or None with ``dp_size == 1`` (no collective:
    ``(False, None, cudagraph_mode)``).

    Bad input raises ``TypeError``/``ValueError`` before any collective, so a bad rank fails
    alone and fast (its peers then time out, if ``timeout_s`` is set). Ranks that disagree on
    the configuration or the step raise :class:`DPSyncError` together (a ``dp_size`` other than
    the group's size: :class:`DPConfigError`, also a ``ValueError``, on that rank); collective
    errors and timeouts raise :class:`DPSyncError`.
    """
    return coordinate_batch_across_dp_async(num_tokens_unpadded, allow_microbatching, allow_dp_padding, config,
                                            num_tokens_padded, uniform_decode, cudagraph_mode).result()


# --- backends ---------------------------------------------------------------------------------------

# Implementation choices, measured side by side in bench/bench_dp.py (private knobs, not API):
# the NCCL path's stream switch ("lowlevel": lowlevel.use_stream on a cached Stream; "torch":
# torch.cuda.stream), and how the gloo path waits: "timeout" (work.wait(timedelta), a condition
# variable wait in gloo's work: the host thread sleeps and is woken when gloo's thread finishes),
# "spin" (is_completed() in a loop for at most _GLOO_SPIN_S, then work.wait(the rest of the
# timeout): no wake-up on the critical path, but on a small host the spinning ranks starve gloo's
# threads), "auto" (spin where the process may use at least _SPIN_MIN_CPUS cores, else timeout).
_NCCL_STREAM = "lowlevel"
_GLOO_WAIT = os.environ.get("LOWLEVEL_DP_GLOO_WAIT", "auto")  # the variable: for tests of real processes
_GLOO_SPIN_S = 5e-4  # a gloo vote of two processes takes ~0.15 ms on the H200 host
_SPIN_MIN_CPUS = 8
_OUT_BLOCK = 256  # results handed out per pinned block


def _cpus() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota
    (``cpu.max``, what container limits set while the affinity still lists every core)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return n


def _buffers(config: DPConfig) -> dict[str, Any]:
    st = config._state
    if not st.bufs:
        import torch
        import torch.distributed as dist

        w = dist.get_world_size(config.group)
        c = dist.get_rank(config.group)
        cuda = torch.cuda.is_available()
        bufs: dict[str, Any] = {"pin": cuda, "out": None, "out_np": None, "out_i": _OUT_BLOCK,
                                "timedelta": None if config.timeout_s is None
                                else datetime.timedelta(seconds=config.timeout_s)}
        if config.use_device_collective:
            from .event import Event
            from .stream import Stream

            host = torch.zeros((ROWS, w), dtype=torch.int32, pin_memory=cuda)
            bufs.update(host=host, np=host.numpy())
            # empty, not zeros: a fill kernel runs on the current stream, which the vote's own
            # (non-blocking) stream does not wait for, so a slow first fill could land after the
            # vote's host-to-device copy and zero this rank's column. The copy writes it whole.
            bufs["device"] = torch.empty((ROWS, w), dtype=torch.int32, device="cuda")
            bufs["stream"] = Stream()
            bufs["tstream"] = torch.cuda.Stream()
            bufs["event"] = Event()
        else:
            # Two tables used in turn: while one step's all-reduce is in flight, the table of the
            # step before is reset for the next one, so a step writes only its six changing
            # values before the collective. Each table is written through a flat int32
            # memoryview (index row * w + column), cheaper than NumPy indexing for one element.
            template = torch.zeros((ROWS, w), dtype=torch.int32)
            t = template.numpy()
            if config.dp_rank < w:
                t[R_PRESENT, config.dp_rank] = 1
            t[R_DP_RANK, c] = config.dp_rank
            t[R_DP_SIZE, c] = config.dp_size
            t[R_NUM_UBATCHES, c] = config.num_ubatches
            slots = []
            for _ in range(2):
                h = template.clone()
                a = h.numpy()
                slots.append((h, a, a.data.cast("B").cast("i"), [h]))
            bufs.update(host=slots[0][0], np=slots[0][1], mv=slots[0][2], slot=slots[1], next=slots[0],
                        template=t.data.cast("B").cast("i"), template_t=template,
                        opts=dist.AllreduceOptions(), const=None, order=None, expect=None,
                        slices=tuple(slice(r * w, (r + 1) * w) for r in range(PLAN_ROWS))
                        + (slice(PLAN_ROWS * w, None),),
                        many_cpus=_cpus() >= _SPIN_MIN_CPUS)
        st.group_rank = c
        st.group_size = w
        st.bufs = bufs
    return st.bufs


def _new_out_block(b: dict[str, Any], w: int) -> None:
    import torch

    blk = torch.empty((_OUT_BLOCK, w), dtype=torch.int32, pin_memory=b["pin"])
    b["out"], b["out_np"], b["out_i"] = blk.unbind(0), blk.numpy(), 0  # the row views made once per block
    b["out_rows"] = list(b["out_np"])


def _out(b: dict[str, Any], counts: list[int]) -> Any:
    """A fresh-looking int32 result: row ``i`` of a pinned block of ``_OUT_BLOCK`` results (a
    new block when one is used up; a block lives while any of its rows is referenced), so a
    step allocates nothing."""
    if b["out_i"] == _OUT_BLOCK:
        _new_out_block(b, len(counts))
    i = b["out_i"]
    b["out_np"][i] = counts
    b["out_i"] = i + 1
    return b["out"][i]


def _start(config: DPConfig, column: tuple[int, int, int, int, int]) -> Any:
    """Fill this rank's column and enqueue the one SUM all-reduce; the gloo work or None."""
    st = config._state
    if not config.use_device_collective:
        return _start_gloo(config, column)
    import torch.distributed as dist

    b = _buffers(config)
    table, c, w = b["np"], st.group_rank, st.group_size
    table.fill(0)
    table[:PLAN_ROWS, c] = column
    if config.dp_rank < w:
        table[R_PRESENT, config.dp_rank] = 1
    table[R_DP_RANK, c] = config.dp_rank
    table[R_DP_SIZE, c] = config.dp_size
    table[R_NUM_UBATCHES, c] = config.num_ubatches
    table[R_STEP, c] = st.step % _STEP_MOD
    try:
        dev, host = b["device"], b["host"]
        # A dedicated stream: the vote never waits for the model's queued work, and the
        # model's stream never waits for the vote. No host wait here: the event is polled.
        if _NCCL_STREAM == "torch":
            import torch

            with torch.cuda.stream(b["tstream"]):
                dev.copy_(host, non_blocking=True)
                dist.all_reduce(dev, group=config.group)
                host.copy_(dev, non_blocking=True)
            b["event"].record(b["tstream"])
        else:
            from .stream import use_stream

            s = b["stream"]
            with use_stream(s):
                dev.copy_(host, non_blocking=True)
                dist.all_reduce(dev, group=config.group)
                host.copy_(dev, non_blocking=True)
            b["event"].record(s)
        return None
    except Exception as exc:
        st.broken = f"{type(exc).__name__}: {exc}"
        raise DPSyncError(f"{_where(config)} failed: {type(exc).__name__}: {exc}") from exc


_dist: Any = None  # torch.distributed, imported at the first gloo vote


def _start_gloo(config: DPConfig, column: tuple[int, int, int, int, int]) -> Any:
    """The gloo vote: write the six values that change (plan rows and step) into the table
    prepared for this step, enqueue the all-reduce, then (while it runs) reset the other table
    for the next step and prepare the expected check rows. Returns the work."""
    global _dist
    st = config._state
    b = st.bufs or _buffers(config)
    h, a, mv, hl = cur = b["next"]
    c, w = st.group_rank, st.group_size
    step = st.step % _STEP_MOD
    mv[c], mv[w + c], mv[2 * w + c], mv[3 * w + c], mv[4 * w + c] = column
    mv[R_STEP * w + c] = step
    try:
        dist = _dist
        if dist is None:
            import torch.distributed as dist

            _dist = dist
        # The group is looked up per call, not cached: a config must not keep the world group's
        # C++ object alive after destroy_process_group() (gloo aborts the process when a group
        # is destroyed late, at interpreter exit).
        pg = dist.group.WORLD if config.group is None else config.group
        work = pg.allreduce(hl, b["opts"])
    except Exception as exc:
        st.broken = f"{type(exc).__name__}: {exc}"
        raise DPSyncError(f"{_where(config)} failed: {type(exc).__name__}: {exc}") from exc
    # In flight from here on.
    prev = b["slot"]
    prev[2][:] = b["template"]  # the previous step's table (read already): reset for the next step
    b["slot"], b["next"] = cur, prev
    b["host"], b["np"], b["mv"] = h, a, mv
    const = b["const"]
    b["expect"] = None if const is None else const + [step] * w
    i = b["out_i"]
    if i == _OUT_BLOCK:  # the next block of results, made here rather than after the wait
        _new_out_block(b, w)
        i = 0
    b["row"] = b["out_rows"][i], b["out"][i]  # this vote's result row (skipped if the vote fails)
    b["out_i"] = i + 1
    return work


def _finish(config: DPConfig, work: Any) -> tuple[bool, Any, int]:
    """Wait for the collective (bounded by ``timeout_s``), check the table, derive the plan."""
    st, b = config._state, config._state.bufs
    assert b is not None
    try:
        if config.use_device_collective:
            _poll(b["event"], config)
        else:
            _wait_work(work, config)
    except DPSyncError as exc:
        st.broken = str(exc)
        raise
    except Exception as exc:
        st.broken = f"{type(exc).__name__}: {exc}"
        raise DPSyncError(f"{_where(config)} failed: {type(exc).__name__}: {exc}") from exc
    expect = b.get("expect")
    if expect is not None:
        # Fast path (gloo, from the second vote on): the check rows equal the ones a full check
        # accepted before, with this step's number, so check_dp_table would find nothing. The
        # plan needs only min/max/membership of the plan rows (order-free), and the padded row
        # in dp_rank order when it is handed out as is.
        flat = b["mv"].tolist()
        s_unp, s_pad, s_wants, s_allows, s_modes, s_check = b["slices"]
        if flat[s_check] == expect:
            n = config.num_ubatches
            pad = flat[s_pad]
            mx = max(pad)
            mode = min(flat[s_modes])
            should = 0 not in flat[s_wants] and (mx // n) * (n - 1) < min(flat[s_unp])
            row, result = b["row"]
            if should or (mode and 0 not in flat[s_allows]):
                row.fill(mx)
            else:
                order = b["order"]
                row[:] = pad if order is None else [pad[k] for k in order]
            return should, result, mode
    rows = b["np"].tolist()
    w = st.group_size
    problems = check_dp_table(rows)
    if problems:
        msg = f"{_where(config)}: the ranks disagree: " + "; ".join(problems)
        if config.dp_size != w:
            raise DPConfigError(f"dp_size must equal the group's size ({w}), got {config.dp_size}. {msg}")
        raise DPSyncError(msg)
    plan_rows = rows[:PLAN_ROWS]
    ranks = rows[R_DP_RANK]
    order = None
    if ranks != list(range(w)):  # dp_rank order differs from the group's: columns in dp_rank order
        order = sorted(range(w), key=ranks.__getitem__)
        plan_rows = [[r[c] for c in order] for r in plan_rows]
    if "expect" in b:  # gloo: remember the accepted check rows (but the step) for the fast path
        b["const"], b["order"] = [x for r in rows[R_PRESENT:R_STEP] for x in r], order
    should_ubatch, counts, synced, _ = _plan_of(plan_rows, config.num_ubatches)
    return should_ubatch, _out(b, counts), synced


def _poll(event: Any, config: DPConfig) -> None:
    """Wait for ``event`` (the D2H copy of the reduced table), raising on ``timeout_s``: spin on
    ``cudaEventQuery`` for the first 2 ms (a vote takes ~0.1 ms), then query every 50 µs
    (the GIL released). Not ``work.wait(timeout)``: with a timeout, torch's NCCL work waits in
    a sleep loop that cost ~700 µs a vote on an H200 pair (bench_dp, "earlier path")."""
    if event.query():
        return
    t0 = time.perf_counter()
    limit = math.inf if config.timeout_s is None else config.timeout_s
    spin_until = t0 + 2e-3
    while not event.query():
        now = time.perf_counter()
        if now - t0 > limit:
            raise DPSyncError(f"{_where(config)} timed out after {config.timeout_s} s: a peer never joined")
        if now > spin_until:
            time.sleep(5e-5)


def _wait_work(work: Any, config: DPConfig) -> None:
    """Wait for the gloo work, at most ``timeout_s``: spin on ``is_completed()`` for at most
    ``_GLOO_SPIN_S`` where the host has the cores for it (see ``_GLOO_WAIT``), then block in
    ``work.wait`` for the rest of the timeout."""
    b = config._state.bufs
    timeout = b.get("timedelta")
    if b.get("many_cpus") if _GLOO_WAIT == "auto" else _GLOO_WAIT == "spin":
        done = work.is_completed
        if not done():
            t0 = time.perf_counter()
            limit = config.timeout_s
            budget = _GLOO_SPIN_S if limit is None else min(_GLOO_SPIN_S, limit)
            while not done():
                if time.perf_counter() - t0 > budget:
                    if limit is not None:
                        left = limit - (time.perf_counter() - t0)
                        if left <= 0:
                            raise DPSyncError(f"{_where(config)} timed out after {config.timeout_s} s: "
                                              "a peer never joined")
                        timeout = datetime.timedelta(seconds=left)
                    break
            else:
                timeout = None  # completed: wait() returns at once, or raises the collective's error
    if timeout is None:
        work.wait()
        return
    try:
        ok = work.wait(timeout)
    except Exception as exc:
        text = str(exc).lower()
        if "timeout" in text or "timed out" in text:
            raise DPSyncError(f"{_where(config)} timed out after {config.timeout_s} s: a peer never joined "
                              f"({exc})") from exc
        raise
    if ok is False:
        raise DPSyncError(f"{_where(config)} timed out after {config.timeout_s} s: a peer never joined")
