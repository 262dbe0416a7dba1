"""DP padding sync: data-parallel ranks agree each step on padding, microbatching and graph mode.

Spawns ``--world`` CPU processes joined over gloo (no GPU needed); every rank calls
``coordinate_batch_across_dp`` once per step with its own batch size, and all of them get the
same plan from one all-reduce. Run: ``python examples/dp_sync.py --world 2 --steps 6``.
"""
from __future__ import annotations

import argparse
import os
import random
import tempfile
from typing import Any


def rank_main(rank: int, world: int, init_file: str, steps: int, seed: int, queue: Any) -> None:
    import torch.distributed as dist

    import lowlevel
    from lowlevel import CudagraphDispatcher, CUDAGraphMode

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = lowlevel.DPConfig(world, rank, enable_microbatching=True, decode_token_threshold=32,
                                prefill_token_threshold=256, timeout_s=30.0)
        d = CudagraphDispatcher(max_capture_size=256)
        d.initialize_cudagraph_keys(CUDAGraphMode.FULL)
        rng = random.Random(seed * 100 + rank)
        for step in range(steps):
            # this rank's batch: mostly decode sizes, some prefill sizes above the graphs' range
            if random.Random(seed * 1000 + step).random() < 0.3:  # a step where every rank prefills
                n = rng.randint(300, 1024)
            else:
                n = rng.randint(1, 200) if rng.random() < 0.8 else rng.randint(300, 1024)
            mode, desc = d.dispatch(n)  # this rank's own padding and mode, before the vote
            should_ubatch, counts, synced = lowlevel.coordinate_batch_across_dp(
                n, True, True, cfg, num_tokens_padded=desc.num_tokens, uniform_decode=False,
                cudagraph_mode=mode)
            queue.put((step, rank, n, mode.name, should_ubatch, [int(c) for c in counts], synced))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2, help="number of ranks (processes)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch.multiprocessing as mp

    from lowlevel import CUDAGraphMode

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one host: the loopback interface
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(rank_main, args=(args.world, os.path.join(tmp, "rendezvous"), args.steps, args.seed, queue),
                           nprocs=args.world, start_method="spawn", join=True)
    rows: dict[int, list[tuple[Any, ...]]] = {}
    while not queue.empty():
        r = queue.get()
        rows.setdefault(r[0], []).append(r)
    print(f"{'step':>4}  {'tokens per rank':<18} {'own modes':<16} {'microbatch':<10} {'padded to':<14} mode")
    for step in sorted(rows):
        rs = sorted(rows[step], key=lambda r: r[1])
        assert len(rs) == args.world, f"step {step}: {len(rs)} of {args.world} ranks reported"
        plans = {(r[4], tuple(r[5]), r[6]) for r in rs}
        assert len(plans) == 1, f"step {step}: the ranks disagree: {plans}"
        should, counts, synced = plans.pop()
        print(f"{step:>4}  {str([r[2] for r in rs]):<18} {','.join(r[3] for r in rs):<16} {str(should):<10} "
              f"{str(list(counts)):<14} {CUDAGraphMode(synced).name}")
    print(f"{args.world} ranks agreed on all {len(rows)} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
