"""CPU tier of the host fast paths. Exactly-typed lowlevel Events and Streams take inline paths
in execute_in_parallel, maybe_execute_in_parallel and use_stream; each must enqueue exactly what
the checked path enqueues (driven here with subclasses, which only the checked path takes),
return or raise the same, and leave the caller's streams current."""
import threading

import pytest

import lowlevel
from lowlevel import _runtime as rt
from lowlevel import parallel as par
from lowlevel import stream as stm

_CHECK_SLOTS, _MAYBE_CHECKED, _FORK_JOIN = par._check_slots, par._maybe_checked, par._fork_join


class _Cupy:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def use(self):
        self.log.append(("cupy", self.name))


class SubStream(lowlevel.Stream):
    __slots__ = ()


class SubEvent(lowlevel.Event):
    __slots__ = ()


def _stream(cls, name, ptr, log):
    s = cls.__new__(cls)
    s._cupy, s.ptr, s.device_id, s._torch, s._torch_key = _Cupy(name, log), ptr, 0, None, (ptr, 0, 1)
    return s


def _event(cls, ptr):
    e = cls.__new__(cls)
    e._cupy, e.ptr, e.timing = None, ptr, False
    return e


class Boom(Exception):
    pass


def _fake_runtime(monkeypatch, log):
    """Logging fakes of the runtime layer; returns torch's current key, in a one-element list."""
    torch_current = [(1, 0, 1)]

    def set_current(*key):
        log.append(("torch", key))
        torch_current[0] = key

    monkeypatch.setattr(rt, "current_handle", lambda: 1)
    monkeypatch.setattr(rt, "torch_get_current", lambda dev: torch_current[0])
    monkeypatch.setattr(rt, "torch_set_current", set_current)
    monkeypatch.setattr(rt, "cupy_get_current", lambda: _Cupy("main", log))
    monkeypatch.setattr(rt, "event_record", lambda ev, s: log.append(("record", ev, s)))
    monkeypatch.setattr(rt, "stream_wait_event", lambda s, ev, flags: log.append(("wait", ev, s)))
    monkeypatch.setattr(rt, "is_capturing", lambda h: False)
    monkeypatch.setattr(stm, "_adopted", {})  # adopt() caches by handle: no stream of an earlier run
    return torch_current


def _fns(n, none_slots, raise_at, log):
    def make(name):
        def f():
            log.append(("run", name))
            if name == raise_at:
                raise Boom(name)
            return None if name == "a1" else name
        return f
    return make("default"), [None if i in none_slots else make(f"a{i}") for i in range(n)]


def _one_path(monkeypatch, native, spy, real, make_call):
    """``make_call(native, log)()`` under the fake runtime, with ``par.<spy>`` (the entry of the
    checked path, really ``real``) noting when it runs: (its result, or ("raised", message) for
    a Boom, and the log). Asserts that torch's current stream was restored and that the fast
    path ran for lowlevel's own Stream/Event types (``native``), the checked one otherwise."""
    log: list = []
    current = _fake_runtime(monkeypatch, log)
    checked = []
    monkeypatch.setattr(par, spy, lambda *a: (checked.append(1), real(*a))[1])
    call = make_call(native, log)
    try:
        out = call()
    except Boom as e:
        out = ("raised", str(e))
    assert current[0] == (1, 0, 1), "torch's current stream was not restored"
    assert bool(checked) is not native, "the fast path was not taken" if native else "the checked path was not taken"
    return out, log


def _fork_join(monkeypatch, native, n, none_slots, raise_at, first):
    def make(native, log):
        scls, ecls = (lowlevel.Stream, lowlevel.Event) if native else (SubStream, SubEvent)
        streams = [_stream(scls, f"s{i}", 100 + i, log) for i in range(n)]
        start, done = _event(ecls, 10), [_event(ecls, 20 + i) for i in range(n)]
        default_fn, aux_fns = _fns(n, none_slots, raise_at, log)
        return lambda: lowlevel.execute_in_parallel(default_fn, aux_fns, start, done, streams, True,
                                                    enqueue_default_first=first)
    return _one_path(monkeypatch, native, "_check_slots", _CHECK_SLOTS, make)


@pytest.mark.parametrize("n,none_slots", [(0, ()), (1, ()), (1, (0,)), (2, ()), (2, (1,)), (3, (1,)),
                                          (4, (0, 2)), (4, ())])
@pytest.mark.parametrize("first", [False, True])
def test_fork_join_fast_path_enqueues_what_the_checked_path_does(monkeypatch, n, none_slots, first):
    names = ["default"] + [f"a{i}" for i in range(n) if i not in none_slots]
    for raise_at in [None, *names]:
        checked = _fork_join(monkeypatch, False, n, none_slots, raise_at, first)
        fast = _fork_join(monkeypatch, True, n, none_slots, raise_at, first)
        assert fast == checked, raise_at
        if raise_at is None and n - len(none_slots):  # something forked: start recorded, done waited
            assert checked[1][0] == ("record", 10, 1) and checked[1][-1][0] == "wait"


def test_fork_join_fast_path_refuses_what_the_checked_path_refuses(monkeypatch):
    log: list = []
    _fake_runtime(monkeypatch, log)
    s, e = _stream(lowlevel.Stream, "s", 100, log), _event(lowlevel.Event, 20)
    start = _event(lowlevel.Event, 10)
    with pytest.raises(TypeError, match=r"aux_fns\[0\]"):
        lowlevel.execute_in_parallel(lambda: 0, [3], start, [e], [s], True)
    with pytest.raises(ValueError, match="same length"):
        lowlevel.execute_in_parallel(lambda: 0, [lambda: 1], start, [e, e], [s], True)
    with pytest.raises(ValueError, match=r"done_events\[1\]"):
        lowlevel.execute_in_parallel(lambda: 0, [lambda: 1, lambda: 2], start, [e, None], [s, s], True)
    with pytest.raises(TypeError, match="CUDA stream"):
        lowlevel.execute_in_parallel(lambda: 0, [lambda: 1, lambda: 2], start, [e, e], [s, "x"], True)
    with pytest.raises(TypeError, match="default_fn"):
        lowlevel.execute_in_parallel(None, [lambda: 1], start, [e], [s], True)
    assert log == []  # nothing was recorded or made current


@pytest.mark.parametrize("raise_at", [None, "fn0", "fn1"])
def test_pair_fast_path_enqueues_what_the_checked_path_does(monkeypatch, raise_at):
    def make(native, log):
        scls, ecls = (lowlevel.Stream, lowlevel.Event) if native else (SubStream, SubEvent)

        def fn(name):
            def f():
                log.append(("run", name))
                if name == raise_at:
                    raise Boom(name)
                return name
            return f
        return lambda: lowlevel.maybe_execute_in_parallel(fn("fn0"), fn("fn1"), _event(ecls, 10), _event(ecls, 11),
                                                          _stream(scls, "aux", 100, log))
    runs = [_one_path(monkeypatch, native, "_maybe_checked", _MAYBE_CHECKED, make) for native in (False, True)]
    assert runs[0] == runs[1]
    if raise_at is None:
        assert runs[1][1] == [("record", 10, 1), ("run", "fn0"), ("cupy", "aux"), ("torch", (100, 0, 1)),
                              ("wait", 10, 100), ("run", "fn1"), ("record", 11, 100), ("torch", (1, 0, 1)),
                              ("cupy", "main"), ("wait", 11, 1)]


@pytest.mark.parametrize("n,none_slots", [(1, ()), (2, (0,)), (3, ())])
@pytest.mark.parametrize("raise_at", [None, "default", "a2"])
def test_runner_fast_path_enqueues_what_the_checked_path_does(monkeypatch, n, none_slots, raise_at):
    runners = []

    def make(native, log):
        r = lowlevel.ParallelRunner.__new__(lowlevel.ParallelRunner)
        r.streams = [_stream(lowlevel.Stream if native else SubStream, f"s{i}", 100 + i, log) for i in range(n)]
        r.num_aux, r._start, r._done = n, _event(lowlevel.Event, 10), [_event(lowlevel.Event, 20 + i) for i in range(n)]
        r._capture_events = []
        runners.append(r)
        default_fn, aux_fns = _fns(n, none_slots, raise_at, log)
        return lambda: r(default_fn, aux_fns)
    runs = [_one_path(monkeypatch, native, "_fork_join", _FORK_JOIN, make) for native in (False, True)]
    assert runs[0] == runs[1]
    r = runners[-1]
    with pytest.raises(ValueError, match="aux streams"):
        r(lambda: 0, [lambda: 1] * (n + 1))
    with pytest.raises(TypeError, match=r"aux_fns\[0\]"):
        r(lambda: 0, ["x"] * n)


# --- use_stream: saved streams in the object's slots, extra entries on per-thread stacks ------

@pytest.fixture
def switch(monkeypatch):
    """torch's and CuPy's current streams per thread, as names."""
    cur = threading.local()

    class Named:
        def __init__(self, name):
            self.name = name

        def use(self):
            cur.cupy = self.name

    def get():
        return getattr(cur, "torch", ("main",)), getattr(cur, "cupy", "main")

    monkeypatch.setattr(rt, "torch_get_current", lambda dev: get()[0])
    monkeypatch.setattr(rt, "torch_set_current", lambda *key: setattr(cur, "torch", key))
    monkeypatch.setattr(rt, "cupy_get_current", lambda: Named(get()[1]))

    def make(name, ptr):
        s = lowlevel.Stream.__new__(lowlevel.Stream)
        s._cupy, s.ptr, s.device_id, s._torch, s._torch_key = Named(name), ptr, 0, None, (ptr, 0, 1)
        return s
    yield make, get
    assert stm._nested == 0, "a stacked entry was left behind"


def test_use_stream_slots_then_stack_then_slots(switch):
    make, get = switch
    a, b = make("a", 7), make("b", 8)
    u = lowlevel.use_stream(a)
    for _ in range(2):  # the slots are free again after each use
        with u:
            assert get() == ((7, 0, 1), "a")
            with lowlevel.use_stream(b):
                with u:  # re-entered while active: stacked
                    assert get() == ((7, 0, 1), "a") and stm._nested == 1
                assert get() == ((8, 0, 1), "b") and stm._nested == 0
            assert get() == ((7, 0, 1), "a")
        assert get() == (("main",), "main")
    with pytest.raises(lowlevel.LowlevelError, match="without a matching __enter__"):
        u.__exit__(None, None, None)
    assert get() == (("main",), "main")


def test_use_stream_restores_on_exception_from_slots_and_stack(switch):
    make, get = switch
    u = lowlevel.use_stream(make("a", 7))
    with pytest.raises(Boom), u, u:
        raise Boom
    assert get() == (("main",), "main")


def test_use_stream_threads_share_one_object(switch):
    """Thread A holds the slots; thread B enters the same object (stacked) and exits after A."""
    make, get = switch
    u = lowlevel.use_stream(make("a", 7))
    b_entered, a_exited = threading.Event(), threading.Event()
    seen = []

    def other():
        with u:
            seen.append(get())
            b_entered.set()
            a_exited.wait(10)
        seen.append(get())

    t = threading.Thread(target=other)
    with u:
        t.start()
        assert b_entered.wait(10)
    assert get() == (("main",), "main")
    a_exited.set()
    t.join(10)
    assert seen == [((7, 0, 1), "a"), (("main",), "main")]


def test_use_stream_entry_that_fails_switching_torch_leaves_cupy_as_it_was(monkeypatch):
    log = []
    _fake_runtime(monkeypatch, log)

    def broken(*key):
        raise Boom("torch refused the stream")

    monkeypatch.setattr(rt, "torch_set_current", broken)
    s = _stream(lowlevel.Stream, "s", 7, log)
    u = lowlevel.use_stream(s)
    with pytest.raises(Boom):
        u.__enter__()
    assert log == [("cupy", "s"), ("cupy", "main")]  # switched, then switched back
    assert u._prev_torch is None  # the slots were not claimed: the object is usable again
