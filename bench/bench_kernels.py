"""SM-limited kernels: speed vs cuBLAS / copy bandwidth, SM scaling curves (PNG), overlap of a
capped matmul with a capped copy (software caps and green contexts). Launch cost: bench_launch."""
from __future__ import annotations

import os
from typing import Any

from .common import Report, host_us_side_by_side, wall_ms

NEEDS_GPU = True


def _ms(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


DECODE_M = (1, 16, 64, 256)
DECODE_NK = ((4096, 4096), (14336, 4096), (4096, 14336))
SQUARES = (4096, 8192)


def decode_gemms(rep: Report) -> None:
    """bf16 matmul on the decode grid and two squares against torch.mm (cuBLAS, all SMs), at all
    SMs and at 1/2 and 1/4 of them against linear scaling; plot ``decode_gemm.png``."""
    import torch

    import lowlevel
    from lowlevel import kernels as K
    from lowlevel.kernels.matmul import config_for, plan
    from lowlevel.sm_control import device_sm_count

    total = device_sm_count()
    caps = (total, total // 2, total // 4)
    shapes = [(M, N, Kd) for M in DECODE_M for N, Kd in DECODE_NK] + [(n, n, n) for n in SQUARES]
    ratios: dict[int, list[float]] = {c: [] for c in caps}
    labels = []
    logs = []
    for M, N, Kd in shapes:
        a = torch.randn(M, Kd, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(Kd, N, device="cuda", dtype=torch.bfloat16)
        c = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        flops, nbytes = 2 * M * N * Kd, 2 * (M * Kd + Kd * N + M * N)
        cublas = _ms(lambda a=a, b=b, c=c: torch.mm(a, b, out=c)) * 1e3
        units = plan(a, b, c, "tf32").tiles
        cfg = config_for(M, N, Kd, 2)
        label = f"{M}x{N}x{Kd}"
        labels.append(label)
        full = None
        # the prepared launch (validated once, as a model's decode step would use it): device time
        # without lowlevel's per-call Python validation, which at these sizes can exceed the
        # kernel (the public call is timed beside it at all SMs, "public_call_us")
        run = K.prepare_matmul(a, b, out=c)
        public = _ms(lambda a=a, b=b, c=c: K.matmul(a, b, out=c)) * 1e3
        for cap in caps:
            with lowlevel.sm_limit(cap):
                us = _ms(run) * 1e3
            full = us if full is None else full
            ratios[cap].append(cublas / us)
            extra = {"TFLOP/s": flops / us / 1e6, "GB/s": nbytes / us / 1e3, "cublas_TFLOP/s": flops / cublas / 1e6,
                     "cublas_GB/s": nbytes / cublas / 1e3, "programs": min(cap, units), "sm_cap": cap,
                     "config": list(cfg), "public_call_us": public}
            if cap == total:
                rep.add(f"matmul bf16 {label}, all SMs", us, "us", "torch.mm (cuBLAS)", cublas,
                        target=">= 0.9x cuBLAS", extra=extra)
            else:
                rep.add(f"matmul bf16 {label}, {cap} SMs", us, "us", f"linear scaling from {total} SMs",
                        full * total / cap, extra={**extra, "vs_cublas_all_sms": cublas / us})
            logs.append(f"{label:>18} cap {cap:3d} ({min(cap, units):3d} programs): {us:8.1f} us "
                        f"{flops / us / 1e6:6.1f} TFLOP/s {nbytes / us / 1e3:6.0f} GB/s | cuBLAS {cublas:8.1f} us "
                        f"-> {cublas / us:.2f}x | public call {public:6.1f} us | {tuple(cfg)}")
        if label in ("1x4096x4096", "64x4096x4096"):  # host cost per call (µs), the three paths interleaved
            hosts = host_us_side_by_side(run, lambda a=a, b=b, c=c: K.matmul(a, b, out=c),
                                         lambda a=a, b=b, c=c: torch.mm(a, b, out=c),
                                         n=200, trials=7, sync=torch.cuda.synchronize, warmup=20)
            rep.add(f"matmul {label}: host+device us per call, prepared launch", hosts[0], "us",
                    "torch.mm, same measure", hosts[2], extra={"public_call_us": hosts[1]})
            logs.append(f"{label:>18} back-to-back per call: prepared {hosts[0]:.1f} us, matmul() {hosts[1]:.1f} us, "
                        f"torch.mm {hosts[2]:.1f} us")
        del a, b, c, run
    print("\n".join(logs))
    full_r = ratios[total][:len(DECODE_M) * len(DECODE_NK)]
    gm = 1.0
    for r in full_r:
        gm *= r
    gm **= 1 / len(full_r)
    rep.add("decode grid: geometric mean of speed vs cuBLAS, all SMs", gm, "x", target=">= 1.0x (ambition)",
            extra={"meeting_0.9x": [lb for lb, r in zip(labels, ratios[total]) if r >= 0.9],
                   "below_0.9x": [lb for lb, r in zip(labels, ratios[total]) if r < 0.9]})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(14, 4.5))
        width = 0.27
        for i, cap in enumerate(caps):
            ax.bar([x + (i - 1) * width for x in range(len(labels))], ratios[cap], width, label=f"{cap} SMs")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(0.9, color="gray", ls="--", lw=0.8, label="0.9x target")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"speed vs cuBLAS on all {total} SMs")
        ax.set_title("lowlevel.kernels.matmul (bf16, SM-capped) against torch.mm")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = os.path.join(rep.out_dir, "decode_gemm.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        rep.files.append(path)
    except ImportError:  # pragma: no cover
        pass


def memory_bound(rep: Report) -> tuple[Any, Any, float]:
    """copy and rms_norm against torch's copy bandwidth; returns (src, dst, copy GB/s)."""
    import torch

    from lowlevel import kernels as K

    n = 1 << 28  # 1 GiB of fp32
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    copy_bw = 2 * src.nbytes / _ms(lambda: dst.copy_(src)) / 1e6
    ours_bw = 2 * src.nbytes / _ms(lambda: K.copy(src, dst)) / 1e6
    rep.add("copy, all SMs", ours_bw, "GB/s", "torch copy_ (the copy bandwidth)", copy_bw, lower_is_better=False,
            target=">= 0.9x")
    x = torch.randn(16384, 8192, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8192, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    rms_bw = 2 * x.nbytes / _ms(lambda: K.rms_norm(x, w, out=y)) / 1e6
    rep.add("rms_norm bf16 16384x8192, all SMs", rms_bw, "GB/s", "torch copy_ (the copy bandwidth)", copy_bw,
            lower_is_better=False, target=">= 0.9x")
    import importlib

    rn = importlib.import_module("lowlevel.kernels.rms_norm")
    for rows, warps, pf in ((4, 16, False), (2, 16, True), (2, 8, True), (4, 16, True)):
        p = rn.plan(x, w, 1e-6, None, y, cfg=(rows, warps, 1, pf)).prepare()
        bw = 2 * x.nbytes / _ms(p) / 1e6
        rep.add(f"rms_norm bf16 16384x8192, {rows} rows x {warps} warps, prefetch={pf}", bw, "GB/s",
                "torch copy_ (the copy bandwidth)", copy_bw, lower_is_better=False)
    rr = torch.randn_like(x)
    fused_bw = 4 * x.nbytes / _ms(lambda: K.rms_norm(x, w, residual=rr, out=y)) / 1e6
    rep.add("fused add + rms_norm bf16, all SMs", fused_bw, "GB/s", "torch copy_ (the copy bandwidth)", copy_bw,
            lower_is_better=False)
    return src, dst, copy_bw


def run(rep: Report) -> None:
    import torch

    import lowlevel
    from lowlevel import kernels as K
    from lowlevel.sm_control import device_sm_count

    total = device_sm_count()
    decode_gemms(rep)
    src, dst, _ = memory_bound(rep)
    x = torch.randn(16384, 8192, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8192, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)

    # --- SM scaling ----------------------------------------------------------------------------
    caps = sorted({1, 2, 4, 8, 16, 24, 32, 48, 66, 96, 112, total})
    am = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    cm = torch.empty_like(am)
    curves = {"matmul (TFLOP/s)": [], "copy (GB/s)": [], "rms_norm (GB/s)": []}
    for cap in caps:
        with lowlevel.sm_limit(cap):
            curves["matmul (TFLOP/s)"].append(2 * 8192 ** 3 / _ms(lambda: K.matmul(am, bm, out=cm)) / 1e9)
            curves["copy (GB/s)"].append(2 * src.nbytes / _ms(lambda: K.copy(src, dst)) / 1e6)
            curves["rms_norm (GB/s)"].append(2 * x.nbytes / _ms(lambda: K.rms_norm(x, w, out=y)) / 1e6)
    mm = curves["matmul (TFLOP/s)"]
    half = caps.index(66) if 66 in caps else len(caps) // 2
    linear_at = mm[0] * caps[half]  # linear extrapolation from 1 SM
    rep.add(f"matmul at {caps[half]} SMs vs linear from 1 SM", mm[half], "TFLOP/s", "linear scaling", linear_at,
            lower_is_better=False, target=">= 0.9x linear")
    rep.add(f"matmul at {caps[half]} SMs vs {total} SMs x {caps[half]}/{total}", mm[half], "TFLOP/s",
            "proportional share of all-SM speed", mm[-1] * caps[half] / total, lower_is_better=False)
    for name in ("copy (GB/s)", "rms_norm (GB/s)"):
        ys = curves[name]
        sat = next(c for c, v in zip(caps, ys) if v >= 0.9 * max(ys))
        rep.add(f"{name.split()[0]}: SMs needed for 90% of peak bandwidth", sat, "SMs", "all SMs", total,
                extra={"caps": caps, "values": ys})
    rep.figures[-1].extra["all_curves"] = {"caps": caps, **curves}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for ax, (name, ys) in zip(axes, curves.items()):
            ax.plot(caps, ys, "o-", label="measured")
            ax.plot(caps, [ys[-1] * c / total for c in caps], "--", color="gray", label="linear (from all SMs)")
            ax.set_xlabel("SM cap")
            ax.set_title(name)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle("Throughput against SM cap")
        fig.tight_layout()
        path = os.path.join(rep.out_dir, "sm_scaling.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        rep.files.append(path)
    except ImportError:  # pragma: no cover
        pass

    # --- overlap: capped matmul + capped copy on two streams -----------------------------------
    s1, s2 = lowlevel.Stream(), lowlevel.Stream()
    a4 = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b4 = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    c4 = torch.empty_like(a4)
    src2 = torch.randn(1 << 28, device="cuda")
    dst2 = torch.empty_like(src2)

    def mm_run():
        K.matmul(a4, b4, out=c4)

    def cp_run():
        K.copy(src2, dst2)

    def seq():
        mm_run()
        cp_run()

    def fork(sa, sb, cap_a, cap_b):
        """matmul on ``sa`` capped at ``cap_a`` || copy on ``sb`` capped at ``cap_b``; joined back."""
        ev = lowlevel.Event().record()
        for s, cap, fn in ((sa, cap_a, mm_run), (sb, cap_b, cp_run)):
            with lowlevel.use_stream(s), lowlevel.sm_limit(cap):
                ev.wait()
                fn()
        lowlevel.Event().record(sa).wait()
        lowlevel.Event().record(sb).wait()

    t_seq = wall_ms(seq)
    t_free = wall_ms(lambda: fork(s1, s2, total, total))
    rep.add("overlap: both uncapped on two streams", t_free, "ms", "sequential", t_seq)
    best = None
    for k in (8, 16, 32, 48):
        t = wall_ms(lambda k=k: fork(s1, s2, total - k, k))
        rep.add(f"overlap: matmul on {total - k} SMs || copy on {k} SMs", t, "ms", "sequential", t_seq,
                extra={"both_uncapped_ms": t_free})
        best = (t, k) if best is None or t < best[0] else best
    rep.add(f"overlap: best software split (copy on {best[1]} SMs)", best[0], "ms", "both uncapped", t_free)
    try:
        for k in (16, 32):
            with lowlevel.sm_partition([total // 8 * 8 - k - 8, k]) as part:
                sa, sb = part.streams
                t = wall_ms(lambda sa=sa, sb=sb, part=part: fork(sa, sb, part.sm_counts[0], part.sm_counts[1]))
                rep.add(f"overlap: green contexts, matmul {part.sm_counts[0]} SMs || copy {part.sm_counts[1]} SMs",
                        t, "ms", "sequential", t_seq)
                torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - no green contexts here: say so in the table
        rep.add(f"overlap: green contexts unavailable ({type(exc).__name__}: {exc})"[:90], 0.0, "ms")

    # launch cost: bench_launch (prepared launch against Triton's entry points, matmul()'s plan cache)


if __name__ == "__main__":  # the quick part alone: python -m bench.bench_kernels [OUT_DIR]
    import json
    import sys

    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "results")
    rep = Report("bench_kernels", out_dir)
    decode_gemms(rep)
    memory_bound(rep)
    for f in rep.figures:
        r = f.ratio
        print(f"{f.name:60s} {f.value:10.2f} {f.unit:8s} {f.baseline_name:36s} "
              f"{f.baseline if f.baseline is not None else float('nan'):10.2f} "
              f"{'' if r is None else f'{r:.3f}x'} {f.target}")
    with open(os.path.join(out_dir, "bench_kernels_quick.json"), "w") as fh:
        json.dump([f.to_json() for f in rep.figures], fh, indent=1)
