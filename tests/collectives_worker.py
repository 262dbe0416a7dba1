"""Worker processes for the tests of ``lowlevel.all_to_all_single`` (spawned, one per rank).

``run(rank, world, port, out_dir, backend)`` writes ``rank{r}.json``: for each case, whether the
result equals torch's ``all_to_all_single`` and an independent reference built from every rank's
regenerated input, and the errors bad arguments raised (and that the group still works after).
With backend ``nccl`` also: a communicator limited to 8 CTAs, a zero-CTA communicator
(``zero_sm_group``) with and without symmetric buffers, the zero-SM path called from the legacy
default stream and from a side stream with a consumer right after it, captured in a CUDA graph
and replayed into a poisoned output.
"""
import json
import os
import sys

NO_NVLS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_input(torch, rank, rows, cols, dtype, device, seed):
    g = torch.Generator().manual_seed(seed * 100 + rank)
    return torch.randn(rows, cols, generator=g).to(dtype=dtype, device=device)


def reference(torch, rank, world, rows, cols, dtype, device, seed):
    h = rows // world
    xs = [make_input(torch, j, rows, cols, dtype, device, seed) for j in range(world)]
    return torch.cat([xs[j][rank * h:(rank + 1) * h] for j in range(world)])


def run(rank, world, port, out_dir, backend):
    os.environ.update(NO_NVLS)
    import torch
    import torch.distributed as dist

    sys.path.insert(0, ROOT)
    import lowlevel

    cuda = backend == "nccl"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            **({"device_id": torch.device("cuda", rank)} if cuda else {}))
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    res = {"rank": rank, "cases": [], "errors": {}}
    groups = {"world": None}
    if cuda:
        o = dist.ProcessGroupNCCL.Options()
        o.config.max_ctas = 8
        groups["ctas8"] = dist.new_group(backend="nccl", pg_options=o)
        groups["zero_sm"] = lowlevel.zero_sm_group()
    shapes = [(world * 3, 5), (world * 64, 257), (world, 1)] + ([(world * 2048, 1024)] if cuda else [(0, 5)])
    dtypes = [torch.float32] + ([torch.bfloat16] if cuda else [torch.float64])
    seed = 0
    for gname, group in groups.items():
        for rows, cols in shapes:
            for dtype in dtypes:
                seed += 1
                x = make_input(torch, rank, rows, cols, dtype, device, seed)
                out = torch.full_like(x, float("nan"))
                got = lowlevel.all_to_all_single(out, x, group=group)
                want = torch.full_like(x, float("nan"))
                dist.all_to_all_single(want, x, group=group)
                ref = reference(torch, rank, world, rows, cols, dtype, device, seed)
                res["cases"].append({"group": gname, "shape": [rows, cols], "dtype": str(dtype),
                                     "returned_output": got is out, "equal_torch": bool(torch.equal(out, want)),
                                     "equal_reference": bool(torch.equal(out, ref)),
                                     "input_unchanged": bool(torch.equal(x, make_input(torch, rank, rows, cols, dtype,
                                                                                       device, seed)))})
    if cuda:  # the zero-SM path: buffers in symmetric windows of the zero-CTA group
        rows, cols = world * 1024, 768
        zs = lowlevel.SymmetricBuffers(groups["zero_sm"], [(rows, cols), (rows, cols)], torch.bfloat16)
        x, out = zs.tensors
        side = torch.cuda.Stream()
        runs = {}
        for i, where in enumerate(("default stream", "side stream", "default stream again")):
            x.copy_(make_input(torch, rank, rows, cols, torch.bfloat16, device, 50 + i))
            out.fill_(float("nan"))
            if where == "side stream":
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    lowlevel.all_to_all_single(out, x, group=groups["zero_sm"])
                    y = (out.float() * 2).sum(dim=1)  # a consumer right after, on the caller's stream
                torch.cuda.current_stream().wait_stream(side)
            else:
                lowlevel.all_to_all_single(out, x, group=groups["zero_sm"])
                y = (out.float() * 2).sum(dim=1)
            ref = reference(torch, rank, world, rows, cols, torch.bfloat16, device, 50 + i)
            runs[where] = bool(torch.equal(out, ref)) and bool(torch.equal(y, (ref.float() * 2).sum(dim=1)))
        res["zero_sm_runs"] = runs
        try:  # torch's own call on the legacy default stream: what the wrapper avoids
            dist.all_to_all_single(out, x, group=groups["zero_sm"])
            torch.cuda.synchronize()
            res["torch_on_stream0"] = "ok"
        except Exception as exc:
            res["torch_on_stream0"] = f"{type(exc).__name__}: {exc}"
        # captured (from the default stream: the fork becomes a branch of the graph) and replayed
        s0 = torch.cuda.Stream()
        s0.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s0):
            lowlevel.all_to_all_single(out, x, group=groups["zero_sm"])
        torch.cuda.current_stream().wait_stream(s0)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            lowlevel.all_to_all_single(out, x, group=groups["zero_sm"])
        replays = []
        for i in range(5):
            out.fill_(float("nan"))
            x.copy_(make_input(torch, rank, rows, cols, torch.bfloat16, device, 99 + i))
            graph.replay()
            torch.cuda.synchronize()
            replays.append(bool(torch.equal(out, reference(torch, rank, world, rows, cols, torch.bfloat16, device,
                                                           99 + i))))
        res["graph_replays_equal"] = replays
        del graph
        zs.close()
        zs.close()  # idempotent
        res["closed_repr"] = repr(zs)
    # bad arguments: every rank raises the same error before sending anything; the group still works
    x = make_input(torch, rank, world * 4, 3, torch.float32, device, 7)
    if not cuda:
        refusals = {"symmetric_gloo": lambda: lowlevel.SymmetricBuffers(None, [(4, 4)], torch.float32),
                    "symmetric_dtype": lambda: lowlevel.SymmetricBuffers(None, [(4, 4)], "float32"),
                    "symmetric_shapes": lambda: lowlevel.SymmetricBuffers(None, [], torch.float32)}
        if not torch.cuda.is_available():  # with a GPU, every gloo rank here would make NCCL on cuda:0
            refusals["zero_sm_gloo"] = lambda: lowlevel.zero_sm_group()
    else:
        refusals = {}
    bad = {**refusals,
        "odd_rows": lambda: lowlevel.all_to_all_single(torch.empty(world * 4 + 1, 3, device=device),
                                                       torch.empty(world * 4 + 1, 3, device=device)),
        "shape": lambda: lowlevel.all_to_all_single(torch.empty(world * 4, 4, device=device), x),
        "dtype": lambda: lowlevel.all_to_all_single(torch.empty(world * 4, 3, dtype=torch.float64, device=device), x),
        "not_tensor": lambda: lowlevel.all_to_all_single([1, 2], x),
        "strided": lambda: lowlevel.all_to_all_single(torch.empty(3, world * 4, device=device).t(), x),
        "in_place": lambda: lowlevel.all_to_all_single(x, x),
    }
    big = torch.empty(world * 8, 3, device=device)
    bad["overlap"] = lambda: lowlevel.all_to_all_single(big[2:2 + world * 4], big[:world * 4])
    flat = torch.empty(world * 8, device=device)
    bad["same_storage"] = lambda: lowlevel.all_to_all_single(flat[1:world * 4 + 1], flat[:world * 4])
    bad["group_type"] = lambda: lowlevel.all_to_all_single(torch.empty_like(x), x, group="world")
    bad["zero_dim"] = lambda: lowlevel.all_to_all_single(torch.empty((), device=device), torch.ones((), device=device))
    bad["meta"] = lambda: lowlevel.all_to_all_single(torch.empty(world * 4, 3, device="meta"),
                                                     torch.empty(world * 4, 3, device="meta"))
    bad["sparse"] = lambda: lowlevel.all_to_all_single(torch.empty_like(x), x.to_sparse())
    z = torch.randn(world * 4, 3, dtype=torch.complex64, device=device)
    bad["conj"] = lambda: lowlevel.all_to_all_single(torch.empty_like(z), z.conj())
    bad["neg"] = lambda: lowlevel.all_to_all_single(torch.empty_like(x), torch._neg_view(x))
    for name, fn in bad.items():
        try:
            fn()
            res["errors"][name] = None
        except Exception as exc:
            res["errors"][name] = f"{type(exc).__name__}: {exc}"
    if not cuda and world > 2:  # a rank outside the group: nothing sent, output returned unwritten (as torch)
        pair = dist.new_group([0, 1])
        out = torch.full_like(x, float("nan"))
        got = lowlevel.all_to_all_single(out, x, group=pair)
        want = reference(torch, rank, 2, world * 4, 3, torch.float32, device, 7) if rank < 2 else None
        res["outside_group"] = got is out and (bool(torch.equal(out, want)) if rank < 2 else bool(out.isnan().all()))
    out = torch.empty_like(x)
    lowlevel.all_to_all_single(out, x)
    res["after_errors_ok"] = bool(torch.equal(out, reference(torch, rank, world, world * 4, 3, torch.float32, device,
                                                             7)))
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


def spawn(world, out_dir, backend, timeout=240):
    """Run ``world`` ranks; their results (AssertionError naming the rank that failed or hung)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from bench.common import free_port, run_ranks

    env = dict(os.environ, OMP_NUM_THREADS="1", **NO_NVLS)
    env["PYTHONPATH"] = os.path.dirname(os.path.abspath(__file__)) + os.pathsep + ROOT + os.pathsep + \
        env.get("PYTHONPATH", "")
    code = "import sys, collectives_worker as w; w.run(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), " \
           "sys.argv[4], sys.argv[5])"
    port = free_port()
    return run_ranks([[sys.executable, "-c", code, str(r), str(world), str(port), str(out_dir), backend]
                      for r in range(world)], str(out_dir), env=env, timeout=timeout, what=f" ({backend})")
