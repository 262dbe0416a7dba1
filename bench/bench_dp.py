"""DP padding sync latency, µs per step, side by side in one run (every rank's trials interleaved).

NCCL, 2 GPUs (one process a GPU; skipped with the reason when fewer exist):
lowlevel blocking (`use_device_collective=True`, timeout kept), lowlevel async (start, simulated
host work, result) against blocking-then-host-work, vLLM's pattern (pinned CPU table -> device,
one all-reduce, ``.cpu()``), one collective per field, a plain all-reduce of lowlevel's bigger
table, and the earlier lowlevel path with its parts swapped one at a time (what cost the time).
Gloo (CPU, 2 processes): lowlevel blocking vs one plain gloo all-reduce of the same table (bare,
and with ``.tolist()`` of the result), of vLLM's 5-row table, and one collective per field;
lowlevel's gloo wait ("timeout": ``work.wait(timedelta)``; "spin": ``is_completed()`` for at most
0.5 ms, then the wait) and the same two waits around a plain all-reduce.
Host work on the critical path (one process, the collective replaced by one already done, so the
figure is the host's Python alone, without threads or peers): from the call to the enqueue plus
from the wait's return to the call's return, lowlevel's vote vs ``dist.all_reduce`` (+ ``.tolist()``).

Each figure: the median over trials of the mean per step, with p20/p80 in ``extra``.
``python -m bench.bench_dp`` prints the raw JSON.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from .common import Report, free_port

NEEDS_GPU = False  # the gloo figures run anywhere; the NCCL ones need 2 GPUs
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_NVLS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
HOST_WORK_US = 150.0  # simulated host work between start and result (preparing the next step's inputs)


def _busy(us: float) -> None:
    import time

    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass


def _stats(xs: list[float]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(xs)
    return {"median": float(np.median(a)), "p20": float(np.percentile(a, 20)), "p80": float(np.percentile(a, 80))}


def _measure(fns: dict[str, Any], barrier: Any, n: int, trials: int, warmup: int = 50) -> dict[str, dict[str, float]]:
    """Mean µs per call of each fn over ``n`` calls, ``trials`` times, interleaved; every rank
    runs the same sequence (each fn makes the same collectives on every rank)."""
    import time

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    per: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(trials):
        for k, fn in fns.items():
            barrier()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            per[k].append((time.perf_counter() - t0) / n * 1e6)
    return {k: _stats(v) for k, v in per.items()}


def worker(rank: int, world: int, port: int, out: str, backend: str, n: int, trials: int) -> None:
    """One rank of the benchmark (spawned by :func:`run`)."""
    os.environ.update(NO_NVLS)
    import numpy as np
    import torch
    import torch.distributed as dist

    import lowlevel
    from lowlevel import dp as dpm

    kw: dict[str, Any] = {}
    if backend == "nccl":
        torch.cuda.set_device(rank)
        kw["device_id"] = torch.device("cuda", rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, **kw)
    group = dist.group.WORLD
    dev = backend == "nccl"
    cfg = lowlevel.DPConfig(world, rank, group, enable_microbatching=True, use_device_collective=dev, timeout_s=30)
    acfg = lowlevel.DPConfig(world, rank, group, enable_microbatching=True, use_device_collective=dev, timeout_s=30)
    args = (600 + rank, True, True)
    kws = dict(num_tokens_padded=640, uniform_decode=False, cudagraph_mode=2)
    col = (600 + rank, 640, 1, 1, 2)

    def ours():
        return lowlevel.coordinate_batch_across_dp(*args, config=cfg, **kws)

    def ours_then_host():
        r = lowlevel.coordinate_batch_across_dp(*args, config=cfg, **kws)
        _busy(HOST_WORK_US)
        return r

    def ours_async_host():
        v = dpm.coordinate_batch_across_dp_async(*args, config=acfg, **kws)
        _busy(HOST_WORK_US)
        return v.result()

    pin = dev
    device = "cuda" if dev else "cpu"

    def finish(t: Any) -> Any:  # the same post-processing as lowlevel's, on the reduced [5, dp] table
        should, counts, mode, _ = dpm.post_process_dp_table(t.numpy(), 2)
        return should, torch.tensor(counts, dtype=torch.int32), mode

    def vllm():  # dp_utils._run_ar + _synchronize_dp_ranks: fresh pinned table, to device, all-reduce, .cpu()
        t = torch.zeros(5, world, dtype=torch.int32, pin_memory=pin)
        t[:, rank] = torch.tensor(col, dtype=torch.int32)
        d = t.to(device, non_blocking=True)
        dist.all_reduce(d, group=group)
        return finish(d.cpu())

    fields = [torch.zeros(world, dtype=torch.int32, device=device) for _ in range(5)]

    def per_field():
        for f, v in zip(fields, col):
            f.zero_()
            f[rank] = v
            dist.all_reduce(f, group=group)
        return finish(torch.stack([f.cpu() for f in fields]))

    big_host = torch.zeros(dpm.ROWS, world, dtype=torch.int32, pin_memory=pin)
    big_dev = torch.zeros(dpm.ROWS, world, dtype=torch.int32, device=device)
    small_host = torch.zeros(5, world, dtype=torch.int32, pin_memory=pin)

    def plain(table_host: Any) -> Any:
        if dev:
            d = big_dev[: table_host.shape[0]]
            d.copy_(table_host, non_blocking=True)
            dist.all_reduce(d, group=group)
            return d.cpu()
        dist.all_reduce(table_host, group=group)
        return table_host

    def knob(name: str, value: str) -> Any:  # ours with one private implementation choice swapped
        def f() -> Any:
            prev = getattr(dpm, name)
            setattr(dpm, name, value)
            try:
                return ours()
            finally:
                setattr(dpm, name, prev)
        return f

    fns: dict[str, Any] = {"ours": ours, "vllm": vllm, "per_field": per_field,
                           "plain_big": lambda: plain(big_host), "plain_small": lambda: plain(small_host),
                           "ours_then_host": ours_then_host, "ours_async_host": ours_async_host}
    if not dev:
        import datetime

        fns["ours_timeout"] = knob("_GLOO_WAIT", "timeout")
        fns["ours_spin"] = knob("_GLOO_WAIT", "spin")
        td30 = datetime.timedelta(seconds=30)

        def plain_tolist() -> Any:
            dist.all_reduce(big_host, group=group)
            return big_host.tolist()

        def plain_spin() -> Any:  # the floor of a spinning wait: no wake-up of the host thread
            work = dist.all_reduce(big_host, group=group, async_op=True)
            while not work.is_completed():
                pass
            work.wait()
            return big_host

        fns["plain_big_tolist"] = plain_tolist
        fns["plain_big_spin"] = plain_spin
        fns["plain_big_async_wait"] = lambda: dist.all_reduce(big_host, group=group, async_op=True).wait()
        fns["plain_big_async_wait_timeout"] = lambda: dist.all_reduce(big_host, group=group, async_op=True).wait(td30)
    if dev:
        import datetime

        fns["ours_torch_stream"] = knob("_NCCL_STREAM", "torch")

        from lowlevel.stream import Stream, use_stream

        old_s = Stream()
        old_t = torch.cuda.Stream()
        old_dev = torch.zeros(5, world, dtype=torch.int32, device="cuda")
        old_host = torch.zeros(5, world, dtype=torch.int32, pin_memory=True)
        td = datetime.timedelta(seconds=30)

        def old(timeout: bool = True, lowlevel_stream: bool = True, sync: str = "stream") -> Any:
            """The earlier lowlevel path with one part swapped at a time."""
            h = old_host.numpy()
            h.fill(0)  # the last step's reduced sums are still in the other ranks' columns
            h[:, rank] = col
            ctx = use_stream(old_s) if lowlevel_stream else torch.cuda.stream(old_t)
            with ctx:
                old_dev.copy_(old_host, non_blocking=True)
                work = dist.all_reduce(old_dev, group=group, async_op=True)
                work.wait(td) if timeout else work.wait()
                old_host.copy_(old_dev, non_blocking=True)
            (old_s if lowlevel_stream else old_t).synchronize()
            return finish(old_host)

        fns.update({"old": old, "old_no_timeout": lambda: old(timeout=False),
                    "old_torch_stream": lambda: old(lowlevel_stream=False),
                    "old_torch_stream_no_timeout": lambda: old(timeout=False, lowlevel_stream=False)})

        def vllm_wait_timeout():  # vLLM's pattern, but waiting on the work with a timeout
            t = torch.zeros(5, world, dtype=torch.int32, pin_memory=True)
            t[:, rank] = torch.tensor(col, dtype=torch.int32)
            d = t.to("cuda", non_blocking=True)
            dist.all_reduce(d, group=group, async_op=True).wait(td)
            return finish(d.cpu())

        fns["vllm_wait_timeout"] = vllm_wait_timeout
    barrier = (lambda: dist.barrier(device_ids=[rank])) if dev else dist.barrier
    res = _measure(fns, barrier, n, trials)
    res["_plans_equal"] = bool(_same_plan(ours(), vllm()))
    res["_host_work_us"] = HOST_WORK_US
    res["_gloo_spins"] = bool(cfg._state.bufs.get("many_cpus")) if not dev else None
    res["_cpus"] = dpm._cpus()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()
    _ = np


def host_path_worker(out: str, trials: int, n: int) -> None:
    """The host's own work on the critical path of one vote, µs (spawned by :func:`host_path`):
    the collective is a stand-in that completes at once, so what is timed is the Python from the
    call to the enqueue and from the wait's return to the call's return, nothing of gloo's threads.
    Patches ``torch.distributed`` (a fake 2-rank group): run it in a process of its own."""
    import time

    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    import lowlevel
    from lowlevel import dp as dpm

    pc = time.perf_counter
    stamp = [0.0, 0.0]

    class Done:
        def wait(self, timeout: Any = None) -> bool:
            stamp[1] = pc()
            return True

        def is_completed(self) -> bool:
            return True

    done = Done()
    peer = np.zeros((dpm.ROWS, 2), np.int32)  # what the other rank adds to the table
    peer[:dpm.PLAN_ROWS, 1] = (601, 640, 1, 1, 2)
    peer[dpm.R_PRESENT, 1], peer[dpm.R_DP_RANK, 1], peer[dpm.R_DP_SIZE, 1], peer[dpm.R_NUM_UBATCHES, 1] = 1, 1, 2, 2

    class FakeGroup:
        def allreduce(self, tensors: Any, opts: Any) -> Done:
            stamp[0] = pc()
            t = tensors[0].numpy()
            if t.shape == peer.shape:
                np.add(t, peer, out=t)
            return done

    fake = FakeGroup()
    dist.get_world_size = lambda group=None: 2  # type: ignore[assignment]
    dist.get_rank = lambda group=None: 0  # type: ignore[assignment]
    c10d._get_default_group = lambda: fake  # dist.all_reduce's group
    cfg = lowlevel.DPConfig(2, 0, enable_microbatching=True, timeout_s=30)
    object.__setattr__(cfg, "group", fake)
    st = cfg._state
    vote = lowlevel.coordinate_batch_across_dp
    table = torch.zeros(dpm.ROWS, 2, dtype=torch.int32)

    def ours() -> Any:
        peer[dpm.R_STEP, 1] = st.step % dpm._STEP_MOD
        return vote(600, True, True, cfg, num_tokens_padded=640, uniform_decode=False, cudagraph_mode=2)

    def plain() -> Any:
        dist.all_reduce(table)

    def plain_tolist() -> Any:
        dist.all_reduce(table)
        return table.tolist()

    fns = {"ours": ours, "plain_big": plain, "plain_big_tolist": plain_tolist}
    for fn in fns.values():
        for _ in range(300):
            fn()
    got = ours()
    assert got[0] is True and got[1].tolist() == [640, 640] and got[2] == 2, got
    per: dict[str, dict[str, list[float]]] = {k: {"pre": [], "post": [], "critical": []} for k in fns}
    for _ in range(trials):
        for k, fn in fns.items():
            pre = post = 0.0
            for _ in range(n):
                t0 = pc()
                fn()
                t1 = pc()
                pre += stamp[0] - t0
                post += t1 - stamp[1]
            per[k]["pre"].append(pre / n * 1e6)
            per[k]["post"].append(post / n * 1e6)
            per[k]["critical"].append((pre + post) / n * 1e6)
    with open(out, "w") as f:
        json.dump({k: {part: _stats(v) for part, v in d.items()} for k, d in per.items()}, f)


def host_path(trials: int = 31, n: int = 1000, timeout: float = 120) -> dict[str, Any]:
    """:func:`host_path_worker` in a process of its own: ``{fn: {"pre"|"post"|"critical": stats}}``."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "h.json")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        code = ("import sys; from bench.bench_dp import host_path_worker; "
                "host_path_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))")
        subprocess.run([sys.executable, "-c", code, out, str(trials), str(n)], env=env, cwd=ROOT, check=True,
                       timeout=timeout)
        with open(out) as f:
            return json.load(f)


def _same_plan(a: Any, b: Any) -> bool:
    return a[0] == b[0] and a[1].tolist() == b[1].tolist() and a[2] == b[2]


def measure(backend: str, world: int = 2, n: int = 150, trials: int = 11, timeout: float = 300) -> dict[str, Any]:
    """Spawn ``world`` ranks and return rank 0's figures (µs per step: median, p20, p80)."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        port = free_port()
        env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", **NO_NVLS)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        code = ("import sys; from bench.bench_dp import worker; "
                "worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], "
                "int(sys.argv[6]), int(sys.argv[7]))")
        procs = [subprocess.Popen([sys.executable, "-c", code, str(r), str(world), str(port), out, backend, str(n),
                                   str(trials)], env=env, cwd=ROOT) for r in range(world)]
        try:
            for p in procs:
                p.wait(timeout=timeout)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if any(p.returncode for p in procs):
            raise RuntimeError(f"bench_dp {backend} ranks exited with {[p.returncode for p in procs]}")
        with open(out) as f:
            return json.load(f)


def _gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def _add(rep: Report, res: dict[str, Any], name: str, key: str, base_name: str, base: str, target: str = "") -> None:
    rep.add(name, res[key]["median"], "us/step", base_name, res[base]["median"], target=target,
            extra={"p20": res[key]["p20"], "p80": res[key]["p80"], "baseline_p20": res[base]["p20"],
                   "baseline_p80": res[base]["p80"]})


def run(rep: Report) -> None:
    results: dict[str, Any] = {}
    g = measure("gloo", trials=21)  # more trials: the figures differ by a few µs in ~150
    results["gloo"] = g
    _add(rep, g, "DP sync, gloo, 2 processes (lowlevel)", "ours",
         "one plain gloo all-reduce of the same [10, 2] table", "plain_big", "<= 1.0x")
    _add(rep, g, "plain gloo all-reduce of the [10, 2] table", "plain_big",
         "plain gloo all-reduce of vLLM's [5, 2] table", "plain_small", "the checks' rows cost nothing")
    _add(rep, g, "DP sync, gloo (lowlevel)", "ours", "one gloo collective per field (5)", "per_field")
    _add(rep, g, "DP sync, gloo, 2 processes (lowlevel)", "ours",
         "one plain gloo all-reduce of the same table + .tolist()", "plain_big_tolist")
    _add(rep, g, "DP sync, gloo, spin on is_completed() <= 0.5 ms", "ours_spin", "work.wait(timeout)",
         "ours_timeout", f"the default spins: {g['_gloo_spins']} ({g['_cpus']} cores)")
    _add(rep, g, "plain gloo all-reduce, spin on is_completed()", "plain_big_spin", "plain gloo all-reduce",
         "plain_big", "the floor of a spinning wait")
    h = host_path()
    results["gloo_host_path"] = h
    for k, name in (("plain_big", "dist.all_reduce of the same table"),
                    ("plain_big_tolist", "dist.all_reduce + .tolist()")):
        rep.add("DP sync, gloo: host work on the critical path (lowlevel)", h["ours"]["critical"]["median"],
                "us/step", f"{name}: its own host work", h[k]["critical"]["median"],
                target="no peers, no threads: the Python alone",
                extra={part: h["ours"][part] for part in ("pre", "post", "critical")}
                | {"baseline_" + part: h[k][part] for part in ("pre", "post", "critical")})
    _add(rep, g, "DP sync, gloo, async (start, host work, result)", "ours_async_host",
         f"blocking, then {HOST_WORK_US:.0f} us host work", "ours_then_host")
    n = _gpus()
    if n < 2:
        print(f"bench_dp: NCCL figures skipped: need 2 CUDA GPUs, found {n}", file=sys.stderr)
    else:
        r = measure("nccl")
        results["nccl"] = r
        _add(rep, r, "DP sync, NCCL 2 GPUs (lowlevel, timeout kept)", "ours",
             "vLLM's pattern (to device, all-reduce, .cpu())", "vllm", "<= 1.0x")
        _add(rep, r, "DP sync, NCCL, async (start, host work, result)", "ours_async_host",
             f"blocking, then {HOST_WORK_US:.0f} us host work", "ours_then_host")
        _add(rep, r, "DP sync, NCCL (lowlevel)", "ours", "one NCCL all-reduce per field (5)", "per_field")
        _add(rep, r, "plain NCCL all-reduce of the [10, 2] table + .cpu()", "plain_big",
             "the same of vLLM's [5, 2] table", "plain_small")
        _add(rep, r, "DP sync, NCCL (lowlevel)", "ours", "earlier lowlevel path (stream, wait(timeout), sync)", "old")
        _add(rep, r, "DP sync, NCCL, lowlevel.use_stream", "ours", "torch.cuda.stream", "ours_torch_stream")
        for k in ("old_no_timeout", "old_torch_stream", "old_torch_stream_no_timeout", "vllm_wait_timeout"):
            _add(rep, r, f"earlier path variant: {k}", k, "earlier lowlevel path", "old")
    path = os.path.join(rep.out_dir, "bench_dp_raw.json")
    os.makedirs(rep.out_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    rep.files.append(path)


if __name__ == "__main__":  # one JSON line per backend, printed as soon as it is measured
    print(json.dumps({"gloo_host_path": host_path()}), flush=True)
    print(json.dumps({"gloo": measure("gloo", trials=21)}), flush=True)
    if _gpus() >= 2:
        print(json.dumps({"nccl": measure("nccl")}), flush=True)
