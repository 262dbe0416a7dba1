"""The whole toolkit in one serving step (examples/serve_decode.py) on transformers models, 1 GPU.

Three ways to serve the same decode trace (random batch sizes 1..256) with the same model and
weights: (a) eager torch, unpadded; (b) raw ``torch.cuda.graph`` per capture size in one shared
pool with a hand-written padding table and torch argmax (what a user writes without lowlevel);
(c) lowlevel: ``CudagraphDispatcher`` + ``CUDAGraphRunner`` from persistent buffers, the final
RMSNorm as a Triton kernel, the MoE shared expert on an aux stream, greedy sampling in CuPy.
(b) and (c) replay the very same patched model, so their ratio is the toolkit's own cost.
Figures: tokens/s (trials interleaved, median), host µs per step, capture s and MiB, share of
steps replayed; a timeline picture of one step. Tokens are checked against eager's greedy tokens
on the same padded batch. Skipped (with the reason) where transformers is missing.
"""
from __future__ import annotations

import bisect
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from .common import Report

NEEDS_GPU = True

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(os.path.dirname(HERE), "examples")
STEPS = 64
TRIALS = 5


def skip_reason() -> str | None:
    """Why this module cannot run here (None: it can)."""
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        return f"transformers is not installed ({exc}); pip install 'lowlevel-streams[examples]'"
    return None


def run(rep: Report) -> None:
    why = skip_reason()
    if why is not None:
        rep.skipped = why  # type: ignore[attr-defined]
        print(f"bench_e2e skipped: {why}")
        return
    import torch

    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    import serve_decode as sd

    with torch.inference_mode():
        tl_model = None
        for kind in ("llama", "qwen2moe"):
            try:
                srv = _one_model(rep, sd, kind)
            except Exception as exc:  # one model failing keeps the other's figures
                import traceback

                traceback.print_exc()
                print(f"bench_e2e: {kind} failed: {type(exc).__name__}: {exc}")
                rep.add(f"{kind}: failed", 0.0, "-", extra={"error": f"{type(exc).__name__}: {exc}"[:500]})
                continue
            if kind == "qwen2moe" or tl_model is None:
                tl_model = (kind, srv)
        if tl_model is not None:
            _timeline(rep, sd, *tl_model)
    _two_gpus(rep)


def interleaved(ways: dict[str, Callable[[int], Any]], trace: list[int], srv: Any, sync: Callable[[], Any],
                before: Callable[[], Any] | None = None) -> tuple[dict[str, list[float]], dict[str, list[float]], int]:
    """Each way serves the whole ``trace`` in turn, ``TRIALS + 1`` times (the first a warm-up):
    ``(wall s per trial, host µs per step, steps of the "lowlevel" way that replayed a graph in
    the first timed trial)`` per way. ``sync`` waits for the device; ``before`` runs before each
    timed pass (a barrier, so that ranks start together)."""
    import lowlevel

    walls: dict[str, list[float]] = {k: [] for k in ways}
    host: dict[str, list[float]] = {k: [] for k in ways}
    replayed = 0
    for trial in range(TRIALS + 1):
        for name, fn in ways.items():
            sync()
            if before is not None:
                before()
            t_start = time.perf_counter()
            for n in trace:
                t0 = time.perf_counter()
                fn(n)
                if trial:
                    host[name].append((time.perf_counter() - t0) * 1e6)
                if name == "lowlevel" and trial == 1 and srv.last["mode"] is lowlevel.CUDAGraphMode.FULL:
                    replayed += 1
            sync()
            if trial:
                walls[name].append(time.perf_counter() - t_start)
    return walls, host, replayed


class RawGraphs:
    """The baseline: torch.cuda.graph per capture size, one shared pool, a padding table."""

    def __init__(self, srv: Any, sizes: list[int]) -> None:
        import torch

        self.srv, self.sizes = srv, sorted(sizes)
        self.graphs: dict[int, Any] = {}
        self.outs: dict[int, Any] = {}
        self.table = [self.sizes[bisect.bisect_left(self.sizes, n)] if n <= self.sizes[-1] else n
                      for n in range(self.sizes[-1] + 1)]
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self) -> tuple[float, float]:
        import torch

        fwd, srv = self.srv.forward_logits, self.srv
        side = torch.cuda.Stream()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # as DecodeServer.capture: held afterwards = what the graphs keep
        free0 = torch.cuda.mem_get_info()[0]
        t0 = time.perf_counter()
        for s in reversed(self.sizes):  # largest first: the pool's blocks serve the smaller ones
            ids, pos = srv.ids_buf[:s], srv.pos_buf[:s]
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fwd(ids, pos)  # warm-up
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self.outs[s] = fwd(ids, pos)
            self.graphs[s] = g
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        torch.cuda.empty_cache()
        return elapsed, (free0 - torch.cuda.mem_get_info()[0]) / 2**20

    def step(self, n: int, pad: int | None = None) -> Any:
        """One step of ``n`` requests padded to ``pad`` rows (default: this rank's own table)."""
        s = pad if pad is not None else (self.table[n] if n < len(self.table) else n)
        srv = self.srv
        if s > n:
            srv.ids_buf[n:s].zero_()
        g = self.graphs.get(s)
        if g is None:
            logits = srv.forward_logits(srv.ids_buf[:s], srv.pos_buf[:s])
        else:
            g.replay()
            logits = self.outs[s]
        tokens = logits[:n].argmax(dim=-1)
        srv.advance(n, tokens)
        return tokens


def _one_model(rep: Report, sd: Any, kind: str) -> Any:
    import torch

    model = sd.build_model(kind, tiny=False, device="cuda", dtype=torch.bfloat16, seed=0, experts="grouped_mm")
    import lowlevel

    aux = lowlevel.Stream()
    sd.patch_model(model, aux)
    srv = sd.DecodeServer(model, max_batch=256, gpu=True, seed=0)
    srv.aux = aux
    # Warm every capture size eagerly first (kernel choice and lazy module loads per size), so
    # neither capture below pays the cold start for the other: the first one measured used to.
    for size in srv.dispatcher.capture_sizes:
        srv.forward_logits(*srv.views[size])
    torch.cuda.synchronize()
    reserved0 = torch.cuda.memory_reserved()
    srv.capture()
    reserved1 = torch.cuda.memory_reserved()
    raw = RawGraphs(srv, srv.dispatcher.capture_sizes)
    raw_s, raw_mib = raw.capture()
    reserved2 = torch.cuda.memory_reserved()
    trace = sd.make_trace(STEPS, 256, 0.0, 0, 0)  # decode sizes only
    tokens = sum(trace)

    def eager_step(n: int) -> Any:
        t = srv.forward_logits(srv.ids_buf[:n], srv.pos_buf[:n]).argmax(dim=-1)
        srv.advance(n, t)
        return t

    # Tokens: from one saved state, each way serves the trace; lowlevel's must equal the raw graphs'
    # and eager's greedy tokens on the same padded batch.
    ids0, pos0 = srv.ids_buf.clone(), srv.pos_buf.clone()
    ours_tok, raw_tok, eager_pad_mismatch = [], [], 0
    for n in trace:
        ids_s, pos_s = srv.ids_buf.clone(), srv.pos_buf.clone()
        t = srv.step(n, write_back=False)
        ref = srv.eager_tokens(n, srv.last["pad"])
        eager_pad_mismatch += int((ref != t).sum())
        srv.advance(n, t)
        ours_tok.append(t.clone())
        srv.ids_buf.copy_(ids_s)
        srv.pos_buf.copy_(pos_s)
        raw_tok.append(raw.step(n).clone())
    same_as_raw = all(torch.equal(a, b) for a, b in zip(ours_tok, raw_tok))
    srv.ids_buf.copy_(ids0)
    srv.pos_buf.copy_(pos0)

    def sampled_by(sampler: str) -> Callable[[int], Any]:  # the same step, another argmax
        def step(n: int) -> Any:
            default, srv.sampler = srv.sampler, sampler
            try:
                return srv.step(n)
            finally:
                srv.sampler = default
        return step

    ways: dict[str, Callable[[int], Any]] = {"lowlevel": srv.step, "lowlevel, torch argmax": sampled_by("torch"),
                                             "lowlevel, cupy.argmax": sampled_by("cupy"),
                                             "raw graphs": raw.step, "eager": eager_step}
    walls, host, replayed = interleaved(ways, trace, srv, torch.cuda.synchronize)
    tps = {k: tokens / statistics.median(v) for k, v in walls.items()}
    hus = {k: statistics.median(v) for k, v in host.items()}
    spread = {k: [round(tokens / x) for x in sorted(v)] for k, v in walls.items()}
    cfg = model.config
    shape = (f"hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers"
             + (f", {cfg.num_experts} experts top-{cfg.num_experts_per_tok}" if kind == "qwen2moe" else ""))
    extra = {"model": shape, "steps": STEPS, "tokens": tokens, "tokens_per_s_trials": spread,
             "tokens_equal_raw_graphs": same_as_raw, "tokens_differing_from_eager_same_padding": eager_pad_mismatch,
             "padded_tokens": sum(raw.table[n] - n for n in trace),
             "torch_reserved_mib_after_capture": {"lowlevel": (reserved1 - reserved0) / 2**20,
                                                  "raw graphs": (reserved2 - reserved1) / 2**20}}
    rep.add(f"{kind}: serving step tokens/s", tps["lowlevel"], "tokens/s", "raw torch.cuda.graph + padding table",
            tps["raw graphs"], lower_is_better=False, target=">= 1.0x raw graphs", extra=extra)
    rep.add(f"{kind}: serving step tokens/s vs eager", tps["lowlevel"], "tokens/s", "eager torch (unpadded)",
            tps["eager"], lower_is_better=False, target=">= 4x eager")
    rep.add(f"{kind}: serving step tokens/s, sampling by torch argmax", tps["lowlevel, torch argmax"], "tokens/s",
            "raw torch.cuda.graph + padding table", tps["raw graphs"], lower_is_better=False,
            target=">= 1.0x raw graphs (the toolkit with torch's argmax)")
    rep.add(f"{kind}: serving step tokens/s, sampling by cupy.argmax", tps["lowlevel, cupy.argmax"],
            "tokens/s", "raw torch.cuda.graph + padding table", tps["raw graphs"], lower_is_better=False)
    rep.add(f"{kind}: host us per step", hus["lowlevel"], "us", "raw torch.cuda.graph + padding table",
            hus["raw graphs"], extra={"eager_us": hus["eager"], "torch_argmax_us": hus["lowlevel, torch argmax"],
                                      "cupy_argmax_us": hus["lowlevel, cupy.argmax"]})
    rep.add(f"{kind}: capture of {srv.graphs} sizes", srv.capture_s, "s", "raw torch.cuda.graph", raw_s)
    rep.add(f"{kind}: capture memory", srv.capture_mib, "MiB", "raw torch.cuda.graph", raw_mib)
    rep.add(f"{kind}: share of steps replayed", 100.0 * replayed / len(trace), "%",
            extra={"tokens_identical_to_eager": eager_pad_mismatch == 0})
    print(f"bench_e2e {kind}: tokens/s lowlevel {tps['lowlevel']:.0f}, raw {tps['raw graphs']:.0f}, "
          f"eager {tps['eager']:.0f}; tokens equal raw: {same_as_raw}; differing from eager: {eager_pad_mismatch}")
    return srv


def _timeline(rep: Report, sd: Any, kind: str, srv: Any) -> None:
    """One replayed step and one eager step of the same batch, on a timeline."""
    import torch

    import lowlevel

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    tl = lowlevel.Timeline(labels={lowlevel.current_stream(): "compute stream", srv.aux: "aux stream"})
    n = 24
    torch.cuda.synchronize()
    with tl.activate():
        with tl.span("replayed step (pad, graph, CuPy argmax)"):
            srv.step(n)
        with tl.span("eager step, same batch"):
            srv.forward_logits(*srv.views[srv.last["pad"]])
    torch.cuda.synchronize()
    path = os.path.join(rep.out_dir, "e2e_timeline.png")
    tl.plot(path, title=f"{kind}: one decode step of {n} requests")
    rep.files.append(path)
    trace = os.path.join(rep.out_dir, "e2e_trace.json")
    tl.to_chrome_trace(trace)
    rep.files.append(trace)


# --- 2 GPUs (DP 2) ----------------------------------------------------------------------------------
NO_NVLS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def dp2_worker(rank: int, init_file: str, out_dir: str, kind: str) -> None:
    """One DP rank (its GPU visible as device 0): the decode trace served (a) by lowlevel's step
    (async DP vote over NCCL, dispatch, runner, CuPy sampling) and (b) by raw torch graphs with
    vLLM's DP pattern (a fresh pinned [5, dp] table to the device, all-reduce, ``.cpu()``, pad
    every rank to the max), trials interleaved and started together by a barrier. Writes
    ``dp2_rank{rank}.json``."""
    import json

    os.environ.update(NO_NVLS)
    import torch
    import torch.distributed as dist

    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    import serve_decode as sd

    import lowlevel

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            device_id=torch.device("cuda", 0))
    res: dict[str, Any] = {"rank": rank}
    try:
        with torch.inference_mode():
            warm = torch.ones(1, device="cuda")
            dist.all_reduce(warm)  # NCCL connects the peers at the first collective
            model = sd.build_model(kind, tiny=False, device="cuda", dtype=torch.bfloat16, seed=0, experts="grouped_mm")
            aux = lowlevel.Stream()
            sd.patch_model(model, aux)
            cfg = lowlevel.DPConfig(2, rank, use_device_collective=True, timeout_s=60.0)
            srv = sd.DecodeServer(model, max_batch=256, gpu=True, rank=rank, dp_cfg=cfg, seed=0)
            srv.aux = aux
            srv.capture()
            raw = RawGraphs(srv, srv.dispatcher.capture_sizes)
            raw.capture()
            trace = sd.make_trace(STEPS, 256, 0.0, 0, rank)

            def raw_step(n: int) -> Any:  # vLLM's DP pattern, then the raw graph of the common size
                s = raw.table[n]
                t = torch.zeros(5, 2, dtype=torch.int32, pin_memory=True)
                t[:, rank] = torch.tensor([n, s, 0, 1, 2], dtype=torch.int32)
                d = t.to("cuda", non_blocking=True)
                dist.all_reduce(d)
                pad = int(d.cpu()[1].max())
                return raw.step(n, pad)

            # tokens: from one saved state each way serves the trace; they must be equal
            ids0, pos0 = srv.ids_buf.clone(), srv.pos_buf.clone()
            ours_tok = [srv.step(n).clone() for n in trace]
            srv.ids_buf.copy_(ids0)
            srv.pos_buf.copy_(pos0)
            raw_tok = [raw_step(n).clone() for n in trace]
            res["tokens_equal_raw"] = all(torch.equal(a, b) for a, b in zip(ours_tok, raw_tok))
            ways = {"lowlevel": srv.step, "raw graphs + vLLM DP pattern": raw_step}
            walls, host, replayed = interleaved(ways, trace, srv, torch.cuda.synchronize,
                                                lambda: dist.barrier(device_ids=[0]))  # ranks start together
            res.update(tokens=sum(trace), walls=walls, host_us={k: statistics.median(v) for k, v in host.items()},
                       replayed_share=replayed / len(trace), capture_s=srv.capture_s)
    except Exception as exc:  # reported by the parent
        import traceback

        traceback.print_exc()
        res["error"] = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(out_dir, f"dp2_rank{rank}.json"), "w") as f:
        json.dump(res, f)
    sys.stdout.flush()
    os._exit(0)  # no teardown: a hung NCCL teardown must not hold the bench


def _two_gpus(rep: Report, kind: str = "llama", timeout: float = 240) -> None:
    import json
    import subprocess
    import tempfile

    import torch

    n = torch.cuda.device_count()
    if n < 2:
        print(f"bench_e2e DP 2: skipped: needs 2 CUDA GPUs, found {n}")
        return
    root = os.path.dirname(HERE)
    with tempfile.TemporaryDirectory() as d:
        code = ("import sys; from bench.bench_e2e import dp2_worker; "
                "dp2_worker(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])")
        procs = []
        for r in range(2):
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(r), **NO_NVLS)
            env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
            procs.append(subprocess.Popen([sys.executable, "-c", code, str(r), os.path.join(d, "rdv"), d, kind],
                                          env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        deadline = time.perf_counter() + timeout
        outs = []
        for p in procs:
            try:
                outs.append(p.communicate(timeout=max(deadline - time.perf_counter(), 1))[0].decode(errors="replace"))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                outs.append("(killed: timeout)")
        res = []
        for r in range(2):
            path = os.path.join(d, f"dp2_rank{r}.json")
            if not os.path.exists(path):
                rep.add(f"DP 2 {kind}: failed", 0.0, "-", extra={"error": outs[r][-1500:] if r < len(outs) else ""})
                print(f"bench_e2e DP 2: rank {r} wrote nothing:\n" + (outs[r][-3000:] if r < len(outs) else ""))
                return
            with open(path) as f:
                res.append(json.load(f))
    errors = [r.get("error") for r in res if r.get("error")]
    if errors:
        rep.add(f"DP 2 {kind}: failed", 0.0, "-", extra={"error": errors[0][:500]})
        print(f"bench_e2e DP 2 failed: {errors}\n" + "\n".join(o[-2000:] for o in outs))
        return
    ours, base = "lowlevel", "raw graphs + vLLM DP pattern"
    # tokens/s of the pair: both ranks' tokens over the slower rank's wall time, per trial
    tps = {}
    for k in (ours, base):
        trials = [sum(r["tokens"] for r in res) / max(r["walls"][k][i] for r in res)
                  for i in range(len(res[0]["walls"][k]))]
        tps[k] = trials
    med = {k: statistics.median(v) for k, v in tps.items()}
    extra = {"tokens_per_s_trials": {k: [round(x) for x in sorted(v)] for k, v in tps.items()},
             "tokens_equal_raw": [r["tokens_equal_raw"] for r in res], "steps": STEPS,
             "replayed_share": [r["replayed_share"] for r in res], "dp_backend": "nccl",
             "host_us": [r["host_us"] for r in res]}
    rep.add(f"DP 2 {kind}: serving step tokens/s (both ranks)", med[ours], "tokens/s",
            "raw torch.cuda.graph + vLLM's DP all-reduce", med[base], lower_is_better=False,
            target=">= 1.0x raw graphs", extra=extra)
    rep.add(f"DP 2 {kind}: host us per step (rank 0)", res[0]["host_us"][ours], "us",
            "raw torch.cuda.graph + vLLM's DP all-reduce", res[0]["host_us"][base])
    print(f"bench_e2e DP 2 {kind}: tokens/s lowlevel {med[ours]:.0f}, raw {med[base]:.0f}; "
          f"tokens equal: {extra['tokens_equal_raw']}")
