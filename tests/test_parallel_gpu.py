"""GPU tier of fork/join and CpuGpuEvent."""
import threading
import time

import numpy as np
import pytest

import lowlevel
from lowlevel.testing import spin, spin_triton

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
cp = pytest.importorskip("cupy")


def _events(n):
    return lowlevel.Event(), [lowlevel.Event() for _ in range(n)]


@pytest.mark.parametrize("kind", ["lowlevel", "torch", "cupy"])
def test_parallel_equals_sequential_mixed_frameworks(kind):
    x = torch.randn(512, 256, device="cuda", dtype=torch.float64)
    w = torch.randn(256, 128, device="cuda", dtype=torch.float64)
    xc = lowlevel.as_cupy(x)

    def default():
        return x @ w

    def aux_torch():
        return x * 2

    def aux_cupy():
        return cp.tanh(xc) + 1

    def aux_triton():
        out = torch.ones(64, device="cuda")
        spin_triton(out, 1000)
        return out

    if kind == "lowlevel":
        streams = [lowlevel.Stream() for _ in range(4)]
        start, done = _events(4)
    elif kind == "torch":
        streams = [torch.cuda.Stream() for _ in range(4)]
        start, done = torch.cuda.Event(), [torch.cuda.Event() for _ in range(4)]
    else:
        streams = [cp.cuda.Stream(non_blocking=True) for _ in range(4)]
        start, done = cp.cuda.Event(), [cp.cuda.Event() for _ in range(4)]
    fns = [aux_torch, None, aux_cupy, aux_triton]
    d_seq, a_seq = lowlevel.execute_in_parallel(default, fns, None, [])
    cur = torch.cuda.current_stream().cuda_stream
    d_par, a_par = lowlevel.execute_in_parallel(default, fns, start, done, streams, True)
    assert torch.cuda.current_stream().cuda_stream == cur
    torch.cuda.synchronize()
    torch.testing.assert_close(d_par, x @ w, rtol=0, atol=0)
    torch.testing.assert_close(d_par, d_seq, rtol=0, atol=0)
    torch.testing.assert_close(a_par[0], a_seq[0], rtol=0, atol=0)
    assert a_par[1] is None
    np.testing.assert_allclose(cp.asnumpy(a_par[2]), np.tanh(x.cpu().numpy()) + 1, rtol=1e-12)
    torch.testing.assert_close(a_par[3], a_seq[3])


def test_aux_work_runs_on_aux_stream_for_every_framework():
    streams = [lowlevel.Stream() for _ in range(3)]
    start, done = _events(3)
    seen = []

    def probe(name):
        def f():
            seen.append((name, torch.cuda.current_stream().cuda_stream, cp.cuda.get_current_stream().ptr))
        return f

    lowlevel.execute_in_parallel(probe("default"), [probe("a"), probe("b"), probe("c")], start, done, streams, True)
    cur = torch.cuda.current_stream().cuda_stream
    assert seen[-1][1] == cur
    for (name, t, c), s in zip(seen[:3], streams):
        assert t == s.ptr and c == s.ptr, name


def test_real_overlap_beats_sequential():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    streams = [lowlevel.Stream()]
    start, done = _events(1)
    ns = 50_000_000
    half = max(1, sms // 2)

    def run(enable):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        lowlevel.execute_in_parallel(lambda: spin(ns, blocks=half), [lambda: spin(ns, blocks=half)], start, done,
                                     streams, enable)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(True)
    seq, par = run(False), run(True)
    assert seq > 0.095 and par < 0.075, (seq, par)


def test_join_orders_later_work_after_aux():
    s = lowlevel.Stream()
    start, done = _events(1)
    n = 1 << 22
    src = torch.randn(n, device="cuda")
    dst = torch.full((n,), -1.0, device="cuda")

    def aux():
        spin(30_000_000)
        dst.copy_(src)

    lowlevel.execute_in_parallel(lambda: None, [aux], start, done, [s], True)
    y = dst.clone()  # on the current stream, after the join
    torch.cuda.synchronize()
    assert torch.equal(y, src)


def test_fork_waits_for_work_before_the_call():
    s = lowlevel.Stream()
    start, done = _events(1)
    n = 1 << 22
    src = torch.randn(n, device="cuda")
    buf = torch.full((n,), -1.0, device="cuda")
    spin(30_000_000)  # current stream busy, then the write the aux fn must see
    buf.copy_(src)
    _, (got,) = lowlevel.execute_in_parallel(lambda: None, [lambda: buf.clone()], start, done, [s], True)
    torch.cuda.synchronize()
    assert torch.equal(got, src)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("framework", ["torch", "cupy"])
def test_lifetime_17_93(framework, nested):
    """Aux returns 16 MiB of 17s; the consumer reads it late and drops the reference; the aux
    stream then allocates 16 MiB of 93s. Without protection the read sees 93s."""
    n = 4 << 20  # 16 MiB of float32
    aux = lowlevel.Stream()
    start, done = _events(1)
    cur = torch.cuda.current_stream().cuda_stream

    def produce():
        if framework == "torch":
            v = torch.full((n,), 17.0, device="cuda")
        else:
            v = cp.full((n,), 17.0, dtype=cp.float32)
        return {"output": (v,)} if nested else v

    cp.full((8,), 1.0, dtype=cp.float32).copy()  # CuPy compiles its fill and copy kernels outside the timed part
    torch.cuda.synchronize()
    _, (res,) = lowlevel.execute_in_parallel(lambda: None, [produce], start, done, [aux], True)
    val = res["output"][0] if nested else res
    torch.cuda._sleep(400_000_000)  # the consumer stream is busy (~0.2 s) ...
    copied = lowlevel.as_torch(val).clone() if framework == "torch" else val.copy()  # ... then reads
    ptr = val.data_ptr() if framework == "torch" else val.data.ptr
    del res, val
    with lowlevel.use_stream(aux):
        repl = torch.full((n,), 93.0, device="cuda") if framework == "torch" else cp.full((n,), 93.0, dtype=cp.float32)
    consumer_pending = not lowlevel.Stream.from_external(cur).query()
    torch.cuda.synchronize()
    assert consumer_pending
    assert float(copied.min()) == 17.0 and float(copied.max()) == 17.0
    assert float(repl.min()) == 93.0
    assert torch.cuda.current_stream().cuda_stream == cur
    if framework == "cupy":
        from lowlevel.lifetime import default_keep_alive

        def held():  # this test's array only: arrays other tests still hold may stay pending
            return any(item[0].data.ptr == ptr for item in list(default_keep_alive._items))

        deadline = time.monotonic() + 5
        while held() and time.monotonic() < deadline:
            default_keep_alive.collect()
        assert not held()  # released once nobody holds it and the consumer's reads are done


def test_exception_on_gpu_joins_and_restores():
    s = lowlevel.Stream()
    start, done = _events(1)
    n = 1 << 22
    src = torch.randn(n, device="cuda")
    dst = torch.full((n,), -1.0, device="cuda")
    cur_t, cur_c = torch.cuda.current_stream().cuda_stream, cp.cuda.get_current_stream().ptr

    def aux():
        spin(30_000_000)
        dst.copy_(src)
        raise ValueError("aux failed after enqueueing")

    with pytest.raises(ValueError):
        lowlevel.execute_in_parallel(lambda: None, [aux], start, done, [s], True)
    assert torch.cuda.current_stream().cuda_stream == cur_t and cp.cuda.get_current_stream().ptr == cur_c
    y = dst.clone()
    torch.cuda.synchronize()
    assert torch.equal(y, src)  # the forked stream was joined back


@pytest.mark.parametrize("fanout", [False, True])
def test_graph_capture_and_replay(fanout):
    src = torch.empty(1024, device="cuda")
    runner = lowlevel.ParallelRunner(2)
    e0, e1 = lowlevel.Event(), lowlevel.Event()
    aux_s = lowlevel.Stream()

    def step():
        def main():
            return src * 3

        def aux():
            return {"value": src + 1}

        if fanout:
            m, (a, none) = runner(main, [aux, None])
            assert none is None
        else:
            m, a = lowlevel.maybe_execute_in_parallel(main, aux, e0, e1, aux_s)
        return m + a["value"] - src  # = 3*src + 1

    src.fill_(1.0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    if fanout:
        assert runner.capture_event_sets == 1
    for v in (3.0, 17.0, -5.0):
        src.fill_(v)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, torch.full_like(out, v * 3 + 1)), v


def test_cpu_gpu_event_waits_block_and_order():
    ev = lowlevel.CpuGpuEvent()
    consumer = lowlevel.Stream()
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("r", ev.wait(consumer)))
    th.start()
    time.sleep(0.05)
    assert th.is_alive()
    ev.record()
    th.join(5)
    assert out["r"] is True


def test_cpu_gpu_event_1000_rounds_without_stale_read():
    """Producer (main thread) writes round i into a buffer on its stream and records; the
    consumer thread waits on its stream, copies, then hands back a 'consumed' event."""
    rounds = 1000
    produced, consumed = lowlevel.CpuGpuEvent(), lowlevel.CpuGpuEvent()
    ps, cs = lowlevel.Stream(), lowlevel.Stream()
    buf = torch.zeros(1 << 16, device="cuda")
    results = torch.full((rounds,), -1.0, device="cuda")
    errors = []

    def consumer():
        try:
            with lowlevel.use_stream(cs):
                for i in range(rounds):
                    assert produced.wait(timeout=30)
                    results[i] = buf[-1]  # read after the producer's write
                    consumed.record()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    th = threading.Thread(target=consumer)
    th.start()
    with lowlevel.use_stream(ps):
        for i in range(rounds):
            if i:
                assert consumed.wait(timeout=30)  # do not overwrite before the read
            if i % 100 == 0:
                spin(1_000_000)
            buf.fill_(float(i + 1))
            produced.record()
    th.join(60)
    assert not errors, errors
    torch.cuda.synchronize()
    assert torch.equal(results.cpu(), torch.arange(1, rounds + 1, dtype=torch.float32))
