"""CUDA graphs: capture a step once, replay it; serve many batch sizes from a ladder of graphs.

1. ``lowlevel.capture()``: the step reads a persistent input buffer, so a replay after new data
   is copied in computes on the new data.
2. ``CudagraphDispatcher`` + ``CUDAGraphRunner``: each batch is padded up to the nearest captured
   size and replays that graph; batches above the ladder run eagerly.
Run: ``python examples/graphs.py --hidden 512 --max-size 64``.
"""
from __future__ import annotations

import argparse
import random
import time

from _util import have_gpu

import lowlevel
from lowlevel import CudagraphDispatcher, CUDAGraphMode, CUDAGraphRunner


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8,
                   help="small layers per step (graphs pay off when launches dominate)")
    p.add_argument("--max-size", type=int, default=64, help="largest captured batch")
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args(argv)
    if not have_gpu("graphs"):
        return 0
    import torch

    torch.manual_seed(0)
    h, top = args.hidden, args.max_size
    ws = [torch.randn(h, h, device="cuda") / h ** 0.5 for _ in range(args.layers)]

    def step(x: torch.Tensor) -> torch.Tensor:
        for w in ws:
            x = torch.relu(x @ w) + x
        return x

    buf = torch.zeros(top + 16, h, device="cuda")  # persistent input: graphs read views of it

    # 1. one graph, replayed on new data
    x8 = buf[:8]
    step(x8)  # warm-up outside the capture (cuBLAS workspaces, allocator)
    torch.cuda.synchronize()
    with lowlevel.capture() as g:
        y8 = step(x8)
    x8.copy_(torch.randn(8, h, device="cuda"))
    g.replay()
    diff = (y8 - step(x8)).abs().max().item()
    print(f"capture + replay of {args.layers} layers on new data: max |replay - eager| = {diff:.2e}")
    assert diff < 1e-4

    # 2. a ladder of graphs behind the dispatcher
    d = CudagraphDispatcher(max_capture_size=top)
    d.initialize_cudagraph_keys(CUDAGraphMode.FULL)
    runner = CUDAGraphRunner(step, CUDAGraphMode.FULL)
    views = {s: buf[:s] for s in d.capture_sizes}  # one view per size: the same buffers every call
    t0 = time.perf_counter()
    n_graphs = runner.capture_all(d, lambda desc: (views[desc.num_tokens],), progress=False)
    print(f"captured {n_graphs} graphs (sizes {d.capture_sizes[0]}..{top}) in {time.perf_counter() - t0:.2f} s")

    rng = random.Random(0)
    worst, replayed, eager_steps = 0.0, 0, 0
    for _ in range(args.steps):
        n = rng.randint(1, top + 8)
        data = torch.randn(n, h, device="cuda")
        mode, desc = d.dispatch(n)
        pad = desc.num_tokens
        buf[:n].copy_(data)
        buf[n:pad].zero_()  # padding rows: defined contents
        if mode is CUDAGraphMode.FULL:
            out = runner(mode, desc, views[pad], num_tokens=n)[:n]
            replayed += 1
        else:
            out = runner(mode, desc, buf[:n])  # NONE: eager, unpadded
            eager_steps += 1
        ref = step(buf[:pad])[:n]  # eager on the same padded batch
        worst = max(worst, (out - ref).abs().max().item())
    print(f"{args.steps} steps: {replayed} replayed, {eager_steps} eager; {runner.padded_tokens} padding tokens; "
          f"max |graph - eager| = {worst:.2e}")
    assert worst < 1e-4 and runner.hits >= replayed - n_graphs

    def timed(fn):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / 50 * 1e6

    mode, desc = d.dispatch(24)
    eager_us = timed(lambda: step(views[desc.num_tokens]))
    graph_us = timed(lambda: runner(mode, desc, views[desc.num_tokens]))
    print(f"24 tokens: eager {eager_us:.1f} us, graph replay {graph_us:.1f} us ({eager_us / graph_us:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
