"""DP padding sync latency over gloo with 2 and 4 local processes: one collective per call vs a
naive version that issues one collective per field (CPU only)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

from .common import Report

NEEDS_GPU = False

_WORKER = r'''
import json, statistics, sys, time
import torch, torch.distributed as dist
import lowlevel
rank, world, port, out, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
cfg = lowlevel.DPConfig(world, rank, enable_microbatching=True)
def ours():
    lowlevel.coordinate_batch_across_dp(600 + rank, True, True, cfg, num_tokens_padded=640, uniform_decode=False,
                                        cudagraph_mode=2)
bufs = [torch.zeros(world, dtype=torch.int32) for _ in range(5)]
def naive():  # one all-gather-by-sum per field, like code that syncs each quantity on its own
    for i, v in enumerate((600 + rank, 640, 1, 1, 2)):
        bufs[i].zero_(); bufs[i][rank] = v
        dist.all_reduce(bufs[i])
    modes = int(bufs[4].min()); pad = int(bufs[1].max())
    return modes, pad
res = {}
for name, fn in (("ours", ours), ("naive", naive), ("ours2", ours), ("naive2", naive)):
    for _ in range(50): fn()
    dist.barrier()
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(steps): fn()
        ts.append((time.perf_counter() - t0) / steps * 1e6)
    res[name] = statistics.median(ts)
if rank == 0:
    json.dump(res, open(out, "w"))
dist.destroy_process_group()
'''


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(rep: Report) -> None:
    for world in (2, 4):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "r.json")
            port = _port()
            env = dict(os.environ, OMP_NUM_THREADS="1")
            procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(r), str(world), str(port), out, "300"],
                                      env=env) for r in range(world)]
            for p in procs:
                p.wait(timeout=600)
            res = json.load(open(out))
        ours = min(res["ours"], res["ours2"])
        naive = min(res["naive"], res["naive2"])
        rep.add(f"coordinate_batch_across_dp, gloo, {world} processes", ours, "us/step",
                "one collective per field (5 all-reduces)", naive)
