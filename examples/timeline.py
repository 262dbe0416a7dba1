"""Timeline: spans per stream -> a Chrome/Perfetto trace, busy/overlap figures, a Gantt PNG.

On any machine: spans added from already-measured timings (``Timeline.add``). Where a GPU
exists: spans recorded with CUDA timing events around work on two streams, and lowlevel's own
runtimes (``execute_in_parallel``) recording their branches inside ``Timeline.activate()``.
Run: ``python examples/timeline.py --out /tmp/tl`` and open ``trace.json`` in ui.perfetto.dev.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

from _util import have_gpu

import lowlevel


def recorded_spans() -> lowlevel.Timeline:
    """Spans from timings measured elsewhere (a log, a profiler): one microbatch overlap."""
    tl = lowlevel.Timeline()
    for i, (start, compute, comm) in enumerate([(0.0, 1.0, 0.6), (1.0, 1.0, 0.6), (2.0, 1.0, 0.6)]):
        tl.add(f"attn ub{i % 2}", "compute", start, start + compute)
        tl.add(f"a2a ub{i % 2}", "comm", start + compute, start + compute + comm)
    return tl


def gpu_spans() -> lowlevel.Timeline:
    """Spans timed on the device: a matmul on one stream beside a copy on another, then a fork/join
    whose branches the runtime records itself."""
    import torch

    a = torch.randn(2048, 2048, device="cuda")
    src = torch.randn(32 << 20, device="cuda")
    dst = torch.empty_like(src)
    s1, s2 = lowlevel.Stream(), lowlevel.Stream()
    tl = lowlevel.Timeline(labels={s1: "matmul stream", s2: "copy stream"})
    runner = lowlevel.ParallelRunner(1)
    tl.label(runner.streams[0], "aux stream")
    (a @ a).sum()  # warm-up: cuBLAS handles, allocator
    torch.cuda.synchronize()
    with tl.activate():
        with lowlevel.use_stream(s1), tl.span("matmul x4"):
            for _ in range(4):
                a @ a
        with lowlevel.use_stream(s2), tl.span("copy 128 MB"):
            dst.copy_(src)
        runner(lambda: a @ a, [lambda: dst.mul_(2.0)])  # spans "default" and "aux0"
    torch.cuda.synchronize()
    return tl


def report(tl: lowlevel.Timeline, tag: str, out: str) -> None:
    st = tl.stats()
    trace = tl.to_chrome_trace(os.path.join(out, f"{tag}_trace.json"))
    n = sum(1 for e in trace["traceEvents"] if e["ph"] == "X")
    busy = ", ".join(f"{k} {v:.3f}" for k, v in sorted(st["busy_ms"].items()))
    print(f"[{tag}] {n} spans; busy ms: {busy}; wall {st['wall_ms']:.3f} ms; "
          f"achieved speedup {st['achieved_speedup']:.2f}x of ideal {st['ideal_speedup']:.2f}x")
    tracks = sorted(st["busy_ms"])
    if len(tracks) >= 2:
        print(f"[{tag}] overlap of {tracks[0]!r} and {tracks[1]!r}: {tl.overlap_ms(tracks[0], tracks[1]):.3f} ms")
    try:
        print(f"[{tag}] picture: {tl.plot(os.path.join(out, f'{tag}.png'), title=tag)}")
    except ImportError:
        print(f"[{tag}] no picture: matplotlib is not installed")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="folder for traces and pictures (default: a temporary one)")
    args = p.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="lowlevel-timeline-")
    os.makedirs(out, exist_ok=True)
    tl = recorded_spans()
    report(tl, "recorded", out)
    with open(os.path.join(out, "recorded_trace.json")) as f:
        assert len(json.load(f)["traceEvents"]) == 6 + 3  # 6 spans, the process name, 2 track names
    if have_gpu("timeline"):
        report(gpu_spans(), "gpu", out)
    print(f"wrote traces to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
