"""SM-limited copy: a memory-bound kernel that stays on at most ``get_num_sms()`` SMs, the
stand-in for SM-bound communication kernels (DeepEP-style) in overlap experiments."""
from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

from ._launch import (
    INTERPRET,
    FastLauncher,
    Plan,
    PreparedLaunch,
    check_device,
    check_stream,
    check_writes,
    to_torch,
)

__all__ = ["copy", "prepare_copy"]


@triton.jit(do_not_specialize=["num_progs"])
def _copy_kernel(src_ptr, dst_ptr, n, num_progs, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK).to(tl.int64)
    block = tl.full((BLOCK,), BLOCK, tl.int64)  # 64-bit offsets: arrays may exceed 2**31 elements
    for chunk in range(pid, tl.cdiv(n, BLOCK), num_progs):
        idx = chunk * block + offs
        m = idx < n
        tl.store(dst_ptr + idx, tl.load(src_ptr + idx, mask=m), mask=m)


_launch = FastLauncher(_copy_kernel, ("num_progs",))


def plan(src: Any, dst: Any) -> Plan:
    st, _ = to_torch(src, "src")
    dt, _ = to_torch(dst, "dst")
    if st.shape != dt.shape or st.dtype != dt.dtype:
        raise ValueError(f"src and dst must match: {tuple(st.shape)} {st.dtype} vs {tuple(dt.shape)} {dt.dtype}")
    if not (st.is_contiguous() and dt.is_contiguous()):
        raise ValueError("copy needs contiguous src and dst")
    check_device("copy", st, dt)
    check_writes("copy", "dst", dt, ("src", st), same_ok=("src",))
    n = st.numel()  # both contiguous: the kernel indexes them flat, no views needed
    # one program per SM at most (so the cap bounds the SMs in use), each moving 32 KiB a step
    block = 128 if INTERPRET else 32768 // st.element_size()
    return Plan(_launch, triton.cdiv(n, block), (st, dt, n, 0), 3, {"BLOCK": block},
                1 if INTERPRET else 16, 1, dst)


def copy(src: Any, dst: Any) -> Any:
    """Copy ``src`` into ``dst`` (same shape and dtype, both contiguous) on at most
    :func:`~lowlevel.sm_control.get_num_sms` SMs, on lowlevel's current stream. Returns ``dst``."""
    return plan(src, dst).launch()


def prepare_copy(src: Any, dst: Any, *, stream: Any = None) -> PreparedLaunch:
    """Validate once and launch once (``dst`` is written now); the returned
    :class:`PreparedLaunch` copies ``src`` into ``dst`` per call, on lowlevel's current stream
    at each call, or always on ``stream`` when one is given (a :class:`StreamLaunch`, the
    cheapest path). ``TypeError`` / ``ValueError`` for bad arrays or a ``stream`` that is no
    stream, before anything launches."""
    bound = check_stream(stream)
    return plan(src, dst).prepare(bound)
