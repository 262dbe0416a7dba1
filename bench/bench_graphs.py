"""CUDA graphs: launch-bound work eager vs lowlevel replay vs raw torch.cuda.CUDAGraph replay,
the per-call overhead of Graph.replay / CUDAGraphRunner over a raw replay, and a real model
(HF transformers Llama decode, random weights; skipped with the reason when transformers is
missing): per-batch time, capture time and memory against raw torch.cuda.graph, re-capture by
in-place update, the memory estimate. ``BENCH_GRAPHS_ONLY=llama`` runs the model part alone."""
from __future__ import annotations

import os
import sys
import time as _time

from .common import Report, host_us, host_us_side_by_side

NEEDS_GPU = True


def run(rep: Report) -> None:
    if os.environ.get("BENCH_GRAPHS_ONLY") == "llama":
        _llama_decode(rep)
        return
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

    _llama_decode(rep)


# --- a real model: HF transformers Llama decode ----------------------------------------------------

LLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=512)


_T0 = _time.perf_counter()


def _log(msg: str) -> None:
    print(f"[bench_graphs {_time.perf_counter() - _T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def _capture_sizes() -> list[int]:
    return [1, 2, 4] + list(range(8, 257, 8))  # 35 sizes, vLLM's ladder up to 256


def _llama_decode(rep: Report, cfg: dict | None = None, steps: int = 64) -> None:
    """Eager vs raw torch.cuda.graph (one shared pool, largest first, a warm-up per size on a
    side stream, a hand-written padding table) vs lowlevel (CudagraphDispatcher +
    CUDAGraphRunner.capture_all): per-batch time over a random size trace, capture seconds and
    reserved MiB, re-capture after release (update in place), the memory estimate."""
    try:
        import transformers
    except ImportError as exc:
        print(f"bench_graphs: Llama decode skipped: transformers is not importable ({exc})")
        return
    import gc
    import time

    import numpy as np
    import torch

    from lowlevel import CudagraphDispatcher, CUDAGraphMode, CUDAGraphRunner, padding_table

    sync = torch.cuda.synchronize
    conf = dict(LLAMA, **(cfg or {}))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**conf))
    model = model.to(torch.bfloat16).eval()
    vocab = conf["vocab_size"]
    sizes = _capture_sizes()
    top = sizes[-1]
    table = padding_table(sizes)
    ids = torch.randint(0, vocab, (top, 1), device="cuda")
    rng = np.random.default_rng(0)
    trace = [int(n) for n in rng.integers(1, top + 1, steps)]
    src = torch.randint(0, vocab, (steps, top, 1), device="cuda")

    @torch.no_grad()
    def fn(x):
        return model(input_ids=x, use_cache=False).logits

    fn(ids)
    sync()
    mib = 2.0 ** 20
    _log("model built")

    def clean() -> int:
        sync()
        gc.collect()
        torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()
        return torch.cuda.memory_reserved()

    raw_warm: list[float] = []

    def raw_capture():
        """The torch recipe: warm-up per size on a side stream, then torch.cuda.graph into one pool."""
        r0 = clean()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        graphs = {}
        warm = 0.0
        t0 = time.perf_counter()
        for n in reversed(sizes):
            tw = time.perf_counter()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(ids[:n])
            torch.cuda.current_stream().wait_stream(side)
            warm += time.perf_counter() - tw
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = fn(ids[:n])
            graphs[n] = (g, out)
        sync()
        t = time.perf_counter() - t0
        raw_warm.append(warm)
        return graphs, t, torch.cuda.memory_reserved() - r0

    d = CudagraphDispatcher(sizes, max_num_seqs=top)
    d.initialize_cudagraph_keys(CUDAGraphMode.FULL)
    make = lambda desc: (ids[: desc.num_tokens],)  # noqa: E731

    def ours_capture(runner):
        r0 = clean()
        t0 = time.perf_counter()
        n = runner.capture_all(d, make)
        sync()
        t = time.perf_counter() - t0
        assert n == len(sizes)
        return t, torch.cuda.memory_reserved() - r0 + runner.pool.cupy_bytes()

    # the estimate first, on a clean device
    est_runner = CUDAGraphRunner(fn, CUDAGraphMode.FULL)
    clean()
    t0 = time.perf_counter()
    est = est_runner.estimate_memory(d, make, sample=2)
    est_s = time.perf_counter() - t0
    del est_runner
    _log("estimate done")

    # alternate raw and lowlevel captures: round 0 is cold, rounds 1 and 2 warm
    runner = CUDAGraphRunner(fn, CUDAGraphMode.FULL)
    raw_s, raw_b, ours_s, ours_b, ours_st = [], [], [], [], []
    raw2: dict = {}
    for rnd in range(3):
        raw2.clear()
        graphs, t, b = raw_capture()
        raw2.update(graphs)
        del graphs
        raw_s.append(t)
        raw_b.append(b)
        runner.release(keep_execs=False)
        t, b = ours_capture(runner)  # fresh instantiations
        ours_s.append(t)
        ours_b.append(b)
        ours_st.append(runner.last_capture)
        _log(f"round {rnd}: raw {raw_s[-1]:.3f} s {raw_b[-1] / mib:.0f} MiB, ours {t:.3f} s {b / mib:.0f} MiB")
    ours1_s, ours1_b, raw1_s, raw1_b, st1 = ours_s[0], ours_b[0], raw_s[0], raw_b[0], ours_st[0]
    ours2_s, raw2_s = sum(ours_s[1:]) / 2, sum(raw_s[1:]) / 2
    ours2_b, raw2_b, st2 = ours_b[-1], raw_b[-1], ours_st[-1]
    pool_b = runner.pool.memory()

    # outputs: lowlevel vs raw vs eager at the padded size
    identical = {"raw": 0, "eager": 0}
    for n in (1, 3, 17, 100, 256):
        ids.copy_(src[n % steps])
        mode, desc = d.dispatch(n)
        ours_out = runner(mode, desc, ids[: desc.num_tokens], num_tokens=n)[:n].float().cpu()
        g, out = raw2[table[n]]
        g.replay()
        identical["raw"] += bool(torch.equal(out[:n].float().cpu(), ours_out))
        identical["eager"] += bool(torch.equal(fn(ids[: table[n]])[:n].float().cpu(), ours_out))

    def eager_trace():
        for i, n in enumerate(trace):
            ids[:n].copy_(src[i, :n])
            fn(ids[:n])

    def raw_trace():
        for i, n in enumerate(trace):
            ids[:n].copy_(src[i, :n])
            raw2[table[n]][0].replay()

    def ours_trace():
        for i, n in enumerate(trace):
            ids[:n].copy_(src[i, :n])
            mode, desc = d.dispatch(n)
            runner(mode, desc, ids[: desc.num_tokens], num_tokens=n)

    e_us, r_us, o_us = (v / steps for v in host_us_side_by_side(eager_trace, raw_trace, ours_trace, n=1, trials=3,
                                                                 sync=sync, warmup=1))
    raw2.clear()
    _log("traces timed")

    # sleep / wake: give everything back, re-capture with in-place updates
    before = {}
    for n in (5, 64, 256):
        ids.copy_(src[n % steps])
        mode, desc = d.dispatch(n)
        before[n] = runner(mode, desc, ids[: desc.num_tokens], num_tokens=n)[:n].float().cpu()
    held = clean()
    runner.release()
    freed = held - clean()
    ours3_s, _ = ours_capture(runner)
    st3 = runner.last_capture
    _log("woke")
    woke_equal = 0
    for n in (5, 64, 256):
        ids.copy_(src[n % steps])
        mode, desc = d.dispatch(n)
        woke_equal += bool(torch.equal(runner(mode, desc, ids[: desc.num_tokens], num_tokens=n)[:n].float().cpu(),
                                       before[n]))
    runner.release(keep_execs=False)

    weak = CUDAGraphRunner(fn, CUDAGraphMode.FULL, weak_outputs=True)
    weak_s, weak_b = ours_capture(weak)
    weak.release(keep_execs=False)
    del weak
    _log("weak done")

    t0 = time.perf_counter()
    gc.collect()
    gc_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch.cuda.empty_cache()
    ec_s = time.perf_counter() - t0

    def brk(st):
        return {"warmup_s": st.warmup_s, "capture_s": st.capture_s, "instantiate_s": st.instantiate_s,
                "other_s": st.other_s, "updated": st.updated}

    what = f"Llama {conf['num_hidden_layers']}L h{conf['hidden_size']} bf16"
    rep.add(f"{what} decode, per batch over {steps} random sizes: lowlevel", o_us, "us",
            "raw torch.cuda.graph + padding table", r_us,
            extra={"eager_us": e_us, "speedup_vs_eager": e_us / o_us, "bit_identical_of_5": identical})
    rep.add(f"{what}: capture_all of {len(sizes)} sizes (warm)", ours2_s, "s",
            "raw torch.cuda.graph, warm-up per size, shared pool (warm)", raw2_s, target="<= 1.0x raw",
            extra={"cold_s": ours1_s, "raw_cold_s": raw1_s, "rounds_s": ours_s, "raw_rounds_s": raw_s,
                   "breakdown_cold": brk(st1), "breakdown_warm": brk(st2),
                   "torch_gc_collect_s": gc_s, "torch_empty_cache_s": ec_s, "raw_warmup_s": raw_warm})
    rep.add(f"{what}: capture_all reserved memory", ours2_b / mib, "MiB", "raw torch.cuda.graph reserved", raw2_b / mib,
            target="<= 1.0x raw",
            extra={"cold_mib": ours1_b / mib, "raw_cold_mib": raw1_b / mib, "rounds_mib": [b / mib for b in ours_b],
                   "raw_rounds_mib": [b / mib for b in raw_b], "pool_torch_mib": pool_b.torch / mib,
                   "pool_cupy_mib": pool_b.cupy / mib})
    rep.add(f"{what}: capture_all reserved memory, weak_outputs=True", weak_b / mib, "MiB",
            "raw torch.cuda.graph reserved", raw2_b / mib, extra={"seconds": weak_s})
    rep.add(f"{what}: re-capture after release (update in place)", ours3_s, "s",
            "capture_all with fresh instantiations", ours2_s,
            extra={"updated": st3.updated, "instantiate_s_update": st3.instantiate_s,
                   "instantiate_s_fresh": st2.instantiate_s, "outputs_equal_after_wake_of_3": woke_equal,
                   "freed_by_release_mib": freed / mib, "pool_torch_mib": pool_b.torch / mib})
    rep.add(f"{what}: memory estimate from the 2 largest", est.total_bytes / mib, "MiB",
            "capture_all actual pool", (pool_b.total) / mib,
            extra={"first_mib": est.first_bytes / mib, "per_token_kib": est.per_token_bytes / 1024,
                   "estimate_s": est_s})
