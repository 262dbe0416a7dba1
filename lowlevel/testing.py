"""Helpers for tests and benchmarks: kernels that keep a stream busy for a known time."""
from __future__ import annotations

import functools
from typing import Any

from . import _runtime as rt
from .errors import check_bool
from .stream import StreamLike

__all__ = ["spin", "spin_triton"]

_SPIN_SRC = r"""
extern "C" __global__ void lowlevel_spin(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}
"""


@functools.cache
def _spin_kernel() -> Any:
    return rt.cp.RawKernel(_SPIN_SRC, "lowlevel_spin")


def spin(ns: int, *, blocks: int = 1, stream: StreamLike | None = None, whole_sm: bool = False) -> None:
    """Enqueue a kernel of ``blocks`` one-thread blocks that each busy-wait ``ns`` nanoseconds
    on ``stream`` (default: lowlevel's current stream). ``whole_sm=True`` gives each block
    enough shared memory that no two blocks share an SM, so ``blocks`` blocks run in
    ``ceil(blocks / SMs)`` waves. ``whole_sm`` must be a bool (``TypeError``)."""
    whole_sm = check_bool(whole_sm, "whole_sm")
    h = rt.stream_handle(stream)
    k = _spin_kernel()
    smem = 0
    if whole_sm:
        dev = rt.cp.cuda.runtime.getDevice()
        smem = int(rt.cp.cuda.runtime.getDeviceProperties(dev)["sharedMemPerMultiprocessor"]) // 2 + 1024
        if k.max_dynamic_shared_size_bytes < smem:
            k.max_dynamic_shared_size_bytes = smem
    k((blocks,), (1,), (rt.cp.uint64(ns),), stream=rt.cupy_external(h), shared_mem=smem)


@functools.cache
def _triton_spin() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def _spin(out_ptr, iters):
        pid = tl.program_id(0)
        acc = tl.load(out_ptr + pid)
        for _ in range(iters):
            acc = acc * 0.999999 + 0.5
        tl.store(out_ptr + pid, acc)

    return _spin


def spin_triton(out: Any, iters: int) -> None:
    """A Triton kernel (one program per element of the 1-D float32 CUDA tensor ``out``) that
    applies ``v = v * 0.999999 + 0.5`` to each element ``iters`` times, in place; it launches on
    torch's current stream."""
    _triton_spin()[(out.numel(),)](out, iters)
