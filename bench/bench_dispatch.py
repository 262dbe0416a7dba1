"""Host cost of CudagraphDispatcher.dispatch (CPU only)."""
from __future__ import annotations

from .common import Report, host_us

NEEDS_GPU = False


def run(rep: Report) -> None:
    from lowlevel import CudagraphDispatcher, CUDAGraphMode

    d = CudagraphDispatcher(max_num_seqs=256)
    d.initialize_cudagraph_keys(CUDAGraphMode.FULL_AND_PIECEWISE)
    sizes = list(range(1, 513))
    it = iter(sizes * 1000)
    all_modes = CUDAGraphMode.valid_runtime_modes()

    def memo():
        d.dispatch(next(it))

    def full_path():  # explicit valid_modes: the un-memoised path, as vLLM computes every call
        d.dispatch(next(it), valid_modes=all_modes)

    for _ in range(2):
        for n in sizes:
            d.dispatch(n)
    rep.add("dispatch(), 512 sizes round-robin", host_us(memo, n=5000, warmup=0, trials=5), "us",
            "same dispatch without the memo (vLLM's per-call work)", host_us(full_path, n=5000, warmup=0, trials=5),
            target="< 1 us")
