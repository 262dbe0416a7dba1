"""Worker processes for the torch.distributed tests of DP sync (spawned, one per rank).

``run(rank, world, port, out_dir, steps, mode, backend)`` writes ``rank{r}.json`` in ``out_dir``.
Modes: ``plan`` (random steps against a reference; with backend ``nccl`` also against gloo and
the async vote), ``async`` (start/result against the blocking call), ``timeout``, and
``mismatch-<kind>`` (ranks that disagree: every rank must raise, none die).
"""
import json
import os
import random
import time

NO_NVLS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def reference_plan(cols, num_ubatches):
    """Independent single-process statement of the rules, over every rank's inputs."""
    unpadded = [c[0] for c in cols]
    padded = [c[1] for c in cols]
    mode = min(c[4] for c in cols)
    ubatch = all(c[2] for c in cols)
    if ubatch and (max(padded) // num_ubatches) * (num_ubatches - 1) >= min(unpadded):
        ubatch = False
    pad_all = ubatch or (all(c[3] for c in cols) and mode != 0)
    return ubatch, ([max(padded)] * len(cols) if pad_all else padded), mode


def step_inputs(step, rank):
    big = random.Random(step).random() < 0.4  # a step where every rank has a large batch
    rng = random.Random(step * 1000 + rank)
    if big:
        unp = rng.choice([512, 600, 700, 1024, 2048])
    else:
        unp = rng.choice([0, 1, 5, 31, 32, 33, 100, 511, 512, 600, 2048])
    pad = unp + rng.choice([0, 0, 1, 7, 64])
    uniform = rng.random() < 0.5
    return dict(num_tokens_unpadded=unp, num_tokens_padded=pad, uniform_decode=uniform,
                allow_microbatching=big or rng.random() < 0.8, allow_dp_padding=rng.random() < 0.8,
                cudagraph_mode=rng.choice([0, 1, 2, 2]))


# Each mismatch kind: the DPConfig arguments (dp_size, dp_rank, extra kwargs) for a rank in a world.
def mismatch_config(kind, rank, world):
    if kind == "dp_size":  # rank 0 believes in 2 ranks, the others in 3 (faults.md D, line 1)
        return (world, rank, {}) if rank == 0 else (world + 1, rank, {})
    if kind == "dp_size_all":  # every rank believes in one rank more than the group has
        return world + 1, rank, {}
    if kind == "dup_rank":  # the last rank says it is dp_rank 0 too
        return world, (0 if rank == world - 1 else rank), {}
    if kind == "num_ubatches":
        return world, rank, {"num_ubatches": 2 if rank == 0 else 3}
    if kind == "step":  # the last rank is one step ahead
        return world, rank, {}
    raise ValueError(kind)


def _plan_json(plan):
    should, counts, synced = plan
    return [bool(should), [int(x) for x in counts.numpy()], int(synced)]


def run(rank, world, port, out_dir, steps, mode, backend="gloo"):
    os.environ.update(NO_NVLS)
    dump_s = float(os.environ.get("DP_WORKER_DUMP_S", "0"))
    if dump_s > 0:  # a hang prints every thread's stack before the parent gives up on it
        import faulthandler

        faulthandler.dump_traceback_later(dump_s, exit=True)
    import torch
    import torch.distributed as dist

    import lowlevel
    from lowlevel import dp as dpm

    kw = {}
    if backend == "nccl":
        torch.cuda.set_device(rank)
        kw["device_id"] = torch.device("cuda", rank)
    # A file rendezvous (unique per spawn): no race for a TCP port with other process groups
    # starting on the machine at the same time; a bare port number still means TCP.
    init = f"tcp://127.0.0.1:{port}" if str(port).isdigit() else f"file://{port}"
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world, **kw)
    gloo = dist.new_group(backend="gloo") if backend == "nccl" else None
    device = backend == "nccl"
    res = {"rank": rank}
    teardown = True
    try:
        if mode == "timeout":
            teardown = False
            if device:  # connect the peers first: NCCL's first collective blocks until they arrive
                t = torch.ones(1, device="cuda")
                dist.all_reduce(t)
                torch.cuda.synchronize()
            cfg = lowlevel.DPConfig(world, rank, timeout_s=2.0, use_device_collective=device)
            if rank == 1:
                if device:  # joins late, so the NCCL kernel rank 0 left behind completes and both exit
                    time.sleep(4)
                    print("rank 1 joins", flush=True)
                    lowlevel.coordinate_batch_across_dp(5, False, True, lowlevel.DPConfig(world, rank, timeout_s=30,
                                                                                          use_device_collective=True))
                    print("rank 1 voted", flush=True)
                    torch.cuda.synchronize()
                    print("rank 1 synchronized", flush=True)
                else:
                    time.sleep(8)  # never joins in time
            else:
                t0 = time.monotonic()
                try:
                    lowlevel.coordinate_batch_across_dp(5, False, True, cfg, cudagraph_mode=2)
                    res["error"] = None
                except lowlevel.DPSyncError as e:
                    res["error"] = str(e)
                res["elapsed"] = time.monotonic() - t0
                print(f"rank 0 returned after {res['elapsed']:.2f} s: {res['error']}", flush=True)
                if device:
                    try:
                        lowlevel.coordinate_batch_across_dp(5, False, True, cfg)
                    except lowlevel.DPSyncError as e:  # a timed-out config refuses to go on
                        res["after_timeout"] = str(e)
                    torch.cuda.synchronize()  # the late peer completes the collective
        elif mode.startswith("mismatch-"):  # one or more kinds, comma-separated, in one process group
            res["kinds"] = {}
            for kind in mode.removeprefix("mismatch-").split(","):
                size, r, extra = mismatch_config(kind, rank, world)
                cfg = lowlevel.DPConfig(size, r, timeout_s=30, use_device_collective=device, **extra)
                if kind == "step" and rank == world - 1:
                    cfg._state.step += 1
                k = res["kinds"][kind] = {}
                t0 = time.monotonic()
                try:
                    lowlevel.coordinate_batch_across_dp(5, False, True, cfg, cudagraph_mode=2)
                    k["error"] = None
                except Exception as e:  # noqa: BLE001 - the test checks the class
                    k["error"] = str(e)
                    k["error_types"] = [c.__name__ for c in type(e).__mro__]
                k["elapsed"] = time.monotonic() - t0
                k["step"] = cfg.step
                # The collective completed: the group still works after a mismatch.
                t = torch.ones(1, device="cuda" if device else "cpu")
                dist.all_reduce(t)
                k["after"] = float(t.item())
        elif mode == "async":
            cfg = lowlevel.DPConfig(world, rank, enable_microbatching=True, timeout_s=30,
                                    use_device_collective=device)
            ref = lowlevel.DPConfig(world, rank, enable_microbatching=True, timeout_s=30,
                                    use_device_collective=device)
            same, second_start = [], None
            for step in range(steps):
                inp = step_inputs(step, rank)
                vote = dpm.coordinate_batch_across_dp_async(config=cfg, **inp)
                if step == 0:
                    try:
                        cfg.start(**inp)
                    except RuntimeError as e:
                        second_start = str(e)
                sum(range(2000))  # host work while the vote is in flight
                got = _plan_json(vote.result())
                assert _plan_json(vote.result()) == got  # result() is idempotent
                want = _plan_json(lowlevel.coordinate_batch_across_dp(config=ref, **inp))
                same.append(got == want)
            res.update(same=same, second_start=second_start, step=cfg.step)
            # generation mismatch through the async path: the last rank one step ahead
            bad = lowlevel.DPConfig(world, rank, timeout_s=30, use_device_collective=device)
            if rank == world - 1:
                bad._state.step = 7
            t0 = time.monotonic()
            try:
                bad.start(5, False, True).result()
                res["gen_error"] = None
            except lowlevel.DPSyncError as e:
                res["gen_error"] = str(e)
            res["gen_elapsed"] = time.monotonic() - t0
        else:
            cfg = lowlevel.DPConfig(world, rank, enable_microbatching=True, decode_token_threshold=32,
                                    prefill_token_threshold=512, timeout_s=60, use_device_collective=device)
            cfg_gloo = (lowlevel.DPConfig(world, rank, gloo, enable_microbatching=True, timeout_s=60)
                        if gloo is not None else None)
            plans = []
            for step in range(steps):
                inp = step_inputs(step, rank)
                should, counts, synced = lowlevel.coordinate_batch_across_dp(config=cfg, **inp)
                cols = []
                for r in range(world):
                    i = step_inputs(step, r)
                    wants = i["allow_microbatching"] and dpm.check_ubatch_thresholds(cfg, i["num_tokens_unpadded"],
                                                                                    i["uniform_decode"])
                    cols.append((i["num_tokens_unpadded"], i["num_tokens_padded"], int(wants),
                                 int(i["allow_dp_padding"]), i["cudagraph_mode"]))
                ref = reference_plan(cols, 2)
                got = (should, [int(x) for x in counts.numpy()], synced)
                entry = {"got": got, "ok": list(got) == [ref[0], list(ref[1]), ref[2]], "dtype": str(counts.dtype),
                         "pinned": bool(counts.is_pinned()) if device else None}
                if cfg_gloo is not None:
                    entry["gloo_same"] = _plan_json(lowlevel.coordinate_batch_across_dp(config=cfg_gloo, **inp)) \
                        == [got[0], got[1], got[2]]
                plans.append(entry)
            res.update(plans=plans, steps=cfg.step)
    finally:
        if teardown:
            dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    if not teardown:
        os._exit(0)  # the group is in an unknown state after a timeout: leave without teardown


def spawn(world, out_dir, steps, mode="plan", backend="gloo", timeout=240):
    """Run ``world`` worker processes; returns their JSON results, or raises AssertionError
    naming a rank that hung or died (with every rank's output)."""
    import sys
    import uuid

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench.common import run_ranks

    port = os.path.join(str(out_dir), f"rendezvous-{uuid.uuid4().hex}")  # a FileStore path, not a port
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import dp_worker; "
            "dp_worker.run(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6]), "
            "sys.argv[7], sys.argv[8])")
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", DP_WORKER_DUMP_S=str(max(timeout - 10, 5)),
               **NO_NVLS)
    return run_ranks([[sys.executable, "-c", code, here, str(r), str(world), str(port), str(out_dir), str(steps),
                       mode, backend] for r in range(world)], str(out_dir), env=env, timeout=timeout,
                     what=f" ({mode}, {backend})")
