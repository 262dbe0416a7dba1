"""Persistent matmul: C = A @ B with fp32 accumulation, on at most ``get_num_sms()`` SMs.

The grid is ``min(cap, tiles)`` programs; program ``p`` computes tiles ``p, p + P, p + 2P, ...``
in grouped order (``GROUP_M`` rows of tiles share B tiles in L2). ``P`` is a runtime argument
that Triton does not specialise on, so changing the cap never recompiles.
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ._launch import INTERPRET, FastLauncher, Plan, PreparedLaunch, check_device, like_input, to_torch


@triton.jit(do_not_specialize=["num_progs"])
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, num_progs,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_group = GROUP_M * num_pid_n
    for tile in range(pid, num_tiles, num_progs):
        # grouped order: walk GROUP_M tile-rows down a column of tiles before moving right
        group = tile // tiles_per_group
        first_m = group * GROUP_M
        group_rows = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % tiles_per_group) % group_rows
        pid_n = (tile % tiles_per_group) // group_rows
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(k_tiles):
            k_left = K - kt * BLOCK_K
            a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        c = acc.to(c_ptr.dtype.element_ty)
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, c, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


_launch = FastLauncher(_matmul_kernel, ("num_progs",))

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages), tuned for Hopper
_CONFIGS = {
    2: (128, 256, 64, 8, 8, 3),   # bf16 / fp16
    4: (128, 128, 32, 8, 8, 3),   # fp32 (tf32 tensor cores)
}
_SMALL = (64, 64, 64, 8, 4, 3)     # for products that have fewer tiles than SMs
_INTERP = (16, 16, 16, 2, 1, 1)


def _config(M: int, N: int, itemsize: int) -> tuple[int, ...]:
    if INTERPRET:
        return _INTERP
    cfg = _CONFIGS[itemsize]
    if triton.cdiv(M, cfg[0]) * triton.cdiv(N, cfg[1]) < 132:
        small = _SMALL if itemsize == 2 else (64, 64, 32, 8, 4, 3)
        return small
    return cfg


def _plan(a: Any, b: Any, out: Any, precision: str) -> Plan:
    at, a_cp = to_torch(a, "a")
    bt, _ = to_torch(b, "b")
    if at.dim() != 2 or bt.dim() != 2:
        raise ValueError(f"matmul takes 2-D inputs, got shapes {tuple(at.shape)} and {tuple(bt.shape)}")
    if at.dtype != bt.dtype:
        raise TypeError(f"a and b must have the same dtype, got {at.dtype} and {bt.dtype}")
    if at.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"matmul supports bfloat16, float16 and float32, got {at.dtype}")
    if precision not in ("tf32", "ieee"):
        raise ValueError(f"precision must be 'tf32' or 'ieee', got {precision!r}")
    M, K = at.shape
    K2, N = bt.shape
    if K != K2:
        raise ValueError(f"inner dimensions differ: a is {tuple(at.shape)}, b is {tuple(bt.shape)}")
    if out is None:
        ct = torch.empty((M, N), dtype=at.dtype, device=at.device)
        result = like_input(ct, a_cp)
    else:
        ct, _ = to_torch(out, "out")
        result = out
        if tuple(ct.shape) != (M, N) or ct.dtype != at.dtype:
            raise ValueError(f"out must be ({M}, {N}) {at.dtype}, got {tuple(ct.shape)} {ct.dtype}")
    check_device("matmul", at, bt, ct)
    bm, bn, bk, gm, warps, stages = _config(M, N, at.element_size())
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn) if M and N else 0
    args = (at, bt, ct, M, N, K, at.stride(0), at.stride(1), bt.stride(0), bt.stride(1), ct.stride(0), ct.stride(1), 0)
    cex = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm,
           "INPUT_PRECISION": precision if at.dtype == torch.float32 else "ieee"}
    return Plan(_launch, tiles, args, 12, cex, warps, stages, result)


def matmul(a: Any, b: Any, *, out: Any = None, precision: str = "tf32") -> Any:
    """``a @ b`` for 2-D ``a`` (M, K) and ``b`` (K, N) of the same dtype (bf16, fp16 or fp32),
    accumulated in fp32, written to ``out`` (M, N) (new if None) on lowlevel's current stream.

    Runs on at most :func:`~lowlevel.sm_control.get_num_sms` SMs. Inputs may be torch tensors
    or CuPy arrays (viewed, not copied); any strides; the result is of the kind of ``a``.
    ``precision`` for fp32 inputs: ``"tf32"`` (tensor cores) or ``"ieee"`` (exact fp32)."""
    return _plan(a, b, out, precision).launch()


def prepare_matmul(a: Any, b: Any, *, out: Any, precision: str = "tf32") -> PreparedLaunch:
    """Validate once and return a :class:`PreparedLaunch` that recomputes ``a @ b`` into
    ``out`` each time it is called (the cheapest launch path; the cap is read per call)."""
    if out is None:
        raise ValueError("prepare_matmul needs out=")
    return _plan(a, b, out, precision).prepare()
