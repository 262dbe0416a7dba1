"""CPU tier of microbatch overlap: ring order, hooks, no-op helpers, generators, abort paths."""
import threading

import pytest

import lowlevel
from lowlevel import ubatch_ring as ring
from lowlevel import ubatching as ub


class FakeStream(lowlevel.Stream):
    """A Stream without a GPU: a handle and a name."""

    def __init__(self, name, ptr):
        self.name, self.ptr = name, ptr


class FakeCudaEvent:
    def __init__(self, ptr):
        self.ptr = ptr


@pytest.fixture
def fakes(monkeypatch):
    """Fakes of the runtime layer (one module): events, the stream switch and stream ordering
    log by stream name; the thread-local ``tl.cur`` is the stream made current last."""
    from lowlevel import _runtime as rt

    log = []
    names = {1: "compute", 2: "comm"}
    tl = threading.local()
    count = iter(range(1000, 10**6))
    monkeypatch.setattr(rt, "create_event", lambda **kw: FakeCudaEvent(next(count)))
    monkeypatch.setattr(rt, "event_record", lambda ev, stream: log.append(("record", names.get(stream, stream))))
    monkeypatch.setattr(rt, "stream_wait_event",
                        lambda stream, ev, flags: log.append(("wait", names.get(stream, stream))))
    monkeypatch.setattr(rt, "save", lambda: "prev")
    monkeypatch.setattr(rt, "restore", lambda prev: None)

    def switch(s):
        tl.cur = s.name

    monkeypatch.setattr(rt, "make_current", switch)
    monkeypatch.setattr(rt, "order", lambda producer, consumer: log.append(
        ("join", names.get(producer, producer), names.get(consumer, consumer))))
    return log, tl


def _run_threads(n, body, timeout=10):
    compute, comm = FakeStream("compute", 1), FakeStream("comm", 2)
    barrier = threading.Barrier(n + 1)
    ctxs = lowlevel.make_ubatch_contexts(n, compute, comm, barrier, timeout_s=timeout)
    errors = [None] * n

    def worker(i):
        try:
            with ctxs[i]:
                body(i, ctxs[i])
        except BaseException as e:
            errors[i] = e

    ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in ts:
        t.start()
    barrier.wait(timeout)
    ring.start_ubatches(ctxs)
    for t in ts:
        t.join(timeout)
    assert not any(t.is_alive() for t in ts), "a microbatch thread hung"
    return ctxs, errors


@pytest.mark.parametrize("n", [2, 3, 4])
def test_ring_order(fakes, n):
    log, tl = fakes
    order = []

    def body(i, ctx):
        for stage in range(3):
            order.append((i, stage, tl.cur))
            if stage == 0:
                ub.dbo_yield_and_switch_from_compute_to_comm()
            elif stage == 1:
                ub.dbo_yield_and_switch_from_comm_to_compute()
        assert ub.dbo_current_ubatch_id() == i and ub.dbo_enabled()

    ctxs, errors = _run_threads(n, body)
    assert errors == [None] * n
    # one microbatch runs Python at a time, in ring order, and each stage is on the right stream
    expected = [(i, 0, "compute") for i in range(n)] + [(i, 1, "comm") for i in range(n)] + \
               [(i, 2, "compute") for i in range(n)]
    assert order == expected
    # compute->comm: record on compute, then the comm stream waits (after the CPU yield)
    assert log.count(("record", "compute")) == n and log.count(("wait", "comm")) == n
    assert log.count(("record", "comm")) == n and log.count(("wait", "compute")) == n
    assert not ub.dbo_enabled() and ring.active_ubatch_contexts() == {}


def test_sync_switches_and_plain_switches(fakes):
    log, tl = fakes
    seen = []

    def body(i, ctx):
        ub.dbo_switch_to_comm_sync()
        seen.append((i, tl.cur))
        ub.dbo_switch_to_compute_sync()
        seen.append((i, tl.cur))
        ub.dbo_switch_to_comm()
        seen.append((i, tl.cur))
        ub.dbo_yield()  # resumes on the same stream
        seen.append((i, tl.cur))
        ub.dbo_switch_to_compute()

    _run_threads(2, body)
    assert seen == [(0, "comm"), (0, "compute"), (0, "comm"), (1, "comm"), (1, "compute"), (1, "comm"),
                    (0, "comm"), (1, "comm")]


def test_recv_hooks_go_to_the_next_microbatch(fakes):
    ran = []

    def body(i, ctx):
        ub.dbo_register_recv_hook(lambda i=i: ran.append((f"hook from {i}", ub.dbo_current_ubatch_id())))
        ub.dbo_yield()
        ub.dbo_maybe_run_recv_hook()

    _run_threads(2, body)
    # 0's hook runs in 1 at its maybe_run; 1's hook runs in 0 when 0 resumes
    assert sorted(ran) == [("hook from 0", 1), ("hook from 1", 0)]


def test_helpers_are_noops_outside_microbatches():
    assert not ub.dbo_enabled() and ub.dbo_current_ubatch_id() == 0
    for f in (ub.dbo_yield, ub.dbo_yield_and_switch_from_compute_to_comm, ub.dbo_yield_and_switch_from_comm_to_compute,
              ub.dbo_switch_to_comm, ub.dbo_switch_to_compute, ub.dbo_switch_to_comm_sync,
              ub.dbo_switch_to_compute_sync, ub.dbo_maybe_run_recv_hook):
        assert f() is None
    ub.dbo_register_recv_hook(lambda: pytest.fail("must not run"))


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("fail_at", [0, 1, 2, 3])
def test_abort_at_every_yield_point(fakes, n, fail_at):
    """Microbatch 1 raises at its k-th switch point; nobody hangs, the others get UBatchAbort."""
    def body(i, ctx):
        for k in range(3):
            if i == 1 and k == fail_at:
                raise KeyError(f"boom at {k}")
            [ub.dbo_yield, ub.dbo_yield_and_switch_from_compute_to_comm,
             ub.dbo_yield_and_switch_from_comm_to_compute][k]()
        if i == 1 and fail_at == 3:
            raise KeyError("boom at exit")

    ctxs, errors = _run_threads(n, body, timeout=10)
    assert isinstance(errors[1], KeyError)
    assert isinstance(ring.first_ubatch_error(ctxs), KeyError)
    for i in range(n):
        if i != 1:
            assert errors[i] is None or isinstance(errors[i], lowlevel.UBatchAbort)
    assert ring.active_ubatch_contexts() == {}


def test_make_contexts_validates():
    with pytest.raises(ValueError):
        lowlevel.make_ubatch_contexts(1, FakeStream("a", 1), FakeStream("b", 2))


def test_generator_scheduler_order(fakes):
    log, tl = fakes
    order = []

    def mb(i):
        order.append((i, "attn", tl.cur))
        yield lowlevel.TO_COMM
        order.append((i, "dispatch", tl.cur))
        yield lowlevel.TO_COMPUTE
        order.append((i, "mlp", tl.cur))
        return i * 10

    res = lowlevel.run_generators([mb(0), mb(1)], FakeStream("compute", 1), FakeStream("comm", 2))
    assert res == [0, 10]
    assert order == [(0, "attn", "compute"), (1, "attn", "compute"), (0, "dispatch", "comm"),
                     (1, "dispatch", "comm"), (0, "mlp", "compute"), (1, "mlp", "compute")]
    assert ("join", "comm", "compute") in log
    order.clear()
    res = lowlevel.run_generators([mb(0), mb(1), mb(2)], FakeStream("compute", 1), FakeStream("comm", 2),
                                  stage_offset=2)
    # microbatch 1 starts after two steps of microbatch 0, microbatch 2 after four
    assert [o[:2] for o in order[:4]] == [(0, "attn"), (0, "dispatch"), (1, "attn"), (0, "mlp")]
    assert res == [0, 10, 20]


def test_generator_exception_closes_the_others(fakes):
    closed = []

    def good():
        try:
            yield lowlevel.TO_COMM
            yield lowlevel.TO_COMPUTE
        finally:
            closed.append("good")

    def bad():
        yield lowlevel.TO_COMM
        raise ValueError("bad microbatch")

    with pytest.raises(ValueError, match="bad microbatch"):
        lowlevel.run_generators([good(), bad()], FakeStream("compute", 1), FakeStream("comm", 2))
    assert closed == ["good"]
    with pytest.raises(ValueError, match="expected"):
        lowlevel.run_generators([(x for x in ["sideways"])], FakeStream("compute", 1), FakeStream("comm", 2))


def test_parked_workers_run_each_job_on_the_same_threads_and_report_hangs():
    from lowlevel.ubatch_runner import _Workers

    w = _Workers(3)
    seen = []
    for step in range(5):
        out = [None] * 3
        w.submit([lambda i=i: out.__setitem__(i, (threading.current_thread().name, step * 10 + i)) for i in range(3)])
        assert w.wait(5.0) == []
        assert [v for _, v in out] == [step * 10 + i for i in range(3)]
        seen.append(tuple(name for name, _ in out))
    assert len(set(seen)) == 1 and len(set(seen[0])) == 3  # the same three threads every step
    release = threading.Event()
    w.submit([lambda: None, lambda: release.wait(10), lambda: None])
    assert w.wait(0.3) == ["ubatch-1"]
    release.set()
    w.close()
    for t in w.threads:
        t.join(2.0)
    assert not any(t.is_alive() for t in w.threads)


class FakeRun:
    """``run(k)`` for :func:`lowlevel.find_sm_split`: per-k times, the first call of each k
    (the warm-up) returning ``warm`` (huge: it must not count); every call logged."""

    def __init__(self, times, warm=1e6, noise=None):
        self.times, self.warm, self.noise, self.calls = times, warm, noise or {}, []

    def __call__(self, k):
        nth = sum(1 for c in self.calls if c == k)
        self.calls.append(k)
        if nth == 0:
            return self.warm
        extra = self.noise.get(k, [0.0])
        return self.times[k] + extra[(nth - 1) % len(extra)]


def test_find_sm_split_picks_the_fastest_median_after_a_warm_up():
    run = FakeRun({0: 4.15, 8: 3.9, 16: 3.7, 24: 3.61, 32: 3.65},
                  noise={24: [0.0, 5.0, 0.0, 0.0, 0.0]})  # one outlier: the median ignores it
    best, table = lowlevel.find_sm_split(run, [0, 8, 16, 24, 32], reps=5)
    assert best == 24
    assert list(table) == [0, 8, 16, 24, 32]
    assert table == pytest.approx({0: 4.15, 8: 3.9, 16: 3.7, 24: 3.61, 32: 3.65})
    # each k: one warm-up then reps calls, in the order given
    assert run.calls == [k for k in (0, 8, 16, 24, 32) for _ in range(6)]
    best, table = lowlevel.find_sm_split(FakeRun({5: 2.0, 7: 1.0}), (7, 5), reps=1, warmup=3)
    assert best == 7 and list(table) == [7, 5]  # order kept; warm-ups (3 each) ignored


def test_comm_sm_candidates_keep_the_compute_waves():
    # 256 tiles on 132 SMs: 2 waves on 128 programs (k 4), 3 on 86 (k 46), 4 on 64 (k 68)
    assert lowlevel.comm_sm_candidates(256, 132, max_comm=131) == [4, 46, 68]
    assert lowlevel.comm_sm_candidates(256, 132) == [4, 46, 66]  # at most half the SMs: 66 still 4 waves
    assert lowlevel.comm_sm_candidates(1024, 132, extra_waves=3) == [4, 18, 29, 38]
    assert lowlevel.comm_sm_candidates(384, 132, extra_waves=0) == [4]
    assert lowlevel.comm_sm_candidates(100, 132) == [32, 66]  # 1 wave needs 100 SMs; 66 gives 2 waves
    assert lowlevel.comm_sm_candidates(64, 132) == [66]  # any share up to half keeps 1 wave
    assert lowlevel.comm_sm_candidates(132, 132, max_comm=0) == []
    assert lowlevel.comm_sm_candidates(8, 132, max_comm=131, extra_waves=10**9) == [124, 128, 129, 130, 131]
    assert lowlevel.comm_sm_candidates(10**9, 132, extra_waves=10**9) == list(range(1, 67))  # at once
    # brute force: each k is the largest share <= max_comm with its wave count; waves increase
    for total in (1, 7, 132):
        for units in (1, 7, 131, 132, 133, 1000, 4097):
            for mc in (0, 3, total // 2, total - 1):
                ks = lowlevel.comm_sm_candidates(units, total, max_comm=mc, extra_waves=4)
                waves = [-(-units // (total - k)) for k in ks]
                assert waves == sorted(set(waves)) and all(0 < k <= mc for k in ks)
                for k, w in zip(ks, waves):
                    assert k == mc or -(-units // (total - k - 1)) > w  # one more comm SM costs a wave
    with pytest.raises(ValueError, match="units"):
        lowlevel.comm_sm_candidates(0, 132)
    with pytest.raises(TypeError, match="total_sms"):
        lowlevel.comm_sm_candidates(10, 132.0)
    with pytest.raises(ValueError, match="extra_waves"):
        lowlevel.comm_sm_candidates(10, 132, extra_waves=-1)


def test_find_sm_split_ties_go_to_the_smallest_k():
    run = FakeRun({32: 2.0, 16: 2.0, 0: 3.0, 8: 2.0})
    best, table = lowlevel.find_sm_split(run, [32, 16, 0, 8], reps=3)
    assert best == 8 and table[32] == table[16] == table[8] == 2.0
    import numpy as np

    best, _ = lowlevel.find_sm_split(lambda k: np.float32(1.5), np.array([4, 2], dtype=np.int64), reps=2)
    assert best == 2 and type(best) is int


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"run": None}, TypeError, "run must be callable"),
    ({"candidates": []}, ValueError, "candidates must hold at least one"),
    ({"candidates": [0, -8]}, ValueError, r"candidates\[1\]"),
    ({"candidates": [0, 1.5]}, TypeError, r"candidates\[1\]"),
    ({"candidates": [True]}, TypeError, r"candidates\[0\]"),
    ({"candidates": "08"}, TypeError, "candidates must be an iterable of ints"),
    ({"candidates": 8}, TypeError, "candidates must be an iterable of ints"),
    ({"candidates": [8, 8]}, ValueError, "must not repeat"),
    ({"reps": 0}, ValueError, "reps"),
    ({"reps": 2.0}, TypeError, "reps"),
    ({"warmup": -1}, ValueError, "warmup"),
])
def test_find_sm_split_refuses_bad_arguments_before_running(kwargs, exc, match):
    calls = []
    args = {"run": lambda k: calls.append(k) or 1.0, "candidates": [0, 16]}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        lowlevel.find_sm_split(args.pop("run"), args.pop("candidates"), **args)
    assert calls == []


@pytest.mark.parametrize("value, exc", [(float("nan"), ValueError), (float("inf"), ValueError),
                                        (-0.5, ValueError), (None, TypeError), ("1.0", TypeError),
                                        (True, TypeError)])
def test_find_sm_split_refuses_a_bad_time_naming_k(value, exc):
    def run(k):
        return value if k == 16 else 1.0

    with pytest.raises(exc, match=r"run\(16\)"):  # a measured call
        lowlevel.find_sm_split(run, [0, 16], reps=2, warmup=0)
    calls = []

    def bad_warm_up(k):
        calls.append(k)
        return value if len(calls) == 1 else 1.0

    with pytest.raises(exc, match=r"run\(16\)"):  # the warm-up's result is checked too
        lowlevel.find_sm_split(bad_warm_up, [16], reps=1, warmup=1)
    assert calls == [16]
