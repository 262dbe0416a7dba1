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
    with pytest.raises(lowlevel.CaptureError, match="exception in the captured block"):
        with lowlevel.capture(stream=s):
            y = x * 2
            raise RuntimeError("user code failed")
    assert not s.is_capturing()
    with pytest.raises(lowlevel.CaptureError):
        with lowlevel.capture(stream=s):
            y = x * 2
            torch.cuda.synchronize()  # illegal during capture
    assert not s.is_capturing()
    assert torch.cuda.current_stream().cuda_stream != s.ptr
    with lowlevel.capture(stream=s) as g:
        y = x * 3
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, x * 3)
    with pytest.raises(ValueError):
        with lowlevel.capture(mode="bogus"):
            pass
    with pytest.raises(TypeError):
        with lowlevel.capture(pool=object()):
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
