"""Worker processes for the 2-GPU tests of ``lowlevel.PeerBuffers`` and
``lowlevel.kernels.all_to_all_single`` (spawned, one per rank, NCCL).

``run(rank, world, port, out_dir)`` writes ``rank{r}.json``:

- ``cases``: for shapes (ragged ones too) x dtypes x program counts, whether the output (poisoned
  first) equals an independent reference built from every rank's regenerated input, and equals
  torch's ``all_to_all_single`` of the same input; the input unchanged;
- ``repeat_equal``: 50 calls in a row on fresh inputs (the epochs advance), each checked;
- ``beside_matmul_equal``: the exchange on a side stream while a matmul reads the output buffer's
  previous contents on the compute stream, in a ping-pong of 2 buffers x 20 layers, bit-exact
  against the same layers in order with NCCL's all-to-all (the start barrier must hold the
  peer's stores until the reader is done), and that against a float32 reference;
- ``graph_replays_equal``: the call captured in a CUDA graph with a consumer after it, replayed
  10 times on fresh inputs into a poisoned output;
- ``mismatch_error``: rank 0 launches 4 programs and rank 1 launches 2 with a small
  ``max_spins``: ``check`` must raise (on the rank whose waits gave up) instead of hanging;
- ``errors``: bad arguments refused before anything launched (output unchanged).
"""
import json
import os
import sys

NO_NVLS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_input(torch, rank, shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed * 100 + rank)
    x = torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32) * 8
    return x.to(dtype)


def reference(torch, rank, world, shape, dtype, seed):
    h = shape[0] // world
    xs = [make_input(torch, j, shape, dtype, seed) for j in range(world)]
    return torch.cat([xs[j][rank * h:(rank + 1) * h] for j in range(world)])


def _err(fn):
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def run(rank, world, port, out_dir):
    os.environ.update(NO_NVLS)
    import torch
    import torch.distributed as dist

    sys.path.insert(0, ROOT)
    import lowlevel
    from lowlevel import kernels as K
    from lowlevel.kernels import all_to_all as A

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))
    res = {"rank": rank, "cases": [], "errors": {}}
    sms = lowlevel.sm_control.device_sm_count()
    shapes = [(world * 3, 5), (world * 1000, 77), (world * 4096, 2048), (world * 1, 1), (world * 8191, 3)]
    dtypes = [torch.bfloat16, torch.float32, torch.int8]
    seed = 0
    for shape in shapes:
        for dtype in dtypes:
            pb = lowlevel.PeerBuffers(None, [shape, shape], dtype)
            for programs in (1, 7, sms):
                seed += 1
                x = make_input(torch, rank, shape, dtype, seed)
                x0 = x.clone()
                out = pb.tensors[1]
                out.fill_(-7)
                torch.cuda.synchronize()
                dist.barrier(device_ids=[rank])  # every rank poisoned before any rank stores
                got = K.all_to_all_single(out, x, peers=pb, programs=programs)
                torch.cuda.synchronize()
                A.check(pb)
                tor = _gather_ref(torch, dist, x)
                res["cases"].append({"shape": list(shape), "dtype": str(dtype), "programs": programs,
                                     "returned_output": got is out,
                                     "equal_reference": bool(torch.equal(out, reference(torch, rank, world, shape,
                                                                                        dtype, seed))),
                                     "equal_torch": bool(torch.equal(out, tor)),
                                     "input_unchanged": bool(torch.equal(x, x0))})
                dist.barrier(device_ids=[rank])  # nobody poisons again before every rank checked
            pb.close()
    # many calls in a row: epochs advance, every output right
    shape, dtype = (world * 512, 300), torch.bfloat16
    with lowlevel.PeerBuffers(None, [shape], dtype) as pb:
        ok = []
        for i in range(50):
            seed += 1
            x = make_input(torch, rank, shape, dtype, seed)
            K.all_to_all_single(pb.tensors[0], x, peers=pb, programs=1 + (i * 13) % sms)
            ok.append(bool(torch.equal(pb.tensors[0], reference(torch, rank, world, shape, dtype, seed))))
            dist.barrier(device_ids=[rank])  # the reference read the output before the next call stores
        A.check(pb)
        res["repeat_equal"] = ok
    # beside a matmul that reads the buffer the peer stores into next (ping-pong, no host sync)
    T, H, layers = 4096, 1024, 20
    g = torch.Generator(device="cuda").manual_seed(99)
    w = torch.randn(H, H, device="cuda", dtype=torch.bfloat16, generator=g) / 32
    xs = [make_input(torch, r, (T, H), torch.bfloat16, 777) for r in range(world)]
    with lowlevel.PeerBuffers(None, [(T, H), (T, H)], torch.bfloat16) as pb:
        a, b = pb.tensors
        side = torch.cuda.Stream()
        cur = xs[rank]
        for _ in range(layers):
            K.matmul(cur, w, out=a)  # reads b (the previous layer's exchange), writes a
            side.wait_stream(torch.cuda.current_stream())
            with lowlevel.use_stream(side):
                K.all_to_all_single(b, a, peers=pb, programs=16)
            torch.cuda.current_stream().wait_stream(side)
            cur = b
        torch.cuda.synchronize()
        A.check(pb)
        # the same layers in order on one stream with NCCL's all-to-all: the same kernels on the
        # same bits, so the overlapped NVLink run must match it exactly
        cur, ha, hb = xs[rank], torch.empty(T, H, device="cuda", dtype=torch.bfloat16), None
        for _ in range(layers):
            K.matmul(cur, w, out=ha)
            hb = torch.empty_like(ha)
            dist.all_to_all_single(hb, ha)
            cur = hb
        torch.cuda.synchronize()
        res["beside_matmul_max_diff"] = float((b.float() - hb.float()).abs().max())
        res["beside_matmul_equal"] = bool(torch.equal(b, hb))
        # and that sequence against a float32 reference with bf16 rounding (drift of a few ulps)
        ref = [x.float() for x in xs]
        h = T // world
        for _ in range(layers):
            ys = [(x @ w.float()).bfloat16().float() for x in ref]
            ref = [torch.cat([ys[j][r * h:(r + 1) * h] for j in range(world)]) for r in range(world)]
        res["beside_matmul_ref_rel"] = float((hb.float() - ref[rank]).norm() / ref[rank].norm())
    # captured with a consumer right after it, replayed on fresh inputs
    shape, dtype = (world * 2048, 512), torch.float32
    with lowlevel.PeerBuffers(None, [shape], dtype) as pb:
        x = torch.empty(shape, device="cuda", dtype=dtype)
        y = torch.empty(shape, device="cuda", dtype=dtype)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            x.copy_(make_input(torch, rank, shape, dtype, 5000))
            K.all_to_all_single(pb.tensors[0], x, peers=pb, programs=32)  # warm-up: compile off the capture
            torch.mul(pb.tensors[0], 2, out=y)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            K.all_to_all_single(pb.tensors[0], x, peers=pb, programs=32)
            torch.mul(pb.tensors[0], 2, out=y)
        ok = []
        for i in range(10):
            x.copy_(make_input(torch, rank, shape, dtype, 6000 + i))
            y.fill_(float("nan"))
            pb.tensors[0].fill_(float("nan"))
            torch.cuda.synchronize()
            dist.barrier(device_ids=[rank])
            graph.replay()
            torch.cuda.synchronize()
            ok.append(bool(torch.equal(y, 2 * reference(torch, rank, world, shape, dtype, 6000 + i))))
            dist.barrier(device_ids=[rank])
        A.check(pb)
        res["graph_replays_equal"] = ok
        del graph
    # bad arguments: refused before anything launched
    with lowlevel.PeerBuffers(None, [(world * 4, 8), (world * 4, 8)], torch.float32) as pb:
        o, other = pb.tensors
        o.fill_(3.0)
        x = torch.randn(world * 4, 8, device="cuda")
        cases = {
            "not_peer_output": lambda: K.all_to_all_single(torch.empty_like(x), x, peers=pb),
            "slice_output": lambda: K.all_to_all_single(o[:world * 2], x[:world * 2], peers=pb),
            "dtype": lambda: K.all_to_all_single(o, x.double(), peers=pb),
            "shape": lambda: K.all_to_all_single(o, x[:, :4], peers=pb),
            "strided": lambda: K.all_to_all_single(o, torch.randn(8, world * 4, device="cuda").t(), peers=pb),
            "in_place": lambda: K.all_to_all_single(o, o, peers=pb),
            "peer_input": lambda: K.all_to_all_single(o, pb.peer((rank + 1) % world)[1], peers=pb),
            "programs_zero": lambda: K.all_to_all_single(o, x, peers=pb, programs=0),
            "programs_big": lambda: K.all_to_all_single(o, x, peers=pb, programs=sms + 1),
            "programs_bool": lambda: K.all_to_all_single(o, x, peers=pb, programs=True),
            "spins_zero": lambda: K.all_to_all_single(o, x, peers=pb, max_spins=0),
            "peers_type": lambda: K.all_to_all_single(o, x, peers=None),
            "cpu_input": lambda: K.all_to_all_single(o, x.cpu(), peers=pb),
        }
        for name, fn in cases.items():
            res["errors"][name] = _err(fn)
        torch.cuda.synchronize()
        res["errors_output_unchanged"] = bool((o == 3.0).all())
        K.all_to_all_single(other, x, peers=pb)  # still works after the refusals
        torch.cuda.synchronize()
        res["after_errors_ok"] = bool(torch.equal(other, _gather_ref(torch, dist, x)))
    # programs that differ between the ranks: an error, not a hang
    with lowlevel.PeerBuffers(None, [(world * 64, 64)], torch.float32) as pb:
        x = torch.randn(world * 64, 64, device="cuda")
        K.all_to_all_single(pb.tensors[0], x, peers=pb, programs=4 if rank == 0 else 2, max_spins=20000)
        res["mismatch_error"] = _err(lambda: A.check(pb))
        dist.barrier(device_ids=[rank])
    res["closed_error"] = _err(lambda: pb.tensors)
    res["closed_call_error"] = _err(lambda: K.all_to_all_single(o, x, peers=pb))
    res["repr"] = repr(pb)
    dist.barrier(device_ids=[rank])
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


def _gather_ref(torch, dist, x):
    """The all-to-all of ``x`` by torch (NCCL), the reference of a lowlevel call on the same rows."""
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x)
    torch.cuda.synchronize()
    return out


def spawn(world, out_dir, timeout=240):
    """Run ``world`` ranks; their results (AssertionError naming the rank that failed or hung)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from bench.common import free_port, run_ranks

    env = dict(os.environ, OMP_NUM_THREADS="1", **NO_NVLS)
    env["PYTHONPATH"] = os.path.dirname(os.path.abspath(__file__)) + os.pathsep + ROOT + os.pathsep + \
        env.get("PYTHONPATH", "")
    code = "import sys, peer_worker as w; w.run(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])"
    port = free_port()
    return run_ranks([[sys.executable, "-c", code, str(r), str(world), str(port), str(out_dir)]
                      for r in range(world)], str(out_dir), env=env, timeout=timeout, what=" (peer all-to-all)")
