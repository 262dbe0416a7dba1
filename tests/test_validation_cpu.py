"""CPU tier of issue 16 for errors.py, device.py, cudagraph_dispatch.py, ubatch_slices.py and
lifetime.py: one test per fault line of faults.md (A, B, E's container case) and table-driven
bad-value tests per kind (error class, the message names the argument, nothing changed)."""
import collections
import copy
import dataclasses
import math
from typing import Any, Literal

import numpy as np
import pytest

import lowlevel
from lowlevel import BatchDescriptor as BD
from lowlevel import CudagraphDispatcher, default_capture_sizes, maybe_create_ubatch_slices, padding_table
from lowlevel import CUDAGraphMode as M
from lowlevel.cudagraph_dispatch import as_cudagraph_mode, captured_lora_counts
from lowlevel.errors import LowlevelError, check_bool, check_choice, check_int, check_timeout
from lowlevel.ubatch_slices import UBatchSlice

NAN, INF = float("nan"), float("inf")


def _disp(mode=M.FULL_AND_PIECEWISE, sizes=(1, 2, 4, 8), max_num_seqs=8, q=1, **kw):
    d = CudagraphDispatcher(list(sizes), max_num_seqs=max_num_seqs, **kw)
    d.initialize_cudagraph_keys(mode, q)
    return d


def _state(d):
    return (copy.deepcopy(d.cudagraph_keys), dict(d._memo), d.cudagraph_mode, d.keys_initialized,
            d.uniform_decode_query_len, list(d.capture_sizes), d.max_capture_size)


# --- faults.md A: validation late, skipped on a cache hit, or missing ---------------------------

def test_A_dispatch_memo_hit_cannot_accept_what_a_miss_refuses():
    d = _disp(M.FULL)
    assert d.dispatch(5) == (M.FULL, BD(8, 8, False))
    assert d.dispatch(1) == (M.FULL, BD(1, 1, False))
    before = _state(d)
    for _ in range(3):  # every time, not just the first
        with pytest.raises(TypeError, match="num_tokens"):
            d.dispatch(5.0)
        with pytest.raises(TypeError, match="num_tokens"):
            d.dispatch(True)
        with pytest.raises(TypeError, match="uniform_decode"):
            d.dispatch(5, uniform_decode=1)
        with pytest.raises(TypeError, match="has_lora"):
            d.dispatch(5, has_lora=0)
    assert _state(d) == before
    assert d.dispatch(np.int64(5)) == (M.FULL, BD(8, 8, False))  # NumPy ints are ints


def test_A_negative_active_loras():
    d = _disp(M.PIECEWISE, max_loras=2)
    with pytest.raises(ValueError, match="num_active_loras"):
        d.dispatch(5, has_lora=True, num_active_loras=-2)
    with pytest.raises(ValueError, match="num_active_loras"):
        d.dispatch(5, has_lora=False, num_active_loras=2)  # would silently miss every key


def test_A_add_key_with_bad_descriptor():
    d = _disp(M.FULL)
    before = _state(d)
    with pytest.raises(ValueError, match="num_tokens"):
        d.add_cudagraph_key(M.FULL, BD(-8, "x"))
    with pytest.raises(TypeError, match="batch_descriptor"):
        d.add_cudagraph_key(M.FULL, (8, 8, False, False, 0))
    assert _state(d) == before


def test_A_add_key_before_initialize_is_a_clear_error():
    d = CudagraphDispatcher([1, 8])
    with pytest.raises(LowlevelError, match="initialize_cudagraph_keys"):
        d.add_cudagraph_key(M.FULL, BD(8, 8))
    assert d.cudagraph_keys == {M.PIECEWISE: set(), M.FULL: set()} and not d.keys_initialized
    d.initialize_cudagraph_keys(M.NONE)
    with pytest.raises(LowlevelError, match="NONE"):
        d.add_cudagraph_key(M.FULL, BD(8, 8))


def test_A_batch_descriptor_validates():
    with pytest.raises(ValueError, match="num_tokens"):
        BD(-1, num_reqs=-3)
    with pytest.raises(ValueError, match="num_reqs"):
        BD(1, num_reqs=-3)
    with pytest.raises(TypeError, match="uniform"):
        BD(8, 8, "no")
    with pytest.raises(ValueError, match="num_reqs"):
        BD(8)._replace(num_reqs=-1)
    with pytest.raises(TypeError, match="num_tokens"):
        BD._make([8.0, None, False, False, 0])
    d = BD(np.int64(8), np.int32(4), np.bool_(True))
    assert d == BD(8, 4, True) and type(d.num_tokens) is int and type(d.uniform) is bool
    assert hash(d) == hash(BD(8, 4, True))


def test_A_numpy_integers_are_integers():
    assert padding_table(np.array([4, 8])) == [0, 4, 4, 4, 4, 8, 8, 8, 8]
    d = CudagraphDispatcher(np.array([1, 8]), max_capture_size=np.int64(8), max_num_seqs=np.int32(8))
    assert d.capture_sizes == [1, 8] and all(type(s) is int for s in d.capture_sizes)
    d.initialize_cudagraph_keys(np.int64(2), np.int64(1))
    assert d.cudagraph_mode is M.FULL
    assert default_capture_sizes(np.int16(8)) == [1, 2, 4, 8]


def test_A_raw_errors_name_the_argument():
    with pytest.raises(TypeError, match="capture_sizes.*None"):
        padding_table(None)
    with pytest.raises(TypeError, match=r"mode.*'FULL' \(str\)"):
        M.FULL_AND_PIECEWISE.has_mode("FULL")


def test_A_add_key_message_shows_the_type():
    d = _disp(M.FULL)
    with pytest.raises(TypeError, match=r"runtime_mode.*'FULL' \(str\)"):
        d.add_cudagraph_key("FULL", BD(8, 8))


def test_A_no_driver_message(monkeypatch):
    import cupy

    from lowlevel import device

    class FakeErr(Exception):
        status = 35

        def __str__(self):
            return "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version"

    def raise_():
        raise FakeErr()

    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", raise_)
    try:
        monkeypatch.setattr(device, "_driver_present", lambda: False)
        device.probe.cache_clear()
        assert not lowlevel.cuda_available()
        with pytest.raises(lowlevel.CudaUnavailableError, match="no NVIDIA driver found") as ei:
            lowlevel.require_cuda()
        assert "insufficient" not in str(ei.value)
        # a driver is installed but too old: the runtime's own words stay
        monkeypatch.setattr(device, "_driver_present", lambda: True)
        device.probe.cache_clear()
        with pytest.raises(lowlevel.CudaUnavailableError, match="insufficient"):
            lowlevel.require_cuda()
    finally:
        monkeypatch.undo()
        device.probe.cache_clear()


def test_A_timeouts_and_modes_helpers():
    # DPConfig(timeout_s=inf / True) and coordinate_batch_across_dp(cudagraph_mode=2.0) use these
    for bad, exc in [(INF, ValueError), (True, TypeError), (NAN, ValueError), (-1, ValueError), (0, ValueError)]:
        with pytest.raises(exc, match="timeout_s"):
            check_timeout(bad, "timeout_s")
    with pytest.raises(TypeError, match="cudagraph_mode"):
        as_cudagraph_mode(2.0, "cudagraph_mode")


# --- faults.md B: silent wrong results ----------------------------------------------------------

def test_B_int_mode_is_normalised_and_anything_else_raises():
    assert as_cudagraph_mode(2) is M.FULL and as_cudagraph_mode(np.int64(1)) is M.PIECEWISE
    assert as_cudagraph_mode(M.FULL_DECODE_ONLY) is M.FULL_DECODE_ONLY
    for bad in ("FULL", 2.0, True, None):
        with pytest.raises(TypeError, match="mode"):
            as_cudagraph_mode(bad)
    with pytest.raises(ValueError, match="mode"):
        as_cudagraph_mode(3)
    with pytest.raises(ValueError, match="runtime"):
        as_cudagraph_mode(M.FULL_AND_PIECEWISE, runtime=True)


def test_B_named_maximum_is_a_capture_size():
    d = CudagraphDispatcher(max_capture_size=300)
    assert d.capture_sizes[-2:] == [288, 300] and d.max_capture_size == 300
    d.initialize_cudagraph_keys(M.PIECEWISE)
    for n in (289, 295, 300):
        assert d.dispatch(n) == (M.PIECEWISE, BD(300))
    assert d.dispatch(301) == (M.NONE, BD(301))
    assert default_capture_sizes(42)[-1] == 42
    d = CudagraphDispatcher(max_capture_size=42)
    d.initialize_cudagraph_keys(M.FULL)
    assert d.dispatch(41) == (M.FULL, BD(42, 42, False))


@pytest.mark.parametrize("mode", [M.PIECEWISE, M.FULL, M.FULL_AND_PIECEWISE, M.FULL_DECODE_ONLY])
def test_B_q_alignment_for_every_mode(mode):
    d = CudagraphDispatcher([1, 2, 4, 8, 16, 32], max_num_seqs=8)
    before = _state(d)
    with pytest.raises(ValueError, match="multiples"):
        d.initialize_cudagraph_keys(mode, uniform_decode_query_len=3)
    assert _state(d) == before
    # an aligned ladder works; the uniform batch of 9 tokens pads to a multiple of 3
    d = CudagraphDispatcher([1, 3, 6, 12, 24], max_num_seqs=8)
    d.initialize_cudagraph_keys(mode, uniform_decode_query_len=3)
    got_mode, desc = d.dispatch(9, uniform_decode=True)
    assert desc.num_tokens % 3 == 0 and got_mode is not M.NONE


@pytest.mark.parametrize("sizes", [[], None, np.array([], dtype=np.int64)])
def test_B_graphs_disabled_config(sizes):
    d = CudagraphDispatcher(sizes, max_capture_size=0)
    assert d.capture_sizes == [] and d.max_capture_size == 0
    d.initialize_cudagraph_keys(M.NONE)
    for n in (0, 1, 7, 512):
        assert d.dispatch(n) == (M.NONE, BD(n))
    assert d.get_capture_descs() == []
    with pytest.raises(ValueError, match="disabled"):
        d.initialize_cudagraph_keys(M.PIECEWISE)
    assert d.cudagraph_mode is M.NONE


def test_B_uninitialised_and_disabled_with_sizes():
    d = CudagraphDispatcher([1, 8], max_capture_size=0)
    assert d.capture_sizes == [] and d.dispatch(4) == (M.NONE, BD(4))


@pytest.mark.parametrize("tokens,kw", [
    ([4, 4], dict(split_point=12)),  # beyond the real tokens
    ([4, 4], dict(split_point=-4)),
    ([4, 4], dict(split_point=0)),
    ([4, 4, 4], dict(split_point=[8, 4], num_ubatches=3)),  # unsorted
    ([4, 4, 4], dict(split_point=[4, 4], num_ubatches=3)),  # not strictly increasing
    ([4, 4.7], {}),  # not integer counts
    ([4, 0], {}),
    ([4, -1], {}),
    ([4, 3], {}),  # default split 16 // 2 = 8 lies beyond the 7 real tokens
])
def test_B_split_points_tile_the_batch(tokens, kw):
    arr = np.array(tokens)
    saved = arr.copy()
    with pytest.raises(ValueError, match="split_point|num_scheduled_tokens"):
        maybe_create_ubatch_slices(True, arr, 16, 4, **kw)
    assert np.array_equal(arr, saved)


def test_B_split_point_types():
    with pytest.raises(TypeError, match="split_point"):
        maybe_create_ubatch_slices(True, [4, 4], 8, 2, split_point=4.7)
    with pytest.raises(TypeError, match="split_point"):
        maybe_create_ubatch_slices(True, [4, 4], 8, 2, split_point=True)
    with pytest.raises(TypeError, match=r"split_point\[0\]"):
        maybe_create_ubatch_slices(True, [4, 4], 8, 2, split_point=[4.0])
    with pytest.raises(ValueError, match="split_point"):  # the total itself: an empty last microbatch
        maybe_create_ubatch_slices(True, [4, 4], 8, 2, split_point=np.int64(8))
    s, p = maybe_create_ubatch_slices(True, [4, 4], 8, 2, split_point=np.int64(7))
    assert s[1].token_slice == slice(7, 8) and p[1].token_slice == slice(7, 8)


# --- faults.md E (CPU half): outputs in any container are found ----------------------------------

@dataclasses.dataclass
class _Out:
    hidden: Any
    aux: Any = None


class _Obj:
    def __init__(self, v):
        self.v = v
        self.me = self  # a cycle


class _Slots:
    __slots__ = ("v", "unset")

    def __init__(self, v):
        self.v = v


_NT = collections.namedtuple("_NT", "v n")


def test_E_iter_arrays_walks_containers():
    torch = pytest.importorskip("torch")
    from lowlevel.lifetime import iter_arrays

    t = [torch.randn(i + 1) for i in range(9)]
    assert iter_arrays(None) == () and iter_arrays(t[0])[0] is t[0] and len(iter_arrays(t[0])) == 1
    result = [_Out(t[0], {"k": _NT(t[1], [t[2]])}), _Obj(t[3]), _Slots(t[4]), (t[5],), {"x": {t[6]}},
              collections.deque([t[7]]), collections.UserDict(a=t[8]), t[0], "s", 3, None, np.ones(3)]
    got = iter_arrays(result)
    assert [id(x) for x in got] == [id(x) for x in t]  # each once, depth first
    lin = torch.nn.Linear(3, 3)  # a module's parameters are not walked
    assert iter_arrays([lin]) == []
    tv = torch.max(torch.randn(3, 3), 0)  # torch.return_types are sequences
    assert len(iter_arrays(tv)) == 2


# --- table-driven bad values, per kind -----------------------------------------------------------

INT_BAD = [("str", "8", TypeError), ("none", None, TypeError), ("float", 8.0, TypeError),
           ("nan", NAN, TypeError), ("inf", INF, TypeError), ("bool", True, TypeError),
           ("np.bool", np.bool_(True), TypeError), ("np.float", np.float64(8), TypeError)]
BOOL_BAD = [("int", 1, TypeError), ("str", "yes", TypeError), ("none", None, TypeError), ("float", 1.0, TypeError)]
MODE_BAD = [("str", "FULL", TypeError), ("float", 2.0, TypeError), ("bool", True, TypeError),
            ("none", None, TypeError), ("nan", NAN, TypeError), ("3", 3, ValueError), ("-1", -1, ValueError)]


def _fresh():
    return _disp(M.FULL_AND_PIECEWISE, max_loras=2)


# (entry point, argument name, call(value) given a fresh dispatcher, minimum, a valid value)
INT_ENTRIES = [
    ("check_int", "x", lambda d, v: check_int(v, "x", 0), 0, 3),
    ("default_capture_sizes", "max_size", lambda d, v: default_capture_sizes(v), 1, 8),
    ("padding_table", "max_size?", lambda d, v: padding_table([1, 8], v), 0, 8),
    ("captured_lora_counts", "max_loras", lambda d, v: captured_lora_counts(v), 0, 4),
    ("BatchDescriptor", "num_tokens", lambda d, v: BD(v), 0, 8),
    ("BatchDescriptor", "num_reqs?", lambda d, v: BD(8, v), 0, 8),
    ("BatchDescriptor", "num_active_loras", lambda d, v: BD(8, None, False, True, v), 0, 2),
    ("CudagraphDispatcher", "max_num_seqs", lambda d, v: CudagraphDispatcher([1, 8], max_num_seqs=v), 1, 8),
    ("CudagraphDispatcher", "max_loras", lambda d, v: CudagraphDispatcher([1, 8], max_loras=v), 0, 2),
    ("CudagraphDispatcher", "max_capture_size?", lambda d, v: CudagraphDispatcher([1, 8], max_capture_size=v), 0, 8),
    ("initialize_cudagraph_keys", "uniform_decode_query_len",
     lambda d, v: d.initialize_cudagraph_keys(M.FULL_AND_PIECEWISE, v), 1, 1),
    ("dispatch", "num_tokens", lambda d, v: d.dispatch(v), 0, 5),
    ("dispatch", "num_active_loras", lambda d, v: d.dispatch(5, has_lora=True, num_active_loras=v), 0, 2),
    ("maybe_create_ubatch_slices", "num_tokens_padded",
     lambda d, v: maybe_create_ubatch_slices(True, [4, 4], v, 2), 0, 8),
    ("maybe_create_ubatch_slices", "num_reqs_padded",
     lambda d, v: maybe_create_ubatch_slices(True, [4, 4], 8, v), 0, 2),
    ("maybe_create_ubatch_slices", "num_ubatches",
     lambda d, v: maybe_create_ubatch_slices(True, [4, 4], 8, 2, num_ubatches=v), 2, 2),
    ("maybe_create_ubatch_slices", "split_point?",
     lambda d, v: maybe_create_ubatch_slices(True, [4, 4], 8, 2, split_point=v), 1, 4),
    ("UBatchSlice", "token_slice", lambda d, v: UBatchSlice(slice(0, 1), slice(0, v)), 0, 4),
]


def _result(r):
    return _state(r) if isinstance(r, CudagraphDispatcher) else r


def _check(d, call, value, exc, name):
    before = _state(d)
    with pytest.raises(exc) as ei:
        call(d, value)
    assert name in str(ei.value), str(ei.value)
    assert _state(d) == before


@pytest.mark.parametrize("entry", INT_ENTRIES, ids=lambda e: f"{e[0]}.{e[1]}")
@pytest.mark.parametrize("bad", INT_BAD + [("negative", -1, ValueError), ("below", "min", ValueError)],
                         ids=lambda b: b[0])
def test_int_arguments(entry, bad):
    _, name, call, minimum, valid = entry
    kind, value, exc = bad
    if name.endswith("?"):  # None means "the default" here
        name = name[:-1]
        if value is None:
            pytest.skip("None is the default")
    if value == "min":
        value = minimum - 1
        if value == -1:
            pytest.skip("same as negative")
    _check(_fresh(), call, value, exc, name)


@pytest.mark.parametrize("entry", INT_ENTRIES, ids=lambda e: f"{e[0]}.{e[1]}")
@pytest.mark.parametrize("np_type", [np.int64, np.int32, np.uint8])
def test_int_arguments_accept_numpy(entry, np_type):
    _, name, call, minimum, valid = entry
    assert _result(call(_fresh(), np_type(valid))) == _result(call(_fresh(), valid))


def test_int_out_of_range_above():
    with pytest.raises(ValueError, match="max_size"):
        padding_table([1, 8], 9)
    with pytest.raises(ValueError, match="num_tokens_padded"):
        maybe_create_ubatch_slices(True, [4, 4], 7, 2)
    with pytest.raises(ValueError, match="num_reqs_padded"):
        maybe_create_ubatch_slices(True, [4, 4], 8, 1)
    with pytest.raises(ValueError, match="x"):
        check_int(11, "x", 0, 10)
    with pytest.raises(ValueError, match="token_slice"):
        UBatchSlice(slice(0, 1), slice(5, 4))
    with pytest.raises(ValueError, match="request_slice"):
        UBatchSlice(slice(0, 2, 2), slice(0, 4))
    with pytest.raises(TypeError, match="request_slice"):
        UBatchSlice((0, 1), slice(0, 4))
    assert UBatchSlice(slice(np.int64(0), np.int64(1)), slice(0, 4)).request_slice == slice(0, 1)


BOOL_ENTRIES = [
    ("check_bool", "flag", lambda d, v: check_bool(v, "flag")),
    ("captured_lora_counts", "specialize", lambda d, v: captured_lora_counts(4, v)),
    ("BatchDescriptor", "uniform", lambda d, v: BD(8, 8, v)),
    ("BatchDescriptor", "has_lora", lambda d, v: BD(8, 8, False, v)),
    ("CudagraphDispatcher", "specialize_lora", lambda d, v: CudagraphDispatcher([1, 8], specialize_lora=v)),
    ("CudagraphDispatcher", "piecewise_supported", lambda d, v: CudagraphDispatcher([1, 8], piecewise_supported=v)),
    ("dispatch", "uniform_decode", lambda d, v: d.dispatch(4, uniform_decode=v)),
    ("dispatch", "has_lora", lambda d, v: d.dispatch(4, has_lora=v)),
    ("maybe_create_ubatch_slices", "should_ubatch", lambda d, v: maybe_create_ubatch_slices(v, [4, 4], 8, 2)),
]


@pytest.mark.parametrize("entry", BOOL_ENTRIES, ids=lambda e: f"{e[0]}.{e[1]}")
@pytest.mark.parametrize("bad", BOOL_BAD, ids=lambda b: b[0])
def test_bool_arguments(entry, bad):
    _, name, call = entry
    _check(_fresh(), call, bad[1], bad[2], name)


@pytest.mark.parametrize("entry", BOOL_ENTRIES, ids=lambda e: f"{e[0]}.{e[1]}")
def test_bool_arguments_accept_numpy(entry):
    _, name, call = entry
    assert _result(call(_fresh(), np.bool_(True))) == _result(call(_fresh(), True))


MODE_ENTRIES = [
    ("as_cudagraph_mode", "mode", lambda d, v: as_cudagraph_mode(v)),
    ("has_mode", "mode", lambda d, v: M.FULL_AND_PIECEWISE.has_mode(v)),
    ("add_cudagraph_key", "runtime_mode", lambda d, v: d.add_cudagraph_key(v, BD(8))),
    ("initialize_cudagraph_keys", "cudagraph_mode", lambda d, v: d.initialize_cudagraph_keys(v)),
    ("dispatch", "valid_modes", lambda d, v: d.dispatch(4, valid_modes={v, M.NONE})),
    ("dispatch", "invalid_modes", lambda d, v: d.dispatch(4, invalid_modes=[v])),
]


@pytest.mark.parametrize("entry", MODE_ENTRIES, ids=lambda e: f"{e[0]}.{e[1]}")
@pytest.mark.parametrize("bad", MODE_BAD, ids=lambda b: b[0])
def test_mode_arguments(entry, bad):
    _, name, call = entry
    _check(_fresh(), call, bad[1], bad[2], name)


@pytest.mark.parametrize("entry", MODE_ENTRIES, ids=lambda e: f"{e[0]}.{e[1]}")
def test_mode_arguments_accept_ints(entry):
    _, name, call = entry
    for v, m in [(2, M.FULL), (np.int64(1), M.PIECEWISE)]:
        d1, d2 = _fresh(), _fresh()
        assert call(d1, v) == call(d2, m)
        assert _state(d1) == _state(d2)


@pytest.mark.parametrize("bad,exc", [(M.FULL, TypeError), (2, TypeError), ("FULL", TypeError), (None, None),
                                     ([M.FULL_AND_PIECEWISE], ValueError), ([], ValueError)])
def test_mode_collections(bad, exc):
    d = _fresh()
    if exc is None:
        assert d.dispatch(4, valid_modes=bad) == d.dispatch(4)
        return
    before = _state(d)
    with pytest.raises(exc, match="modes"):
        d.dispatch(4, valid_modes=bad)
    assert _state(d) == before


def test_pair_modes_refused_where_a_runtime_mode_is_needed():
    d = _fresh()
    before = _state(d)
    with pytest.raises(ValueError, match="runtime_mode"):
        d.add_cudagraph_key(M.FULL_DECODE_ONLY, BD(8, 8))
    with pytest.raises(ValueError, match="runtime_mode"):
        d.add_cudagraph_key(M.NONE, BD(8))
    with pytest.raises(ValueError, match="mode"):
        M.FULL.has_mode(M.FULL_DECODE_ONLY)
    with pytest.raises(ValueError, match="capture sizes"):
        d.add_cudagraph_key(M.FULL, BD(9, 8))  # not a capture size: dispatch could never return it
    with pytest.raises(ValueError, match="relaxed"):
        d.add_cudagraph_key(M.PIECEWISE, BD(8, 8))  # dispatch looks PIECEWISE keys up relaxed
    assert _state(d) == before


SIZES_BAD = [("none", None, TypeError), ("str", "48", TypeError), ("int", 8, TypeError),
             ("float", [1.5], TypeError), ("bool", [True, 2], TypeError), ("nan", [NAN], TypeError),
             ("inf", [INF], TypeError), ("zero", [0, 8], ValueError), ("negative", [-1], ValueError),
             ("2-D", np.array([[1, 8]]), TypeError)]


@pytest.mark.parametrize("entry", [("padding_table", lambda d, v: padding_table(v)),
                                   ("CudagraphDispatcher", lambda d, v: CudagraphDispatcher(v))],
                         ids=lambda e: e[0])
@pytest.mark.parametrize("bad", SIZES_BAD, ids=lambda b: b[0])
def test_capture_size_arguments(entry, bad):
    _, call = entry
    if bad[1] is None and entry[0] == "CudagraphDispatcher":
        pytest.skip("None is the default ladder")
    _check(_fresh(), call, bad[1], bad[2], "capture_sizes")


TOKENS_BAD = [("none", None, TypeError), ("str", "44", TypeError), ("int", 8, TypeError),
              ("float", [4, 4.7], ValueError), ("bool", [True, True], ValueError), ("nan", [4, NAN], ValueError),
              ("zero", [4, 0], ValueError), ("negative", [9, -1], ValueError), ("empty", [], ValueError),
              ("2-D", [[4, 4]], ValueError)]


@pytest.mark.parametrize("bad", TOKENS_BAD, ids=lambda b: b[0])
def test_scheduled_token_arguments(bad):
    _check(_fresh(), lambda d, v: maybe_create_ubatch_slices(True, v, 8, 2), bad[1], bad[2], "num_scheduled_tokens")


TIMEOUT_BAD = [("bool", True, TypeError), ("np.bool", np.bool_(True), TypeError), ("str", "1", TypeError),
               ("object", object(), TypeError), ("nan", NAN, ValueError), ("inf", INF, ValueError),
               ("-inf", -INF, ValueError), ("negative", -1, ValueError), ("zero", 0.0, ValueError)]


@pytest.mark.parametrize("bad", TIMEOUT_BAD, ids=lambda b: b[0])
def test_timeout_values(bad):
    with pytest.raises(bad[2], match="timeout_s"):
        check_timeout(bad[1], "timeout_s")


def test_timeout_accepts():
    assert check_timeout(None, "t") is None
    with pytest.raises(TypeError, match="t must"):
        check_timeout(None, "t", allow_none=False)
    for v in (1, 0.25, np.float32(2.5), np.int64(3)):
        out = check_timeout(v, "t")
        assert type(out) is float and out == float(v)


Precision = Literal["tf32", "ieee"]


def test_check_choice():
    assert check_choice("tf32", "precision", Precision) == "tf32"
    with pytest.raises(ValueError, match=r"precision must be one of 'tf32', 'ieee'; got 'fp8'"):
        check_choice("fp8", "precision", Precision)
    with pytest.raises(TypeError, match=r"precision.*1 \(int\)"):
        check_choice(1, "precision", Precision)
    with pytest.raises(TypeError, match="level"):
        check_choice(True, "level", Literal[0, 1])  # True is not 1
    assert check_choice(1, "level", Literal[0, 1]) == 1
    assert check_choice("a", "x", ("a", "b")) == "a"


def test_check_int_messages():
    with pytest.raises(TypeError, match=r"n must be a positive int, got 2.5 \(float\)"):
        check_int(2.5, "n", 1)
    with pytest.raises(TypeError, match="n must be a non-negative int, got a bool"):
        check_int(False, "n", 0)
    with pytest.raises(ValueError, match="n must be an int >= 2, got 1"):
        check_int(1, "n", 2)
    assert check_int(np.array(7), "n") == 7 and check_int(5, "n", 0, types=(int,)) == 5
    assert math.isfinite(check_int(np.uint64(2**40), "n", 0))
