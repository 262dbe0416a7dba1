"""CUDA graphs: launch-bound work eager vs lowlevel replay vs raw torch.cuda.CUDAGraph replay,
and the per-call overhead of Graph.replay / CUDAGraphRunner over a raw replay."""
from __future__ import annotations

from .common import Report, host_us

NEEDS_GPU = True


def run(rep: Report) -> None:
    import torch

    import lowlevel
    from lowlevel import BatchDescriptor, CUDAGraphMode

    sync = torch.cuda.synchronize
    x = torch.randn(1024, device="cuda")

    def hundred():
        for _ in range(100):
            x.add_(1.0)

    side = torch.cuda.Stream()

    def both_graphs(fn):
        """``fn`` captured by lowlevel and by torch, each after a warm-up run."""
        fn()
        sync()
        with lowlevel.capture() as ours_g:
            fn()
        theirs_g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            fn()
        sync()
        with torch.cuda.graph(theirs_g):
            fn()
        return ours_g, theirs_g

    g, tg = both_graphs(hundred)

    eager = host_us(hundred, n=50, trials=7, sync=sync, warmup=5)
    ours = host_us(g.replay, n=200, trials=7, sync=sync, warmup=10)
    raw = host_us(tg.replay, n=200, trials=7, sync=sync, warmup=10)
    rep.add("100 small kernels: lowlevel graph replay", ours, "us", "eager torch", eager,
            target=">= 8x over eager", extra={"speedup_vs_eager": eager / ours})
    rep.add("100 small kernels: lowlevel vs torch graph replay", ours, "us", "torch.cuda.CUDAGraph.replay", raw)

    # Overhead per replay on a 1-node graph (host-bound): ours, the runner, raw torch.
    y = torch.randn(16, device="cuda")
    one = lambda: y.mul_(1.0)  # noqa: E731
    g1, t1 = both_graphs(one)
    runner = lowlevel.CUDAGraphRunner(lambda: one(), CUDAGraphMode.FULL)
    desc = BatchDescriptor(16, 16)
    runner(CUDAGraphMode.FULL, desc)
    raw1 = host_us(t1.replay, n=5000, sync=sync)
    rep.add("1-node graph: Graph.replay()", host_us(g1.replay, n=5000, sync=sync), "us",
            "torch CUDAGraph.replay()", raw1)
    r_us = host_us(lambda: runner(CUDAGraphMode.FULL, desc), n=5000, sync=sync)
    rep.add("1-node graph: CUDAGraphRunner call (lookup + replay)", r_us, "us", "torch CUDAGraph.replay()", raw1,
            target="<= raw + 1 us", extra={"over_raw_us": r_us - raw1})
