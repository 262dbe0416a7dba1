"""SM-limited kernels: speed vs cuBLAS / copy bandwidth, SM scaling curves (PNG), overlap of a
capped matmul with a capped copy (software caps and green contexts), and launch cost."""
from __future__ import annotations

import os

from .common import Report, host_us_side_by_side, wall_ms

NEEDS_GPU = True


def _ms(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def run(rep: Report) -> None:
    import torch

    import lowlevel
    from lowlevel import kernels as K
    from lowlevel.sm_control import device_sm_count

    total = device_sm_count()
    # --- matmul vs cuBLAS ------------------------------------------------------------------
    for n in (4096, 8192):
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
        flops = 2 * n ** 3
        ours = flops / _ms(lambda: K.matmul(a, b, out=c)) / 1e9
        cublas = flops / _ms(lambda: torch.matmul(a, b, out=c)) / 1e9
        rep.add(f"matmul bf16 {n}^3, all SMs", ours, "TFLOP/s", "torch.matmul (cuBLAS)", cublas,
                lower_is_better=False, target=">= 0.8x cuBLAS")

    # --- memory-bound kernels vs the measured copy bandwidth -----------------------------------
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
    rr = torch.randn_like(x)
    fused_bw = 4 * x.nbytes / _ms(lambda: K.rms_norm(x, w, residual=rr, out=y)) / 1e6
    rep.add("fused add + rms_norm bf16, all SMs", fused_bw, "GB/s", "torch copy_ (the copy bandwidth)", copy_bw,
            lower_is_better=False)

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
        t = wall_ms(lambda: fork(s1, s2, total - k, k))
        rep.add(f"overlap: matmul on {total - k} SMs || copy on {k} SMs", t, "ms", "sequential", t_seq,
                extra={"both_uncapped_ms": t_free})
        best = (t, k) if best is None or t < best[0] else best
    rep.add(f"overlap: best software split (copy on {best[1]} SMs)", best[0], "ms", "both uncapped", t_free)
    try:
        for k in (16, 32):
            with lowlevel.sm_partition([total // 8 * 8 - k - 8, k]) as part:
                sa, sb = part.streams
                t = wall_ms(lambda: fork(sa, sb, part.sm_counts[0], part.sm_counts[1]))
                rep.add(f"overlap: green contexts, matmul {part.sm_counts[0]} SMs || copy {part.sm_counts[1]} SMs",
                        t, "ms", "sequential", t_seq)
                torch.cuda.synchronize()
    except Exception as exc:  # no green contexts here: say so in the table
        rep.add(f"overlap: green contexts unavailable ({type(exc).__name__}: {exc})"[:90], 0.0, "ms")

    # --- launch cost ---------------------------------------------------------------------------
    from lowlevel.kernels.copy import _copy_kernel

    s_small = torch.randn(1024, device="cuda")
    d_small = torch.empty_like(s_small)
    K.copy(s_small, d_small)
    prepared = K.prepare_copy(s_small, d_small)
    entry, argv = prepared._entry, (1, 1, 1, torch.cuda.current_stream().cuda_stream) + prepared._argv
    fast, triton_path, full, floor = host_us_side_by_side(
        prepared,
        lambda: _copy_kernel[(1,)](s_small, d_small, 1024, 1, BLOCK=8192, num_warps=16, num_stages=1),
        lambda: K.copy(s_small, d_small),
        lambda: entry(*argv), sync=torch.cuda.synchronize)
    rep.add("kernel launch: prepare_copy(...)() (cached kernel + arguments)", fast, "us",
            "kernel[grid](...) (Triton's launch path)", triton_path, target="<= 5 us")
    rep.add("kernel launch: lowlevel.kernels.copy (validation each call)", full, "us",
            "kernel[grid](...) (Triton's launch path)", triton_path)
    rep.add("kernel launch: prepare_copy(...)()", fast, "us", "floor: Triton's C launcher entry, called directly",
            floor)

