"""GPU tier of microbatch overlap: a toy layer (matmul -> comm stage -> matmul) microbatched
with threads and with generators, eager and replayed, against the non-microbatched result."""
import pytest

import lowlevel
from lowlevel import ubatching as ub

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
K = pytest.importorskip("lowlevel.kernels")

H = 256


@pytest.fixture(scope="module")
def weights():
    return torch.randn(H, H, device="cuda") / 16, torch.randn(H, H, device="cuda") / 16


def _thread_layer(w1, w2):
    def layer(i, x):
        h = K.matmul(x, w1, precision="ieee")
        c = torch.empty_like(h)  # allocated on the compute stream, written by the comm stage
        ub.dbo_yield_and_switch_from_compute_to_comm()
        with lowlevel.sm_limit(8):
            K.copy(h, c)  # the "communication" stage, SM-capped, on the comm stream
        c.mul_(2.0)
        ub.dbo_yield_and_switch_from_comm_to_compute()
        return K.matmul(c, w2, precision="ieee")
    return layer


def _gen_layer(w1, w2):
    def layer(i, x):
        h = K.matmul(x, w1, precision="ieee")
        c = torch.empty_like(h)
        yield lowlevel.TO_COMM
        with lowlevel.sm_limit(8):
            K.copy(h, c)
        c.mul_(2.0)
        yield lowlevel.TO_COMPUTE
        return K.matmul(c, w2, precision="ieee")
    return layer


def _ref(x, w1, w2):
    return ((x.double() @ w1.double()) * 2) @ w2.double()


@pytest.mark.parametrize("mode", ["threads", "generators"])
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("lens", [[300, 212], [100, 100, 312]])
def test_overlapped_equals_reference(weights, mode, graph, lens):
    w1, w2 = weights
    fn = _thread_layer(w1, w2) if mode == "threads" else _gen_layer(w1, w2)
    total = sum(lens)
    slices, _ = lowlevel.maybe_create_ubatch_slices(True, lens, total, len(lens))
    comm_sms = []
    ctl = lowlevel.SMControlContextManager(16, comm_sms.append, lambda n: None, total_sms=132)
    runner = lowlevel.UBatchRunner(fn, mode=mode, sm_control=ctl, timeout_s=30)
    x = torch.empty(total, H, device="cuda")
    for trial in range(3):
        x.copy_(torch.randn(total, H))
        out = runner([x], slices, graph=graph)
        torch.cuda.synchronize()
        assert out.shape == (total, H)
        torch.testing.assert_close(out.double(), _ref(x, w1, w2), rtol=1e-4, atol=1e-4)
    if graph:
        assert list(runner.graphs) == [tuple(s.num_tokens for s in slices)]  # keyed on all slice sizes
    assert comm_sms[:2] == [16, 132]


def test_three_microbatch_graph_keys_are_distinct(weights):
    w1, w2 = weights
    runner = lowlevel.UBatchRunner(_thread_layer(w1, w2), num_ubatches=3, timeout_s=30)
    x = torch.randn(300, H, device="cuda")
    a = [lowlevel.UBatchSlice(slice(0, 1), slice(0, 100)), lowlevel.UBatchSlice(slice(1, 2), slice(100, 200)),
         lowlevel.UBatchSlice(slice(2, 3), slice(200, 300))]
    b = [lowlevel.UBatchSlice(slice(0, 1), slice(0, 100)), lowlevel.UBatchSlice(slice(1, 2), slice(100, 150)),
         lowlevel.UBatchSlice(slice(2, 3), slice(150, 300))]
    runner([x], a, graph=True)
    out = runner([x], b, graph=True)  # same first two... totals differ only after slice 2 (vLLM #43145)
    torch.cuda.synchronize()
    assert len(runner.graphs) == 2
    torch.testing.assert_close(out.double(), _ref(x, w1, w2), rtol=1e-4, atol=1e-4)


def test_clear_frees_graphs_and_the_next_call_captures_again(weights):
    w1, w2 = weights
    runner = lowlevel.UBatchRunner(_gen_layer(w1, w2), mode="generators", timeout_s=30)
    x = torch.randn(512, H, device="cuda")
    slices, _ = lowlevel.maybe_create_ubatch_slices(True, [300, 212], 512, 2)
    first = runner([x], slices, graph=True)
    torch.testing.assert_close(first.double(), _ref(x, w1, w2), rtol=1e-4, atol=1e-4)
    (key, (g, _)), = runner.graphs.items()
    runner.clear()
    assert runner.graphs == {} and runner.pool.live_graphs() == []  # the instantiation is gone
    runner.clear()  # idempotent
    x.copy_(torch.randn(512, H))
    out = runner([x], slices, graph=True)  # captured again into a fresh output
    torch.cuda.synchronize()
    assert runner.graphs[key][0] is not g
    torch.testing.assert_close(out.double(), _ref(x, w1, w2), rtol=1e-4, atol=1e-4)


def test_gpu_abort_restores_streams(weights):
    w1, w2 = weights

    def bad(i, x):
        h = K.matmul(x, w1)
        ub.dbo_yield_and_switch_from_compute_to_comm()
        if i == 1:
            raise RuntimeError("microbatch 1 failed")
        ub.dbo_yield_and_switch_from_comm_to_compute()
        return h

    runner = lowlevel.UBatchRunner(bad, timeout_s=10)
    x = torch.randn(64, H, device="cuda")
    s = [lowlevel.UBatchSlice(slice(0, 1), slice(0, 32)), lowlevel.UBatchSlice(slice(1, 2), slice(32, 64))]
    cur = torch.cuda.current_stream().cuda_stream
    with pytest.raises(RuntimeError, match="microbatch 1 failed"):
        runner([x], s)
    assert torch.cuda.current_stream().cuda_stream == cur
    assert not ub.dbo_enabled()
    torch.cuda.synchronize()


def test_parked_threads_end_on_close_and_when_the_runner_is_dropped(weights):
    import gc

    w1, w2 = weights
    x = torch.randn(64, H, device="cuda")
    s = [lowlevel.UBatchSlice(slice(0, 1), slice(0, 32)), lowlevel.UBatchSlice(slice(1, 2), slice(32, 64))]
    runner = lowlevel.UBatchRunner(_thread_layer(w1, w2), timeout_s=30)
    runner([x], s)
    first = list(runner._workers.threads)
    runner([x], s)
    assert runner._workers.threads == first  # parked, not restarted
    runner.close()
    for t in first:
        t.join(2.0)
    assert not any(t.is_alive() for t in first)
    out = runner([x], s)  # a run after close starts new threads
    torch.cuda.synchronize()
    torch.testing.assert_close(out.double(), _ref(x, w1, w2), rtol=1e-4, atol=1e-4)
    second = list(runner._workers.threads)
    del runner, out
    gc.collect()
    for t in second:
        t.join(2.0)
    assert not any(t.is_alive() for t in second)


@pytest.mark.parametrize("mode", ["generators", "threads"])
def test_first_replay_follows_the_warm_up(weights, mode):
    """The call that captures runs the microbatches eagerly first (the warm-up, on the capture
    stream) and then replays the graph on the caller's stream: the replay, and what the caller
    enqueues after it, must follow the warm-up. Here the warm-up alone sleeps ~100 ms on the
    comm stream (nothing sleeps inside the capture), so a replay that does not wait for it
    finishes while the capture stream is still busy (the bug: two runs of every stage at once;
    it hung a cross-GPU collective). The output is checked too."""
    w1, w2 = weights
    cycles = 200_000_000  # ~100 ms at an H200's ~2 GHz

    def slow_warm_up(i, x):
        h = K.matmul(x, w1, precision="ieee")
        yield lowlevel.TO_COMM
        if not torch.cuda.is_current_stream_capturing():
            torch.cuda._sleep(cycles)  # only the eager warm-up is slow
        c = h * 2.0
        yield lowlevel.TO_COMPUTE
        return K.matmul(c, w2, precision="ieee")

    fn = slow_warm_up if mode == "generators" else ub.thread_fn_from_generator(slow_warm_up)
    runner = lowlevel.UBatchRunner(fn, mode=mode, timeout_s=30)
    x = torch.randn(256, H, device="cuda")
    slices, _ = lowlevel.maybe_create_ubatch_slices(True, [128, 128], 256, 2)
    torch.cuda.synchronize()
    out = runner([x], slices, graph=True)
    after = lowlevel.Event()
    after.record()  # on the caller's stream, after the replay
    after.synchronize()
    busy = not lowlevel.graphs.capture_stream().query() or not runner.comm_stream.query()
    torch.cuda.synchronize()
    assert not busy, "the first replay finished while the warm-up was still running"
    torch.testing.assert_close(out.double(), _ref(x, w1, w2), rtol=1e-4, atol=1e-4)
    runner.close()
