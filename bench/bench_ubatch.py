"""Microbatch overlap: two microbatches, each L layers of (matmul -> comm stage), balanced;
overlapped (threads, generators; with and without an SM split; FULL graph) vs the same work in
sequence on one stream. Two comm stages: a host-to-device transfer (copy engine, no SMs) and
an SM-capped copy kernel (an SM-bound comm kernel). Saves the timeline picture and trace."""
from __future__ import annotations

import os
import statistics
import time

from .common import Report, wall_ms

NEEDS_GPU = True
LAYERS = 8
COPY_MAX = 1 << 27  # float32 elements per copy-stage buffer (512 MiB)
H2D_MAX = 1 << 25  # float32 elements per pinned host buffer (128 MiB)


def _balance(torch, lowlevel, runner, run, n, resize, rounds=3):
    """Resize the comm stage until the comm stream is as busy as the compute stream *while the
    two microbatches overlap* (each stage alone is a poor guide: an H2D transfer and a matmul
    slow each other down). Returns the final size and the busy times of the last round."""
    compute = lowlevel.current_stream()
    for _ in range(rounds):
        tl = lowlevel.Timeline(labels={compute: "compute", runner.comm_stream: "comm"})
        torch.cuda.synchronize()
        with tl.activate():
            run()
        busy = tl.stats()["busy_ms"]
        n = resize(int(n * busy["compute"] / busy["comm"]))
    return n, busy


def _host_ms(torch, fn, reps=15):
    """Median host time (ms) of ``fn`` alone, the device drained before each call."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def run(rep: Report) -> None:
    import torch

    import lowlevel
    from lowlevel import kernels as K
    from lowlevel import ubatching as ub
    from lowlevel.sm_control import device_sm_count

    total = device_sm_count()
    comm_k = 16
    comm_cap = [total]
    H, T = 4096, 4096  # hidden size, tokens per microbatch
    w = torch.randn(H, H, device="cuda", dtype=torch.bfloat16) / 64
    x = torch.randn(2 * T, H, device="cuda", dtype=torch.bfloat16)

    # Buffers for the two comm stages, sized below: views of the first n elements of these.
    big = {"copy": [(torch.randn(COPY_MAX, device="cuda"), torch.empty(COPY_MAX, device="cuda")) for _ in range(2)],
           "h2d": [(torch.randn(H2D_MAX).pin_memory(), torch.empty(H2D_MAX, device="cuda")) for _ in range(2)]}
    comm_bufs: dict[str, list] = {}

    def resize(kind, n):
        n = max(1024, min(n, COPY_MAX if kind == "copy" else H2D_MAX)) // 1024 * 1024
        comm_bufs[kind] = [(src[:n], dst[:n]) for src, dst in big[kind]]
        return n

    # First guess from each stage alone: elements that take as long as one capped matmul.
    h = torch.empty(T, H, device="cuda", dtype=torch.bfloat16)
    with lowlevel.sm_limit(total - comm_k):
        t_mm = wall_ms(lambda: K.matmul(x[:T], w, out=h), reps=10)
    src, dst = big["copy"][0]
    with lowlevel.sm_limit(comm_k):
        t_cp = wall_ms(lambda: K.copy(src, dst), reps=10)
    hsrc, hdst = big["h2d"][0]
    t_h2d = wall_ms(lambda: hdst.copy_(hsrc, non_blocking=True), reps=10)
    n_copy = resize("copy", int(COPY_MAX * t_mm / t_cp))
    n_h2d = resize("h2d", int(H2D_MAX * t_mm / t_h2d))
    stage = ["copy"]

    def layer_gen(i, xs):
        src, dst = comm_bufs[stage[0]][i]
        hs = torch.empty_like(xs)
        for _ in range(LAYERS):
            K.matmul(xs, w, out=hs)  # compute stage
            yield lowlevel.TO_COMM
            if stage[0] == "copy":
                with lowlevel.sm_limit(comm_cap[0]):
                    K.copy(src, dst)  # SM-bound comm stand-in (DeepEP-style kernel)
            else:
                dst.copy_(src, non_blocking=True)  # host-to-device transfer on the copy engine
            yield lowlevel.TO_COMPUTE
        return hs

    slices = [lowlevel.UBatchSlice(slice(0, 1), slice(0, T)), lowlevel.UBatchSlice(slice(1, 2), slice(T, 2 * T))]

    def sequential():
        for i, s in enumerate(slices):
            for _ in layer_gen(i, x[s.token_slice]):
                pass

    ctl = lowlevel.SMControlContextManager(comm_k, lambda n: comm_cap.__setitem__(0, n), K.set_num_sms)
    thr = lowlevel.UBatchRunner(ub.thread_fn_from_generator(layer_gen), sm_control=ctl)
    gen = lowlevel.UBatchRunner(layer_gen, mode="generators", sm_control=ctl)
    thr_nosplit = lowlevel.UBatchRunner(ub.thread_fn_from_generator(layer_gen))
    gen_nosplit = lowlevel.UBatchRunner(layer_gen, mode="generators")

    stage[0] = "h2d"
    gen_nosplit([x], slices)  # warm up
    n_h2d, busy_h = _balance(torch, lowlevel, gen_nosplit, lambda: gen_nosplit([x], slices), n_h2d,
                             lambda n: resize("h2d", n))
    t_seq_h = wall_ms(sequential)
    t_thr_h = wall_ms(lambda: thr_nosplit([x], slices))
    t_gen_h = wall_ms(lambda: gen_nosplit([x], slices))
    t_graph_h = wall_ms(lambda: gen_nosplit([x], slices, graph=True))
    rep.add("H2D comm stage: overlap, threads", t_thr_h, "ms", "sequential, one stream", t_seq_h, target=">= 1.6x",
            extra={"elements_per_h2d_stage": n_h2d, "busy_ms_overlapped": busy_h,
                   "alone_ms": {"matmul": t_mm, "h2d": t_h2d * n_h2d / H2D_MAX}})
    rep.add("H2D comm stage: overlap, generators", t_gen_h, "ms", "sequential, one stream", t_seq_h, target=">= 1.6x")
    # Host time to enqueue one overlapped run (no sync inside): where it nears the wall time
    # above, the runtime, not the GPU, sets the pace.
    host_thr, host_gen = (_host_ms(torch, lambda r=r: r([x], slices)) for r in (thr_nosplit, gen_nosplit))
    rep.add("H2D comm stage: host time to enqueue a run, threads", host_thr, "ms", "generators", host_gen)
    rep.add("H2D comm stage: overlap, generators, FULL graph replay", t_graph_h, "ms", "sequential, one stream",
            t_seq_h)
    for mode, runner in (("generators", gen_nosplit), ("threads", thr_nosplit)):
        tl_h = lowlevel.Timeline(labels={lowlevel.current_stream(): "compute", runner.comm_stream: "comm (H2D)"})
        torch.cuda.synchronize()
        with tl_h.activate():
            runner([x], slices)
        suffix = "" if mode == "generators" else "_threads"
        rep.files.append(tl_h.plot(os.path.join(rep.out_dir, f"ubatch_timeline_h2d{suffix}.png"),
                                   f"two microbatches, H2D comm stage, {mode}"))
        if not suffix:
            trace_h = os.path.join(rep.out_dir, "ubatch_trace_h2d.json")
            tl_h.to_chrome_trace(trace_h)
            rep.files.append(trace_h)
    stage[0] = "copy"
    gen([x], slices)  # warm up
    n_copy, busy_c = _balance(torch, lowlevel, gen, lambda: gen([x], slices), n_copy, lambda n: resize("copy", n))

    t_seq = wall_ms(sequential)
    with ctl:
        t_seq_split = wall_ms(sequential)
    t_thr = wall_ms(lambda: thr([x], slices))
    t_gen = wall_ms(lambda: gen([x], slices))
    t_thr_ns = wall_ms(lambda: thr_nosplit([x], slices))
    t_gen_ns = wall_ms(lambda: gen_nosplit([x], slices))
    t_graph = wall_ms(lambda: gen([x], slices, graph=True))
    tgt = ">= 1.6x"
    rep.add("SM-capped copy comm stage: overlap, threads, SM split", t_thr, "ms", "same caps in sequence",
            t_seq_split)
    rep.add("SM-capped copy comm stage: overlap, generators, SM split", t_gen, "ms", "same caps in sequence",
            t_seq_split)
    rep.add("overlap, threads, SM split (comm 16 SMs)", t_thr, "ms", "sequential, one stream", t_seq, target=tgt,
            extra={"elements_per_copy_stage": n_copy, "busy_ms_overlapped": busy_c,
                   "alone_ms": {"matmul": t_mm, "copy": t_cp * n_copy / COPY_MAX}})
    rep.add("overlap, generators, SM split (comm 16 SMs)", t_gen, "ms", "sequential, one stream", t_seq, target=tgt)
    rep.add("overlap, threads, no SM split", t_thr_ns, "ms", "sequential, one stream", t_seq)
    rep.add("overlap, generators, no SM split", t_gen_ns, "ms", "sequential, one stream", t_seq)
    rep.add("overlap, generators + SM split, FULL graph replay", t_graph, "ms", "sequential, one stream", t_seq)
    rep.add("generators vs threads (SM split)", t_gen, "ms", "threads", t_thr)
    rep.add("sequential with the same caps", t_seq_split, "ms", "sequential, uncapped", t_seq)

    tl = lowlevel.Timeline(labels={lowlevel.current_stream(): "compute", gen.comm_stream: "comm"})
    torch.cuda.synchronize()
    with tl.activate():
        gen([x], slices)
    st = tl.stats()
    rep.add("timeline: achieved speedup of the overlapped run", st["achieved_speedup"], "x",
            "ideal (total busy / busiest stream)", st["ideal_speedup"], lower_is_better=False,
            extra={"wall_ms": st["wall_ms"], "busy_ms": st["busy_ms"]})
    png = tl.plot(os.path.join(rep.out_dir, "ubatch_timeline.png"), "two microbatches, generators, SM split")
    trace = os.path.join(rep.out_dir, "ubatch_trace.json")
    tl.to_chrome_trace(trace)
    rep.files += [png, trace]
