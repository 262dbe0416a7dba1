"""Overlap inside one batch: matmul then RMSNorm of its output (and matmul then a copy of its
output into the peer GPU), in sequence on all SMs each (the best of the producer's kernel,
lowlevel's tuned matmul and cuBLAS, each followed by the best consumer) vs DBO with 2
microbatches vs tile overlap (producer on P SMs, consumer on C SMs starting on the first
finished row blocks or tiles) at the best P/C split; for the copy C = 0 is a split too (every
producer program stores its own tiles into the peer in its epilogue). Each figure also carries the bound no
overlap can beat (best sequential / the fastest matmul alone) and the producer's rounds of
tiles on every SM (one round: every tile finishes at about the same time).

Timing: each variant is captured once into a CUDA graph holding ``ITERS`` back-to-back
launches cycling over ``ITERS`` distinct weight matrices (so the weights stream from HBM as in
a model, not from L2); the figure is the median over replays of the graph's device time
(CUDA events) divided by ``ITERS``. Graphs take the host's launch cost out of both sides: with
consumer SMs the overlap path enqueues two streams, four waits and two kernels per call, which
eagerly would dominate at these sizes. Saves a timeline picture of both (eager, one launch each)."""
from __future__ import annotations

import importlib
import json
import os
import statistics

from .common import Report

NEEDS_GPU = True
ITERS = 8
SHAPES = [(M, N, 4096) for N in (14336, 4096) for M in (16, 64, 256, 1024)]
CONSUMER_SMS = (4, 8, 16, 32)  # plus suggest_split's choice


def _graph_us(torch, lowlevel, step, reps=15):
    """Median µs per step of a graph of ITERS steps (step(i) enqueues iteration i)."""
    for i in range(ITERS):  # compile, allocate outside the capture
        step(i)
    torch.cuda.synchronize()
    with lowlevel.capture() as g:
        for i in range(ITERS):
            step(i)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / ITERS)
    return statistics.median(times), min(times), max(times)


def _dbo(torch, h, first, second):
    """DBO with 2 microbatches of ``h`` rows: ``first(rows)`` (the matmul) on the caller's
    stream for each half, ``second(rows)`` (the consumer) of a half on a side stream as soon as
    that half's matmul is done, so the consumer of half 0 overlaps the matmul of half 1; every
    kernel on all SMs. Returns ``step(i)`` for :func:`_graph_us`."""
    side = torch.cuda.Stream()
    halves = (slice(0, h), slice(h, None))

    def step(i):
        cur = torch.cuda.current_stream()
        for rows in halves:
            first(i, rows)
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                second(i, rows)
        cur.wait_stream(side)
    return step


def _waves(M, N, Kd, programs):
    """(tiles, rounds) of the overlapping producer on ``programs`` programs: with one round
    every tile finishes at about the same time and nothing can start early."""
    TO = importlib.import_module("lowlevel.kernels.tile_overlap")  # the module (the package exports a function)
    bm, bn = TO.producer_config(M, N, 2, programs, Kd)[:2]
    tiles = -(-M // bm) * -(-N // bn)
    return tiles, -(-tiles // programs)


def _rms_case(rep, torch, lowlevel, K, TO, total, M, N, Kd):
    dt = torch.bfloat16
    a = torch.randn(M, Kd, device="cuda", dtype=dt)
    bs = [torch.randn(Kd, N, device="cuda", dtype=dt) / 64 for _ in range(ITERS)]
    w = torch.randn(N, device="cuda", dtype=dt)
    out = torch.empty(M, N, device="cuda", dtype=dt)
    y = torch.empty_like(out)

    # the sequential alternatives, all SMs each: the producer's kernel, lowlevel's tuned matmul,
    # cuBLAS; then lowlevel's norm (torch's after cuBLAS); the best of them is the baseline
    seqs = {"producer kernel + lowlevel rms_norm": lambda i: (TO.producer_matmul(a, bs[i], out=out),
                                                             K.rms_norm(out, w, 1e-6, out=y)),
            "lowlevel matmul + lowlevel rms_norm": lambda i: (K.matmul(a, bs[i], out=out),
                                                             K.rms_norm(out, w, 1e-6, out=y)),
            "cuBLAS + torch rms_norm": lambda i: (torch.matmul(a, bs[i], out=out),
                                                  torch.nn.functional.rms_norm(out, (N,), w, 1e-6))}
    seq_all = {k: _graph_us(torch, lowlevel, f) for k, f in seqs.items()}
    seq_name = min(seq_all, key=lambda k: seq_all[k][0])
    seq_us = seq_all[seq_name]
    mm_us = min(_graph_us(torch, lowlevel, lambda i: K.matmul(a, bs[i], out=out)),
                _graph_us(torch, lowlevel, lambda i: torch.matmul(a, bs[i], out=out)))
    dbo_us = (_graph_us(torch, lowlevel, _dbo(torch, M // 2, lambda i, r: K.matmul(a[r], bs[i], out=out[r]),
                                              lambda i, r: K.rms_norm(out[r], w, 1e-6, out=y[r])))
              if M >= 2 else None)
    splits = {}
    for c in sorted({TO.suggest_split(M, N, total, K=Kd)[1], *CONSUMER_SMS}):
        ov = TO.tile_overlap(producer_sms=total - c, consumer_sms=c)
        splits[c] = _graph_us(torch, lowlevel, lambda i, ov=ov: ov.matmul_rms_norm(a, bs[i], w, out=out, y=y))
        ov.check()
    best = min(splits, key=lambda c: splits[c][0])
    ov_us = splits[best]
    tiles, rounds = _waves(M, N, Kd, total - best)
    rep.add(f"matmul+rms_norm bf16 M={M} N={N} K={Kd}: tile overlap P={total - best}, C={best}", ov_us[0], "us",
            f"best sequential run, all SMs each ({seq_name})", seq_us[0], lower_is_better=True,
            target=">= 1.2x at M <= 256",
            extra={"overlap_min_max_us": ov_us[1:], "sequential_min_max_us": seq_us[1:],
                   "sequential_us": {k: v[0] for k, v in seq_all.items()},
                   "splits_us": {f"P={total - c},C={c}": v[0] for c, v in splits.items()},
                   "matmul_alone_us": mm_us[0], "dbo_2_microbatches_us": dbo_us[0] if dbo_us else None,
                   "upper_bound_x": seq_us[0] / mm_us[0], "producer_tiles": tiles, "producer_rounds": rounds})
    if dbo_us:
        rep.add(f"matmul+rms_norm bf16 M={M} N={N} K={Kd}: DBO, 2 microbatches", dbo_us[0], "us",
                "best sequential run", seq_us[0], lower_is_better=True)
    print(f"M={M} N={N}: seq {seq_us[0]:.1f} us ({seq_name}; matmul alone {mm_us[0]:.1f}: bound "
          f"{seq_us[0] / mm_us[0]:.3f}x), DBO {dbo_us[0] if dbo_us else float('nan'):.1f}, overlap {ov_us[0]:.1f} us "
          f"at C={best}: {seq_us[0] / ov_us[0]:.3f}x; {tiles} tiles, {rounds} rounds; splits "
          + ", ".join(f"{c}:{v[0]:.1f}" for c, v in splits.items()), flush=True)
    return a, bs, w, out, y, best


def _peer_case(rep, torch, lowlevel, K, TO, total, cp, M, N):
    import triton

    CP = importlib.import_module("lowlevel.kernels.copy")  # the module (the package exports a function)
    dt = torch.bfloat16
    Kd = 4096
    a = torch.randn(M, Kd, device="cuda", dtype=dt)
    bs = [torch.randn(Kd, N, device="cuda", dtype=dt) / 64 for _ in range(ITERS)]
    out = torch.empty(M, N, device="cuda", dtype=dt)
    dst = torch.empty(M, N, device="cuda:1", dtype=dt)

    def peer_copy(rows=slice(None)):  # the copy engine over NVLink (cudaMemcpyAsync, kind default)
        o, d = out[rows], dst[rows]
        cp.cuda.runtime.memcpyAsync(d.data_ptr(), o.data_ptr(), o.nbytes, 4, torch.cuda.current_stream().cuda_stream)

    def sm_copy(rows=slice(None)):  # an SM kernel storing over NVLink: lowlevel's copy kernel (whose API
        o, d = out[rows], dst[rows]  # keeps to one device), blocks small enough to give every SM work
        n = o.numel()
        block = max(1024, min(16384, triton.next_power_of_2(triton.cdiv(n, total))))
        grid = min(total, triton.cdiv(n, block))
        CP._copy_kernel[(grid,)](o, d, n, grid, BLOCK=block, num_warps=16 if block >= 8192 else 4)

    copies = {"copy engine": peer_copy, "SM copy kernel": sm_copy}
    mms = {"producer kernel": lambda i: TO.producer_matmul(a, bs[i], out=out),
           "lowlevel matmul": lambda i: K.matmul(a, bs[i], out=out),
           "cuBLAS": lambda i: torch.matmul(a, bs[i], out=out)}
    seqs = {f"{m} + {c}": (lambda i, mf=mf, cf=cf: (mf(i), cf())) for m, mf in mms.items() for c, cf in copies.items()}
    seq_all = {k: _graph_us(torch, lowlevel, f) for k, f in seqs.items()}
    torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), out.cpu())  # the last sequential run stored the SM copy kernel's result
    seq_name = min(seq_all, key=lambda k: seq_all[k][0])
    seq_us = seq_all[seq_name]
    best_copy = copies[seq_name.split(" + ")[1]]  # DBO's consumer: the faster sequential copy
    mm_us = min(_graph_us(torch, lowlevel, lambda i: K.matmul(a, bs[i], out=out)),
                _graph_us(torch, lowlevel, lambda i: torch.matmul(a, bs[i], out=out)))
    dbo_us = _graph_us(torch, lowlevel, _dbo(torch, M // 2, lambda i, r: K.matmul(a[r], bs[i], out=out[r]),
                                             lambda i, r: best_copy(r)))
    splits = {}
    for c in sorted({0, TO.suggest_split(M, N, total, K=Kd)[1], *CONSUMER_SMS}):  # 0: the copy in the epilogue
        ov = TO.tile_overlap(producer_sms=total - c, consumer_sms=c)
        splits[c] = _graph_us(torch, lowlevel, lambda i, ov=ov: ov.matmul_copy(a, bs[i], out=out, dst=dst))
        ov.check()
        torch.cuda.synchronize()
        assert torch.equal(dst.cpu(), out.cpu()), c
    best = min(splits, key=lambda c: splits[c][0])
    best_c = min((c for c in splits if c), key=lambda c: splits[c][0])  # the best with consumer SMs of its own
    tiles, rounds = _waves(M, N, Kd, total - best)
    where = " (the copy in the producer's epilogue)" if best == 0 else ""
    rep.add(f"matmul+copy to peer GPU bf16 M={M} N={N} K={Kd}: tile overlap P={total - best}, C={best}{where}",
            splits[best][0], "us", f"best sequential run ({seq_name})", seq_us[0], lower_is_better=True,
            target=">= 1.2x at M <= 256",
            extra={"splits_us": {f"P={total - c},C={c}": v[0] for c, v in splits.items()},
                   "best_with_consumer_sms_us": splits[best_c][0],
                   "best_with_consumer_sms_x": seq_us[0] / splits[best_c][0],
                   "sequential_us": {k: v[0] for k, v in seq_all.items()}, "matmul_alone_us": mm_us[0],
                   "dbo_2_microbatches_us": dbo_us[0], "upper_bound_x": seq_us[0] / mm_us[0],
                   "producer_tiles": tiles, "producer_rounds": rounds})
    rep.add(f"matmul+copy to peer GPU bf16 M={M} N={N} K={Kd}: DBO, 2 microbatches", dbo_us[0], "us",
            "best sequential run", seq_us[0], lower_is_better=True)
    print(f"peer M={M} N={N}: seq {seq_us[0]:.1f} us ({seq_name}; bound {seq_us[0] / mm_us[0]:.3f}x), DBO "
          f"{dbo_us[0]:.1f}, overlap {splits[best][0]:.1f} us at C={best}: {seq_us[0] / splits[best][0]:.3f}x "
          f"(with consumer SMs: {seq_us[0] / splits[best_c][0]:.3f}x at C={best_c}); "
          f"{tiles} tiles, {rounds} rounds; splits " + ", ".join(f"{c}:{v[0]:.1f}" for c, v in splits.items()),
          flush=True)


def _partial(rep: Report) -> None:
    """The figures so far, to ``$BENCH_PARTIAL`` if set (a run cut short keeps them)."""
    path = os.environ.get("BENCH_PARTIAL")
    if path:
        with open(path, "w") as f:
            json.dump([fig.to_json() for fig in rep.figures], f, indent=1)


def run(rep: Report) -> None:
    import torch

    import lowlevel
    from lowlevel import kernels as K
    TO = importlib.import_module("lowlevel.kernels.tile_overlap")  # the module, not the function of that name
    from lowlevel.sm_control import device_sm_count

    total = device_sm_count()
    timeline_case = None
    for M, N, Kd in SHAPES:
        case = _rms_case(rep, torch, lowlevel, K, TO, total, M, N, Kd)
        if (M, N) == (256, 4096):
            timeline_case = case
        _partial(rep)

    if timeline_case is not None:
        a, bs, w, out, y, best = timeline_case
        ov = TO.tile_overlap(producer_sms=total - best, consumer_sms=best)
        ov.matmul_rms_norm(a, bs[0], w, out=out, y=y)
        torch.cuda.synchronize()
        cur = lowlevel.current_stream()
        ps, cs = ov.streams
        tl = lowlevel.Timeline(labels={cur: "caller (sequential)", ps: f"producer ({total - best} SMs)",
                                       cs: f"consumer ({best} SMs)"})
        # Each pair (sequential, then overlapped) waits behind a ~1 ms sleep on the caller's
        # stream, so that the host has enqueued both before the device reaches them: the picture
        # shows the device's schedule, not the host's enqueue latency (graphs remove that latency
        # in the figures). A 50 us gate was too short on the H200 run of 2026-11-30: the eager
        # host path of one overlapped call (validation, two forks, two spans) took longer. The
        # picture is the window around the last pair.
        with tl.activate():
            for i in range(3):
                torch.cuda._sleep(2_000_000)
                with tl.span("matmul", cur):
                    TO.producer_matmul(a, bs[i], out=out)
                with tl.span("rms_norm", cur):
                    K.rms_norm(out, w, 1e-6, out=y)
                ov.matmul_rms_norm(a, bs[i], w, out=out, y=y)
            torch.cuda.synchronize()
        sp = tl.resolve()
        last = [s for s in sp if s.start_ms >= max(x.start_ms for x in sp if x.name == "matmul")]
        lo, hi = min(s.start_ms for s in last), max(s.end_ms for s in last)
        try:
            png = tl.plot(os.path.join(rep.out_dir, "tile_overlap_timeline.png"),
                          "M=256 N=K=4096 bf16: sequential, then tile overlap (eager)",
                          window_ms=(lo - 0.002, hi + 0.002))
            rep.files.append(png)
        except ImportError as exc:  # pragma: no cover - matplotlib missing
            print(f"no picture: {exc}")
        print("timeline spans (ms):", [(s.name, s.track, round(s.start_ms, 4), round(s.end_ms, 4)) for s in sp])

    # --- the peer copy: matmul then copy into GPU 1 vs tiles copied as they finish -------------
    if torch.cuda.device_count() >= 2 and torch.cuda.can_device_access_peer(0, 1):
        import cupy as cp

        with cp.cuda.Device(0):
            try:
                cp.cuda.runtime.deviceEnablePeerAccess(1)
            except cp.cuda.runtime.CUDARuntimeError:
                pass  # already enabled
        for M, N, _ in SHAPES:
            _peer_case(rep, torch, lowlevel, K, TO, total, cp, M, N)
            _partial(rep)
