"""CPU tier of the graph runner and capture(): argument checks, mode normalisation, errors
raised before any state changes, lifecycle calls that need no GPU."""
import inspect
import typing

import numpy as np
import pytest

import lowlevel
from lowlevel import BatchDescriptor as BD
from lowlevel import CUDAGraphMode as M
from lowlevel import CUDAGraphRunner

no_gpu = pytest.mark.skipif(lowlevel.cuda_available(), reason="checks the behaviour without a GPU")


class FakeGraph:
    """Stands in for a captured Graph: counts replays."""

    def __init__(self):
        self.replays = 0
        self.closed = False

    def replay(self, stream=None):
        self.replays += 1

    def close(self):
        self.closed = True


def _fn(x=None):
    return ("eager", x)


def _state(r):
    return (r.hits, r.captures, r.bypasses, r.padded_tokens, dict(r.graphs), r.capturing_enabled)


@pytest.mark.parametrize("kwargs, exc, word", [
    ({"warmup": 1.5}, TypeError, "warmup"),
    ({"warmup": -1}, ValueError, "warmup"),
    ({"warmup": True}, TypeError, "warmup"),
    ({"warmup": "2"}, TypeError, "warmup"),
    ({"pool": "x"}, TypeError, "pool"),
    ({"pool": 3}, TypeError, "pool"),
    ({"weak_outputs": 1}, TypeError, "weak_outputs"),
])
def test_construction_refuses_bad_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        CUDAGraphRunner(_fn, M.FULL, **kwargs)


@pytest.mark.parametrize("mode, exc", [
    (M.NONE, ValueError), (M.FULL_DECODE_ONLY, ValueError), (M.FULL_AND_PIECEWISE, ValueError),
    (0, ValueError), (3, ValueError), ("FULL", TypeError), (2.0, TypeError), (True, TypeError), (None, TypeError),
])
def test_construction_refuses_modes_other_than_full_or_piecewise(mode, exc):
    with pytest.raises(exc, match="runtime_mode"):
        CUDAGraphRunner(_fn, mode)


def test_construction_accepts_the_int_of_a_mode_and_refuses_non_callables():
    assert CUDAGraphRunner(_fn, 2).runtime_mode is M.FULL
    assert CUDAGraphRunner(_fn, np.int64(1)).runtime_mode is M.PIECEWISE
    with pytest.raises(TypeError, match="fn must be callable"):
        CUDAGraphRunner("notfn")


def test_int_mode_replays_like_the_enum():
    """runner(2, desc) is runner(FULL, desc): the int mode is what coordinate_batch_across_dp returns."""
    r = CUDAGraphRunner(_fn, M.FULL)
    g = FakeGraph()
    r.graphs[BD(8, 8)] = (g, "static out")
    for mode in (M.FULL, 2, np.int64(2), np.int32(2)):
        assert r(mode, BD(8, 8), "x", num_tokens=5) == "static out"
    assert g.replays == 4 and r.hits == 4 and r.bypasses == 0 and r.padded_tokens == 4 * 3
    # NONE and the other runtime mode, as ints too, go around the graph
    for mode in (M.NONE, 0, M.PIECEWISE, 1):
        assert r(mode, BD(5), "y") == ("eager", "y")
    assert r.bypasses == 4 and g.replays == 4


@pytest.mark.parametrize("mode, exc", [("FULL", TypeError), (2.0, TypeError), (True, TypeError),
                                       (False, TypeError), (None, TypeError), (7, ValueError),
                                       (-1, ValueError), (M.FULL_AND_PIECEWISE, ValueError)])
def test_call_refuses_other_modes_and_changes_nothing(mode, exc):
    r = CUDAGraphRunner(_fn, M.FULL)
    g = FakeGraph()
    r.graphs[BD(8, 8)] = (g, "out")
    before = _state(r)
    with pytest.raises(exc, match="mode"):
        r(mode, BD(8, 8), "x")
    assert _state(r) == before and g.replays == 0


@pytest.mark.parametrize("num_tokens, exc", [(16, ValueError), (9, ValueError), (-1, ValueError),
                                             (True, TypeError), (4.0, TypeError), ("4", TypeError)])
def test_num_tokens_outside_the_graph_is_refused_before_replay(num_tokens, exc):
    r = CUDAGraphRunner(_fn, M.FULL)
    g = FakeGraph()
    r.graphs[BD(8, 8)] = (g, "out")
    before = _state(r)
    with pytest.raises(exc, match="num_tokens"):
        r(M.FULL, BD(8, 8), "x", num_tokens=num_tokens)
    assert _state(r) == before and g.replays == 0
    assert r.padded_tokens == 0  # never negative
    assert r(M.FULL, BD(8, 8), num_tokens=np.int64(8)) == "out" and r.padded_tokens == 0
    assert r(M.FULL, BD(8, 8), num_tokens=0) == "out" and r.padded_tokens == 8


def test_capture_disabled_raises_without_state_change():
    r = CUDAGraphRunner(_fn, M.FULL)
    r.capturing_enabled = False
    before = _state(r)
    with pytest.raises(RuntimeError, match="capturing is disabled"):
        r(2, BD(4, 4), "x")  # the int mode takes the graph path, not the bypass
    assert _state(r) == before


def test_capture_all_refuses_a_dispatcher_without_keys():
    r = CUDAGraphRunner(_fn, M.FULL)
    d = lowlevel.CudagraphDispatcher([1, 2, 4])
    before = _state(r)
    with pytest.raises(ValueError, match="initialize_cudagraph_keys"):
        r.capture_all(d, lambda desc: ())
    with pytest.raises(ValueError, match="initialize_cudagraph_keys"):
        r.estimate_memory(d, lambda desc: ())
    d.initialize_cudagraph_keys(M.NONE)
    with pytest.raises(ValueError, match="nothing to capture"):
        r.capture_all(d, lambda desc: ())
    d.initialize_cudagraph_keys(M.PIECEWISE)
    with pytest.raises(ValueError, match="no FULL keys"):
        r.capture_all(d, lambda desc: ())
    with pytest.raises(TypeError, match="dispatcher"):
        r.capture_all("d", lambda desc: ())
    d.initialize_cudagraph_keys(M.FULL)
    with pytest.raises(TypeError, match="make_args"):
        r.capture_all(d, None)
    with pytest.raises(TypeError, match="progress"):
        r.capture_all(d, lambda desc: (), progress="yes")
    with pytest.raises(ValueError, match="sample"):
        r.estimate_memory(d, lambda desc: (), sample=0)
    assert _state(r) == before and r._pool is None  # nothing was made


def test_capture_all_progress_is_off_by_default():
    sig = inspect.signature(CUDAGraphRunner.capture_all)
    assert sig.parameters["progress"].default is False


def test_all_descriptors_already_captured_is_not_an_error():
    r = CUDAGraphRunner(_fn, M.FULL)
    d = lowlevel.CudagraphDispatcher([1, 2], max_num_seqs=2)
    d.initialize_cudagraph_keys(M.FULL)
    for _, descs in d.get_capture_descs():
        for desc in descs:
            r.graphs[desc] = (FakeGraph(), None)
    assert r.capture_all(d, lambda desc: ()) == 0


def test_clear_and_release_without_a_pool_need_no_gpu():
    r = CUDAGraphRunner(_fn, M.FULL)
    g1, g2 = FakeGraph(), FakeGraph()
    r.graphs[BD(1, 1)] = (g1, 1)
    r.graphs[BD(2, 2)] = (g2, 2)
    r.clear()
    assert r.graphs == {} and g1.closed and g2.closed
    r.release(keep_execs=False)
    assert r.graphs == {} and r.memory()["total_bytes"] == 0


def test_capture_mode_is_a_literal_and_checked_first():
    hints = typing.get_type_hints(lowlevel.capture)
    assert set(typing.get_args(hints["mode"])) == {"relaxed", "thread_local", "global"}
    with pytest.raises(ValueError, match="mode"), lowlevel.capture(mode="bogus"):
        pass
    with pytest.raises(TypeError, match="mode"), lowlevel.capture(mode=1):
        pass
    with pytest.raises(TypeError, match="pool"), lowlevel.capture(pool="x"):
        pass
    with pytest.raises(TypeError, match="update"), lowlevel.capture(update=object()):
        pass


@no_gpu
def test_capture_without_gpu_raises_cuda_unavailable():
    with pytest.raises(lowlevel.CudaUnavailableError), lowlevel.capture():
        pass
    with pytest.raises(lowlevel.CudaUnavailableError):
        lowlevel.GraphPool()


@no_gpu
def test_capture_all_without_gpu_raises_cuda_unavailable_and_keeps_state():
    r = CUDAGraphRunner(_fn, M.FULL)
    d = lowlevel.CudagraphDispatcher([1, 2], max_num_seqs=2)
    d.initialize_cudagraph_keys(M.FULL)
    with pytest.raises(lowlevel.CudaUnavailableError):
        r.capture_all(d, lambda desc: ())
    assert r.graphs == {} and r.captures == 0 and r.capturing_enabled


def test_fresh_graph_cannot_replay_and_closes_quietly():
    g = lowlevel.Graph()
    assert not g.captured
    with pytest.raises(RuntimeError, match="never captured"):
        g.replay()
    g.close()
    g.close()
    g.release_memory()
    assert not g.captured


def test_graph_memory_report_without_gpu_or_pools():
    from lowlevel.info import format_graph_memory, graph_memory

    r = CUDAGraphRunner(_fn, M.FULL)
    mem = graph_memory(r)
    assert mem["runners"][0]["graphs"] == 0
    text = format_graph_memory(mem)
    assert "FULL runner: 0 graph(s)" in text
