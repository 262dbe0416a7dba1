"""Boundary validation of the core and the runtimes (faults.md A, C), one table per kind.

Each bad value must raise the right class with a message that names the argument, before any
state changes. A good value of a type that used to be refused (a NumPy integer) must pass the
check: without a GPU such a call then stops at ``CudaUnavailableError``, which is how these
tests tell "validated and accepted" from "refused".
"""
from __future__ import annotations

import math
import threading

import numpy as np
import pytest

import lowlevel
from lowlevel import sm_control
from lowlevel.errors import CudaUnavailableError
from lowlevel.ubatch_slices import UBatchSlice

GPU = lowlevel.cuda_available()


def _fn():
    return None


def _gen():
    yield lowlevel.YIELD


# (entry point, argument name, callable taking the bad value)
INT_ARGS = [
    ("ParallelRunner", "num_aux", lambda v: lowlevel.ParallelRunner(v)),
    ("sm_limit", "n", lambda v: lowlevel.sm_limit(v)),
    ("set_num_sms", "num_sms", lambda v: lowlevel.set_num_sms(v)),
    ("SMControlContextManager", "comm_sms", lambda v: lowlevel.SMControlContextManager(v, _fn1, _fn1, total_sms=132)),
    ("SMControlContextManager", "total_sms", lambda v: lowlevel.SMControlContextManager(1, _fn1, _fn1, total_sms=v)),
    ("make_ubatch_contexts", "num_micro_batches", lambda v: lowlevel.make_ubatch_contexts(v, 1, 2)),
    ("run_generators", "stage_offset", lambda v: lowlevel.run_generators([], 1, 2, stage_offset=v)),
    ("UBatchRunner", "num_ubatches", lambda v: lowlevel.UBatchRunner(_fn, num_ubatches=v)),
    ("UBatchRunner", "stage_offset", lambda v: lowlevel.UBatchRunner(_fn, stage_offset=v)),
    ("sm_partition", "sm_counts[0]", lambda v: lowlevel.sm_partition([v])),
]


def _fn1(n):
    return None


@pytest.mark.parametrize("entry,arg,call", INT_ARGS, ids=[f"{e}-{a}" for e, a, _ in INT_ARGS])
@pytest.mark.parametrize("bad,exc", [("8", TypeError), (8.0, TypeError), (None, TypeError), (True, TypeError),
                                     (np.bool_(True), TypeError), (-3, ValueError)])
def test_int_arguments_refuse_non_ints(entry, arg, call, bad, exc):
    if bad is None and arg in ("num_sms", "total_sms"):
        pytest.skip(f"None means 'every SM' for {arg}")
    cap = sm_control.caps.global_cap
    with pytest.raises(exc) as info:
        call(bad)
    assert arg.split("[")[0] in str(info.value), f"{entry}: message does not name {arg}: {info.value}"
    assert sm_control.caps.global_cap == cap and sm_control.get_num_sms() == sm_control.get_num_sms()


@pytest.mark.parametrize("entry,arg,call", INT_ARGS, ids=[f"{e}-{a}" for e, a, _ in INT_ARGS])
def test_int_arguments_accept_numpy_integers(entry, arg, call):
    good = np.int64(16 if "sm" in arg or arg in ("n", "num_sms", "total_sms") else 2)
    try:
        r = call(good)
    except CudaUnavailableError:
        return  # validated, then stopped for want of a GPU
    except (TypeError, ValueError) as exc:
        assert arg not in str(exc), f"{entry} refused a NumPy integer for {arg}: {exc}"
    else:
        if entry == "set_num_sms":
            lowlevel.set_num_sms(None)
        del r


TIMEOUTS = [
    ("UBatchRunner", "timeout_s", lambda v: lowlevel.UBatchRunner(_fn, timeout_s=v)),
    ("make_ubatch_contexts", "timeout_s", lambda v: lowlevel.make_ubatch_contexts(2, 1, 2, timeout_s=v)),
]


@pytest.mark.parametrize("entry,arg,call", TIMEOUTS, ids=[e for e, _, _ in TIMEOUTS])
@pytest.mark.parametrize("bad,exc", [(-1, ValueError), (0, ValueError), (math.nan, ValueError),
                                     (math.inf, ValueError), (True, TypeError), ("5", TypeError)])
def test_timeouts_are_finite_positive_seconds(entry, arg, call, bad, exc):
    with pytest.raises(exc, match=arg):
        call(bad)


@pytest.mark.parametrize("bad,exc", [(-1, ValueError), (math.nan, ValueError), (True, TypeError), ("1", TypeError)])
def test_cpu_gpu_event_wait_timeout(bad, exc):
    ev = lowlevel.CpuGpuEvent(event_factory=lambda: None)
    with pytest.raises(exc, match="timeout"):
        ev.wait(timeout=bad)
    assert not ev.is_recorded()


CALLABLES = [
    ("execute_in_parallel", "default_fn", lambda v: lowlevel.execute_in_parallel(v, [], None, [])),
    ("execute_in_parallel", "aux_fns", lambda v: lowlevel.execute_in_parallel(_fn, v, None, [])),
    ("execute_in_parallel", "aux_fns[1]", lambda v: lowlevel.execute_in_parallel(_fn, [_fn, v], None, [])),
    ("maybe_execute_in_parallel", "fn0", lambda v: lowlevel.maybe_execute_in_parallel(v, _fn, None, None)),
    ("maybe_execute_in_parallel", "fn1", lambda v: lowlevel.maybe_execute_in_parallel(_fn, v, None, None)),
    ("UBatchRunner", "fn", lambda v: lowlevel.UBatchRunner(v)),
    ("CpuGpuEvent", "event_factory", lambda v: lowlevel.CpuGpuEvent(v)),
    ("SMControlContextManager", "set_comm_sms", lambda v: lowlevel.SMControlContextManager(1, v, _fn1, total_sms=8)),
    ("thread_fn_from_generator", "gen_fn", lambda v: lowlevel.thread_fn_from_generator(v)),
]


@pytest.mark.parametrize("entry,arg,call", CALLABLES, ids=[f"{e}-{a}" for e, a, _ in CALLABLES])
@pytest.mark.parametrize("bad", ["notfn", 3])
def test_callables_are_checked(entry, arg, call, bad):
    if arg == "aux_fns" and bad == 3:
        pass
    with pytest.raises(TypeError) as info:
        call(bad)
    assert arg in str(info.value)


def test_execute_in_parallel_none_aux_fns_names_the_argument():
    with pytest.raises(TypeError, match="aux_fns"):
        lowlevel.execute_in_parallel(_fn, None, None, [])


def test_execute_in_parallel_checks_the_parallel_path_before_enqueueing():
    calls = []

    def f():
        calls.append(1)

    with pytest.raises(ValueError, match="same length"):
        lowlevel.execute_in_parallel(f, [f], object(), [], aux_streams=[1], enable=True)
    with pytest.raises(TypeError, match="start_event"):
        lowlevel.execute_in_parallel(f, [f], None, [object()], aux_streams=[1], enable=True)
    with pytest.raises(ValueError, match=r"done_events\[0\]"):
        lowlevel.execute_in_parallel(f, [f], _Ev(), [None], aux_streams=[1], enable=True)
    with pytest.raises(TypeError, match="event"):
        lowlevel.execute_in_parallel(f, [f], _Ev(), ["not an event"], aux_streams=[1], enable=True)
    assert calls == []  # nothing ran


class _Ev:
    def record(self, stream=None):
        raise AssertionError("must not be recorded")

    def wait(self, stream=None):
        raise AssertionError("must not be waited on")


def test_ubatch_runner_mode_is_a_literal_choice():
    with pytest.raises(ValueError, match="mode") as info:
        lowlevel.UBatchRunner(_fn, mode="thread")
    assert "'threads'" in str(info.value) and "'generators'" in str(info.value)
    with pytest.raises(TypeError, match="mode"):
        lowlevel.UBatchRunner(_fn, mode=1)


def test_ubatch_runner_refuses_slices_outside_its_input(monkeypatch):
    """faults.md B: rows 4..20 of an 8-row input is refused, not silently truncated."""
    from lowlevel import ubatch_runner

    monkeypatch.setattr(ubatch_runner, "Stream", lambda: object())  # no GPU needed to build one
    r = lowlevel.UBatchRunner(_fn, comm_stream=None)
    x = np.arange(8 * 3).reshape(8, 3)
    with pytest.raises(ValueError, match=r"slices\[1\].*inputs\[0\] has 8 rows"):
        r([x], [UBatchSlice(slice(0, 1), slice(0, 4)), UBatchSlice(slice(1, 2), slice(4, 20))])
    with pytest.raises(ValueError, match="empty"):
        r([x], [UBatchSlice(slice(0, 1), slice(0, 4)), UBatchSlice(slice(1, 1), slice(4, 4))])
    with pytest.raises(TypeError, match=r"slices\[0\]"):
        r([x], [(0, 4), (4, 8)])
    with pytest.raises(ValueError, match="expected 2 slices"):
        r([x], [UBatchSlice(slice(0, 1), slice(0, 8))])
    with pytest.raises(TypeError, match="inputs"):
        r("abc", [UBatchSlice(slice(0, 1), slice(0, 4)), UBatchSlice(slice(1, 2), slice(4, 8))])
    assert r.graphs == {} and r._workers is None


def test_run_generators_refuses_generator_functions():
    with pytest.raises(TypeError, match=r"gens\[0\].*call the generator function"):
        lowlevel.run_generators([_gen], 1, 2)


def test_sm_limit_exit_without_entry_is_refused():
    lim = lowlevel.sm_limit(4)
    with pytest.raises(lowlevel.LowlevelError, match="without a matching __enter__"):
        lim.__exit__(None, None, None)
    with lim:  # the object still works afterwards, and re-entry nests
        with lim:
            assert sm_control._tls.stack[-2:] == [4, 4]
    assert not getattr(sm_control._tls, "stack", [])


class _Flaky:
    """set_*_sms callbacks that record what they were given and raise once on demand."""

    def __init__(self, log, name, fail_on=None):
        self.log, self.name, self.fail_on = log, name, fail_on

    def __call__(self, n):
        self.log.append((self.name, n))
        if n == self.fail_on:
            self.fail_on = None
            raise RuntimeError(f"{self.name} refused {n}")


def test_sm_control_restores_both_budgets_when_a_callback_raises():
    """faults.md C: compute raising on entry leaves comm capped today; comm raising on exit
    leaves compute capped today. Both must end at every SM, and the error must propagate."""
    log = []
    ctl = lowlevel.SMControlContextManager(16, _Flaky(log, "comm", None), _Flaky(log, "compute", 116),
                                           total_sms=132)
    with pytest.raises(RuntimeError, match="compute refused 116"), ctl:
        pytest.fail("the body must not run")
    assert log[-2:] == [("comm", 132), ("compute", 132)]
    log.clear()
    ctl = lowlevel.SMControlContextManager(16, _Flaky(log, "comm", 132), _Flaky(log, "compute"), total_sms=132)
    with pytest.raises(RuntimeError, match="comm refused 132"), ctl:
        pass
    assert log == [("comm", 16), ("compute", 116), ("comm", 132), ("compute", 132)]
    with pytest.raises(lowlevel.LowlevelError, match="without a matching __enter__"):
        ctl.__exit__(None, None, None)


def test_timeline_validates_names_and_times():
    tl = lowlevel.Timeline(enabled=False)
    with pytest.raises(TypeError, match="enabled"):
        lowlevel.Timeline(enabled="yes")
    with pytest.raises(TypeError, match="name"):
        lowlevel.Timeline().span(3)
    with pytest.raises(ValueError, match="end_ms"):
        tl.add("a", "t", 0.0, math.inf)
    with pytest.raises(ValueError, match="before it starts"):
        tl.add("a", "t", 2.0, 1.0)
    with pytest.raises(TypeError, match="start_ms"):
        tl.add("a", "t", "0", 1.0)
    assert tl.spans == []


def test_stream_handle_refuses_bool_and_unknown_objects():
    with pytest.raises(TypeError, match="bool"):
        lowlevel.stream_handle(True)
    with pytest.raises(TypeError, match="CUDA stream"):
        lowlevel.stream_handle("s")
    with pytest.raises(TypeError, match="bool"):
        lowlevel.use_stream(False)


def test_use_stream_reentry_restores_per_thread(monkeypatch):
    """faults.md C: ``u = use_stream(s); with u: with u: pass`` must leave the caller's streams
    current (the saved streams live on a per-thread stack)."""
    from lowlevel import _runtime as rt

    class FakeCupy:
        def __init__(self, name):
            self.name = name

        def use(self):
            cur.cupy = self.name

    class S(lowlevel.Stream):
        def __init__(self, name, ptr):
            self.ptr, self._torch_key, self._cupy = ptr, (ptr, 0, 1), FakeCupy(name)

    cur = threading.local()
    cur.torch, cur.cupy = ("main",), "main"
    monkeypatch.setattr(rt, "torch_get_current", lambda dev: cur.torch)
    monkeypatch.setattr(rt, "torch_set_current", lambda *key: setattr(cur, "torch", key))
    monkeypatch.setattr(rt, "cupy_get_current", lambda: FakeCupy(cur.cupy))
    u = lowlevel.use_stream(S("s", 7))
    with u:
        with u:
            assert (cur.torch, cur.cupy) == ((7, 0, 1), "s")
        assert (cur.torch, cur.cupy) == ((7, 0, 1), "s")
    assert (cur.torch, cur.cupy) == (("main",), "main")
    seen = []

    def other():
        cur.torch, cur.cupy = ("other",), "other"
        with u:
            seen.append((cur.torch, cur.cupy))
        seen.append((cur.torch, cur.cupy))

    with u:
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen == [((7, 0, 1), "s"), (("other",), "other")]
    assert (cur.torch, cur.cupy) == (("main",), "main")


@pytest.mark.skipif(GPU, reason="checks the message without a GPU")
def test_no_gpu_entry_points_raise_cuda_unavailable():
    for call in (lambda: lowlevel.Stream(), lambda: lowlevel.Event(), lambda: lowlevel.ParallelRunner(1),
                 lambda: lowlevel.current_stream()):
        with pytest.raises(CudaUnavailableError):
            call()


# --- inputs found by trying the library as a new user (same kinds as faults.md A-C) ----------

def test_dispatch_refuses_lora_counts_out_of_the_declared_range():
    """Every LoRA count in [1, max_loras + 1] has a captured count >= it (max_loras + 1 is
    captured), so vLLM's "no captured count >= n: the lookup misses" case is only reached by a
    count out of the declared range (session 4 changed it from NONE to ValueError)."""
    d = lowlevel.CudagraphDispatcher(max_num_seqs=256, max_loras=2)
    d.initialize_cudagraph_keys(lowlevel.CUDAGraphMode.FULL_AND_PIECEWISE)
    assert d.dispatch(5, has_lora=True, num_active_loras=3)[0] is lowlevel.CUDAGraphMode.PIECEWISE
    for bad in (100, -2):
        with pytest.raises(ValueError, match="num_active_loras"):
            d.dispatch(5, has_lora=True, num_active_loras=bad)


def test_batch_descriptor_refuses_more_requests_than_tokens():
    with pytest.raises(ValueError, match="num_reqs"):
        lowlevel.BatchDescriptor(8, 16)
    assert lowlevel.BatchDescriptor(8, 8).num_reqs == 8


def test_post_process_dp_table_checks_its_table():
    ok = np.array([[5, 9], [8, 16], [0, 0], [1, 1], [2, 2]])
    assert lowlevel.post_process_dp_table(ok, 2) == (False, [16, 16], 2, True)
    with pytest.raises(ValueError, match="padded"):
        lowlevel.post_process_dp_table(np.array([[5, 9], [1, 1], [1, 1], [1, 1], [2, 2]]), 2)
    with pytest.raises(ValueError, match="num_ubatches"):
        lowlevel.post_process_dp_table(ok, 1)
    with pytest.raises(TypeError, match="num_ubatches"):
        lowlevel.post_process_dp_table(ok, True)
    with pytest.raises(TypeError, match="table"):
        lowlevel.post_process_dp_table(np.array([[5, 9], [8, 16]]), 2)
    with pytest.raises(ValueError, match="flags"):
        lowlevel.post_process_dp_table(np.array([[5, 9], [8, 16], [2, 0], [1, 1], [2, 2]]), 2)


def test_check_ubatch_thresholds_checks_its_arguments():
    cfg = lowlevel.DPConfig(2, 0, enable_microbatching=True)
    assert lowlevel.check_ubatch_thresholds(cfg, 64, True) is True
    for args, exc, word in [(("cfg", 8, True), TypeError, "config"), ((None, 8, True), TypeError, "config"),
                            ((cfg, -1, True), ValueError, "num_tokens"), ((cfg, 8.0, True), TypeError, "num_tokens"),
                            ((cfg, True, True), TypeError, "num_tokens"), ((cfg, 8, 1), TypeError, "uniform_decode")]:
        with pytest.raises(exc, match=word):
            lowlevel.check_ubatch_thresholds(*args)


def test_dp_config_refuses_what_would_fail_at_the_first_collective():
    with pytest.raises(ValueError, match="timeout_s"):
        lowlevel.DPConfig(2, 0, timeout_s=1e10)
    with pytest.raises(TypeError, match="group"):
        lowlevel.DPConfig(2, 0, group="x")
    if not GPU:
        with pytest.raises(CudaUnavailableError, match="use_device_collective"):
            lowlevel.DPConfig(2, 0, use_device_collective=True)
    assert lowlevel.DPConfig(2, 0, timeout_s=3e6).timeout_s == 3e6


def test_use_stream_exit_without_entry_is_refused():
    u = lowlevel.use_stream.__new__(lowlevel.use_stream)
    with pytest.raises(lowlevel.LowlevelError, match="without a matching __enter__"):
        u.__exit__(None, None, None)
    t = threading.Thread(target=lambda: errors.append(_exit_error(u)))
    errors: list = []
    t.start()
    t.join()
    assert errors == ["LowlevelError"]


def _exit_error(u):
    try:
        u.__exit__(None, None, None)
    except Exception as exc:  # noqa: BLE001 - the class is what is checked
        return type(exc).__name__
    return None


@pytest.mark.parametrize("call,exc,word", [
    (lambda: lowlevel.Stream(priority="x"), TypeError, "priority"),
    (lambda: lowlevel.Stream(priority=1.5), TypeError, "priority"),
    (lambda: lowlevel.Stream(non_blocking="x"), TypeError, "non_blocking"),
    (lambda: lowlevel.ParallelRunner(2, priority="high"), TypeError, "priority"),
    (lambda: lowlevel.capture(stream="x").__enter__(), TypeError, "stream"),
    (lambda: lowlevel.sm_partition([8], device="0"), TypeError, "device"),
    (lambda: lowlevel.sm_partition([8], device=-1), ValueError, "device"),
    (lambda: lowlevel.device_sm_count("0"), TypeError, "device"),
    (lambda: lowlevel.stream_handle(-1), ValueError, "handle"),
    (lambda: lowlevel.start_ubatches([]), TypeError, "contexts"),
    (lambda: lowlevel.start_ubatches(["x"]), TypeError, "contexts"),
    (lambda: lowlevel.abort_ubatches(None), TypeError, "contexts"),
    (lambda: lowlevel.first_ubatch_error(None), TypeError, "contexts"),
    (lambda: lowlevel.merge_traces({"traceEvents": []}), TypeError, "traces"),
    (lambda: lowlevel.Timeline().plot(5), TypeError, "path"),
    (lambda: lowlevel.dbo_register_recv_hook("x"), TypeError, "hook"),
    (lambda: lowlevel.execute_in_parallel(_fn, [], None, [], enable=1), TypeError, "enable"),
    (lambda: lowlevel.execute_in_parallel(_fn, [], None, [], enqueue_default_first=1), TypeError,
     "enqueue_default_first"),
    (lambda: lowlevel.thread_fn_from_generator(lambda: 5)(), TypeError, "generator"),
])
def test_arguments_are_checked_before_the_gpu_is_needed(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


def test_stream_handle_accepts_numpy_integers():
    assert lowlevel.stream_handle(np.int64(5)) == 5 and type(lowlevel.stream_handle(np.int64(5))) is int


def test_ubatch_runner_refuses_overlapping_slices_and_non_bool_graph(monkeypatch):
    from lowlevel import ubatch_runner

    monkeypatch.setattr(ubatch_runner, "Stream", lambda: object())
    r = lowlevel.UBatchRunner(_fn)
    x = np.arange(8 * 3).reshape(8, 3)
    with pytest.raises(ValueError, match="tile the batch"):
        r([x], [UBatchSlice(slice(0, 1), slice(0, 6)), UBatchSlice(slice(1, 2), slice(4, 8))])
    with pytest.raises(TypeError, match="graph"):
        r([x], [UBatchSlice(slice(0, 1), slice(0, 4)), UBatchSlice(slice(1, 2), slice(4, 8))], graph=1)


# --- session 4 fresh-user faults ---------------------------------------------------------------

M = lowlevel.CUDAGraphMode


def _dispatcher(max_loras=0, mode=M.PIECEWISE):
    d = lowlevel.CudagraphDispatcher(max_num_seqs=8, max_loras=max_loras)
    if mode is not None:
        d.initialize_cudagraph_keys(mode)
    return d


@pytest.mark.parametrize("make,n", [(lambda: _dispatcher(), 100), (lambda: _dispatcher(mode=None), 5),
                                    (lambda: _dispatcher(mode=M.NONE), 5), (lambda: _dispatcher(), 5)])
@pytest.mark.parametrize("modes", [{"invalid_modes": [0]}, {"valid_modes": {M.PIECEWISE, M.FULL}}])
def test_dispatch_excluding_none_raises_wherever_none_would_be_returned(make, n, modes):
    d = make()
    memo = dict(d._memo)
    if n == 5 and d.keys_initialized and d.cudagraph_mode is M.PIECEWISE:
        assert d.dispatch(n, **modes)[0] is M.PIECEWISE  # inside the ladder a graph exists
        return
    with pytest.raises(ValueError, match="exclude NONE"):
        d.dispatch(n, **modes)
    assert d._memo == memo


def test_dispatch_refuses_lora_out_of_the_declared_range():
    d = _dispatcher(max_loras=2)
    assert d.dispatch(5, has_lora=True, num_active_loras=3) == (M.PIECEWISE, lowlevel.BatchDescriptor(8, None, False,
                                                                                                      True, 3))
    with pytest.raises(ValueError, match=r"num_active_loras must be at most max_loras \+ 1 = 3.*got 5"):
        d.dispatch(5, has_lora=True, num_active_loras=5)
    with pytest.raises(ValueError, match="num_active_loras"):
        d.dispatch(5, has_lora=True, num_active_loras=np.int64(4))
    with pytest.raises(ValueError, match="has_lora must be False.*max_loras=0"):
        _dispatcher().dispatch(5, has_lora=True)
    with pytest.raises(ValueError, match="has_lora"):
        _dispatcher(mode=None).dispatch(5, has_lora=np.bool_(True), num_active_loras=1)
    assert (5, False, True, 5) not in d._memo


class _FakeGraph:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


@pytest.mark.parametrize("desc", [[1], (8, 8), "x", None, 8])
@pytest.mark.parametrize("path", ["capture", "bypass", "disabled", "num_tokens"])
def test_graph_runner_desc_must_be_a_batch_descriptor_on_every_path(desc, path):
    calls = []
    r = lowlevel.CUDAGraphRunner(lambda *a: calls.append(a))
    mode, kw = M.FULL, {}
    if path == "bypass":
        mode = M.NONE
    elif path == "disabled":
        r.capturing_enabled = False
    elif path == "num_tokens":
        kw = {"num_tokens": 1}
    with pytest.raises(TypeError, match=r"desc must be a BatchDescriptor, got .*\(" + type(desc).__name__):
        r(mode, desc, **kw)
    assert calls == [] and (r.hits, r.captures, r.bypasses, r.padded_tokens) == (0, 0, 0, 0) and r.graphs == {}


def test_graph_runner_hit_path_replays_a_valid_descriptor():
    r = lowlevel.CUDAGraphRunner(lambda *a: None)
    g = _FakeGraph()
    bd = lowlevel.BatchDescriptor(8, 8)
    r.graphs[bd] = (g, "out")
    assert r(M.FULL, bd, num_tokens=np.int64(5)) == "out" and g.replays == 1
    assert (r.hits, r.padded_tokens) == (1, 3)
    with pytest.raises(ValueError, match="num_tokens"):
        r(M.FULL, bd, num_tokens=9)
    assert (r.hits, g.replays) == (1, 1)
    as_tuple = tuple(bd)  # equal to the key and hashing like it: still no BatchDescriptor
    assert as_tuple == bd and as_tuple in r.graphs
    for kw in ({}, {"num_tokens": 5}):
        with pytest.raises(TypeError, match="desc must be a BatchDescriptor, got .*tuple"):
            r(M.FULL, as_tuple, **kw)
    assert (r.hits, g.replays, r.padded_tokens) == (1, 1, 3)


def test_bool_arguments_accept_numpy_bools_and_refuse_ints():
    r = lowlevel.CUDAGraphRunner(_fn, weak_outputs=np.bool_(True))
    assert r.weak_outputs is True
    for bad in (1, 0, None, "True"):
        with pytest.raises(TypeError, match="weak_outputs must be a bool"):
            lowlevel.CUDAGraphRunner(_fn, weak_outputs=bad)
        with pytest.raises(TypeError, match="keep_execs must be a bool"):
            r.release(keep_execs=bad)
    r.release(keep_execs=np.bool_(False))
    d = _dispatcher(mode=M.FULL)
    r2 = lowlevel.CUDAGraphRunner(_fn)
    with pytest.raises(TypeError, match="progress must be a bool"):
        r2.capture_all(d, lambda desc: (), progress=1)
    r2.graphs.update({bd: (_FakeGraph(), None) for _, ds in d.get_capture_descs() for bd in ds})
    assert r2.capture_all(d, lambda desc: (), progress=np.bool_(True)) == 0  # all captured: nothing to do
    with pytest.raises(TypeError, match="enqueue_default_first"):
        lowlevel.ParallelRunner.__new__(lowlevel.ParallelRunner)(_fn, [], enqueue_default_first=1)
    from lowlevel import testing
    with pytest.raises(TypeError, match="whole_sm"):
        testing.spin(10, whole_sm=1)


@pytest.mark.parametrize("split,want", [(np.array([4, 8]), [4, 8]), ([np.int64(4), 8], [4, 8]),
                                        (np.array([4, 8], dtype=np.uint8), [4, 8]), (np.int64(4), [4, 8]),
                                        (np.array(4), [4, 8])])
def test_split_point_accepts_1d_integer_arrays_and_numpy_scalars(split, want):
    s, _ = lowlevel.maybe_create_ubatch_slices(True, np.array([4, 4, 4, 4]), 16, 4, 3, split_point=split)
    assert [x.token_slice.start for x in s[1:]] == want and s[-1].token_slice.stop == 16
    s, _ = lowlevel.maybe_create_ubatch_slices(True, [4, 4], 8, 2, split_point=np.array([3]))  # size 1, 1-D
    assert s[1].token_slice == slice(3, 8)


@pytest.mark.parametrize("split,exc", [(np.array([4.0, 8.0]), TypeError), (np.array([[4, 8]]), TypeError),
                                       (np.array(4.0), TypeError), (np.array([4, 8, 12]), ValueError),
                                       (np.array([8, 4]), ValueError), (17, ValueError), ([4, 17], ValueError)])
def test_split_point_refuses_bad_arrays_and_points_past_the_tokens(split, exc):
    with pytest.raises(exc, match="split_point"):
        lowlevel.maybe_create_ubatch_slices(True, np.array([4, 4, 4, 4]), 16, 4, 3 if np.ndim(split) else 2,
                                            split_point=split)


def test_split_point_at_the_total_gives_an_all_padding_last_slice_that_the_runner_refuses(monkeypatch):
    s, p = lowlevel.maybe_create_ubatch_slices(True, [4, 4], 16, 2)  # default 16 // 2 = 8 = the total
    assert s[1].token_slice == slice(8, 8) and s[1].is_empty() and p[1].token_slice == slice(8, 16)
    from lowlevel import ubatch_runner

    monkeypatch.setattr(ubatch_runner, "Stream", lambda: object())
    ran = []
    r = lowlevel.UBatchRunner(lambda *a: ran.append(a))
    with pytest.raises(ValueError, match="empty microbatch"):
        r([np.zeros((16, 2))], s)
    assert ran == []


def test_ubatch_runner_refuses_slices_not_starting_at_row_0(monkeypatch):
    from lowlevel import ubatch_runner

    monkeypatch.setattr(ubatch_runner, "Stream", lambda: object())
    ran = []
    r = lowlevel.UBatchRunner(lambda *a: ran.append(a))
    x = np.arange(8 * 3).reshape(8, 3)
    with pytest.raises(ValueError, match=r"from row 0: slices\[0\] starts at row 2"):
        r([x], [UBatchSlice(slice(0, 1), slice(2, 4)), UBatchSlice(slice(1, 2), slice(4, 8))])
    assert ran == [] and r.graphs == {}


@pytest.mark.parametrize("call,exc,word", [
    (lambda: lowlevel.ParallelRunner(streams=5), TypeError, "streams must be a sequence"),
    (lambda: lowlevel.ParallelRunner(streams="ab"), TypeError, "streams must be a sequence"),
    (lambda: lowlevel.ParallelRunner(streams=[]), ValueError, "streams"),
    (lambda: lowlevel.ParallelRunner(streams=["x"]), TypeError, r"streams\[0\] must be a CUDA stream"),
    (lambda: lowlevel.ParallelRunner(streams=[True, 1]), TypeError, r"streams\[0\].*bool"),
    (lambda: lowlevel.ParallelRunner(3, streams=[1]), ValueError, r"num_aux must equal len\(streams\) = 1.*got 3"),
    (lambda: lowlevel.ParallelRunner(np.int64(2), streams=[1]), ValueError, "num_aux"),
    (lambda: lowlevel.ParallelRunner(True, streams=[1]), TypeError, "num_aux"),
    (lambda: lowlevel.ParallelRunner(0, streams=[1]), ValueError, "num_aux"),
    (lambda: lowlevel.ParallelRunner(streams=[1], priority=-1), ValueError, "priority must be None"),
])
def test_parallel_runner_streams_and_num_aux(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


@pytest.mark.skipif(GPU, reason="on a GPU these construct")
@pytest.mark.parametrize("kw", [{}, {"num_aux": 1}, {"num_aux": np.int64(2)}])
def test_parallel_runner_documented_forms_reach_the_gpu(kw):
    streams = [1, 2] if kw.get("num_aux") == 2 else [1]
    with pytest.raises(CudaUnavailableError):
        lowlevel.ParallelRunner(streams=streams, **kw)
    with pytest.raises(CudaUnavailableError):
        lowlevel.ParallelRunner(**kw)


@pytest.mark.parametrize("call,name", [
    (lambda: lowlevel.use_stream("x"), "stream"),
    (lambda: lowlevel.use_stream(-3), "stream"),
    (lambda: lowlevel.UBatchRunner(_fn, comm_stream="x"), "comm_stream"),
    (lambda: lowlevel.make_ubatch_contexts(2, "x", 6), "compute_stream"),
    (lambda: lowlevel.run_generators([], "x", 2), "compute_stream"),
    (lambda: lowlevel.capture(stream="x").__enter__(), "stream"),
    (lambda: lowlevel.maybe_execute_in_parallel(_fn, _fn, _Ev(), _Ev(), aux_stream="x"), "aux_stream"),
    (lambda: lowlevel.execute_in_parallel(_fn, [_fn], _Ev(), [_Ev()], aux_streams=[np.float64(1)],
                                          enable=True),
     r"aux_streams\[0\]"),
])
def test_stream_arguments_are_named(call, name):
    with pytest.raises((TypeError, ValueError), match=rf"^{name} must be a CUDA stream") as info:
        call()
    assert "got " in str(info.value)


def test_make_ubatch_contexts_names_the_comm_stream(monkeypatch):
    from lowlevel import ubatch_ring

    real = ubatch_ring.adopt_arg
    monkeypatch.setattr(ubatch_ring, "adopt_arg", lambda s, n: object() if n == "compute_stream" else real(s, n))
    with pytest.raises(TypeError, match="^comm_stream must be a CUDA stream"):
        lowlevel.make_ubatch_contexts(2, 5, "x")


def test_a_dropped_async_vote_is_reachable_from_its_config():
    cfg = lowlevel.DPConfig(1, 0, timeout_s=5)
    assert cfg.vote_in_flight is None
    v = cfg.start(5, False, True)
    assert cfg.vote_in_flight is v
    del v  # dropped: the config must not be wedged for good
    with pytest.raises(RuntimeError, match=r"already in flight.*config\.vote_in_flight\.result\(\)"):
        cfg.start(5, False, True)
    assert cfg.vote_in_flight.result() == (False, None, 0)
    assert cfg.vote_in_flight is None
    assert cfg.start(6, False, True, cudagraph_mode=np.int64(2)).result() == (False, None, 2)
    with pytest.raises(AttributeError):
        cfg.vote_in_flight = None  # read-only


REAL_BAD = [(np.array([1.0]), TypeError), (np.array([[1.0]]), TypeError), (np.array([1.0, 2.0]), TypeError),
            (True, TypeError), (np.bool_(True), TypeError), ("1", TypeError), (1 + 0j, TypeError),
            (np.complex128(1), TypeError), (None, TypeError), (math.nan, ValueError), (math.inf, ValueError)]


@pytest.mark.parametrize("bad,exc", REAL_BAD + [(0.0, ValueError), (-1, ValueError)])
@pytest.mark.parametrize("entry,arg,call", [
    ("DPConfig", "timeout_s", lambda v: lowlevel.DPConfig(2, 0, timeout_s=v)),
    ("UBatchRunner", "timeout_s", lambda v: lowlevel.UBatchRunner(_fn, timeout_s=v)),
    ("make_ubatch_contexts", "timeout_s", lambda v: lowlevel.make_ubatch_contexts(2, 1, 2, timeout_s=v)),
    ("CpuGpuEvent.wait", "timeout", lambda v: lowlevel.CpuGpuEvent(event_factory=lambda: None).wait(timeout=v)),
    ("rms_norm", "eps", lambda v: _rms(v)),
    ("Timeline.add", "start_ms", lambda v: lowlevel.Timeline().add("a", "t", v, 5.0)),
])
def test_real_arguments_refuse_arrays_bools_and_non_finite(entry, arg, call, bad, exc):
    if bad is None and arg not in ("eps", "start_ms"):
        pytest.skip("None means 'no bound'")
    if entry in ("CpuGpuEvent.wait", "Timeline.add") and type(bad) is float and bad == 0.0:
        pytest.skip("0 polls once / is a time")
    if entry == "Timeline.add" and type(bad) is int and bad == -1:
        pytest.skip("a negative time is a time")
    with pytest.raises(exc, match=arg) as info:
        call(bad)
    assert str(info.value).startswith(arg), f"{entry}: {info.value}"


def _rms(eps):
    from lowlevel import kernels

    return kernels.rms_norm(_X, _W, eps)


_X = None
_W = None


@pytest.fixture(autouse=True)
def _rms_inputs():
    global _X, _W
    if _X is None:
        import torch

        g = torch.Generator().manual_seed(4)
        dev = "cuda" if lowlevel.cuda_available() else "cpu"  # on a GPU machine the kernels run for real
        _X, _W = torch.randn(3, 8, generator=g).to(dev), torch.randn(8, generator=g).to(dev)


@pytest.mark.parametrize("good", [np.array(2.0), np.float32(2.0), np.int64(2), 2])
def test_real_arguments_accept_numpy_scalars_and_0d_arrays(good):
    assert lowlevel.DPConfig(2, 0, timeout_s=good).timeout_s == 2.0
    from lowlevel.errors import check_real

    assert check_real(good, "x") == 2.0 and type(check_real(good, "x")) is float


def test_rms_norm_eps_is_checked_and_used():
    import torch

    from lowlevel import kernels

    x, w = _X.double(), _W.double()
    for eps in (1e-6, np.float32(0.5), np.array(0.25)):
        got = kernels.rms_norm(_X, _W, eps)
        e = float(eps)
        want = x / torch.sqrt((x * x).mean(1, keepdim=True) + e) * w
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5), eps
    with pytest.raises(TypeError, match="eps must be a finite real number > 0, got True"):
        kernels.rms_norm(_X, _W, True)
    with pytest.raises(TypeError, match="^eps"):
        kernels.prepare_rms_norm(_X, _W, "x", out=torch.empty_like(_X))
    with pytest.raises(ValueError, match="^eps"):
        kernels.prepare_rms_norm(_X, _W, -1e-6, out=torch.empty_like(_X))


def _timeline():
    tl = lowlevel.Timeline()
    tl.add("a", "compute", 0.0, 3.0)
    tl.add("b", "comm", 1.0, 5.0)
    return tl


@pytest.mark.parametrize("bad", [3, 0, True, b"x.json", None.__class__, 1.5])
def test_path_arguments_refuse_file_descriptors_and_non_paths(bad, tmp_path):
    import os
    import pathlib

    tl = _timeline()
    r, w = os.pipe()
    try:
        for call in (lambda p: tl.to_chrome_trace(p), lambda p: tl.plot(p),
                     lambda p: lowlevel.merge_traces([tl.to_chrome_trace()], path=p),
                     lambda p: lowlevel.plot_merged(tl.to_chrome_trace(), p)):
            with pytest.raises(TypeError, match=r"^path must be a str or os.PathLike"):
                call(w if bad == 3 else bad)
        os.write(w, b"still open")  # the descriptor was neither written nor closed
    finally:
        os.close(r)
        os.close(w)
    p = tmp_path / "t.json"
    tl.to_chrome_trace(p)  # os.PathLike accepted
    merged = lowlevel.merge_traces([pathlib.Path(p), str(p)], align=None, path=tmp_path / "m.json")
    assert len([e for e in merged["traceEvents"] if e.get("ph") == "X"]) == 4


def test_overlap_ms_checks_its_track_names():
    tl = _timeline()
    assert tl.overlap_ms("compute", "comm") == 2.0
    with pytest.raises(TypeError, match="^track_b must be a track name"):
        tl.overlap_ms("compute", 5)
    with pytest.raises(TypeError, match="^track_a"):
        tl.overlap_ms(None, "comm")
    with pytest.raises(ValueError, match=r"^track_a must name a track of this timeline \(\['comm', 'compute'\]\)"):
        tl.overlap_ms("c", "comm")
    tl.label(7, "idle")  # a labelled track without spans is known: no overlap
    assert tl.overlap_ms("idle", "comm") == 0.0


@pytest.mark.parametrize("bad,exc", [("x", TypeError), (1.5, TypeError), (None, TypeError), (True, TypeError),
                                     (np.bool_(False), TypeError), (-1, ValueError), (np.int64(-2), ValueError)])
def test_keep_alive_consumer_is_checked_before_anything_is_held(bad, exc):
    from lowlevel.lifetime import default_keep_alive

    arr = np.arange(4)  # held by this test: never released, so no event is recorded
    ka = lowlevel.KeepAlive()
    before = default_keep_alive.pending()
    with pytest.raises(exc, match="^consumer must be a CUDA stream handle"):
        ka.keep(arr, bad)
    with pytest.raises(exc, match="^consumer must be a CUDA stream handle"):
        lowlevel.protect_outputs({"a": arr}, bad, lambda: None)
    assert ka.pending() == 0 and default_keep_alive.pending() == before
    ka.keep(arr, np.int64(7))
    assert ka.pending() == 1 and ka._items[0][1] == 7 and type(ka._items[0][1]) is int


def test_protect_outputs_checks_consumer_torch():
    with pytest.raises(TypeError, match="^consumer_torch"):
        lowlevel.protect_outputs([np.arange(3)], 5, None)


@pytest.mark.parametrize("bad", ["x", -1, True, 1.5])
def test_stream_arguments_of_events_and_interop_name_stream(bad):
    """Event.record/wait, record_event/wait_event and the interop calls take ``stream=``: a bad
    one is refused with a message that names ``stream`` (no GPU needed: it fails first)."""
    from lowlevel import _runtime as rt  # the one resolver behind all of them

    with pytest.raises((TypeError, ValueError), match="^stream: "):
        rt.stream_handle(bad)


# --- session 4, second fresh user -------------------------------------------------------------

def test_sm_control_re_entry_nests_and_only_the_outermost_exit_gives_back():
    calls = []
    cm = lowlevel.SMControlContextManager(10, lambda n: calls.append(("comm", n)),
                                          lambda n: calls.append(("compute", n)), total_sms=100)
    with cm:
        with cm:
            pass
        assert calls == [("comm", 10), ("compute", 90)]  # the inner exit gave nothing back
    assert calls[2:] == [("comm", 100), ("compute", 100)]
    with pytest.raises(lowlevel.LowlevelError):
        cm.__exit__(None, None, None)


def test_ubatch_runner_refuses_a_context_manager_class_for_sm_control():
    with pytest.raises(TypeError, match="sm_control"):
        lowlevel.UBatchRunner(_fn, sm_control=lowlevel.SMControlContextManager)


def test_dp_vote_checks_its_arguments():
    from lowlevel.dp import DPVote

    with pytest.raises(TypeError, match="config must be a DPConfig"):
        DPVote("x", 2, None)
    with pytest.raises(ValueError, match="mode"):
        DPVote(lowlevel.DPConfig(1, 0), 7, None)
    with pytest.raises(TypeError, match="mode"):
        DPVote(lowlevel.DPConfig(1, 0), 2.0, None)
    assert DPVote(lowlevel.DPConfig(1, 0), np.int64(2), None)._mode == 2


def test_as_cudagraph_mode_runtime_must_be_a_bool():
    from lowlevel.cudagraph_dispatch import as_cudagraph_mode

    for bad in ("yes", 1, None):
        with pytest.raises(TypeError, match="runtime must be a bool"):
            as_cudagraph_mode(1, runtime=bad)
    assert as_cudagraph_mode(2, runtime=np.bool_(True)) is M.FULL


def test_graph_runner_counters_stay_ints_and_a_raising_bypass_is_not_counted():
    r = lowlevel.CUDAGraphRunner(lambda *a: None)
    g = _FakeGraph()
    bd = lowlevel.BatchDescriptor(8, 8)
    r.graphs[bd] = (g, "out")
    r(M.FULL, bd, num_tokens=np.int64(5))
    assert r.padded_tokens == 3 and type(r.padded_tokens) is int

    def boom():
        raise RuntimeError("eager failed")

    r2 = lowlevel.CUDAGraphRunner(boom)
    with pytest.raises(RuntimeError, match="eager failed"):
        r2(M.NONE, bd)
    assert r2.bypasses == 0


@pytest.mark.parametrize("bad,exc", [(True, TypeError), (-5, ValueError), ("x", TypeError)])
def test_timeline_label_refuses_bools_and_negative_handles(bad, exc):
    tl = lowlevel.Timeline()
    with pytest.raises(exc, match="stream"):
        tl.label(bad, "x")
    tl.label(7, "seven")  # a plain handle is fine


def test_plot_titles_must_be_str_and_an_empty_merged_trace_is_refused(tmp_path):
    pytest.importorskip("matplotlib")
    from lowlevel.trace_merge import plot_merged

    tl = _timeline()
    with pytest.raises(TypeError, match="title must be a str"):
        tl.plot(str(tmp_path / "a.png"), title=5)
    with pytest.raises(TypeError, match="title must be a str"):
        plot_merged(tl.to_chrome_trace(), str(tmp_path / "b.png"), title=5)
    with pytest.raises(ValueError, match="no spans"):
        plot_merged({"traceEvents": []}, str(tmp_path / "c.png"))
    assert not any(p.exists() for p in (tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"))


@pytest.mark.parametrize("names,exc", [(5, TypeError), ("ab", TypeError), ([1, 2], TypeError), (["a"], ValueError)])
def test_merge_traces_names_must_be_one_str_per_trace(names, exc):
    from lowlevel.trace_merge import merge_traces

    t = _timeline().to_chrome_trace()
    with pytest.raises(exc, match="names"):
        merge_traces([t, t], align=None, names=names)
    assert [e["args"]["name"] for e in merge_traces([t, t], align=None, names=["x", "y"])["traceEvents"]
            if e.get("name") == "process_name" and e["pid"] in (0, 1)][:2] == ["x", "y"]


def test_merge_traces_checks_the_trace_contents(tmp_path):
    import json

    from lowlevel.trace_merge import merge_traces

    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([1, 2]))
    cases = [(str(listed), TypeError, r"traces\[0\] must be a Chrome trace"),
             ({"traceEvents": 5}, TypeError, "traceEvents must be a list"),
             ({"traceEvents": [5]}, TypeError, r"traceEvents\[0\] must be an event dict"),
             ({"traceEvents": [{"ph": "X", "name": "a", "dur": 1.0}]}, ValueError, "numeric 'ts'")]
    for bad, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            merge_traces([bad], align=None)


def test_real_numbers_too_large_for_a_float_are_named():
    """``float(10**400)`` raises ``OverflowError``: an int or a Fraction past the float range
    escaped as that raw error (no argument named) from every real-number and timeout check."""
    from fractions import Fraction

    from lowlevel.errors import check_real, check_timeout

    for v in (10**400, -(10**400), Fraction(10**400, 3)):
        with pytest.raises(ValueError, match=r"^eps must be a finite real number > 0, got"):
            check_real(v, "eps", "a finite real number > 0", positive=True)
        with pytest.raises(ValueError, match=r"^timeout_s must be a finite positive number of seconds"):
            check_timeout(v, "timeout_s")
    tl = lowlevel.Timeline(enabled=False)
    with pytest.raises(ValueError, match="^end_ms must be"):
        tl.add("a", "t", 0.0, 10**400)
    with pytest.raises(ValueError, match="^timeout_s must be"):
        lowlevel.DPConfig(2, 0, timeout_s=10**400)
    assert tl.spans == []
    assert check_real(Fraction(1, 4), "x") == 0.25 and check_timeout(2**60, "t") == float(2**60)
