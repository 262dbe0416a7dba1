"""CPU tier of fork/join: fallback, exact enqueue order with logging fakes, validation, CpuGpuEvent."""
import threading
import time

import pytest

import lowlevel


def test_sequential_pair_preserves_results_and_order():
    order = []
    r = lowlevel.maybe_execute_in_parallel(lambda: order.append(1) or 1, lambda: order.append(2) or 2, None, None)
    assert r == (1, 2) and order == [1, 2]


def test_sequential_fanout_ignores_events_and_streams():
    order = []

    def f(i):
        return lambda: order.append(i) or i * 10

    d, aux = lowlevel.execute_in_parallel(f(1), [f(2), None, f(3)], None, [])
    assert (d, aux, order) == (10, [20, None, 30], [1, 2, 3])
    order.clear()
    # enable=False with streams given is still sequential, and nothing is validated
    d, aux = lowlevel.execute_in_parallel(f(1), [f(2)], None, [], aux_streams=["bogus", "x"], enable=False)
    assert (d, aux, order) == (10, [20], [1, 2])


class FakeEvent:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def record(self, stream=None):
        self.log.append(f"{self.name}.record@{stream}")

    def wait(self, stream=None):
        self.log.append(f"{self.name}.wait@{stream}")


class FakeCupyStream:
    """Logs being made current: "<name>.enter" for an aux stream, "exit->main" for the caller's."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def use(self):
        self.log.append("exit->main" if self.name == "main" else f"{self.name}.enter")


class FakeStream(lowlevel.Stream):
    """A Stream without a GPU: a handle, a name, and a CuPy stream object that logs."""

    log: list = []

    def __init__(self, name, ptr):
        self.name, self.ptr = name, ptr
        self._torch_key = (ptr, 0, 1)

    @property
    def _cupy(self):
        return FakeCupyStream(self.name, FakeStream.log)


@pytest.fixture
def fake_switch(monkeypatch):
    """Fakes of the runtime layer (one module): torch's and CuPy's current-stream calls and the
    current handle. The stream switch itself, inlined or not, runs as written."""
    from lowlevel import _runtime as rt

    log = []
    torch_current = [("main-key",)]
    monkeypatch.setattr(rt, "current_handle", lambda: 1)
    monkeypatch.setattr(rt, "torch_get_current", lambda dev: torch_current[0])
    monkeypatch.setattr(rt, "torch_set_current", lambda *key: torch_current.__setitem__(0, key))
    monkeypatch.setattr(rt, "cupy_get_current", lambda: FakeCupyStream("main", log))
    FakeStream.log = log
    yield log
    assert torch_current[0] == ("main-key",), "torch's current stream was not restored"


def _fn(log, name, result=None):
    def f():
        log.append(name)
        return result if result is not None else f"{name}-result"
    return f


@pytest.mark.parametrize("default_first", [False, True])
def test_enqueue_order_one_slot(fake_switch, default_first):
    log = fake_switch
    start, done = FakeEvent("start", log), FakeEvent("done", log)
    d, aux = lowlevel.execute_in_parallel(_fn(log, "default"), [_fn(log, "aux")], start, [done],
                                          [FakeStream("aux", 7)], True, enqueue_default_first=default_first)
    assert (d, aux) == ("default-result", ["aux-result"])
    body = ["aux.enter", "start.wait@7", "aux", "done.record@7", "exit->main"]
    if default_first:
        expected = ["start.record@1", "default"] + body + ["done.wait@1"]
    else:
        expected = ["start.record@1"] + body + ["default", "done.wait@1"]
    assert log == expected


def test_enqueue_order_with_none_slots(fake_switch):
    log = fake_switch
    start = FakeEvent("start", log)
    done = [FakeEvent(f"done{i}", log) for i in range(4)]
    streams = [FakeStream(f"s{i}", 10 + i) for i in range(4)]
    d, aux = lowlevel.execute_in_parallel(_fn(log, "default"), [None, _fn(log, "a1"), None, _fn(log, "a3")],
                                          start, done, streams, True)
    assert aux == [None, "a1-result", None, "a3-result"]
    assert log == ["start.record@1",
                   "s1.enter", "start.wait@11", "a1", "done1.record@11",
                   "s3.enter", "start.wait@13", "a3", "done3.record@13",
                   "exit->main", "default", "done1.wait@1", "done3.wait@1"]


def test_all_none_slots_still_record_start_and_never_switch(fake_switch):
    log = fake_switch
    d, aux = lowlevel.execute_in_parallel(_fn(log, "default"), [None, None], FakeEvent("start", log),
                                          [FakeEvent("d0", log), FakeEvent("d1", log)],
                                          [FakeStream("s0", 3), FakeStream("s1", 4)], True)
    assert aux == [None, None]
    assert log == ["start.record@1", "default"]


def test_pair_enqueue_order(fake_switch):
    log = fake_switch
    r = lowlevel.maybe_execute_in_parallel(_fn(log, "fn0"), _fn(log, "fn1"), FakeEvent("e0", log),
                                           FakeEvent("e1", log), FakeStream("aux", 5))
    assert r == ("fn0-result", "fn1-result")
    assert log == ["e0.record@1", "fn0", "aux.enter", "e0.wait@5", "fn1", "e1.record@5", "exit->main",
                   "e1.wait@1"]


@pytest.mark.parametrize("where", ["aux0", "aux1", "default"])
def test_exception_joins_forked_streams_and_restores(fake_switch, where):
    log = fake_switch

    def boom():
        log.append("boom")
        raise KeyError(where)

    fns = {"aux0": _fn(log, "a0"), "aux1": _fn(log, "a1"), "default": _fn(log, "default")}
    fns[where] = boom
    done = [FakeEvent("d0", log), FakeEvent("d1", log)]
    with pytest.raises(KeyError):
        lowlevel.execute_in_parallel(fns["default"], [fns["aux0"], fns["aux1"]], FakeEvent("start", log), done,
                                     [FakeStream("s0", 20), FakeStream("s1", 21)], True)
    assert log.count("exit->main") == 1  # the current streams were restored exactly once
    if where == "aux0":
        assert "d0.record@20" in log and log[-1] == "d0.wait@1"
        assert "s1.enter" not in log
    elif where == "aux1":
        assert log[-2:] == ["d0.wait@1", "d1.wait@1"]
        assert log.index("d1.record@21") > log.index("boom")
    else:
        assert log[-2:] == ["d0.wait@1", "d1.wait@1"]


def test_pair_exception_joins(fake_switch):
    log = fake_switch

    def boom():
        raise RuntimeError("fn1 failed")

    with pytest.raises(RuntimeError, match="fn1 failed"):
        lowlevel.maybe_execute_in_parallel(_fn(log, "fn0"), boom, FakeEvent("e0", log), FakeEvent("e1", log),
                                           FakeStream("aux", 5))
    assert log[-3:] == ["exit->main", "e1.record@5", "e1.wait@1"]


def test_length_mismatch_is_a_value_error(fake_switch):
    log = fake_switch
    with pytest.raises(ValueError, match="same length"):
        lowlevel.execute_in_parallel(lambda: 0, [lambda: 1, lambda: 2], FakeEvent("s", log), [FakeEvent("d", log)],
                                     [FakeStream("a", 1), FakeStream("b", 2)], True)
    with pytest.raises(ValueError, match="same length"):
        lowlevel.execute_in_parallel(lambda: 0, [lambda: 1], FakeEvent("s", log), [FakeEvent("d", log)],
                                     [FakeStream("a", 1), FakeStream("b", 2)], True)
    assert log == []  # validation happens before anything is recorded


# --- CpuGpuEvent with a fake device event -------------------------------------------------

class RecEvent:
    made = []

    def __init__(self):
        self.records, self.waits = [], []
        RecEvent.made.append(self)

    def record(self, stream=None):
        self.records.append(stream)

    def wait(self, stream=None):
        self.waits.append(stream)


def test_cpu_gpu_event_wait_blocks_until_record():
    ev = lowlevel.CpuGpuEvent(RecEvent)
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("r", ev.wait("consumer")))
    th.start()
    time.sleep(0.05)
    assert th.is_alive(), "wait returned before record"
    ev.record("producer")
    th.join(5)
    assert out["r"] is True and not ev.is_recorded()
    assert ev._event.records == ["producer"] and ev._event.waits == ["consumer"]


def test_cpu_gpu_event_double_record_raises_and_fresh_events():
    RecEvent.made.clear()
    ev = lowlevel.CpuGpuEvent(RecEvent)
    ev.record()
    with pytest.raises(RuntimeError, match="consumed"):
        ev.record()
    assert ev.wait(timeout=1) is True
    for _ in range(8):  # reuse cycles, each with a fresh device event
        ev.record()
        assert ev.wait(timeout=1)
    assert len(RecEvent.made) == 9 and len({id(e) for e in RecEvent.made}) == 9


def test_cpu_gpu_event_stop_event_and_timeout():
    ev = lowlevel.CpuGpuEvent(RecEvent)
    stop = threading.Event()
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("r", ev.wait(stop_event=stop)))
    th.start()
    time.sleep(0.02)
    stop.set()
    th.join(2)
    assert not th.is_alive() and out["r"] is False
    t0 = time.monotonic()
    assert ev.wait(timeout=0.05) is False
    assert ev.wait(timeout=0.05, stop_event=threading.Event()) is False
    assert 0.09 <= time.monotonic() - t0 < 2
    with pytest.raises(ValueError):
        ev.wait(timeout=-1)
    ev.record()  # a record after a stopped wait is still consumable
    assert ev.wait(stop_event=stop) is True  # record wins over an already-set stop


def test_parallel_runner_validates():
    with pytest.raises(ValueError, match="num_aux"):
        lowlevel.ParallelRunner(0)
