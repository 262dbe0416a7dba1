"""Row-persistent RMSNorm, optionally fused with the residual add, on at most ``get_num_sms()`` SMs.

``y = x / sqrt(mean(x^2) + eps) * weight``, in fp32, per row; with a residual, first
``x = x + residual`` and that sum is also returned (the new residual).
"""
from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

from lowlevel.sm_control import get_num_sms

from ._launch import INTERPRET, FastLauncher, check_device, like_input, to_torch


@triton.jit(do_not_specialize=["num_progs", "eps"])
def _rms_norm_kernel(x_ptr, w_ptr, r_ptr, y_ptr, rout_ptr, rows, N, stride_x, stride_r, stride_y, stride_ro,
                     eps, num_progs, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    for row in range(pid, rows, num_progs):
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x += tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(rout_ptr + row * stride_ro + cols, x.to(rout_ptr.dtype.element_ty), mask=mask)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        tl.store(y_ptr + row * stride_y + cols, (x * inv * w).to(y_ptr.dtype.element_ty), mask=mask)


_launch = FastLauncher(_rms_norm_kernel, ("num_progs", "eps"))
MAX_N = 65536


def rms_norm(x: Any, weight: Any, eps: float = 1e-6, *, residual: Any = None, out: Any = None) -> Any:
    """RMSNorm of each row of ``x`` (rows, N) with ``weight`` (N,); rows must be contiguous.

    Returns ``out`` (new if None), or ``(out, new_residual)`` when ``residual`` is given, where
    ``new_residual = x + residual`` is a new array. Torch or CuPy inputs; the current stream."""
    import torch

    xt, x_cp = to_torch(x, "x")
    wt, _ = to_torch(weight, "weight")
    if xt.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, N), got shape {tuple(xt.shape)}")
    rows, N = xt.shape
    if wt.shape != (N,):
        raise ValueError(f"weight must have shape ({N},), got {tuple(wt.shape)}")
    if xt.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"rms_norm supports bfloat16, float16 and float32, got {xt.dtype}")
    if N > MAX_N:
        raise ValueError(f"rows of more than {MAX_N} elements are not supported, got {N}")
    if N and xt.stride(1) != 1:
        raise ValueError("the rows of x must be contiguous (x.stride(1) == 1)")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    yt = torch.empty_like(xt) if out is None else to_torch(out, "out")[0]
    if yt.shape != xt.shape or yt.dtype != xt.dtype or (N and yt.stride(1) != 1):
        raise ValueError("out must have x's shape and dtype, with contiguous rows")
    rt = rot = None
    if residual is not None:
        rt, _ = to_torch(residual, "residual")
        if rt.shape != xt.shape or rt.dtype != xt.dtype or (N and rt.stride(1) != 1):
            raise ValueError("residual must have x's shape and dtype, with contiguous rows")
        rot = torch.empty_like(rt)
    check_device("rms_norm", *[t for t in (xt, wt, yt, rt) if t is not None])
    if rows and N:
        block = triton.next_power_of_2(N)
        warps = 1 if INTERPRET else min(16, max(1, block // 512))
        grid = max(1, min(get_num_sms(), rows))
        r_args = (rt, rot, rt.stride(0), rot.stride(0)) if rt is not None else (xt, yt, 0, 0)
        _launch(grid, (xt, wt, r_args[0], yt, r_args[1], rows, N, xt.stride(0), r_args[2], yt.stride(0), r_args[3],
                       float(eps), grid), {"BLOCK": block, "HAS_RESIDUAL": rt is not None}, warps, 1)
    y = like_input(yt, x_cp) if out is None else out
    if residual is None:
        return y
    return y, like_input(rot, x_cp)
