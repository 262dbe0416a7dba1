"""CPU tier: CUDA graph modes, padding tables and the dispatcher (vLLM's cases)."""
import pytest

from lowlevel import BatchDescriptor as BD
from lowlevel import CudagraphDispatcher, default_capture_sizes, padding_table
from lowlevel import CUDAGraphMode as M
from lowlevel.cudagraph_dispatch import captured_lora_counts


def test_mode_algebra():
    assert M.FULL_DECODE_ONLY.value == (2, 0) and M.FULL_AND_PIECEWISE.value == (2, 1)
    assert M.FULL_AND_PIECEWISE.decode_mode() is M.FULL and M.FULL_AND_PIECEWISE.mixed_mode() is M.PIECEWISE
    assert M.FULL_DECODE_ONLY.mixed_mode() is M.NONE and M.FULL.decode_mode() is M.FULL
    assert M.FULL_DECODE_ONLY.has_mode(M.NONE) and not M.FULL_DECODE_ONLY.has_mode(M.PIECEWISE)
    assert M.PIECEWISE.requires_piecewise_compilation() and M.FULL_AND_PIECEWISE.has_piecewise_cudagraphs()
    assert not M.FULL.requires_piecewise_compilation()
    assert M.FULL_AND_PIECEWISE.max_cudagraph_mode() is M.FULL and M.PIECEWISE.max_cudagraph_mode() is M.PIECEWISE
    assert M.FULL_DECODE_ONLY.has_full_cudagraphs() and not M.PIECEWISE.has_full_cudagraphs()
    assert M.valid_runtime_modes() == {M.NONE, M.PIECEWISE, M.FULL}
    assert M.FULL.is_valid_runtime_mode() and not M.FULL_AND_PIECEWISE.is_valid_runtime_mode()
    assert [m.separate_routine() for m in M] == [False, False, False, True, True]
    assert str(M.FULL) == "FULL" and not M.NONE and M.PIECEWISE
    with pytest.raises(ValueError):
        M.FULL.has_mode(M.FULL_DECODE_ONLY)


def test_batch_descriptor():
    d = BD(8, 8, True, True, 2)
    assert d == BD(num_tokens=8, num_reqs=8, uniform=True, has_lora=True, num_active_loras=2)
    assert hash(d) == hash(BD(8, 8, True, True, 2)) and len({d, BD(8, 8, True, True, 2)}) == 1
    assert d.relax_for_mixed_batch_cudagraphs() == BD(8, None, False, True, 2)
    with pytest.raises(AttributeError):
        d.num_tokens = 3
    assert BD(15) == BD(15, None, False, False, 0)


def test_padding_tables():
    assert padding_table([1, 8]) == [0, 1, 8, 8, 8, 8, 8, 8, 8]
    assert padding_table([8, 1, 8]) == [0, 1, 8, 8, 8, 8, 8, 8, 8]
    sizes = default_capture_sizes(512)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-3:] == [480, 496, 512]
    assert sizes == sorted(set([1, 2, 4] + list(range(8, 256, 8)) + list(range(256, 513, 16))))
    t = padding_table(sizes)
    assert len(t) == 513 and t[0] == 0 and t[3] == 4 and t[9] == 16 and t[249] == 256 and t[257] == 272
    assert all(t[s] == s for s in sizes)
    assert all(t[n] >= n and t[n] in sizes for n in range(1, 513))
    assert default_capture_sizes(3) == [1, 2, 3] and default_capture_sizes(8) == [1, 2, 4, 8]
    # the named maximum is a capture size
    assert default_capture_sizes(42)[-3:] == [32, 40, 42] and default_capture_sizes(300)[-3:] == [272, 288, 300]
    assert padding_table([1, 8], 5) == [0, 1, 8, 8, 8, 8]


@pytest.mark.parametrize("bad,exc", [([0, 8], ValueError), ([-1], ValueError), ([1.5], TypeError),
                                     ([True, 2], TypeError), (["8"], TypeError), (None, TypeError),
                                     ("48", TypeError), (8, TypeError)])
def test_bad_capture_sizes(bad, exc):
    with pytest.raises(exc, match="capture_sizes"):
        padding_table(bad)
    if bad is not None:  # None means "the default ladder" to the dispatcher
        with pytest.raises(exc, match="capture_sizes"):
            CudagraphDispatcher(bad)


def test_empty_capture_sizes_disable_graphs():
    assert padding_table([]) == [0] and padding_table([], 0) == [0]
    with pytest.raises(ValueError, match="max_size"):
        padding_table([], 1)


def test_bad_arguments():
    with pytest.raises(ValueError):
        padding_table([1, 8], 9)
    with pytest.raises(ValueError):
        default_capture_sizes(0)
    with pytest.raises(ValueError):
        CudagraphDispatcher([1, 8], max_num_seqs=0)
    with pytest.raises(ValueError):
        CudagraphDispatcher([16, 32], max_capture_size=8)


def test_lora_counts():
    assert captured_lora_counts(4) == [1, 2, 4, 5]
    assert captured_lora_counts(4, False) == [5]
    assert captured_lora_counts(0) == []


def _disp(mode, lora=False, sizes=(1, 8), max_num_seqs=8, **kw):
    d = CudagraphDispatcher(list(sizes), max_num_seqs=max_num_seqs, max_loras=4 if lora else 0, **kw)
    d.initialize_cudagraph_keys(mode, 1)
    return d


CASES = [M.FULL, M.FULL_AND_PIECEWISE, M.FULL_DECODE_ONLY, M.PIECEWISE]


@pytest.mark.parametrize("mode", CASES + ["lora"])
def test_dispatcher_vllm_cases(mode):
    lora = mode == "lora"
    if lora:
        mode = M.PIECEWISE
    d = _disp(mode, lora)
    assert d.keys_initialized
    pw = len(d.cudagraph_keys[M.PIECEWISE])
    full = len(d.cudagraph_keys[M.FULL])
    assert pw == ((10 if lora else 2) if mode.has_mode(M.PIECEWISE) else 0)
    assert full == (2 if mode in (M.FULL, M.FULL_DECODE_ONLY, M.FULL_AND_PIECEWISE) else 0)

    # 8 tokens, not uniform
    got = d.dispatch(8, uniform_decode=False)
    if mode is M.FULL:
        assert got == (M.FULL, BD(8, num_reqs=8, uniform=False))
    elif mode.has_mode(M.PIECEWISE):
        assert got == (M.PIECEWISE, BD(8, None, False))
    else:
        assert got == (M.NONE, BD(8))
    # 8 tokens, uniform decode
    got = d.dispatch(8, uniform_decode=True)
    if mode is M.FULL:
        assert got == (M.FULL, BD(8, 8, False))
    elif mode in (M.FULL_DECODE_ONLY, M.FULL_AND_PIECEWISE):
        assert got == (M.FULL, BD(8, 8, True))
    else:
        assert got == (M.PIECEWISE, BD(8, None, False))
    # beyond the largest capture size: eager, unpadded
    assert d.dispatch(15) == (M.NONE, BD(15))
    # FULL made invalid (cascade attention): relaxed PIECEWISE if there is one, else NONE
    got = d.dispatch(8, invalid_modes={M.FULL})
    if "PIECEWISE" in mode.name:
        assert got == (M.PIECEWISE, BD(8, None, False))
    else:
        assert got == (M.NONE, BD(8))
    assert d.dispatch(8, valid_modes={M.NONE}) == (M.NONE, BD(8))
    # padding: 3 tokens go to the 8 graph
    if mode is M.FULL:
        assert d.dispatch(3) == (M.FULL, BD(8, 8, False))


def test_lora_dispatch_rounds_up():
    d = _disp(M.PIECEWISE, lora=True)
    assert d.dispatch(5, has_lora=True, num_active_loras=3) == (M.PIECEWISE, BD(8, None, False, True, 4))
    assert d.dispatch(5, has_lora=True, num_active_loras=1) == (M.PIECEWISE, BD(8, None, False, True, 1))
    assert d.dispatch(5, has_lora=True, num_active_loras=5) == (M.PIECEWISE, BD(8, None, False, True, 5))
    with pytest.raises(ValueError, match="num_active_loras"):  # above max_loras + 1: out of range
        d.dispatch(5, has_lora=True, num_active_loras=9)
    d2 = CudagraphDispatcher([1, 8], max_num_seqs=8, max_loras=4, specialize_lora=False)
    d2.initialize_cudagraph_keys(M.PIECEWISE)
    assert len(d2.cudagraph_keys[M.PIECEWISE]) == 2
    assert d2.dispatch(2, has_lora=True, num_active_loras=2) == (M.PIECEWISE, BD(8, None, False, True, 5))


def test_uniform_decode_normalised_before_key_with_spec_decode():
    # q=2 (one speculative token): pure FULL must still hit its mixed keys for uniform batches (#36165)
    d = CudagraphDispatcher([2, 4, 8], max_num_seqs=4)
    d.initialize_cudagraph_keys(M.FULL, uniform_decode_query_len=2)
    assert d.dispatch(4, uniform_decode=True) == (M.FULL, BD(4, 4, False))
    d = CudagraphDispatcher([2, 4, 8], max_num_seqs=4)
    d.initialize_cudagraph_keys(M.FULL_DECODE_ONLY, uniform_decode_query_len=2)
    assert d.cudagraph_keys[M.FULL] == {BD(2, 1, True), BD(4, 2, True), BD(8, 4, True)}
    assert d.dispatch(3, uniform_decode=True) == (M.FULL, BD(4, 2, True))
    # keys round-trip: every decode key dispatches to itself
    for k in d.cudagraph_keys[M.FULL]:
        assert d.dispatch(k.num_tokens, uniform_decode=True) == (M.FULL, k)


def test_decode_sizes_must_be_multiples_of_q():
    d = CudagraphDispatcher([1, 3, 4, 8], max_num_seqs=8)
    with pytest.raises(ValueError, match="multiples"):
        d.initialize_cudagraph_keys(M.FULL_AND_PIECEWISE, uniform_decode_query_len=2)
    assert not d.keys_initialized and d.cudagraph_mode is M.NONE  # nothing half-done


def test_piecewise_unsupported():
    d = CudagraphDispatcher([1, 8], piecewise_supported=False)
    for mode in (M.PIECEWISE, M.FULL_AND_PIECEWISE):
        with pytest.raises(ValueError, match="piecewise"):
            d.initialize_cudagraph_keys(mode)
    d.initialize_cudagraph_keys(M.FULL_DECODE_ONLY)
    assert d.keys_initialized


def test_not_initialized_and_none_mode():
    d = CudagraphDispatcher([1, 8])
    assert d.get_capture_descs() == [] and not d.keys_initialized
    assert d.dispatch(4) == (M.NONE, BD(4))
    d.initialize_cudagraph_keys(M.NONE)
    assert d.keys_initialized and d.get_capture_descs() == [] and d.dispatch(4) == (M.NONE, BD(4))


@pytest.mark.parametrize("mode,groups", [(M.FULL, [M.FULL]), (M.PIECEWISE, [M.PIECEWISE]),
                                         (M.FULL_DECODE_ONLY, [M.FULL]),
                                         (M.FULL_AND_PIECEWISE, [M.PIECEWISE, M.FULL]), (M.NONE, [])])
def test_get_capture_descs(mode, groups):
    d = CudagraphDispatcher([1, 4, 8, 16], max_num_seqs=16)
    d.initialize_cudagraph_keys(mode)
    got = d.get_capture_descs()
    assert [m for m, _ in got] == groups
    for _, descs in got:
        assert descs and [x.num_tokens for x in descs] == sorted((x.num_tokens for x in descs), reverse=True)
        assert len({x.uniform for x in descs}) == 1


def test_add_key_and_validation():
    d = CudagraphDispatcher([1, 8], max_num_seqs=8)
    d.initialize_cudagraph_keys(M.PIECEWISE)
    d.add_cudagraph_key(M.PIECEWISE, BD(8, None, False))
    assert len(d.cudagraph_keys[M.PIECEWISE]) == 2  # idempotent
    with pytest.raises(ValueError):
        d.add_cudagraph_key(M.NONE, BD(8))
    with pytest.raises(TypeError):
        d.add_cudagraph_key(M.FULL, (8, 8))
    with pytest.raises(ValueError):
        d.dispatch(-1)
    with pytest.raises(TypeError):
        d.dispatch(2.5)
    with pytest.raises(ValueError):
        d.dispatch(4, valid_modes={M.FULL}, invalid_modes={M.FULL})
    with pytest.raises(ValueError):  # FULL only allowed, no FULL graph, NONE not allowed
        d.dispatch(4, valid_modes={M.FULL})
    # a key added later is seen by dispatch (the memo is invalidated)
    f = CudagraphDispatcher([1, 8], max_num_seqs=8)
    f.initialize_cudagraph_keys(M.FULL_DECODE_ONLY)
    assert f.dispatch(8)[0] is M.NONE
    f.add_cudagraph_key(M.FULL, BD(8, 8, False))
    assert f.dispatch(8) == (M.FULL, BD(8, 8, False))
