"""Worker processes for the torch.distributed tests (spawned, one per rank)."""
import json
import os
import random
import time


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


def run(rank, world, port, out_dir, steps, mode):
    import torch.distributed as dist

    import lowlevel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        if mode == "timeout":
            cfg = lowlevel.DPConfig(world, rank, timeout_s=2.0)
            if rank == 1:
                time.sleep(8)  # never joins in time
                res = {"rank": rank}
            else:
                t0 = time.monotonic()
                try:
                    lowlevel.coordinate_batch_across_dp(5, False, True, cfg, cudagraph_mode=2)
                    res = {"rank": rank, "error": None}
                except lowlevel.DPSyncError as e:
                    res = {"rank": rank, "error": str(e), "elapsed": time.monotonic() - t0}
        else:
            cfg = lowlevel.DPConfig(world, rank, enable_microbatching=True, decode_token_threshold=32,
                                    prefill_token_threshold=512, timeout_s=60)
            from lowlevel.ubatch_slices import check_ubatch_thresholds

            plans = []
            for step in range(steps):
                inp = step_inputs(step, rank)
                should, counts, synced = lowlevel.coordinate_batch_across_dp(config=cfg, **inp)
                cols = []
                for r in range(world):
                    i = step_inputs(step, r)
                    wants = i["allow_microbatching"] and check_ubatch_thresholds(cfg, i["num_tokens_unpadded"],
                                                                                i["uniform_decode"])
                    cols.append((i["num_tokens_unpadded"], i["num_tokens_padded"], int(wants),
                                 int(i["allow_dp_padding"]), i["cudagraph_mode"]))
                ref = reference_plan(cols, 2)
                got = (should, [int(x) for x in counts.numpy()], synced)
                plans.append({"got": got, "ok": list(got) == [ref[0], list(ref[1]), ref[2]],
                              "dtype": str(counts.dtype)})
            res = {"rank": rank, "plans": plans, "steps": cfg.step}
    finally:
        if mode != "timeout":
            dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    if mode == "timeout":
        os._exit(0)  # the group is in an unknown state after a timeout: leave without teardown
