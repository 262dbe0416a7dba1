"""GPU tier: capture, graph pools, failed captures, multi-stream capture, the runner."""
import numpy as np
import pytest

import lowlevel
from lowlevel import BatchDescriptor as BD
from lowlevel import CUDAGraphMode as M
from lowlevel.testing import spin_triton

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
cp = pytest.importorskip("cupy")


def _fresh(shape, seed=None):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("framework", ["cupy", "torch", "triton", "mixed"])
def test_replay_equals_eager_on_fresh_inputs(framework):
    n = 4096
    x_t = torch.empty(n, device="cuda")
    x_c = lowlevel.as_cupy(x_t)

    def fn():
        if framework == "cupy":
            return cp.sin(x_c) * 2 + 1
        if framework == "torch":
            return torch.sin(x_t) * 2 + 1
        if framework == "triton":
            out = torch.empty(n, device="cuda")
            out.copy_(x_t)
            spin_triton(out, 3)
            return out
        a = lowlevel.as_torch(cp.sin(x_c))  # CuPy -> torch inside the graph
        return a * 2 + 1

    x_t.copy_(torch.from_numpy(_fresh(n)))
    fn()  # warm-up outside capture (compilation)
    torch.cuda.synchronize()
    with lowlevel.capture() as g:
        out = fn()
    assert g.captured
    for _ in range(5):
        x_t.copy_(torch.from_numpy(_fresh(n)))
        if isinstance(out, cp.ndarray):
            out[...] = cp.nan
        else:
            out.fill_(float("nan"))
        g.replay()
        ref = fn()
        torch.cuda.synchronize()
        got = lowlevel.as_torch(out)
        torch.testing.assert_close(got, lowlevel.as_torch(ref))


def _cupy9655(use_pool):
    """A = A * 2 inside a capture; afterwards new buffers are allocated on the capture stream.
    Without a graph-private pool they reuse the temporary's block and replays scribble on them."""
    s = lowlevel.Stream()
    n = 1 << 20
    A = cp.ones(n, dtype=cp.float32)
    with s.cupy:
        A2 = A * 2  # warm-up kernels
    s.synchronize()
    del A2
    if use_pool:
        with lowlevel.capture(stream=s) as g:
            B = A * 2  # allocated in the graph pool
            B *= 3
        outs = B
    else:
        with s.cupy:
            s.cupy.begin_capture()
            B = A * 2  # allocated from CuPy's ordinary pool
            B *= 3
            raw = s.cupy.end_capture()
        outs = B
    ptr = int(outs.data.ptr)
    del B, outs  # the caller drops the temporary: its block returns to a pool
    with s.cupy:  # later allocations on the capture stream, filled with known values
        others = [cp.full(n, 7.0, dtype=cp.float32) for _ in range(4)]
    s.synchronize()
    if use_pool:
        g.replay(s)
    else:
        raw.launch(s.cupy)
    s.synchronize()
    clobbered = any(float(o.max()) != 7.0 or float(o.min()) != 7.0 for o in others)
    reused = any(int(o.data.ptr) == ptr for o in others)
    return clobbered, reused


def test_cupy_9655_reproduced_without_pool_and_fixed_with_it():
    clobbered, reused = _cupy9655(use_pool=False)
    assert reused and clobbered, "the bug should reproduce with CuPy's ordinary pool"
    clobbered, reused = _cupy9655(use_pool=True)
    assert not reused and not clobbered


def test_torch_allocations_go_to_the_graph_pool():
    s = lowlevel.Stream()
    n = 1 << 20
    A = torch.ones(n, device="cuda")
    with lowlevel.capture(stream=s) as g:
        B = A * 2
    ptr = B.data_ptr()
    g.keep(A)
    del B
    with lowlevel.use_stream(s):
        others = [torch.full((n,), 7.0, device="cuda") for _ in range(4)]
    g.replay(s)
    s.synchronize()
    assert all(o.data_ptr() != ptr for o in others)
    assert all(bool((o == 7).all()) for o in others)


def test_failed_capture_recovers():
    s = lowlevel.Stream()
    x = torch.randn(1000, device="cuda")
    with pytest.raises(lowlevel.CaptureError, match="exception in the captured block"), lowlevel.capture(stream=s):
        y = x * 2
        raise RuntimeError("user code failed")
    assert not s.is_capturing()
    with pytest.raises(lowlevel.CaptureError), lowlevel.capture(stream=s):
        y = x * 2
        torch.cuda.synchronize()  # illegal during capture
    assert not s.is_capturing()
    assert torch.cuda.current_stream().cuda_stream != s.ptr
    with lowlevel.capture(stream=s) as g:
        y = x * 3
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, x * 3)
    with pytest.raises(ValueError), lowlevel.capture(mode="bogus"):
        pass
    with pytest.raises(TypeError), lowlevel.capture(pool=object()):
        pass


def test_multi_stream_capture_branches():
    x = torch.empty(1 << 16, device="cuda")
    runner = lowlevel.ParallelRunner(2)

    def step():
        m, (a, b) = runner(lambda: x * 3, [lambda: x + 1, lambda: lowlevel.as_torch(cp.exp(lowlevel.as_cupy(x)))])
        return m + a + b

    x.copy_(torch.from_numpy(_fresh(x.numel())))
    step()
    torch.cuda.synchronize()
    with lowlevel.capture() as g:
        out = step()
    assert runner.capture_event_sets == 1
    for seed in range(3):
        x.copy_(torch.from_numpy(_fresh(x.numel(), seed)))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, x * 3 + x + 1 + torch.exp(x))


def test_shared_pool_uses_less_memory():
    sizes = [(k + 1) * (1 << 20) for k in range(20)]  # 20 graphs, temporaries of 4..80 MiB
    x = cp.ones(sizes[-1], dtype=cp.float32)

    def run(shared):
        cp.get_default_memory_pool().free_all_blocks()
        torch.cuda.synchronize()
        free0 = cp.cuda.runtime.memGetInfo()[0]
        pool = lowlevel.GraphPool() if shared else None
        graphs = []
        for n in sorted(sizes, reverse=True):
            with lowlevel.capture(pool=pool) as g:
                t = x[:n] * 2  # temporary
                out = cp.sum(t)
                del t
            graphs.append((g, out))
        used = free0 - cp.cuda.runtime.memGetInfo()[0]
        for g, out in graphs:
            g.replay()
        torch.cuda.synchronize()
        assert all(float(o) == 2.0 * n for (g, o), n in zip(graphs, sorted(sizes, reverse=True)))
        del graphs, pool
        return used

    shared, separate = run(True), run(False)
    print(f"20 graphs: shared pool {shared / 2**20:.0f} MiB, separate pools {separate / 2**20:.0f} MiB")
    assert shared * 4 < separate


def test_runner_capture_replay_bypass_and_counters():
    buf_in = torch.empty(64, device="cuda")
    calls = []

    def fn(x):
        calls.append(x.shape[0])
        return torch.tanh(x) * 2

    d = lowlevel.CudagraphDispatcher([1, 2, 4, 8, 16, 32], max_num_seqs=32)
    d.initialize_cudagraph_keys(M.FULL)
    r = lowlevel.CUDAGraphRunner(fn, M.FULL)
    for n in [3, 8, 3, 17, 32, 5, 64]:
        mode, desc = d.dispatch(n)
        buf_in[:n].copy_(torch.randn(n))
        if mode is M.NONE:
            out = r(mode, desc, buf_in[:n])
            assert out.shape[0] == n
        else:
            out = r(mode, desc, buf_in[: desc.num_tokens], num_tokens=n)
            assert out.shape[0] == desc.num_tokens
        torch.cuda.synchronize()
        torch.testing.assert_close(out[:n], torch.tanh(buf_in[:n]) * 2)
    assert r.captures == 3 and r.hits == 3 and r.bypasses == 1  # graphs for 4, 8 and 32 tokens
    assert r.padded_tokens == (4 - 3) + 0 + (4 - 3) + (32 - 17) + 0 + (8 - 5)
    # PIECEWISE mode goes around a FULL runner
    out = r(M.PIECEWISE, BD(8, None), buf_in[:8])
    assert r.bypasses == 2
    r.capturing_enabled = False
    with pytest.raises(RuntimeError, match="capturing is disabled"):
        r(M.FULL, BD(2, 2), buf_in[:2])
    with pytest.raises(ValueError):
        lowlevel.CUDAGraphRunner(fn, M.NONE)


def test_runner_capture_all_shared_pool_mixed_frameworks():
    d = lowlevel.CudagraphDispatcher([1, 2, 4, 8, 16], max_num_seqs=16)
    d.initialize_cudagraph_keys(M.FULL_AND_PIECEWISE)
    static = torch.empty(16, 32, device="cuda")

    def fn(x):
        y = lowlevel.as_cupy(x) * 3  # CuPy
        z = lowlevel.as_torch(y).sum(dim=1)  # torch
        spin_triton(z, 2)  # Triton, in place
        return z

    full = lowlevel.CUDAGraphRunner(fn, M.FULL)
    pw = lowlevel.CUDAGraphRunner(fn, M.PIECEWISE, pool=full.pool)
    assert full.capture_all(d, lambda desc: (static[: desc.num_tokens],), progress=False) == 5
    assert pw.capture_all(d, lambda desc: (static[: desc.num_tokens],), progress=False) == 5
    full.capturing_enabled = pw.capturing_enabled = False

    def ref(x):
        z = (x * 3).sum(dim=1).double()
        for _ in range(2):
            z = z * 0.999999 + 0.5
        return z

    for n in [1, 3, 5, 7, 9, 16, 12]:
        for uniform in (False, True):
            mode, desc = d.dispatch(n, uniform_decode=uniform)
            static[:n].copy_(torch.randn(n, 32))
            runner = full if mode is M.FULL else pw
            out = runner(mode, desc, static[: desc.num_tokens])
            torch.cuda.synchronize()
            torch.testing.assert_close(out[:n].double(), ref(static[:n]), rtol=1e-5, atol=1e-4)
    assert full.captures == 5 and pw.captures == 5 and full.hits + pw.hits == 14


# --- issue 18: same-stream warm-up, lifecycle, update, memory ------------------------------------

def _clean_reserved():
    """Synchronise and return torch's reserved bytes with nothing cached (cuBLAS workspaces
    and free blocks given back), CuPy's default pool emptied."""
    import gc

    gc.collect()  # garbage of earlier tests may hold device memory
    torch.cuda.synchronize()
    torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    cp.get_default_memory_pool().free_all_blocks()
    return torch.cuda.memory_reserved()


def test_runner_warms_up_and_captures_on_the_same_stream():
    """faults.md E: fn keeps a workspace per stream, made (with a synchronisation) on its first
    call on a stream; warm-up and capture on one stream make the capture reuse it."""
    ws = {}

    def fn(x):
        s = torch.cuda.current_stream()
        w = ws.get(s.cuda_stream)
        if w is None:
            w = ws[s.cuda_stream] = torch.empty_like(x)
            s.synchronize()  # lazy set-up that synchronises: illegal inside a capture
        torch.mul(x, 2, out=w)
        return w + 1

    x = torch.empty(1 << 16, device="cuda")
    x.copy_(torch.from_numpy(_fresh(x.numel(), 0)))
    r = lowlevel.CUDAGraphRunner(fn, M.FULL)
    desc = BD(x.numel(), 64)
    out = r(M.FULL, desc, x)
    torch.cuda.synchronize()
    assert r.captures == 1 and len(ws) == 1
    torch.testing.assert_close(out, x * 2 + 1)
    for seed in range(1, 4):
        x.copy_(torch.from_numpy(_fresh(x.numel(), seed)))
        out.fill_(float("nan"))
        assert r(2, desc, x) is out  # the int mode replays too
        torch.cuda.synchronize()
        torch.testing.assert_close(out, x * 2 + 1)
    assert r.hits == 3 and len(ws) == 1


def _mixed_fn(x):
    """CuPy temporaries (CuPy pool) and torch temporaries and output (torch pool), no cuBLAS."""
    z = cp.tanh(lowlevel.as_cupy(x)) * 3
    t = lowlevel.as_torch(z)
    return (t.sin() + x).sum(dim=1)


def _mixed_ref(x):
    x64 = x.cpu().double()
    return ((torch.tanh(x64) * 3).sin() + x64).sum(dim=1)


def test_runner_release_gives_every_byte_back_and_wakes_with_the_same_outputs():
    d = lowlevel.CudagraphDispatcher([1, 2, 4, 8, 16, 32], max_num_seqs=32)
    d.initialize_cudagraph_keys(M.FULL)
    static = torch.empty(32, 4096, device="cuda")
    static.copy_(torch.from_numpy(_fresh((32, 4096), 5)))
    r0 = _clean_reserved()
    cp0 = cp.get_default_memory_pool().total_bytes()
    r = lowlevel.CUDAGraphRunner(_mixed_fn, M.FULL)
    make = lambda desc: (static[: desc.num_tokens],)  # noqa: E731
    assert r.capture_all(d, make) == 6
    mem = r.memory()
    assert mem["torch_bytes"] > 0 and mem["cupy_bytes"] > 0 and mem["graphs"] == 6
    assert len(mem["per_graph"]) == 6 and sum(b.total for b in mem["per_graph"].values()) > 0
    assert torch.cuda.memory_reserved() - r0 == mem["torch_bytes"]  # warm-ups reserved nothing outside the pool
    st = r.last_capture
    assert st.graphs == 6 and st.updated == 0 and st.total_s >= st.warmup_s + st.capture_s + st.instantiate_s
    from lowlevel.info import format_graph_memory, graph_memory

    print(format_graph_memory(graph_memory(r)))
    before = {}
    for n in (1, 3, 8, 17, 32):
        mode, desc = d.dispatch(n)
        out = r(mode, desc, static[: desc.num_tokens], num_tokens=n)
        before[n] = out[:n].cpu()
        torch.testing.assert_close(before[n].double(), _mixed_ref(static[:n]), rtol=1e-5, atol=1e-3)
    del out
    r.release()  # sleep
    assert r.graphs == {} and r.pool.cupy_bytes() == 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() == r0
    assert r.pool.torch_bytes() == 0
    assert cp.get_default_memory_pool().total_bytes() == cp0
    assert r.capture_all(d, make) == 6  # wake
    assert r.last_capture.updated == 6, "same topology: every graph updated in place"
    for n in (1, 3, 8, 17, 32):
        mode, desc = d.dispatch(n)
        out = r(mode, desc, static[: desc.num_tokens], num_tokens=n)
        assert torch.equal(out[:n].cpu(), before[n])
    del out
    r.clear()  # forget the graphs, keep the pool's memory
    assert r.graphs == {} and r.pool.torch_bytes() > 0
    mode, desc = d.dispatch(5)
    out = r(mode, desc, static[: desc.num_tokens], num_tokens=5)
    assert r.captures == 13
    torch.testing.assert_close(out[:5].cpu(), _mixed_fn(static[:8])[:5].cpu(), rtol=1e-6, atol=1e-5)
    del out
    r.release(keep_execs=False)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() == r0


def test_graph_close_and_garbage_collection_free_an_owned_pool():
    import gc
    import weakref

    x = torch.empty(1 << 20, device="cuda")
    x.copy_(torch.from_numpy(_fresh(x.numel(), 1)))
    r0 = _clean_reserved()
    with lowlevel.capture() as g:  # owns its pool
        y = torch.sin(x) * 2 + 1
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, torch.sin(x) * 2 + 1)
    assert torch.cuda.memory_reserved() > r0
    del y
    g.close()
    assert not g.captured
    with pytest.raises(RuntimeError, match="cannot be replayed"):
        g.replay()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() == r0
    # the garbage-collection path: the finalizer frees the instantiated graph, the pool goes too
    with lowlevel.capture() as g2:
        y = torch.cos(x) + 1
    box, ref = g2._box, weakref.ref(g2)
    assert box.handle
    del g2, y
    gc.collect()
    assert ref() is None and box.handle == 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() == r0


def test_pool_release_refuses_while_a_graph_can_replay():
    pool = lowlevel.GraphPool()
    x = torch.randn(1024, device="cuda")
    with lowlevel.capture(pool=pool) as g:
        y = x * 2
    with pytest.raises(RuntimeError, match="still be replayed"):
        pool.release()
    g.close()
    del y
    pool.release()


def _f1(x):
    return torch.sin(x) * 2 + x.cos()


def _f2(x):  # another topology: more kernels
    return (torch.sin(x) * 2 + x.cos()).exp() + x


def test_recapture_updates_in_place_and_equals_a_fresh_capture():
    n = 1 << 18
    a, b = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
    a.copy_(torch.from_numpy(_fresh(n, 1)))
    b.copy_(torch.from_numpy(_fresh(n, 2)))
    pool = lowlevel.GraphPool()
    with lowlevel.capture(pool=pool) as g:
        out_a = _f1(a)
    handle, t_inst = g._box.handle, g.instantiate_s
    assert not g.updated
    with lowlevel.capture(pool=pool, update=g) as g_again:  # same kernels, new pointers
        out_b = _f1(b)
    assert g_again is g and g.updated and g._box.handle == handle
    with lowlevel.capture(pool=pool) as fresh:
        out_f = _f1(b)
    print(f"instantiate {t_inst * 1e6:.0f} us, update {g.instantiate_s * 1e6:.0f} us")
    for seed in range(3, 6):
        b.copy_(torch.from_numpy(_fresh(n, seed)))
        out_a.fill_(7.0)
        out_b.fill_(float("nan"))
        out_f.fill_(float("nan"))
        g.replay()
        fresh.replay()
        torch.cuda.synchronize()
        assert torch.equal(out_b, out_f)
        torch.testing.assert_close(out_b, _f1(b))
        assert bool((out_a == 7.0).all()), "the updated graph no longer writes the old output"


def test_refused_update_falls_back_to_instantiation():
    n = 1 << 16
    a = torch.empty(n, device="cuda")
    pool = lowlevel.GraphPool()
    with lowlevel.capture(pool=pool) as g:
        out1 = _f1(a)
    handle = g._box.handle
    with lowlevel.capture(pool=pool, update=g) as g2:
        out2 = _f2(a)
    assert g2 is g and not g.updated and g._box.handle and g._box.handle != handle
    for seed in range(2):
        a.copy_(torch.from_numpy(_fresh(n, seed)))
        out2.fill_(float("nan"))
        out1.fill_(7.0)
        g.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out2, _f2(a))
        assert bool((out1 == 7.0).all())
    # a failed re-capture leaves the graph as it was
    with pytest.raises(lowlevel.CaptureError), lowlevel.capture(pool=pool, update=g):
        _f1(a)
        raise RuntimeError("boom")
    a.copy_(torch.from_numpy(_fresh(n, 9)))
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out2, _f2(a))


def test_estimate_memory_then_capture_all_with_progress():
    d = lowlevel.CudagraphDispatcher([1, 2, 4, 8, 16, 32, 64], max_num_seqs=64)
    d.initialize_cudagraph_keys(M.FULL)
    static = torch.empty(64, 8192, device="cuda")
    static.copy_(torch.from_numpy(_fresh((64, 8192), 3)))

    def fn(x):
        return (torch.sin(x) * 2 + 1).cumsum(dim=1)

    make = lambda desc: (static[: desc.num_tokens],)  # noqa: E731
    r = lowlevel.CUDAGraphRunner(fn, M.FULL)
    r0 = _clean_reserved()
    est = r.estimate_memory(d, make, sample=2)
    assert r.graphs == {} and r.captures == 0 and r._pool is None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() == r0  # the throwaway pool is gone
    assert r.capture_all(d, make, progress=True) == 7
    actual = r.memory()["total_bytes"]
    print(f"estimate {est.total_bytes / 2**20:.1f} MiB (first {est.first_bytes / 2**20:.1f}, "
          f"then {est.per_token_bytes / 2**10:.1f} KiB a token), actual {actual / 2**20:.1f} MiB")
    assert est.graphs == 7 and est.sampled == 2
    assert 0.5 * actual <= est.total_bytes <= 8 * actual
    for n in (64, 5, 1):
        mode, desc = d.dispatch(n)
        out = r(mode, desc, static[: desc.num_tokens])
        torch.cuda.synchronize()
        torch.testing.assert_close(out, fn(static[: desc.num_tokens]))


def test_weak_outputs_share_memory_and_stay_correct_until_the_next_replay():
    d = lowlevel.CudagraphDispatcher([8, 16, 32, 64], max_num_seqs=64)
    d.initialize_cudagraph_keys(M.FULL)
    static = torch.empty(64, 1 << 17, device="cuda")
    static.copy_(torch.from_numpy(_fresh((64, 1 << 17), 4)))

    def fn(x):
        return torch.sin(x)  # no temporaries: a 32 MiB output at 64 rows, 60 MiB for all four kept

    make = lambda desc: (static[: desc.num_tokens],)  # noqa: E731
    strong = lowlevel.CUDAGraphRunner(fn, M.FULL)
    weak = lowlevel.CUDAGraphRunner(fn, M.FULL, weak_outputs=True)
    strong.capture_all(d, make)
    weak.capture_all(d, make)
    s_mem, w_mem = strong.memory()["torch_bytes"], weak.memory()["torch_bytes"]
    print(f"outputs kept: {s_mem / 2**20:.0f} MiB, weak outputs: {w_mem / 2**20:.0f} MiB")
    assert w_mem < s_mem
    for n in (64, 9, 33, 8, 64):
        static.copy_(torch.from_numpy(_fresh((64, 1 << 17), n)))
        mode, desc = d.dispatch(n)
        out = weak(mode, desc, static[: desc.num_tokens])
        torch.cuda.synchronize()
        torch.testing.assert_close(out, fn(static[: desc.num_tokens]))


def test_workspace_aliasing_and_allocating_outside_the_pool():
    """A buffer allocated in a capture after a temporary was freed can take the temporary's
    block: replays then overwrite it. One allocated under ``pool.outside()`` never does."""
    import torch

    n = 1 << 22  # 16 MiB of fp32: the allocator's large-block path
    x = torch.randn(n, device="cuda")
    results = {}
    for outside in (False, True):
        pool = lowlevel.GraphPool()
        with lowlevel.capture(pool=pool) as g:
            t = x * 3.0  # a temporary of the capture
            tmp_ptr = t.data_ptr()
            y = t + 1.0
            del t
            if outside:
                with pool.outside():
                    state = torch.empty(n, device="cuda")
                    cstate = cp.empty(n, dtype=cp.float32)
            else:
                state = torch.empty(n, device="cuda")
        torch.cuda.synchronize()
        fill = float(np.random.default_rng().integers(1, 1000))
        state.fill_(fill)
        x.copy_(torch.randn(n, device="cuda"))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, x * 3.0 + 1.0)  # the graph's own output is right either way
        results[outside] = (state.data_ptr() == tmp_ptr, bool((state == fill).all()))
        if outside:
            assert results[outside] == (False, True), "a buffer allocated outside the pool was overwritten"
            assert cstate.data.mem.size >= n * 4
            assert cstate.data.ptr not in range(tmp_ptr, tmp_ptr + n * 4)
        g.close()
    aliased, intact = results[False]
    # The hazard itself (allocator behaviour, true of torch's graphs too): when the block is
    # shared, the replay rewrote the buffer.
    assert (not aliased) or not intact
