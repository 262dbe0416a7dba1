"""Property tests (hypothesis) of the pure-logic layer against plain reference implementations:
capture-size ladders and padding tables, dispatcher keys and dispatch calls, microbatch split
points against the tiling rule."""
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lowlevel import BatchDescriptor as BD  # noqa: E402
from lowlevel import CudagraphDispatcher, default_capture_sizes, maybe_create_ubatch_slices, padding_table  # noqa: E402
from lowlevel import CUDAGraphMode as M  # noqa: E402

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
sizes_st = st.lists(st.integers(1, 600), min_size=1, max_size=24)


# --- ladders and padding ---------------------------------------------------------------------------

def ref_default_sizes(m):
    out = {s for s in (1, 2, 4) if s <= m}
    out |= {s for s in range(8, 256, 8) if s <= m}
    out |= {s for s in range(256, m + 1, 16)}
    out.add(m)
    return sorted(out)


@SETTINGS
@given(st.integers(1, 2048))
def test_default_ladder(m):
    got = default_capture_sizes(m)
    assert got == ref_default_sizes(m)
    assert got[-1] == m and all(a < b for a, b in zip(got, got[1:]))


@SETTINGS
@given(sizes_st, st.data())
def test_padding_table_rounds_up_to_the_next_size(sizes, data):
    top = max(sizes)
    max_size = data.draw(st.one_of(st.none(), st.integers(0, top)))
    got = padding_table(sizes, max_size)
    n_max = top if max_size is None else max_size
    assert len(got) == n_max + 1
    for n in range(n_max + 1):
        assert got[n] == (0 if n == 0 else min(s for s in sizes if s >= n))
    with pytest.raises(ValueError, match="max_size"):
        padding_table(sizes, top + 1)


# --- dispatcher ------------------------------------------------------------------------------------

MODES = [M.NONE, M.PIECEWISE, M.FULL, M.FULL_DECODE_ONLY, M.FULL_AND_PIECEWISE]


def ref_lora_cases(max_loras, specialize):
    if max_loras == 0:
        return [0]
    if not specialize:
        return [max_loras + 1]
    p, counts = 1, []
    while p <= max_loras:
        counts.append(p)
        p *= 2
    return [0] + sorted(set(counts + [max_loras + 1]))


class RefDispatcher:
    """vLLM's dispatch semantics written plainly: no table, no memo, keys rebuilt by hand."""

    def __init__(self, sizes, max_num_seqs, max_loras, specialize, mode, q):
        self.sizes, self.mns, self.ml, self.spec, self.mode, self.q = sorted(set(sizes)), max_num_seqs, \
            max_loras, specialize, mode, q
        sep = mode in (M.FULL_DECODE_ONLY, M.FULL_AND_PIECEWISE)
        mixed = {M.NONE: M.NONE, M.PIECEWISE: M.PIECEWISE, M.FULL: M.FULL, M.FULL_DECODE_ONLY: M.NONE,
                 M.FULL_AND_PIECEWISE: M.PIECEWISE}[mode]
        self.full, self.pw = set(), set()
        cases = ref_lora_cases(max_loras, specialize)
        for x in self.sizes:
            for c in cases:
                if mixed is M.FULL:
                    self.full.add(BD(x, min(x, max_num_seqs), False, c > 0, c))
                elif mixed is M.PIECEWISE:
                    self.pw.add(BD(x, None, False, c > 0, c))
            if sep and q <= x <= q * max_num_seqs:
                for c in cases:
                    self.full.add(BD(x, min(x // q, max_num_seqs), True, c > 0, c))

    def dispatch(self, n, uniform, has_lora, nal, allowed):
        if has_lora and (self.ml == 0 or nal > self.ml + 1):
            return "raises"  # out of the declared LoRA range
        if self.mode is M.NONE or n > self.sizes[-1] or allowed <= {M.NONE}:
            return (M.NONE, BD(n)) if M.NONE in allowed else "raises"
        if has_lora and nal > 0:
            cases = [c for c in ref_lora_cases(self.ml, self.spec) if c > 0]
            if self.spec:
                bigger = [c for c in cases if c >= nal]
                nal = bigger[0] if bigger else nal
            else:
                nal = self.ml + 1
        padded = 0 if n == 0 else min(s for s in self.sizes if s >= n)
        if uniform and self.mode in (M.FULL_DECODE_ONLY, M.FULL_AND_PIECEWISE):
            desc = BD(padded, min(padded // self.q, self.mns), True, has_lora, nal)
        else:
            desc = BD(padded, min(padded, self.mns), False, has_lora, nal)
        if M.FULL in allowed and desc in self.full:
            return M.FULL, desc
        relaxed = BD(padded, None, False, has_lora, nal)
        if M.PIECEWISE in allowed and relaxed in self.pw:
            return M.PIECEWISE, relaxed
        if M.NONE not in allowed:
            return "raises"
        return M.NONE, BD(n)


def q_misaligned(sizes, q, mns):
    return q > 1 and any(q <= x <= q * mns and x % q for x in sizes)


call_st = st.tuples(st.integers(0, 700), st.booleans(), st.booleans(), st.integers(0, 7),
                    st.one_of(st.none(), st.sets(st.sampled_from([M.NONE, M.PIECEWISE, M.FULL]), min_size=1)))


@SETTINGS
@given(sizes_st, st.integers(1, 64), st.integers(0, 4), st.booleans(), st.sampled_from(MODES),
       st.sampled_from([1, 1, 2, 3]), st.lists(call_st, min_size=1, max_size=30))
def test_dispatch_matches_reference(sizes, mns, max_loras, specialize, mode, q, calls):
    d = CudagraphDispatcher(sizes, max_num_seqs=mns, max_loras=max_loras, specialize_lora=specialize)
    if mode is not M.NONE and q_misaligned(sizes, q, mns):
        with pytest.raises(ValueError, match="multiples"):
            d.initialize_cudagraph_keys(mode, q)
        assert not d.keys_initialized
        return
    d.initialize_cudagraph_keys(mode, q)
    ref = RefDispatcher(sizes, mns, max_loras, specialize, mode, q)
    assert d.cudagraph_keys[M.FULL] == ref.full and d.cudagraph_keys[M.PIECEWISE] == ref.pw
    for n, uniform, has_lora, nal, allowed in calls:
        nal = nal if has_lora else 0
        want = ref.dispatch(n, uniform, has_lora, nal, allowed or {M.NONE, M.PIECEWISE, M.FULL})
        for _ in range(2):  # the second call of a memoised batch is a hit
            if want == "raises":
                with pytest.raises(ValueError):
                    d.dispatch(n, uniform, has_lora, nal, valid_modes=allowed)
            else:
                assert d.dispatch(n, uniform, has_lora, nal, valid_modes=allowed) == want
        # what a miss refuses, a hit refuses too
        memo = dict(d._memo)
        with pytest.raises(TypeError):
            d.dispatch(float(n), uniform, has_lora, nal)
        with pytest.raises(TypeError):
            d.dispatch(n, int(uniform), has_lora, nal)
        assert d._memo == memo


@SETTINGS
@given(sizes_st, st.sampled_from(MODES[1:]), st.integers(1, 64))
def test_every_key_round_trips(sizes, mode, mns):
    """Each captured key is what dispatch returns for its own size (vLLM #36165's lesson)."""
    d = CudagraphDispatcher(sizes, max_num_seqs=mns)
    d.initialize_cudagraph_keys(mode)
    for m, descs in d.get_capture_descs():
        for k in descs:
            assert d.dispatch(k.num_tokens, uniform_decode=k.uniform) == (m, k)


# --- microbatch slices -----------------------------------------------------------------------------

@SETTINGS
@given(st.lists(st.integers(1, 50), min_size=1, max_size=8), st.integers(2, 4), st.integers(0, 10),
       st.integers(0, 3), st.data())
def test_split_points_against_the_tiling_rule(tokens, n, extra_tokens, extra_reqs, data):
    total = sum(tokens)
    padded, reqs_padded = total + extra_tokens, len(tokens) + extra_reqs
    kind = data.draw(st.sampled_from(["none", "int", "list"]))
    if kind == "none":
        split, step = None, padded // n
        bounds = [step * i for i in range(1, n)]
    elif kind == "int":
        split = data.draw(st.integers(-5, total + 5))
        bounds = [split * i for i in range(1, n)]
    else:
        split = data.draw(st.lists(st.integers(-5, total + 5), min_size=n - 1, max_size=n - 1))
        bounds = list(split)
    arr = np.array(tokens)
    valid = all(0 < b <= total for b in bounds) and all(a < b for a, b in zip(bounds, bounds[1:]))
    if not valid:
        with pytest.raises(ValueError, match="split_point"):
            maybe_create_ubatch_slices(True, arr, padded, reqs_padded, n, split)
        return
    s, p = maybe_create_ubatch_slices(True, arr, padded, reqs_padded, n, split)
    assert len(s) == len(p) == n
    edges = [0] + bounds + [total]
    cu = np.concatenate([[0], np.cumsum(tokens)])
    for i, sl in enumerate(s):
        assert sl.token_slice == slice(edges[i], edges[i + 1])  # contiguous, tiling [0, total)
        lo, hi = edges[i], edges[i + 1]
        want = [r for r in range(len(tokens)) if cu[r] < hi and cu[r + 1] > lo]
        got = list(range(sl.request_slice.start, sl.request_slice.stop))
        assert got == want  # exactly the requests whose tokens the slice holds
    assert all(not x.is_empty() for x in s[:-1])
    assert p[:-1] == s[:-1] and p[-1].token_slice == slice(edges[-2], padded)
    assert p[-1].request_slice == slice(s[-1].request_slice.start, reqs_padded)
    assert sum(x.num_tokens for x in p) == padded
