"""Persistent matmul: C = A @ B with fp32 accumulation, on at most ``get_num_sms()`` SMs.

The grid is ``min(cap, units)`` programs; program ``p`` computes work units ``p, p + P,
p + 2P, ...``. ``P`` is a runtime argument that Triton does not specialise on, so changing the
cap never recompiles. A unit is one output tile in grouped order (``GROUP_M`` rows of tiles share
B tiles in L2), or, for skinny products with fewer tiles than SMs (decode: M of 1 to a few
hundred), one tile over one of ``split_k`` slices of K. Split-K is one kernel (a serial fix-up,
as cuBLAS's split-K does it): each slice's fp32 partial tile goes to a workspace, then the
program takes a ticket on the tile's counter (release after a CTA barrier), and the program
that draws the last ticket sums the slices in the fixed order 0, 1, 2, ... (acquire), writes
the tile and puts the counter back to 0 for the next launch. The sum order does not depend on
which slice finished last, so the result is the same bits run to run (deterministic), though
not the same bits as the unsplit kernel. Nothing waits on another program, so any cap is safe.
The workspace of :func:`matmul` (partials and counters) is kept per (device, stream) and grows,
never shrinks or frees (a captured graph may point at it); two split-K products on one stream
run in stream order, so they may share it, but a graph replayed on another stream while
``matmul`` runs on the capture stream would race (prepare a launch instead:
:func:`prepare_matmul` owns its workspace). Such a race corrupts more than its own results:
it can leave a tile counter off 0, and later split-K products on that stream then sum too
early. :func:`clear_plan_cache` also retires the shared workspaces, so the next products get
fresh counters (the retired ones stay allocated: graphs may point at them). Making or growing a
workspace (the first split-K product on a stream, or a larger one) zeroes its counters on
torch's current stream and, outside a capture, waits for that on the host.

Tile shapes come from a table measured per (compute capability, SM count) for the shapes that
matter in decoding (:data:`TABLE`, made by ``python -m lowlevel.kernels.tune``) and otherwise
from :func:`heuristic_config`, which derives the split from the device's SM count. The SM cap
never changes the configuration (only the program count), so a cap sweep compiles nothing.

Offsets are 32-bit unless some operand spans 2**31 elements or more; then the kernel is compiled
with 64-bit offsets (``WIDE``).

Plan cache: :func:`matmul` on torch tensors keeps, per launch key, the validated plan (the
configuration, the program count, the argument tail and the compiled kernel's C entry), so a
repeated call does only the key build, one dict look-up, the output allocation (without ``out``)
and the launch. The key holds everything validation and the launch depend on: each
operand's shape, strides, dtype, device and (for inputs and a given ``out``) whether its data
pointer is 16-byte aligned (Triton specialises on it), whether ``out`` is given, ``precision``,
and the SM cap in force (:func:`~lowlevel.set_num_sms`, :func:`~lowlevel.sm_limit`); a hit also
checks that the :data:`TABLE` entry the plan was made from is still the one there. Inputs that
miss are validated as before, so bad input raises the same errors whether the cache is warm or
not. At most :data:`PLAN_CACHE_SIZE` plans are kept (the oldest go first);
:func:`clear_plan_cache` empties it (after changing :func:`heuristic_config`'s tables).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from .. import _runtime as rt
from ..interop import byte_span, extent
from ..sm_control import capped as _capped
from ..sm_control import device_sm_count
from ._launch import (
    INTERPRET,
    FastLauncher,
    Plan,
    PreparedLaunch,
    check_device,
    check_dot_dtype,
    check_stream,
    check_writes,
    like_input,
    overlap_error,
    to_torch,
    with_grid,
)

__all__ = ["PLAN_CACHE_SIZE", "TABLE", "Config", "check_operands", "clear_plan_cache", "config_for",
           "grouped_tile", "heuristic_config", "matmul", "prepare_matmul", "tile_dot", "work_units"]


@triton.jit
def tile_dot(a_ptr, b_ptr, offs_m, offs_n, offs_k, M, N, k_lo, k_len,
             stride_am, stride_ak, stride_bk, stride_bn,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
             INPUT_PRECISION: tl.constexpr):
    """The fp32 ``(BLOCK_M, BLOCK_N)`` tile ``A[offs_m, k_lo : k_lo + k_len] @ B[k_lo : k_lo +
    k_len, offs_n]`` (``offs_k`` is ``arange(0, BLOCK_K)``, 64-bit where the caller's offsets
    are), ``BLOCK_K`` columns of A and rows of B a step; rows past ``M`` and columns past ``N``
    read as 0. ``EVEN_K``: ``k_len`` is a multiple of ``BLOCK_K`` (no K mask). The K loop of
    :func:`matmul` and of the tile-overlap producer (inlined by Triton into each)."""
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + (k_lo + offs_k)[None, :] * stride_ak
    b_ptrs = b_ptr + (k_lo + offs_k)[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(tl.cdiv(k_len, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=offs_m[:, None] < M, other=0.0)
            b = tl.load(b_ptrs, mask=offs_n[None, :] < N, other=0.0)
        else:
            k_left = k_len - kt * BLOCK_K
            a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of tile number ``tile`` in grouped order: GROUP_M tile-rows walked down a
    column of tiles before moving right, so programs running at the same time share columns of
    B in L2 (GROUP_M = 1: row-major, one row of tiles after the other)."""
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (tile // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % tiles_per_group) % group_rows, (tile % tiles_per_group) // group_rows


@triton.jit(do_not_specialize=["num_progs"])
def _matmul_kernel(a_ptr, b_ptr, c_ptr, ws_ptr, cnt_ptr, M, N, K, k_split,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, num_progs,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, WIDE: tl.constexpr, FLATTEN: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    if SPLIT_K:
        n_split = tl.cdiv(K, k_split)
        units = num_tiles * n_split
    else:
        n_split = 1
        units = num_tiles
    for unit in tl.range(pid, units, num_progs, flatten=FLATTEN):
        if SPLIT_K:
            tile = unit % num_tiles
            s = unit // num_tiles
            k_lo = s * k_split
            k_len = tl.minimum(K - k_lo, k_split)
        else:
            tile = unit
            s = 0
            k_lo = 0
            k_len = K
        pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        if WIDE:  # 64-bit offsets: an operand spans 2**31 elements or more
            offs_m = offs_m.to(tl.int64)
            offs_n = offs_n.to(tl.int64)
            offs_k = offs_k.to(tl.int64)
        acc = tile_dot(a_ptr, b_ptr, offs_m, offs_n, offs_k, M, N, k_lo, k_len,
                       stride_am, stride_ak, stride_bk, stride_bn,
                       BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, INPUT_PRECISION)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        if SPLIT_K:
            # Serial split-K fix-up in this kernel: store slice s's fp32 partial, then take a
            # ticket on the tile's counter (release: the CTA barrier first, so every thread's
            # stores are issued). The program that draws the last ticket sums the slices in the
            # fixed order 0, 1, ..., n_split - 1 (the same bits whichever program is last), writes
            # C and puts the counter back to 0 for the next launch (ordered after this one).
            ws_tile = offs_m[:, None] * N + offs_n[None, :]
            mn = M * N
            if WIDE:
                mn = tl.cast(mn, tl.int64)
            tl.store(ws_ptr + s * mn + ws_tile, acc, mask=mask)
            tl.debug_barrier()
            ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if ticket == n_split - 1:
                tl.debug_barrier()  # the acquire by one thread orders every thread's loads after it
                total = tl.load(ws_ptr + ws_tile, mask=mask, other=0.0, cache_modifier=".cg")
                for s2 in range(1, n_split):
                    total += tl.load(ws_ptr + s2 * mn + ws_tile, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(c_ptrs, total.to(c_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")
        else:
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


_launch = FastLauncher(_matmul_kernel, ("num_progs",))


class Config(NamedTuple):
    """One tile configuration: ``split_k`` is the most K slices (1: no split); a short K gets
    fewer, each slice a whole number of ``block_k`` steps."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    flatten: bool = False


# Measured winners (python -m lowlevel.kernels.tune), bf16/fp16, per (compute capability, SMs):
# {(M bucket, N, K): Config}. M buckets: 1, 16, 32, 64, 128, 256 (larger M: the heuristic).
# Times: triton.testing.do_bench medians of the prepared launch at all SMs, against torch.mm in the
# same run (bench_kernels, 2026-11-30); configurations from two tune rounds, the two marked
# "session 5" re-tuned with the in-kernel split-K fix-up (which made 4 slices of 128 x 256 tiles
# slower than the separate reduction it replaced: 62 against 55 us).
TABLE: dict[tuple[tuple[int, int], int], dict[tuple[int, int, int], Config]] = {
    ((9, 0), 132): {  # H200
        (1, 4096, 4096): Config(16, 64, 256, 8, 4, 5),  # 17.4 us, cuBLAS 18.8 us
        (1, 14336, 4096): Config(16, 128, 128, 8, 4, 4),  # 39.7 us, cuBLAS 40.9 us
        (1, 4096, 14336): Config(16, 64, 256, 8, 4, 5),  # 40.6 us, cuBLAS 41.8 us
        (16, 4096, 4096): Config(16, 64, 256, 8, 4, 5),  # 17.5 us, cuBLAS 19.0 us
        (16, 14336, 4096): Config(16, 128, 128, 8, 4, 4),  # 40.0 us, cuBLAS 39.9 us
        (16, 4096, 14336): Config(16, 64, 256, 8, 4, 5),  # 41.0 us, cuBLAS 42.2 us
        (64, 4096, 4096): Config(64, 64, 128, 8, 4, 6),  # 19.1 us, cuBLAS 17.6 us (0.92x; session 5 tune)
        (64, 14336, 4096): Config(64, 128, 64, 8, 4, 5),  # 40.4 us, cuBLAS 40.6 us
        (64, 4096, 14336): Config(64, 64, 256, 8, 4, 3, 2),  # 44.5 us, cuBLAS 43.7 us
        (256, 4096, 4096): Config(64, 128, 128, 8, 4, 4),  # 23.3 us, cuBLAS 23.5 us (session 5 tune)
        (256, 14336, 4096): Config(128, 256, 64, 8, 8, 4),  # 51.0 us, cuBLAS 50.8 us
        (256, 4096, 14336): Config(128, 128, 64, 8, 8, 5, 2),  # 55.9 us, cuBLAS 53.1 us (session 5 tune)
    },
}

# bf16 squares with _BIG (H200, same run): 4096^3 199 us against cuBLAS 187 us (0.94x), 8192^3 1627 us
# against 1610 us (0.99x); 4 stages beat 3 (tune round 1: 192 against 209 us at 4096^3)
_BIG = {2: Config(128, 256, 64, 8, 8, 4), 4: Config(128, 128, 32, 8, 8, 3)}
_MID = {2: Config(64, 64, 64, 8, 4, 3), 4: Config(64, 64, 32, 8, 4, 3)}
_INTERP = Config(16, 16, 16, 2, 1, 1)
_BUCKETS = (1, 16, 32, 64, 128, 256)


def m_bucket(M: int) -> int:
    """The table's row bucket of ``M``: the smallest of 1, 16, 32, 64, 128, 256 at least M, else 0
    (no table entry: :func:`heuristic_config`)."""
    for b in _BUCKETS:
        if b >= M:
            return b
    return 0


def heuristic_config(M: int, N: int, K: int, itemsize: int, sms: int) -> Config:
    """A configuration for shapes the table lacks, from the device's SM count ``sms``: big tiles
    when they give at least one per SM; for small M, BLOCK_M just above M with wide K steps, and
    K split so that tiles x slices come close to ``sms`` (each slice at least 4 K steps)."""
    big = _BIG[itemsize]
    if triton.cdiv(M, big.block_m) * triton.cdiv(N, big.block_n) >= sms:
        return big
    if M > 256:
        return _MID[itemsize]
    if itemsize == 2:  # the shapes of the measured decode winners
        bm, bn, bk, warps, stages = ((16, 64, 256, 4, 5) if M <= 16 else (64, 64, 128, 4, 5) if M <= 64
                                     else (128, 128, 64, 8, 4))
    else:
        bm, bn, bk, warps, stages = (16 if M <= 16 else 64), 64, 32, 4, 3
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    split = max(1, min(sms // tiles, K // (4 * bk)))
    return Config(bm, bn, bk, 8, warps, stages, split)


@functools.cache
def _capability(device: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def config_for(M: int, N: int, K: int, itemsize: int, device: int | None = None) -> Config:
    """The configuration :func:`matmul` uses for an (M, K) x (K, N) product of ``itemsize``-byte
    elements on ``device``: the measured table's entry, else :func:`heuristic_config`."""
    if INTERPRET:
        return _INTERP
    sms = device_sm_count(device)
    if itemsize == 2:
        cc = _capability(device if device is not None else torch.cuda.current_device())
        cfg = TABLE.get((cc, sms), {}).get((m_bucket(M), N, K))
        if cfg is not None:
            return cfg
    return heuristic_config(M, N, K, itemsize, sms)


_WS: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED: list[tuple[torch.Tensor, torch.Tensor]] = []  # outgrown workspaces: a captured graph may still use them


def _zeroed_counters(device: torch.device, n: int) -> torch.Tensor:
    """``n`` int32 split-K tile counters at 0, the zeros in place before any stream uses them
    (the fill runs on torch's current stream; outside a capture this waits for it, inside one
    the fill is a node of the graph, before the kernel)."""
    cnt = torch.zeros(n, device=device, dtype=torch.int32)
    if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        torch.cuda.current_stream(device).synchronize()
    return cnt


def _workspace(device: torch.device, numel: int, tiles: int, own: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-K workspace: fp32 partials (at least ``numel`` elements) and int32 tile
    counters (at least ``tiles``, at 0 between launches: the last slice of a tile puts its
    counter back). One per (device, stream), grown geometrically, never freed (launches on one
    stream run in order; a captured graph may still point at it); ``own`` (prepared launches):
    a new one for the caller alone."""
    if own or device.type != "cuda":
        return torch.empty(numel, device=device, dtype=torch.float32), _zeroed_counters(device, tiles)
    key = (device.index or 0, rt.current_handle())
    cur = _WS.get(key)
    if cur is None or cur[0].numel() < numel or cur[1].numel() < tiles:
        if cur is not None:
            _RETIRED.append(cur)
            numel, tiles = max(numel, 2 * cur[0].numel()), max(tiles, 2 * cur[1].numel())
        cur = _WS[key] = (torch.empty(numel, device=device, dtype=torch.float32), _zeroed_counters(device, tiles))
    return cur


def check_operands(at: torch.Tensor, bt: torch.Tensor, precision: str,
                   what: str = "matmul") -> tuple[int, int, int, str]:
    """``(M, N, K, input_precision)`` of ``at @ bt`` (torch tensors (M, K) and (K, N)), the last
    the kernels' ``INPUT_PRECISION`` (``precision`` for fp32, else "ieee"). ``ValueError`` /
    ``TypeError`` naming the operands when ``what`` cannot multiply them: not 2-D, dtypes that
    differ or are not bf16 / fp16 / fp32 (or that the device's tensor cores lack), a
    ``precision`` other than "tf32" / "ieee", inner dimensions that differ."""
    if at.dim() != 2 or bt.dim() != 2:
        raise ValueError(f"{what} takes 2-D a and b, got shapes {tuple(at.shape)} and {tuple(bt.shape)}")
    if at.dtype != bt.dtype:
        raise TypeError(f"a and b must have the same dtype, got {at.dtype} and {bt.dtype}")
    if at.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"{what} supports bfloat16, float16 and float32, got {at.dtype}")
    check_dot_dtype(at.dtype, "a and b")
    if precision not in ("tf32", "ieee"):
        raise ValueError(f"precision must be 'tf32' or 'ieee', got {precision!r}")
    M, K = at.shape
    K2, N = bt.shape
    if K != K2:
        raise ValueError(f"inner dimensions differ: a is {tuple(at.shape)}, b is {tuple(bt.shape)}")
    return M, N, K, precision if at.dtype == torch.float32 else "ieee"


def _tiling(M: int, N: int, K: int, cfg: Config) -> tuple[int, int, int]:
    """(output tiles, K elements a slice, K slices) of an (M, K) x (K, N) product under ``cfg``:
    slices of whole K steps, fewer than ``cfg.split_k`` when K is short (K == 0: none, the
    tiles store zeros)."""
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n) if M and N else 0
    k_split = triton.cdiv(triton.cdiv(K, max(1, cfg.split_k)), cfg.block_k) * cfg.block_k if K else 0
    return tiles, k_split, (triton.cdiv(K, k_split) if K else 0)


def work_units(M: int, N: int, K: int, itemsize: int = 2, device: int | None = None) -> int:
    """Work units of :func:`matmul` on an (M, K) x (K, N) product of ``itemsize``-byte elements
    on ``device`` (default: the current one): output tiles, times K slices where it splits K. A
    cap of P SMs runs them in ``ceil(units / P)`` waves (:func:`lowlevel.comm_sm_candidates`
    proposes the caps that cost no extra wave); the same count as ``prepare_matmul(...).tiles``."""
    tiles, _, n_split = _tiling(M, N, K, config_for(M, N, K, itemsize, device))
    return tiles * n_split if n_split > 1 else tiles


def plan(a: Any, b: Any, out: Any, precision: str, cfg: Config | None = None, own_ws: bool = False,
          wide: bool | None = None) -> Plan:
    """The launch of ``a @ b``; ``cfg`` and ``wide`` (64-bit offsets) override the choice (tests, tuning)."""
    at, a_cp = to_torch(a, "a")
    bt, _ = to_torch(b, "b")
    M, N, K, input_precision = check_operands(at, bt, precision)
    if out is None:
        ct = torch.empty((M, N), dtype=at.dtype, device=at.device)
        result = like_input(ct, a_cp)
    else:
        ct, _ = to_torch(out, "out")
        result = out
        if tuple(ct.shape) != (M, N) or ct.dtype != at.dtype:
            raise ValueError(f"out must be ({M}, {N}) {at.dtype}, got {tuple(ct.shape)} {ct.dtype}")
    check_device("matmul", at, bt, ct)
    if out is not None:
        check_writes("matmul", "out", ct, ("a", at), ("b", bt))
    if cfg is None:
        cfg = config_for(M, N, K, at.element_size(), at.device.index if at.is_cuda else None)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    tiles, k_split, n_split = _tiling(M, N, K, cfg)
    split = n_split > 1 and tiles > 0
    if wide is None:
        wide = max(extent(at), extent(bt), extent(ct),
                   M * N * n_split if split else 0) >= 1 << 31
    cex = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": cfg.group_m, "SPLIT_K": split,
           "EVEN_K": K % bk == 0, "WIDE": wide, "FLATTEN": cfg.flatten,
           "INPUT_PRECISION": input_precision}
    if not split:  # no workspace: c stands in for the two unused pointers
        args = (at, bt, ct, ct, ct, M, N, K, K, at.stride(0), at.stride(1), bt.stride(0), bt.stride(1),
                ct.stride(0), ct.stride(1), 0)
        return Plan(_launch, tiles, args, 15, cex, cfg.num_warps, cfg.num_stages, result)
    ws, cnt = _workspace(at.device, n_split * M * N, tiles, own_ws)
    args = (at, bt, ct, ws, cnt, M, N, K, k_split, at.stride(0), at.stride(1), bt.stride(0), bt.stride(1),
            ct.stride(0), ct.stride(1), 0)
    return Plan(_launch, tiles * n_split, args, 15, cex, cfg.num_warps, cfg.num_stages, result)


# --- the plan cache of matmul() ------------------------------------------------------------------

PLAN_CACHE_SIZE = 256
"""Most plans :func:`matmul` keeps (the oldest are dropped first)."""

_PLANS: dict[tuple, _Cached] = {}
_TOTALS: dict[Any, int] = {}  # torch.device -> its SMs (the interpreter: INTERPRETER_SMS)
_NO_ENTRY: dict = {}


def clear_plan_cache() -> None:
    """Forget every cached :func:`matmul` plan (the next calls validate and plan again) and
    retire the shared split-K workspaces (kept alive for graphs that captured them; the next
    products get fresh ones, with every tile counter at 0)."""
    _PLANS.clear()
    _RETIRED.extend(_WS.values())
    _WS.clear()


class _Step:
    """One launch of a cached plan with its ``n_ptr`` leading arrays left out: ``grid``
    programs, ``tail`` the arguments after the arrays (program count included) then the
    constexpr values. ``launch``/``prefix``: the compiled kernel's C entry (None under the
    interpreter or where Triton's launcher failed the check: then ``launcher`` is called with
    the tensors, ``ints`` and ``cex``)."""

    __slots__ = ("cex", "grid", "ints", "launch", "launcher", "prefix", "stages", "tail", "warps")

    def __init__(self, p: Plan, grid: int, n_ptr: int) -> None:
        launcher = p.launcher
        args = with_grid(p.args, p.grid_at, grid)
        self.launcher, self.grid, self.ints, self.cex = launcher, grid, args[n_ptr:], p.constexprs
        self.warps, self.stages = p.num_warps, p.num_stages
        self.tail = args[n_ptr:] + tuple(p.constexprs.values())
        self.launch: Any = None
        self.prefix: tuple[Any, ...] = ()
        if not launcher.interpret:
            e = launcher.cache.get(launcher.key(args, p.constexprs, p.num_warps, p.num_stages))
            if e is not None and not e.slow:
                self.launch, self.prefix = e.launch, e.prefix

    def slow(self, *arrays: Any) -> None:
        self.launcher(self.grid, arrays + self.ints, self.cex, self.warps, self.stages)


class _Cached:
    """A validated :func:`matmul` launch: output shape, dtype and device; the table entry it was
    planned from (checked on each hit); the kernel's step, and for split-K the workspace's
    partials (elements) and tile counters (0: no split)."""

    __slots__ = ("device", "dtype", "main", "shape", "spans", "tcfg", "tk", "ws_numel", "ws_tiles")

    def __init__(self, shape: tuple[int, int], dtype: Any, device: Any, tk: Any, tcfg: Any, main: _Step | None,
                 ws_numel: int, ws_tiles: int, spans: tuple[int, int, int]) -> None:
        self.shape, self.dtype, self.device, self.tk, self.tcfg = shape, dtype, device, tk, tcfg
        self.main, self.ws_numel, self.ws_tiles = main, ws_numel, ws_tiles
        self.spans = spans  # bytes spanned by a, b and a given out (fixed by the key's shapes and strides)


def _table_key(at: Any, bt: Any) -> Any:
    """The :data:`TABLE` slot :func:`config_for` reads for ``at @ bt`` (None: it reads none)."""
    dev = at.get_device()
    if INTERPRET or at.element_size() != 2 or dev < 0 or at.dim() != 2 or bt.dim() != 2:
        return None
    (M, K), N = at.shape, bt.shape[1]
    return (_capability(dev), device_sm_count(dev)), (m_bucket(M), N, K)


def _miss(at: Any, bt: Any, ot: Any, precision: str, key: tuple, cap: int) -> Any:
    """Validate, plan and launch (the uncached path); keep the plan under ``key``."""
    tk = _table_key(at, bt)  # read before planning: a table change in between makes the next call miss
    tcfg = TABLE.get(tk[0], _NO_ENTRY).get(tk[1]) if tk is not None else None
    p = plan(at, bt, ot, precision)  # raises on bad input, before anything launches
    result = p.launch()
    main = None
    ws_numel = ws_tiles = 0
    if p.tiles:
        main = _Step(p, max(1, min(cap, p.tiles)), 5)
        if p.constexprs["SPLIT_K"]:
            ws_numel, ws_tiles = p.args[3].numel(), p.args[4].numel()
    if len(_PLANS) >= PLAN_CACHE_SIZE:
        try:
            del _PLANS[next(iter(_PLANS))]
        except (KeyError, RuntimeError, StopIteration):  # another thread got there first
            pass
    spans = (byte_span(at), byte_span(bt), 0 if ot is None else byte_span(ot))
    _PLANS[key] = _Cached(tuple(result.shape), at.dtype, at.device, tk, tcfg, main, ws_numel, ws_tiles, spans)
    return result


def _matmul_torch(at: Any, bt: Any, ot: Any, precision: str) -> Any:
    """:func:`matmul` on torch tensors, through the plan cache."""
    da = at.device
    total = _TOTALS.get(da)
    if total is None:
        total = _TOTALS[da] = device_sm_count(da.index if da.type == "cuda" else None)
    cap = _capped(total)
    try:
        pa, pb = at.data_ptr(), bt.data_ptr()
        if ot is None:
            key: tuple = (at.shape, at.stride(), at.dtype, da, pa % 16 == 0, bt.shape, bt.stride(), bt.dtype,
                          bt.device, pb % 16 == 0, precision, cap)
        else:
            pc = ot.data_ptr()
            key = (at.shape, at.stride(), at.dtype, da, pa % 16 == 0, bt.shape, bt.stride(), bt.dtype, bt.device,
                   pb % 16 == 0, precision, cap, ot.shape, ot.stride(), ot.dtype, ot.device, pc % 16 == 0)
    except RuntimeError:  # a nested tensor has no sizes or strides: to_torch names it (ValueError)
        for name, t in (("a", at), ("b", bt), ("out", ot)):
            if t is not None:
                to_torch(t, name)
        raise
    e = _PLANS.get(key)
    if e is None or (e.tk is not None and TABLE.get(e.tk[0], _NO_ENTRY).get(e.tk[1]) is not e.tcfg):
        return _miss(at, bt, ot, precision, key, cap)
    if ot is None:
        ot = torch.empty(e.shape, dtype=e.dtype, device=e.device)
        pc = ot.data_ptr()
    else:  # the plan checked out's layout; where it lies against a and b can change call to call
        sa, sb, so = e.spans
        if so and sa and pc < pa + sa and pa < pc + so:
            raise overlap_error("matmul", "out", "a")
        if so and sb and pc < pb + sb and pb < pc + so:
            raise overlap_error("matmul", "out", "b")
    s = e.main
    if s is None:  # nothing to compute (M or N is 0)
        return ot
    if not e.ws_numel:
        if s.launch is None:
            s.slow(at, bt, ot, ot, ot)
        else:
            h = rt.torch_get_raw(-1) or rt.cupy_get_current().ptr  # lowlevel's current stream
            s.launch(s.grid, 1, 1, h, *s.prefix, pa, pb, pc, pc, pc, *s.tail)
        return ot
    ws, cnt = _workspace(e.device, e.ws_numel, e.ws_tiles, False)
    if s.launch is None:
        s.slow(at, bt, ot, ws, cnt)
    else:
        h = rt.torch_get_raw(-1) or rt.cupy_get_current().ptr
        s.launch(s.grid, 1, 1, h, *s.prefix, pa, pb, pc, ws.data_ptr(), cnt.data_ptr(), *s.tail)
    return ot


def matmul(a: Any, b: Any, *, out: Any = None, precision: str = "tf32") -> Any:
    """``a @ b`` for 2-D ``a`` (M, K) and ``b`` (K, N) of the same dtype (bf16, fp16 or fp32),
    accumulated in fp32, written to ``out`` (M, N) (new if None) on lowlevel's current stream.

    Runs on at most :func:`~lowlevel.sm_control.get_num_sms` SMs. Inputs may be torch tensors
    or CuPy arrays (viewed, not copied); any strides; the result is of the kind of ``a``.
    ``precision`` for fp32 inputs: ``"tf32"`` (tensor cores) or ``"ieee"`` (exact fp32).
    Skinny products may split K (see the module docstring): deterministic, fp32 partial sums.
    A repeated call with the same shapes, strides, dtypes, devices, ``out`` (given or not),
    ``precision`` and SM cap reuses its plan (see "Plan cache" in the module docstring).
    Raises ``ValueError`` / ``TypeError`` on mismatched shapes, dtypes or devices, and
    ``ValueError`` for an ``out`` that overlaps ``a``, ``b`` or itself in memory (before anything
    runs, on the plan cache's hits too)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and type(precision) is str:
        if out is None:
            return _matmul_torch(a, b, None, precision)
        if isinstance(out, torch.Tensor):
            _matmul_torch(a, b, out, precision)
            return out
    return plan(a, b, out, precision).launch()


def prepare_matmul(a: Any, b: Any, *, out: Any, precision: str = "tf32", stream: Any = None) -> PreparedLaunch:
    """Validate once, launch once (``out`` is written now) and return a :class:`PreparedLaunch`
    that recomputes ``a @ b`` into ``out`` each time it is called (the cheapest launch path;
    the cap is read per call), on lowlevel's current stream at each call, or always on
    ``stream`` when one is given (a :class:`StreamLaunch`). A split-K product gets its own
    workspace, held by the prepared launch: do not run one prepared launch on two streams at
    once (e.g. replayed in a graph on one stream while called on another): a race on its tile
    counters can leave one off 0 and make its later results wrong; prepare again to recover.
    ``TypeError`` / ``ValueError`` for bad operands or a ``stream`` that is no stream, before
    anything launches or is allocated."""
    if out is None:
        raise ValueError("prepare_matmul needs out=")
    bound = check_stream(stream)  # before the workspace is made
    return plan(a, b, out, precision, own_ws=True).prepare(bound)
