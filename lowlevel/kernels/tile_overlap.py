"""Overlap inside one batch: a capped persistent matmul that publishes its output tiles, and a
capped consumer on another stream that starts on the first finished tiles.

``with tile_overlap(producer_sms=P, consumer_sms=C) as ov: out, y = ov.matmul_rms_norm(a, b, w)``
computes ``out = a @ b`` with at most ``P`` programs on one stream and ``y = rms_norm(out) * w``
with at most ``C`` programs on another; the consumer normalises each block of rows as soon as
the producer has published every tile of it. :meth:`TileOverlap.matmul_copy` copies each tile
into a second buffer as soon as it is published. Both forks start after the work enqueued so far
on the caller's current stream, and the caller's stream waits for both before anything enqueued
on it afterwards (a fork/join, as :func:`lowlevel.execute_in_parallel`), eagerly and inside a
graph capture (:func:`lowlevel.capture`): the two launches become two parallel branches.
With ``consumer_sms=0`` (:meth:`TileOverlap.matmul_copy` only) there is no consumer and no
fork: one producer kernel on the caller's current stream stores each tile into ``out`` and
then into ``dst`` in its epilogue, ordered like any kernel launch (one graph node in a
capture); this is the fastest placement at decode shapes (below). Either way, make one launch
with the object before capturing a graph that uses it: its device state (flags, launch
counter) must exist outside the graph's memory.

The protocol (what makes it correct)
------------------------------------
* **Publish (release).** After storing tile ``(pid_m, pid_n)`` a producer program waits at a
  CTA barrier (every thread's stores are issued) and one thread then does
  ``atomic_add(rows[pid_m], 1, sem="release", scope="gpu")`` (``matmul_rms_norm``: one counter
  per block of ``BLOCK_M`` rows; before it, the tile's per-row sums of squares of the values as
  stored go to ``part[pid_n, row]``) or ``atomic_xchg(tiles[t], 1, sem="release")``
  (``matmul_copy``: one flag per tile). CUTLASS's semaphore is the same pattern.
* **Wait (acquire).** A consumer program polls the counter with volatile loads until it
  reaches the row block's tile count (or the flag is set), reads it once more with
  ``atomic_add(ptr, 0, sem="acquire", scope="gpu")``, passes a CTA barrier, and reads with
  L1-bypassing loads (``.cg``). Consumer programs draw their work items from a queue
  (``atomic_add`` on a counter) in the order the producer finishes them: the copy's items are
  tiles; the norm's are a row block by a tile's width of columns (row-block-major), and an
  item sums its rows' partial sums (no pass over the whole row) and scales its own columns.
  Where the consumer has fewer programs than items, a producer program done with its tiles
  draws items from the same queue, so the consumer's tail runs on every SM (GPU only: the
  interpreter runs programs one after the other, and a helper would wait for tiles of a
  program not yet run).
* **Fresh state per launch, without a reset kernel (the epoch).** The counters start every
  launch at 0: when a consumer program (or a helping producer program) is done it takes a
  ticket (``atomic_add(ctrl[0], 1, sem="acq_rel")``); the program that draws the last ticket
  knows that every one of them has finished waiting, hence that every tile was published (each
  counter reached its target, so no producer atomic of this launch is still to come), and it
  writes the counters, the ticket and the work queue back to 0 and bumps ``ctrl[1]``, the
  device-side count of completed launches (the epoch). The next launch is ordered after this
  one by its stream (or by the graph: replay ``k + 1`` starts after replay ``k`` has ended), so
  it starts from zeros. No host value changes between launches, so a graph captured once
  replays any number of times and each replay is independent; a different shape between two
  launches needs nothing either (targets are per launch, counters are back at zero).
  ``ctrl[1]`` after ``n`` launches is ``n`` (:attr:`TileOverlap.launches` reads it), which is
  how the tests see every replay finish. Rule: launches of one :class:`TileOverlap` must be
  ordered (one caller stream at a time, one replay at a time); give concurrent callers their
  own object.
* **No deadlock, by construction.** A consumer program only spins while a tile it needs is
  unpublished; a producer program publishes all its own tiles before it waits for anything
  (as a helper, for tiles of other producer programs). Consumers hold at most ``C`` SMs (one
  program per SM at most: each uses at most one SM's worth of resources) and ``P + C <= SMs``
  is enforced (``ValueError`` otherwise), so every producer program finds an SM, is resident
  beside all the others, and publishes its tiles. The producer is enqueued before the
  consumer, so where CUDA runs the two streams (or graph branches) one after the other, it
  runs producer then consumer (no overlap, still correct: the helping producers then do every
  item and the consumer finds the queue empty), never a consumer waiting for a producer
  queued behind it. As a last guard, a program that spins more than ``max_spins`` times sets
  ``ctrl[2]`` and gives up instead of hanging the GPU; :meth:`TileOverlap.check` raises
  :class:`~lowlevel.LowlevelError` when that happened. Other work on other streams may share
  the SMs (it only delays); two tile overlaps in flight at once need their consumer SMs to add
  up to less than the SM count.

When it pays (two H200s, bf16, K = 4096, graphs, 2026-11-30, session 11; bench_tile_overlap)
------------------------------------------------------------------------------------------
Against the best sequential run: the fastest of this producer, lowlevel's tuned matmul and
cuBLAS, then the norm, or then a copy into the peer by the copy engine or by an SM kernel
storing over NVLink (the faster at every shape: at M <= 256 it adds 1.6 - 21 µs after the
matmul, the copy engine 7.5 - 28).
At M in {16, 64, 256, 1024}, N in {4096, 14336}; DBO with 2 microbatches is 0.20x - 0.94x of
the same baseline, never a gain:

* the copy into the peer GPU, placed in the producer's epilogue (``consumer_sms=0``): at
  N = 4096, 1.14x / 1.09x / 1.06x at M = 16 / 64 / 256; at N = 14336, 1.09x / 1.08x / 1.03x;
  0.85x / 0.92x at M = 1024. Against the copy engine alone it is 1.14x - 1.63x (session 8's
  figures were against the copy engine only). With consumer programs on SMs of their own it
  loses: 0.84x - 0.98x;
* the norm: 0.56x - 0.93x.

What bounds it. The producer runs lowlevel's tuned tiles (:func:`producer_config` with ``K``)
in the tuned matmul's tile order, one round of them (the row-major order made the same tiles 22
µs against 16.5 at M = 256, N = 4096), so every tile finishes at about the same time and
overlap can only shorten the tail after the matmul. No overlap beats (best sequential) /
(matmul alone): for the copy 1.13x / 1.22x / 1.43x at N = 4096 and 1.09x / 1.20x / 1.46x at N =
14336 (M = 16 / 64 / 256); for the norm 1.10x - 1.13x at N = 14336 and 1.22x - 1.29x at N =
4096. The copy in the epilogue has no hand-off at all (each program stores the tile it holds in
registers into the peer): at M = 16 it reaches its bound (12.2 µs against 12.3 for the matmul
alone at 16 x 4096), at M = 64 its tail is 1.4 - 3.4 µs, about the time 0.5 - 1.8 MB take over
NVLink, where 1.2x would need none. At M = 256 the bound is high but the output has to cross
NVLink after the tiles finish: 7.3 MB at 256 x 14336 take 19 µs at about 390 GB/s (the link's
peak is 450), which no ordering of one round avoids; tiles in two rounds, which would let the
first round cross during the second, made the producer 55 - 88 µs instead of 48 (session 11
probe, ``bench/results/tile_overlap_probe_session11_20261130.json``). For the norm, every row
needs every tile of its row block, so it waits for a hand-off between programs, which costs
more than the kernel boundary it replaces: in the probe a consumer that only waits for the row
counters (no loads, no stores) already takes 15.7 µs at 16 x 4096 against 14.5 for matmul then
norm (the fork and join: 1.3 µs over the producer; the flags: 2.3 µs more), and a norm inside
the producer's epilogue after a wait for its row block (no second stream) 16.5 µs.

The kernels compute 32-bit offsets: an operand spanning 2**31 elements or more
(:data:`OFFSET_LIMIT`) is refused with ``ValueError`` before anything runs.

Under ``TRITON_INTERPRET=1`` (no GPU) the interpreter runs the programs of one launch one
after the other and the consumer launch after the producer launch, so the consumer always finds
every flag already published: the flag arithmetic, the ticket and the reset are exercised, the
concurrency is not (that needs the GPU tier).
"""
from __future__ import annotations

import threading
from contextlib import nullcontext
from typing import Any

import torch
import triton
import triton.language as tl

from .. import _runtime as rt
from ..errors import LowlevelError, check_int, check_real
from ..interop import extent
from ..sm_control import device_sm_count
from ..stream import Stream, use_stream
from ._launch import INTERPRET, MAX_SPINS_LIMIT, FastLauncher, check_device, check_writes, to_torch
from .matmul import check_operands, config_for, grouped_tile, tile_dot

__all__ = ["DEFAULT_MAX_SPINS", "MAX_SPINS_LIMIT", "OFFSET_LIMIT", "TileOverlap", "matmul_then_rms_norm",
           "producer_config", "producer_matmul", "suggest_split", "tile_overlap"]

DEFAULT_MAX_SPINS = 1 << 26
"""Polls (each one L2 round trip, roughly 0.5-1 µs) before a consumer gives up."""


# --- kernels ------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["num_progs", "eps", "max_spins", "tickets"])
def _producer_kernel(a_ptr, b_ptr, c_ptr, flags_ptr, part_ptr, w_ptr, y_ptr, ctrl_ptr, M, N, K,
                     stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_ym, stride_yn, eps,
                     num_progs, max_spins, tickets,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                     GROUP_M: tl.constexpr, PUBLISH: tl.constexpr, HELP: tl.constexpr, BLOCK_C: tl.constexpr,
                     PART_T: tl.constexpr, RESET_BLOCK: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """C = A @ B, program p takes tiles p, p + P, ... in grouped order (GROUP_M 1: row-block-major).
    EVEN_K: K is a multiple of BLOCK_K (no K mask). PUBLISH: 0 nothing; 1 (the norm) each
    row's sum of squares of the tile as stored into ``part[pid_n, row]``, then a counter per
    row block; 2 (the copy) a flag per tile; release, after the stores; 3 (the copy with no
    consumer programs) the tile stored into ``y`` too, and program 0 counts the launch. HELP: a program done
    with its tiles then takes work items (norm items, or tiles to copy into ``y``) from the
    consumer's queue, so the consumer's tail runs on every SM, and takes a ticket of the launch
    (``tickets`` in all)."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_rb = tl.cdiv(M, BLOCK_M)
    num_tiles = num_rb * num_pid_n
    for tile in range(pid, num_tiles, num_progs):
        pid_m, pid_n = grouped_tile(tile, num_rb, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tile_dot(a_ptr, b_ptr, offs_m, offs_n, tl.arange(0, BLOCK_K), M, N, 0, K,
                       stride_am, stride_ak, stride_bk, stride_bn,
                       BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, INPUT_PRECISION)
        c = acc.to(c_ptr.dtype.element_ty)
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, c, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
        if PUBLISH == 1:
            v = c.to(tl.float32)  # the values as stored, which the norm of the stored output reads
            tl.store(part_ptr + pid_n * M + offs_m, tl.sum(v * v, axis=1), mask=offs_m < M)
            tl.debug_barrier()  # every thread's stores of the tile are issued before the release
            tl.atomic_add(flags_ptr + pid_m, 1, sem="release", scope="gpu")
        elif PUBLISH == 2:
            tl.debug_barrier()
            tl.atomic_xchg(flags_ptr + tile, 1, sem="release", scope="gpu")
        elif PUBLISH == 3:  # the copy in the epilogue: the tile, still in registers, into y as well
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, c,
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
    if PUBLISH == 3:  # noqa: SIM102 - a constexpr branch around a runtime one (Triton compiles them apart)
        if pid == 0:
            tl.atomic_add(ctrl_ptr + 1, 1, sem="relaxed", scope="gpu")  # the launch count (no flags, no tickets)
    if HELP:
        if PUBLISH == 1:
            _norm_items(c_ptr, w_ptr, y_ptr, flags_ptr, part_ptr, ctrl_ptr, M, N, stride_cm, stride_ym, eps,
                        num_pid_n, num_rb, max_spins, BLOCK_M, BLOCK_C, PART_T)
            _finish(ctrl_ptr, flags_ptr, num_rb, tickets, RESET_BLOCK)
        else:
            _copy_items(c_ptr, y_ptr, flags_ptr, ctrl_ptr, M, N, stride_cm, stride_cn, stride_ym, stride_yn,
                        max_spins, BLOCK_M, BLOCK_N, GROUP_M)
            _finish(ctrl_ptr, flags_ptr, num_tiles, tickets, RESET_BLOCK)


@triton.jit
def _wait_at_least(ptr, target, ctrl_ptr, max_spins):
    """Spin until ``*ptr >= target``, then acquire (gpu scope); after ``max_spins`` polls set the
    error word ``ctrl[2]`` and return (the caller then reads unfinished data: see check()).
    The polls are volatile loads (L2, no read-modify-write): many programs may poll one
    counter while the producer's release goes to it."""
    seen = tl.load(ptr, volatile=True)
    spins = tl.full((), 0, tl.int32)
    while (seen < target) & (spins < max_spins):
        seen = tl.load(ptr, volatile=True)
        spins += 1
    seen = tl.atomic_add(ptr, 0, sem="acquire", scope="gpu")  # orders the reads below after the release
    if seen < target:
        tl.atomic_or(ctrl_ptr + 2, 1, sem="relaxed", scope="gpu")
    tl.debug_barrier()  # the acquire by one thread orders the loads of all threads after it


@triton.jit
def _finish(ctrl_ptr, flags_ptr, n_flags, num_progs, RESET_BLOCK: tl.constexpr):
    """The launch's last program to take a ticket (of ``num_progs``) returns the flags, the
    ticket and the work queue to 0 and bumps the epoch."""
    tl.debug_barrier()
    ticket = tl.atomic_add(ctrl_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == num_progs - 1:
        for i in range(0, n_flags, RESET_BLOCK):
            offs = i + tl.arange(0, RESET_BLOCK)
            tl.store(flags_ptr + offs, tl.zeros((RESET_BLOCK,), dtype=tl.int32), mask=offs < n_flags)
        tl.atomic_xchg(ctrl_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(ctrl_ptr + 3, 0, sem="relaxed", scope="gpu")  # the work queue
        tl.atomic_add(ctrl_ptr + 1, 1, sem="release", scope="gpu")


@triton.jit
def _norm_item(item, c_ptr, w_ptr, y_ptr, rows_ptr, part_ptr, ctrl_ptr, M, N, stride_cm, stride_ym, eps,
               tiles_n, chunks, max_spins,
               BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, PART_T: tl.constexpr):
    """RMSNorm of one work item, BLOCK_M rows x BLOCK_C columns of ``c`` into ``y``, once every
    tile of its row block is published: the row's sum of squares is the sum of the producer's
    per-tile partials, so the item reads its own columns only."""
    pid_m = item // chunks
    _wait_at_least(rows_ptr + pid_m, tiles_n, ctrl_ptr, max_spins)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t0 in range(0, tiles_n, PART_T):  # one pass where PART_T covers every tile (the usual case)
        t = t0 + tl.arange(0, PART_T)
        p = tl.load(part_ptr + t[:, None] * M + rows[None, :], mask=(t[:, None] < tiles_n) & rmask[None, :],
                    other=0.0, cache_modifier=".cg")  # written by other SMs: bypass L1
        ss += tl.sum(p, axis=0)
    inv = 1.0 / tl.sqrt(ss / N + eps)
    cols = (item % chunks) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = rmask[:, None] & (cols[None, :] < N)
    x = tl.load(c_ptr + rows[:, None] * stride_cm + cols[None, :], mask=m, other=0.0,
                cache_modifier=".cg").to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = x * inv[:, None] * w[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _norm_items(c_ptr, w_ptr, y_ptr, rows_ptr, part_ptr, ctrl_ptr, M, N, stride_cm, stride_ym, eps,
                tiles_n, num_rb, max_spins,
                BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, PART_T: tl.constexpr):
    """Draw work items from the launch's queue (``ctrl[3]``, items in row-block-major order, the
    order the producer finishes them) until none is left."""
    chunks = tl.cdiv(N, BLOCK_C)
    items = num_rb * chunks
    item = tl.atomic_add(ctrl_ptr + 3, 1, sem="relaxed", scope="gpu")
    while item < items:
        _norm_item(item, c_ptr, w_ptr, y_ptr, rows_ptr, part_ptr, ctrl_ptr, M, N, stride_cm, stride_ym, eps,
                   tiles_n, chunks, max_spins, BLOCK_M, BLOCK_C, PART_T)
        item = tl.atomic_add(ctrl_ptr + 3, 1, sem="relaxed", scope="gpu")


@triton.jit(do_not_specialize=["eps", "max_spins", "tickets"])
def _rms_consumer_kernel(c_ptr, w_ptr, y_ptr, rows_ptr, part_ptr, ctrl_ptr, M, N, stride_cm, stride_ym, eps,
                         tiles_n, num_rb, max_spins, tickets,
                         BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, PART_T: tl.constexpr,
                         RESET_BLOCK: tl.constexpr):
    """y = c / sqrt(mean(c^2) + eps) * w per row, in items of BLOCK_M rows x BLOCK_C columns
    drawn from the launch's queue; an item waits for its row block's counter to reach tiles_n."""
    _norm_items(c_ptr, w_ptr, y_ptr, rows_ptr, part_ptr, ctrl_ptr, M, N, stride_cm, stride_ym, eps,
                tiles_n, num_rb, max_spins, BLOCK_M, BLOCK_C, PART_T)
    _finish(ctrl_ptr, rows_ptr, num_rb, tickets, RESET_BLOCK)


@triton.jit
def _copy_items(c_ptr, d_ptr, tiles_ptr, ctrl_ptr, M, N, stride_cm, stride_cn, stride_dm, stride_dn, max_spins,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """d[tile] = c[tile] for tiles drawn from the launch's queue (``ctrl[3]``, the producer's
    order), each as soon as its flag is set, until none is left."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    tile = tl.atomic_add(ctrl_ptr + 3, 1, sem="relaxed", scope="gpu")
    while tile < num_tiles:
        _wait_at_least(tiles_ptr + tile, 1, ctrl_ptr, max_spins)
        pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        x = tl.load(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, mask=m,
                    cache_modifier=".cg")
        tl.store(d_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn, x, mask=m)
        tile = tl.atomic_add(ctrl_ptr + 3, 1, sem="relaxed", scope="gpu")


@triton.jit(do_not_specialize=["max_spins", "tickets"])
def _copy_consumer_kernel(c_ptr, d_ptr, tiles_ptr, ctrl_ptr, M, N, stride_cm, stride_cn, stride_dm, stride_dn,
                          max_spins, tickets,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                          RESET_BLOCK: tl.constexpr):
    """d[tile] = c[tile] for each tile as soon as its flag is set, tiles from the launch's queue."""
    _copy_items(c_ptr, d_ptr, tiles_ptr, ctrl_ptr, M, N, stride_cm, stride_cn, stride_dm, stride_dn, max_spins,
                BLOCK_M, BLOCK_N, GROUP_M)
    _finish(ctrl_ptr, tiles_ptr, tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), tickets, RESET_BLOCK)


_produce = FastLauncher(_producer_kernel, ("eps", "num_progs", "max_spins", "tickets"))
_rms = FastLauncher(_rms_consumer_kernel, ("eps", "max_spins", "tickets"))
_copy = FastLauncher(_copy_consumer_kernel, ("max_spins", "tickets"))

_RESET = 16 if INTERPRET else 1024


# --- configuration ------------------------------------------------------------------------------

_BN = (256, 128, 64, 32)


def _block_m(M: int) -> int:
    return 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 256 else 128


def _cost(M: int, N: int, bn: int, programs: int) -> tuple[int, int]:
    """(rounds of tiles x tile width: the makespan in units of one column of weights, rounds)."""
    tiles = triton.cdiv(M, _block_m(M)) * triton.cdiv(N, bn)
    rounds = triton.cdiv(tiles, programs)
    return rounds * bn, rounds


def _tuned(M: int, N: int, K: int | None, itemsize: int,
           programs: int) -> tuple[int, int, int, int, int, int] | None:
    """The tiles of :func:`~lowlevel.kernels.matmul.config_for` (the measured table, else its
    heuristic) when they need no K split and fit in one round on ``programs`` programs, as
    (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, GROUP_M); else None. One round of the tuned tiles
    is as fast as lowlevel's matmul, and every SM it leaves idle can go to the consumer."""
    if K is None or INTERPRET or K <= 0:
        return None
    cfg = config_for(M, N, K, itemsize)
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    if cfg.split_k > 1 or tiles > programs:
        return None
    return (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, cfg.group_m)


def _check_shape_args(M: Any, N: Any, K: Any, itemsize: Any) -> tuple[int, int, int | None, int]:
    """(M, N, K, itemsize) as plain ints, or ``TypeError``/``ValueError`` naming the argument."""
    M = check_int(M, "M", 1)
    N = check_int(N, "N", 1)
    if K is not None:
        K = check_int(K, "K", 0)
    itemsize = check_int(itemsize, "itemsize")
    if itemsize not in (2, 4):
        raise ValueError(f"itemsize must be 2 (bfloat16, float16) or 4 (float32) bytes, got {itemsize}")
    return M, N, K, itemsize


def producer_config(M: int, N: int, itemsize: int, programs: int,
                    K: int | None = None) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the producer for an (M, N) output
    computed by ``programs`` programs (``K``: the inner dimension, when known).

    ``M``, ``N``, ``programs``: positive ints; ``itemsize``: bytes per element, 2 (bf16, fp16)
    or 4 (fp32); ``K``: None or a non-negative int (0: an empty inner dimension, which gets the
    rule without ``K``). Integers are anything :func:`operator.index` accepts (NumPy integers
    included), never bool: ``TypeError`` for another type, ``ValueError`` for a value out of
    range, naming the argument.

    With ``K``, on a GPU, lowlevel's tuned matmul tiles when they run unsplit in one round on
    ``programs`` programs (decode shapes on the H200: M <= 256 at N = 4096 and 14336): the
    producer is then as fast as :func:`lowlevel.kernels.matmul`. Otherwise the row block
    follows M (small blocks at decode sizes, so that the consumer can start early) and the
    column block minimises the makespan ``ceil(tiles / programs) * BLOCK_N`` (the rounds of
    tiles the busiest program runs, each costing its width in weight columns), wider on ties:
    a budget just under a tile count would otherwise pay a whole second round for a few tiles.
    The sequential alternative gets the same rule with every SM. Under ``TRITON_INTERPRET=1``
    always ``(16, 16, 16, 1, 1)``."""
    M, N, K, itemsize = _check_shape_args(M, N, K, itemsize)
    return _config(M, N, itemsize, check_int(programs, "programs", 1), K)[:5]


def _config(M: int, N: int, itemsize: int, programs: int, K: int | None) -> tuple[int, int, int, int, int, int]:
    """:func:`producer_config` without the checks (the launch path's arguments are valid), and
    the tile order's GROUP_M last: the tuned matmul's where its tiles are used (one round, in
    which the order decides which programs share columns of B in L2: at M = 256, N = 4096 on
    the H200 the row-major order made the same tiles 22 µs against 16.5), else 1 (row-block-major:
    rows finish in order, which the norm's consumer waits in)."""
    if INTERPRET:
        return (16, 16, 16, 1, 1, 1)
    tuned = _tuned(M, N, K, itemsize, programs)
    if tuned is not None:
        return tuned
    bm = _block_m(M)
    bn = min(_BN, key=lambda c: (_cost(M, N, c, programs)[0], -c))
    if itemsize == 2 and bm <= 64 and bn <= 64:
        bk, stages = 128, 5  # thin tiles: deep K steps keep enough weight bytes in flight per SM
    else:
        bk, stages = (64 if itemsize == 2 else 32), (4 if bm <= 64 else 3)
    while stages > 2 and stages * (bm * bk + bk * bn) * itemsize > 160 * 1024:
        stages -= 1  # the pipeline's shared memory stays within 160 KiB (the epilogue needs room too)
    warps = 8 if bm * bn >= 128 * 128 else 4
    return (bm, bn, bk, warps, stages, 1)


def suggest_split(M: int, N: int, sms: int | None = None, *, min_consumer_sms: int = 4,
                  K: int | None = None, itemsize: int = 2) -> tuple[int, int]:
    """A (producer_sms, consumer_sms) split for an (M, N) output on ``sms`` SMs (default: the
    device's), ``producer_sms + consumer_sms == sms``. With ``K`` (on a GPU) and lowlevel's
    tuned tiles fitting in one round beside ``min_consumer_sms`` (:func:`producer_config`): one
    producer per tile, the rest to the consumer. Otherwise the fewest producer programs that
    keep the all-SM makespan of :func:`producer_config`'s cost model (so the matmul loses
    nothing to the split), the rest to the consumer, at least ``min_consumer_sms``. A starting
    point for a sweep, not a measurement.

    ``M``, ``N``, ``K`` and ``itemsize`` as in :func:`producer_config`; ``min_consumer_sms`` a
    positive int; ``sms`` an int of at least ``min_consumer_sms + 1`` (one producer). Wrong
    types raise ``TypeError``, values out of range ``ValueError``, naming the argument."""
    M, N, K, itemsize = _check_shape_args(M, N, K, itemsize)
    min_consumer_sms = check_int(min_consumer_sms, "min_consumer_sms", 1)
    total = device_sm_count() if sms is None else check_int(sms, "sms", 2)
    if total <= min_consumer_sms:
        where = " (the device's SM count)" if sms is None else ""
        raise ValueError(f"sms must be at least min_consumer_sms + 1 = {min_consumer_sms + 1} (one SM for the "
                         f"producer), got {total}{where}")
    tuned = _tuned(M, N, K, itemsize, total - min_consumer_sms)
    if tuned is not None:
        producers = triton.cdiv(M, tuned[0]) * triton.cdiv(N, tuned[1])
        return producers, total - producers
    best_cost = min(_cost(M, N, c, total)[0] for c in _BN)
    producers = total - min_consumer_sms
    for c in _BN:
        cost, rounds = _cost(M, N, c, total)
        if cost == best_cost:
            tiles = triton.cdiv(M, _block_m(M)) * triton.cdiv(N, c)
            producers = min(producers, triton.cdiv(tiles, rounds))
    producers = max(1, min(producers, total - min_consumer_sms))
    return producers, total - producers


def _rms_consumer_config(N: int, bm: int, bn: int, tiles_n: int) -> tuple[int, int, int]:
    """(BLOCK_C, PART_T, num_warps) of the norm's work items: ``bm`` rows (the producer's row
    block) by ``BLOCK_C`` columns, the producer's tile width where that is at most 8192
    elements (so items come one per tile, in the order tiles finish), narrower beyond;
    ``PART_T`` partial sums read at once (every tile's where they fit in 16384 values)."""
    if INTERPRET:
        return 16, 4, 1  # small tiles, and a partial sum read in several passes where tiles_n > 4
    block_c = max(16, min(bn, 8192 // bm))
    part_t = min(triton.next_power_of_2(tiles_n), max(1, 16384 // bm))
    return block_c, part_t, 4 if bm * block_c <= 4096 else 8


OFFSET_LIMIT = 1 << 31
"""Elements an operand of tile overlap may span: its kernels compute 32-bit offsets."""


def _check_mm(at: torch.Tensor, bt: torch.Tensor, precision: str) -> tuple[int, int, int, str]:
    """:func:`~lowlevel.kernels.matmul.check_operands` for tile overlap, and the 32-bit offset
    limit for ``a`` and ``b``."""
    shape = check_operands(at, bt, precision, "tile overlap")
    _check_extent(a=at, b=bt)
    return shape


def _check_extent(new: tuple[int, int] = (0, 0), **named: torch.Tensor | None) -> None:
    """``ValueError`` for an operand spanning :data:`OFFSET_LIMIT` elements or more; None
    stands for an output still to be allocated, contiguous of shape ``new``."""
    for name, t in named.items():
        n = new[0] * new[1] if t is None else extent(t)
        if n >= OFFSET_LIMIT:
            raise ValueError(f"{name} spans {n} elements: tile overlap's kernels compute 32-bit offsets, so an "
                             f"operand must span fewer than 2**31 (lowlevel.kernels.matmul switches to 64-bit "
                             f"offsets)")


def _out(x: Any, name: str, shape: tuple[int, int], like: torch.Tensor, contiguous_rows: bool) -> torch.Tensor | None:
    """The output ``x`` checked (None stays None: :func:`_new` allocates it once every argument
    is checked)."""
    if x is None:
        return None
    t, _ = to_torch(x, name)
    if tuple(t.shape) != shape or t.dtype != like.dtype:
        raise ValueError(f"{name} must be {shape} {like.dtype}, got {tuple(t.shape)} {t.dtype}")
    if contiguous_rows and shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"the rows of {name} must be contiguous ({name}.stride(1) == 1)")
    return t


def _new(t: torch.Tensor | None, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """``t``, or a new tensor of ``shape`` like ``like`` where :func:`_out` left None."""
    return torch.empty(shape, dtype=like.dtype, device=like.device) if t is None else t


def _launch_producer(at: torch.Tensor, bt: torch.Tensor, ct: torch.Tensor, grid: int,
                     cfg: tuple[int, int, int, int, int, int], K: int, precision: str, publish: int = 0,
                     flags: torch.Tensor | None = None, consumer: tuple[Any, ...] | None = None) -> None:
    """Launch the producer kernel on the current stream. ``flags``: the row counters
    (``publish`` 1) or tile flags (2); ``consumer``: ``(part, weight, y, ctrl, eps, max_spins,
    tickets, BLOCK_C, PART_T, HELP)``, what a helping producer needs (``y``: the norm's output,
    or the copy's destination; the copy passes dummies for the norm's own)."""
    bm, bn, bk, warps, stages, group_m = cfg
    f = ct if flags is None else flags
    part, wt, yt, ctrl, eps, spins, tickets, block_c, part_t, help_ = consumer or (f, f, ct, f, 1.0, 1, 1, 16, 1,
                                                                                   False)
    args = (at, bt, ct, f, part, wt, yt, ctrl, ct.shape[0], ct.shape[1], K, at.stride(0), at.stride(1),
            bt.stride(0), bt.stride(1), ct.stride(0), ct.stride(1), yt.stride(0), yt.stride(1), eps, grid, spins,
            tickets)
    _produce(grid, args, {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "EVEN_K": K % bk == 0, "GROUP_M": group_m,
                          "PUBLISH": publish, "HELP": help_, "BLOCK_C": block_c, "PART_T": part_t,
                          "RESET_BLOCK": _RESET, "INPUT_PRECISION": precision}, warps, stages)


# --- the Python API -----------------------------------------------------------------------------

class TileOverlap:
    """A producer budget of ``producer_sms`` programs and a consumer budget of ``consumer_sms``
    programs on one device, two streams, and the flag state their launches share (see the
    module docstring for the protocol).

    ``producer_sms + consumer_sms`` must not exceed the device's SM count (``ValueError``
    otherwise: with more, a spinning consumer could hold SMs its producer needs).
    ``consumer_sms=0`` places the consumer in the producer's epilogue: each producer program
    stores each of its tiles into the copy's destination right after storing it into ``out``,
    in one kernel on the caller's stream, with no flag waits, no second stream and no fork
    (only :meth:`matmul_copy` can run that way; :meth:`matmul_rms_norm` refuses it with
    ``ValueError``). ``device``:
    a CUDA device index (default: the current device). ``max_spins``: polls of one flag before
    a consumer gives up and marks the error word (:meth:`check`), an int in [1, 2**31 - 1]
    (:data:`MAX_SPINS_LIMIT`: the kernels count polls in 32 bits). Launches of one object must
    be ordered (one caller stream, one graph replay at a time). Also a context manager
    (``with tile_overlap(...) as ov:``), which only scopes the name: the object holds no
    resources beyond two streams and a few KiB of flags.
    """

    def __init__(self, producer_sms: int, consumer_sms: int, *, device: int | None = None,
                 max_spins: int = DEFAULT_MAX_SPINS) -> None:
        self.producer_sms = check_int(producer_sms, "producer_sms", 1)
        self.consumer_sms = check_int(consumer_sms, "consumer_sms", 0)
        self.max_spins = check_int(max_spins, "max_spins", 1, MAX_SPINS_LIMIT)
        if device is not None:
            device = check_int(device, "device", 0)
        total = device_sm_count(device)
        if self.producer_sms + self.consumer_sms > total:
            why = ("one producer program per SM at most" if not self.consumer_sms else
                   "a consumer spinning on SMs its producer needs could wait forever")
            raise ValueError(
                f"producer_sms + consumer_sms must be at most the device's {total} SMs ({why}), got "
                f"{self.producer_sms} + {self.consumer_sms} = {self.producer_sms + self.consumer_sms}")
        self.total_sms = total
        self.device = device
        self._streams: tuple[Stream, Stream] | None = None
        self._flags: torch.Tensor | None = None  # [0, cap): counters / tile flags
        self._ctrl: torch.Tensor | None = None   # [ticket, completed launches, error, work queue]
        self._part: torch.Tensor | None = None   # the norm's partial sums of squares, [tiles_n, M] fp32
        self._retired: list[torch.Tensor] = []
        self._lock = threading.Lock()

    # -- context manager ---------------------------------------------------------------------
    def __enter__(self) -> TileOverlap:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __repr__(self) -> str:
        return f"TileOverlap(producer_sms={self.producer_sms}, consumer_sms={self.consumer_sms})"

    # -- state ---------------------------------------------------------------------------------
    @property
    def streams(self) -> tuple[Stream, Stream] | None:
        """(producer stream, consumer stream), created at the first GPU launch that forks; None
        before, with ``consumer_sms=0`` (which never forks) and under Triton's interpreter
        (where both run on the caller's stream, in order)."""
        return self._streams

    def _state(self, n_flags: int, dev: torch.device,
               n_part: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(flags, ctrl, partial sums) with at least ``n_flags`` flags and ``n_part`` partial
        sums (None when 0), grown outside a capture only; ``LowlevelError`` during a capture
        that needs more (nothing changes then)."""
        f, ctrl, part = self._flags, self._ctrl, self._part
        fits = (f is not None and f.numel() >= n_flags and f.device == dev and ctrl is not None
                and (n_part == 0 or (part is not None and part.numel() >= n_part and part.device == dev)))
        if fits:
            assert f is not None and ctrl is not None
            return f, ctrl, part if n_part else None
        if not INTERPRET and rt.is_capturing(rt.current_handle()):
            have = 0 if f is None else f.numel()
            have_p = 0 if part is None else part.numel()
            raise LowlevelError(
                f"TileOverlap needs {n_flags} flags and {n_part} partial sums and has {have} and {have_p}: make one "
                "launch of this shape (or larger) before capturing a graph, so that the flag state exists outside "
                "the graph's memory")
        if f is None or f.numel() < n_flags or f.device != dev:
            if f is not None:
                self._retired.append(f)  # launches in flight may still use it: keep it alive
            self._flags = f = torch.zeros(max(n_flags, 2 * (0 if f is None else f.numel()), 256),
                                          dtype=torch.int32, device=dev)
        if ctrl is None or ctrl.device != dev:
            self._ctrl = ctrl = torch.zeros(4, dtype=torch.int32, device=dev)
        if n_part and (part is None or part.numel() < n_part or part.device != dev):
            if part is not None:
                self._retired.append(part)
            self._part = part = torch.zeros(max(n_part, 2 * (0 if part is None else part.numel())),
                                            dtype=torch.float32, device=dev)
        return f, ctrl, part if n_part else None

    def _ctrl_word(self, i: int) -> int:
        """``ctrl[i]`` read after the whole device is idle (0 before the first launch): a
        tensor's ``.item()`` waits for torch's current stream only, and a launch enqueued on
        another (non-blocking) stream, e.g. inside ``use_stream(s)``, would not be waited for."""
        ctrl = self._ctrl
        if ctrl is None:
            return 0
        if ctrl.is_cuda:
            torch.cuda.synchronize(ctrl.device)
        return int(ctrl[i].item())

    @property
    def launches(self) -> int:
        """Launches counted on the device, read after synchronizing it (every stream of its
        device, not only the current one); 0 before the first. With consumer SMs a launch
        counts once its last consumer (or helping producer) program has finished. With
        ``consumer_sms=0`` producer program 0 adds it after storing its own tiles, while other
        programs may still be storing theirs: the count is exact once the kernel has ended,
        which the synchronization here ensures."""
        return self._ctrl_word(1)

    def check(self) -> None:
        """Raise :class:`~lowlevel.LowlevelError` if a consumer ever gave up waiting (after
        ``max_spins`` polls); synchronizes the device (as :attr:`launches`). A result computed
        in such a launch is wrong. Never raises with ``consumer_sms=0`` (nothing waits)."""
        if self._ctrl_word(2):
            raise LowlevelError("a tile-overlap consumer gave up waiting for its producer (max_spins polls): "
                                "the results of that launch are invalid")

    def _fork_join(self, produce: Any, consume: Any, dev: torch.device) -> None:
        if INTERPRET:
            produce()
            consume()
            return
        streams = self._streams
        if streams is None:
            with torch.cuda.device(dev):
                streams = self._streams = (Stream(), Stream())
        ps, cs = streams
        cur = rt.current_handle()
        tracer = rt.tracer
        rt.order(cur, ps.ptr)
        rt.order(cur, cs.ptr)
        if tracer is not None and not rt.is_capturing(cur):
            with use_stream(ps), tracer.span("tile_overlap producer", ps):
                produce()
            with use_stream(cs), tracer.span("tile_overlap consumer", cs):
                consume()
        else:
            with use_stream(ps):
                produce()  # first: where CUDA serialises the two, the producer runs first
            with use_stream(cs):
                consume()
        rt.order(ps.ptr, cur)
        rt.order(cs.ptr, cur)

    # -- operations ----------------------------------------------------------------------------
    def matmul_rms_norm(self, a: Any, b: Any, weight: Any, eps: float = 1e-6, *, out: Any = None, y: Any = None,
                        precision: str = "tf32") -> tuple[Any, Any]:
        """``out = a @ b`` and ``y = out / sqrt(mean(out**2, row) + eps) * weight``, the norm of
        each block of rows starting as soon as the producer has published all its tiles.

        ``a`` (M, K), ``b`` (K, N), ``weight`` (N,): torch tensors (CUDA; CPU under the
        interpreter) of one dtype, bf16, fp16 or fp32 (``precision`` "tf32"/"ieee" for fp32),
        ``weight`` contiguous. ``out`` and ``y`` (M, N) of that dtype with contiguous rows are
        written (new if None). The norm reads ``out`` as stored (rounded to the dtype), as
        running ``matmul`` then ``rms_norm`` would. Returns ``(out, y)``; ordered on the
        caller's current stream like a kernel launch. ``ValueError``/``TypeError`` for bad
        shapes, dtypes or devices, before anything is allocated or launched."""
        at, _ = to_torch(a, "a")
        bt, _ = to_torch(b, "b")
        wt, _ = to_torch(weight, "weight")
        if not self.consumer_sms:
            raise ValueError("matmul_rms_norm needs consumer_sms >= 1, got 0: a row's norm needs every tile of "
                             "its row block, so it cannot run in the epilogue of the program that stored one tile "
                             "(consumer_sms=0 is for matmul_copy)")
        M, N, K, prec = _check_mm(at, bt, precision)
        if tuple(wt.shape) != (N,) or wt.dtype != at.dtype:
            raise ValueError(f"weight must be ({N},) {at.dtype}, got {tuple(wt.shape)} {wt.dtype}")
        if N > 1 and wt.stride(0) != 1:
            raise ValueError(f"weight must be contiguous (weight.stride(0) == 1), got stride {wt.stride(0)}")
        eps = check_real(eps, "eps", "a finite real number > 0", positive=True)
        ct = _out(out, "out", (M, N), at, True)
        yt = _out(y, "y", (M, N), at, True)
        _check_extent((M, N), out=ct, y=yt)
        check_device("matmul_rms_norm", at, bt, wt, *[t for t in (ct, yt) if t is not None])
        ins = (("a", at), ("b", bt), ("weight", wt))
        if ct is not None:
            check_writes("matmul_rms_norm", "out", ct, *ins)
        if yt is not None:  # y may be out itself: each item reads its part of out, then writes it
            check_writes("matmul_rms_norm", "y", yt, *ins, ("out", ct), same_ok=("out",))
        ct, yt = _new(ct, (M, N), at), _new(yt, (M, N), at)  # after every check: nothing allocated for bad input
        if M == 0 or N == 0:
            return ct, yt
        cfg = _config(M, N, at.element_size(), self.producer_sms, K)
        bm, bn = cfg[0], cfg[1]
        rb, tiles_n = triton.cdiv(M, bm), triton.cdiv(N, bn)
        grid = min(self.producer_sms, rb * tiles_n)
        block_c, part_t, cwarps = _rms_consumer_config(N, bm, bn, tiles_n)
        cgrid = min(self.consumer_sms, rb * triton.cdiv(N, block_c))
        # producers take items only where the consumer has fewer programs than items (else they
        # would add their tickets to the launch's tail for nothing), never under the
        # interpreter (it runs programs one by one: a helper would wait forever)
        help_ = not INTERPRET and cgrid < rb * triton.cdiv(N, block_c)
        tickets = cgrid + (grid if help_ else 0)
        eps = float(eps)
        with self._lock:
            flags, ctrl, part = self._state(rb, at.device, tiles_n * M)
            consumer = (part, wt, yt, ctrl, eps, self.max_spins, tickets, block_c, part_t, help_)
            cargs = (ct, wt, yt, flags, part, ctrl, M, N, ct.stride(0), yt.stride(0), eps, tiles_n, rb,
                     self.max_spins, tickets)
            ccex = {"BLOCK_M": bm, "BLOCK_C": block_c, "PART_T": part_t, "RESET_BLOCK": _RESET}
            self._fork_join(lambda: _launch_producer(at, bt, ct, grid, cfg, K, prec, 1, flags, consumer),
                            lambda: _rms(cgrid, cargs, ccex, cwarps, 1), at.device)
        return ct, yt

    def matmul_copy(self, a: Any, b: Any, *, dst: Any, out: Any = None, precision: str = "tf32") -> tuple[Any, Any]:
        """``out = a @ b`` and ``dst[:] = out``, each tile copied as soon as it is published
        (with ``consumer_sms=0``: as soon as it is stored, by the program that computed it).

        ``a`` (M, K), ``b`` (K, N) as in :meth:`matmul_rms_norm`; ``dst`` and ``out`` (M, N) of
        their dtype, any strides (``out`` new if None). ``dst`` may live on another GPU that
        this one has peer access to (``torch.cuda`` / CuPy ``deviceEnablePeerAccess``): the
        consumer then stores over NVLink while the matmul runs. With ``consumer_sms=0`` each
        producer program stores its tiles into ``dst`` itself, in its epilogue (one kernel on
        the caller's stream; the fastest placement at the decode shapes of the module
        docstring). Returns ``(out, dst)``.
        ``ValueError``/``TypeError`` for bad shapes, dtypes or devices, before anything is
        allocated or launched."""
        at, _ = to_torch(a, "a")
        bt, _ = to_torch(b, "b")
        M, N, K, prec = _check_mm(at, bt, precision)
        ct = _out(out, "out", (M, N), at, False)
        dt, _ = to_torch(dst, "dst")
        if tuple(dt.shape) != (M, N) or dt.dtype != at.dtype:
            raise ValueError(f"dst must be {(M, N)} {at.dtype}, got {tuple(dt.shape)} {dt.dtype}")
        _check_extent((M, N), out=ct, dst=dt)
        check_device("matmul_copy", at, bt, *[t for t in (ct,) if t is not None])
        if not INTERPRET and not dt.is_cuda:
            raise ValueError(f"matmul_copy: dst must be on a CUDA device, got {dt.device}")
        if ct is not None:
            check_writes("matmul_copy", "out", ct, ("a", at), ("b", bt))
        check_writes("matmul_copy", "dst", dt, ("a", at), ("b", bt), ("out", ct), same_ok=("out",))
        ct = _new(ct, (M, N), at)
        if M == 0 or N == 0:
            return ct, dt
        cfg = _config(M, N, at.element_size(), self.producer_sms, K)
        bm, bn = cfg[0], cfg[1]
        n_tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
        grid = min(self.producer_sms, n_tiles)
        if not self.consumer_sms:  # each producer program stores its tiles into dst too: no flags, no fork
            with self._lock:
                _, ctrl, _ = self._state(1, at.device)
                consumer = (ctrl, ctrl, dt, ctrl, 1.0, 1, 1, 16, 1, False)
                tracer = rt.tracer
                traced = tracer is not None and not INTERPRET and not rt.is_capturing(rt.current_handle())
                with tracer.span("tile_overlap producer (copy in the epilogue)") if traced else nullcontext():
                    _launch_producer(at, bt, ct, grid, cfg, K, prec, 3, ctrl, consumer)
            return ct, dt
        cgrid = min(self.consumer_sms, n_tiles)
        help_ = not INTERPRET and cgrid < n_tiles  # as in matmul_rms_norm
        tickets = cgrid + (grid if help_ else 0)
        with self._lock:
            flags, ctrl, _ = self._state(n_tiles, at.device)
            consumer = (flags, flags, dt, ctrl, 1.0, self.max_spins, tickets, 16, 1, help_)
            cargs = (ct, dt, flags, ctrl, M, N, ct.stride(0), ct.stride(1), dt.stride(0), dt.stride(1),
                     self.max_spins, tickets)
            ccex = {"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": cfg[5], "RESET_BLOCK": _RESET}
            self._fork_join(lambda: _launch_producer(at, bt, ct, grid, cfg, K, prec, 2, flags, consumer),
                            lambda: _copy(cgrid, cargs, ccex, 1 if INTERPRET else 4, 1), at.device)
        return ct, dt


def producer_matmul(a: Any, b: Any, *, out: Any = None, programs: int | None = None,
                    precision: str = "tf32") -> Any:
    """``a @ b`` into ``out`` with the producer's kernel and tile shapes but publishing nothing,
    on at most ``programs`` programs (default: every SM) on the current stream: the matmul half
    of the sequential alternative that tile overlap is measured against. ``a``, ``b``, ``out``
    and ``precision`` as in :meth:`TileOverlap.matmul_copy`; ``programs`` a positive int.
    Returns ``out``. ``ValueError``/``TypeError`` for bad arguments, before anything is
    allocated or launched."""
    at, _ = to_torch(a, "a")
    bt, _ = to_torch(b, "b")
    M, N, K, prec = _check_mm(at, bt, precision)
    ct = _out(out, "out", (M, N), at, False)
    _check_extent((M, N), out=ct)
    check_device("producer_matmul", at, bt, *[t for t in (ct,) if t is not None])
    if ct is not None:
        check_writes("producer_matmul", "out", ct, ("a", at), ("b", bt))
    total = device_sm_count(at.device.index if at.device.type == "cuda" else None)
    programs = total if programs is None else check_int(programs, "programs", 1)
    ct = _new(ct, (M, N), at)
    if M == 0 or N == 0:
        return ct
    cfg = _config(M, N, at.element_size(), programs, K)
    _launch_producer(at, bt, ct, min(programs, triton.cdiv(M, cfg[0]) * triton.cdiv(N, cfg[1])), cfg, K, prec)
    return ct


def tile_overlap(producer_sms: int, consumer_sms: int, *, device: int | None = None,
                 max_spins: int = DEFAULT_MAX_SPINS) -> TileOverlap:
    """A :class:`TileOverlap` (usable as ``with tile_overlap(producer_sms=P, consumer_sms=C) as ov:``)."""
    return TileOverlap(producer_sms, consumer_sms, device=device, max_spins=max_spins)


_cached: dict[tuple[Any, int, int], TileOverlap] = {}


def matmul_then_rms_norm(a: Any, b: Any, weight: Any, eps: float = 1e-6, *, out: Any = None, y: Any = None,
                         producer_sms: int, consumer_sms: int, precision: str = "tf32") -> tuple[Any, Any]:
    """:meth:`TileOverlap.matmul_rms_norm` with a :class:`TileOverlap` cached per (device,
    producer_sms, consumer_sms): calls with the same budgets share its flags, so they must be
    ordered (one caller stream); concurrent callers make their own :func:`tile_overlap`."""
    at, _ = to_torch(a, "a")
    producer_sms = check_int(producer_sms, "producer_sms", 1)  # before the cache: True == 1 and 1.0 == 1 as keys
    consumer_sms = check_int(consumer_sms, "consumer_sms", 1)
    key = (at.device, producer_sms, consumer_sms)
    ov = _cached.get(key)
    if ov is None:
        ov = TileOverlap(producer_sms, consumer_sms,
                         device=at.device.index if at.device.type == "cuda" else None)
        _cached[key] = ov
    return ov.matmul_rms_norm(a, b, weight, eps, out=out, y=y, precision=precision)
