"""CPU tier of DP padding sync: post-processing, slicing goldens, validation, real gloo runs."""
import json
import os
import sys
import time

import numpy as np
import pytest

import lowlevel
from lowlevel.dp import post_process_dp_table

HERE = os.path.dirname(os.path.abspath(__file__))


def table(cols):
    return np.array(cols, dtype=np.int32).T  # cols: one (unpadded, padded, wants, allows, mode) per rank


def test_min_mode_and_padding():
    t = table([(10, 16, 0, 1, 2), (20, 32, 0, 1, 1)])
    assert post_process_dp_table(t, 2) == (False, [32, 32], 1, True)
    t = table([(10, 16, 0, 1, 2), (20, 32, 0, 1, 0)])  # one rank eager: nobody pads
    assert post_process_dp_table(t, 2) == (False, [16, 32], 0, False)
    t = table([(10, 16, 0, 0, 2), (20, 32, 0, 1, 2)])  # one rank refuses DP padding
    assert post_process_dp_table(t, 2) == (False, [16, 32], 2, False)


def test_one_dissenting_rank_disables_microbatching():
    t = table([(600, 600, 1, 1, 2), (600, 600, 0, 1, 2), (600, 600, 1, 1, 2)])
    assert post_process_dp_table(t, 2)[0] is False
    t = table([(600, 600, 1, 0, 0), (600, 640, 1, 0, 0)])
    assert post_process_dp_table(t, 2) == (True, [640, 640], 0, True)  # microbatching pads even in NONE


def test_empty_last_microbatch_rule_and_equality_case():
    # max padded 100, n=2: (100 // 2) * 1 = 50 >= min unpadded 50 -> abort (equality case)
    t = table([(50, 50, 1, 1, 2), (90, 100, 1, 1, 2)])
    assert post_process_dp_table(t, 2)[0] is False
    t = table([(51, 51, 1, 1, 2), (90, 100, 1, 1, 2)])
    assert post_process_dp_table(t, 2)[0] is True
    # n=3: (99 // 3) * 2 = 66 >= 66 aborts, 67 does not
    assert post_process_dp_table(table([(66, 66, 1, 1, 2), (99, 99, 1, 1, 2)]), 3)[0] is False
    assert post_process_dp_table(table([(67, 67, 1, 1, 2), (99, 99, 1, 1, 2)]), 3)[0] is True


def test_dp_size_one_makes_no_collective(monkeypatch):
    import lowlevel.dp as dp

    monkeypatch.setattr(dp, "_start", lambda *a: pytest.fail("no collective expected"))
    cfg = lowlevel.DPConfig(1, 0)
    assert lowlevel.coordinate_batch_across_dp(7, False, True, cfg, cudagraph_mode=2) == (False, None, 2)
    assert lowlevel.coordinate_batch_across_dp(7, False, True, cfg, cudagraph_mode=np.int64(1)) == (False, None, 1)


class _DoneWork:
    def wait(self, timeout=None):
        return True

    def is_completed(self):
        return True


def _fake_peers(monkeypatch, peers, world=2, group_rank=0):
    """Replace the collective by a table whose other columns are ``peers`` (group rank -> dict of
    row values); returns the list of columns this rank sent."""
    import lowlevel.dp as dp

    sent = []
    real_start = dp._start

    def fake_start(config, column):
        st = config._state
        host = np.zeros((dp.ROWS, world), dtype=np.int32)
        st.bufs = {"host": None, "np": host, "pin": False, "out": None, "out_np": None, "out_i": dp._OUT_BLOCK}
        st.group_size, st.group_rank = world, group_rank
        # fill our column exactly as the real code does, by running it against a stub group
        host[:dp.PLAN_ROWS, group_rank] = column
        host[dp.R_PRESENT, config.dp_rank] += 1
        host[dp.R_DP_RANK, group_rank] = config.dp_rank
        host[dp.R_DP_SIZE, group_rank] = config.dp_size
        host[dp.R_NUM_UBATCHES, group_rank] = config.num_ubatches
        host[dp.R_STEP, group_rank] = st.step
        for c, vals in peers.items():
            full = dict(unpadded=600, padded=640, wants=1, allows=1, mode=2, dp_rank=c, dp_size=world,
                        num_ubatches=config.num_ubatches, step=st.step)
            full.update(vals)
            host[:dp.PLAN_ROWS, c] = [full[k] for k in ("unpadded", "padded", "wants", "allows", "mode")]
            if 0 <= full["dp_rank"] < world:
                host[dp.R_PRESENT, full["dp_rank"]] += 1
            host[dp.R_DP_RANK, c] = full["dp_rank"]
            host[dp.R_DP_SIZE, c] = full["dp_size"]
            host[dp.R_NUM_UBATCHES, c] = full["num_ubatches"]
            host[dp.R_STEP, c] = full["step"]
        sent.append(column)
        return _DoneWork()

    assert real_start is not None
    monkeypatch.setattr(dp, "_start", fake_start)
    return sent


def test_one_collective_per_call_with_fake(monkeypatch):
    sent = _fake_peers(monkeypatch, {1: {}})
    cfg = lowlevel.DPConfig(2, 0, enable_microbatching=True)
    should, counts, mode = lowlevel.coordinate_batch_across_dp(520, True, True, cfg, num_tokens_padded=528,
                                                               uniform_decode=False, cudagraph_mode=1)
    assert sent == [(520, 528, 1, 1, 1)]
    assert should is True and mode == 1
    assert counts.dtype.is_floating_point is False and counts.tolist() == [640, 640]
    assert counts.numpy().dtype == np.int32 and cfg.step == 1


def test_plan_follows_dp_rank_order_not_group_order(monkeypatch):
    # this process is group rank 1 but dp_rank 0; the peer is group rank 0, dp_rank 1
    _fake_peers(monkeypatch, {0: {"dp_rank": 1, "padded": 64, "unpadded": 60, "mode": 0}}, group_rank=1)
    cfg = lowlevel.DPConfig(2, 0)
    should, counts, mode = lowlevel.coordinate_batch_across_dp(5, False, True, cfg, num_tokens_padded=8)
    assert (should, counts.tolist(), mode) == (False, [8, 64], 0)


@pytest.mark.parametrize("peer,match", [
    ({"dp_size": 3}, "group rank 1 has dp_size 3"),
    ({"dp_rank": 0}, "duplicate dp_rank 0"),
    ({"num_ubatches": 3}, "num_ubatches differs"),
    ({"step": 1}, "different steps"),
])
def test_mismatch_in_the_table_raises_and_leaves_step(monkeypatch, peer, match):
    _fake_peers(monkeypatch, {1: peer})
    cfg = lowlevel.DPConfig(2, 0)
    with pytest.raises(lowlevel.DPSyncError, match=match):
        lowlevel.coordinate_batch_across_dp(5, False, True, cfg)
    assert cfg.step == 0 and cfg._state.inflight is None
    _fake_peers(monkeypatch, {1: {}})
    lowlevel.coordinate_batch_across_dp(5, False, True, cfg)  # agreement again: the config still works
    assert cfg.step == 1


def test_own_dp_size_against_group_is_a_value_error(monkeypatch):
    import lowlevel.dp as dp

    _fake_peers(monkeypatch, {1: {"dp_size": 3}})
    cfg = lowlevel.DPConfig(3, 0)
    with pytest.raises(ValueError, match="dp_size must equal the group's size") as ei:
        lowlevel.coordinate_batch_across_dp(5, False, True, cfg)
    assert isinstance(ei.value, dp.DPSyncError) and isinstance(ei.value, dp.DPConfigError)


def test_one_vote_in_flight(monkeypatch):
    import lowlevel.dp as dp

    _fake_peers(monkeypatch, {1: {}})
    cfg = lowlevel.DPConfig(2, 0)
    vote = dp.coordinate_batch_across_dp_async(5, False, True, cfg, cudagraph_mode=2)
    with pytest.raises(RuntimeError, match="already in flight"):
        cfg.start(5, False, True)
    with pytest.raises(RuntimeError, match="already in flight"):
        lowlevel.coordinate_batch_across_dp(5, False, True, cfg)
    assert vote.done() and cfg.step == 0
    plan = vote.result()
    assert plan[0] is False and plan[1].tolist() == [640, 640] and plan[2] == 2
    assert vote.result() is plan and cfg.step == 1  # idempotent, counted once
    assert cfg.start(5, False, True).result()[1].tolist() == [5, 640]  # mode NONE: no padding


def _args(**kw):
    args = dict(num_tokens_unpadded=5, allow_microbatching=False, allow_dp_padding=True,
                config=lowlevel.DPConfig(2, 0), num_tokens_padded=8, uniform_decode=False, cudagraph_mode=0)
    args.update(kw)
    return args


@pytest.mark.parametrize("kw,exc,match", [
    (dict(num_tokens_unpadded=-1), ValueError, "num_tokens_unpadded"),
    (dict(num_tokens_unpadded=5.0), TypeError, "num_tokens_unpadded"),
    (dict(num_tokens_unpadded=True), TypeError, "num_tokens_unpadded"),
    (dict(num_tokens_padded=3), ValueError, "num_tokens_padded"),
    (dict(num_tokens_padded=np.float64(8)), TypeError, "num_tokens_padded"),
    (dict(num_tokens_padded=2**31), ValueError, "num_tokens_padded"),
    (dict(cudagraph_mode=3), ValueError, "cudagraph_mode"),
    (dict(cudagraph_mode=-1), ValueError, "cudagraph_mode"),
    (dict(cudagraph_mode=True), TypeError, "cudagraph_mode"),
    (dict(cudagraph_mode=1.0), TypeError, "cudagraph_mode"),
    (dict(cudagraph_mode="FULL"), TypeError, "cudagraph_mode"),
    (dict(cudagraph_mode=np.bool_(True)), TypeError, "cudagraph_mode"),
    (dict(cudagraph_mode=lowlevel.CUDAGraphMode.FULL_AND_PIECEWISE), ValueError, "cudagraph_mode"),
    (dict(allow_microbatching=True, uniform_decode=None), ValueError, "uniform_decode"),
    (dict(allow_microbatching=1), TypeError, "allow_microbatching"),
    (dict(allow_dp_padding="yes"), TypeError, "allow_dp_padding"),
    (dict(config="cfg"), TypeError, "config"),
])
def test_bad_input_fails_before_any_collective(monkeypatch, kw, exc, match):
    import lowlevel.dp as dp

    monkeypatch.setattr(dp, "_start", lambda *a: pytest.fail("collective reached"))
    args = _args(**kw)
    with pytest.raises(exc, match=match):
        lowlevel.coordinate_batch_across_dp(**args)
    cfg = args["config"]
    if isinstance(cfg, lowlevel.DPConfig):
        assert cfg.step == 0 and cfg._state.inflight is None and not cfg._state.bufs


@pytest.mark.parametrize("mode,want", [(lowlevel.CUDAGraphMode.FULL, 2), (lowlevel.CUDAGraphMode.NONE, 0),
                                       (np.int32(1), 1), (np.int64(2), 2), (1, 1)])
def test_mode_accepts_enum_and_ints(monkeypatch, mode, want):
    _fake_peers(monkeypatch, {1: {"mode": 2}})
    got = lowlevel.coordinate_batch_across_dp(5, False, True, lowlevel.DPConfig(2, 0), cudagraph_mode=mode)
    assert got[2] == want and type(got[2]) is int


@pytest.mark.parametrize("args,kw,exc,match", [
    ((2, 2), {}, ValueError, "dp_rank"),
    ((0, 0), {}, ValueError, "dp_size"),
    ((2.0, 0), {}, TypeError, "dp_size"),
    ((True, 0), {}, TypeError, "dp_size"),
    ((2, False), {}, TypeError, "dp_rank"),
    ((2, -1), {}, ValueError, "dp_rank"),
    ((2, 0), dict(num_ubatches=1), ValueError, "num_ubatches"),
    ((2, 0), dict(num_ubatches=2.5), TypeError, "num_ubatches"),
    ((2, 0), dict(decode_token_threshold=-1), ValueError, "decode_token_threshold"),
    ((2, 0), dict(prefill_token_threshold="512"), TypeError, "prefill_token_threshold"),
    ((2, 0), dict(timeout_s=0), ValueError, "timeout_s"),
    ((2, 0), dict(timeout_s=-1.0), ValueError, "timeout_s"),
    ((2, 0), dict(timeout_s=float("nan")), ValueError, "timeout_s"),
    ((2, 0), dict(timeout_s=float("inf")), ValueError, "timeout_s"),
    ((2, 0), dict(timeout_s=True), TypeError, "timeout_s"),
    ((2, 0), dict(timeout_s="5"), TypeError, "timeout_s"),
    ((2, 0), dict(enable_microbatching=1), TypeError, "enable_microbatching"),
    ((2, 0), dict(use_device_collective="nccl"), TypeError, "use_device_collective"),
])
def test_config_validation(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        lowlevel.DPConfig(*args, **kw)


def test_config_takes_numpy_ints_and_is_immutable():
    cfg = lowlevel.DPConfig(np.int64(4), np.int32(3), num_ubatches=np.int16(3), timeout_s=np.float32(2.5))
    assert (cfg.dp_size, cfg.dp_rank, cfg.num_ubatches) == (4, 3, 3)
    assert type(cfg.dp_size) is int and type(cfg.timeout_s) is float and cfg.step == 0
    with pytest.raises(AttributeError):
        cfg.dp_size = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.step = 3  # type: ignore[misc]


def test_thresholds_use_greater_or_equal():
    cfg = lowlevel.DPConfig(2, 0, enable_microbatching=True, decode_token_threshold=32, prefill_token_threshold=512)
    assert lowlevel.check_ubatch_thresholds(cfg, 32, True) and not lowlevel.check_ubatch_thresholds(cfg, 31, True)
    assert lowlevel.check_ubatch_thresholds(cfg, 512, False) and not lowlevel.check_ubatch_thresholds(cfg, 511, False)
    assert not lowlevel.check_ubatch_thresholds(lowlevel.DPConfig(2, 0), 10_000, False)


# --- slices ---------------------------------------------------------------------------------

def S(r0, r1, t0, t1):
    return lowlevel.UBatchSlice(slice(r0, r1), slice(t0, t1))


def test_slices_goldens():
    assert lowlevel.maybe_create_ubatch_slices(False, [8, 8], 16, 2) == (None, None)
    s, p = lowlevel.maybe_create_ubatch_slices(True, np.array([8, 8]), 16, 2, split_point=12)
    assert s == [S(0, 2, 0, 12), S(1, 2, 12, 16)]  # request 1 straddles: in both
    assert [len(range(x.request_slice.start, x.request_slice.stop)) for x in s] == [2, 1]
    s, _ = lowlevel.maybe_create_ubatch_slices(True, [8, 8], 16, 2, split_point=4)
    assert s == [S(0, 1, 0, 4), S(0, 2, 4, 16)]
    # default split at padded // 2; the last boundary is the unpadded total; the padded copy extends it
    s, p = lowlevel.maybe_create_ubatch_slices(True, [751, 59, 77], 1024, 4)
    assert s == [S(0, 1, 0, 512), S(0, 3, 512, 887)]
    assert p == [S(0, 1, 0, 512), S(0, 4, 512, 1024)]
    assert s[1].num_tokens == 375 and not s[1].is_empty() and S(1, 1, 3, 5).is_empty()
    s, p = lowlevel.maybe_create_ubatch_slices(True, [4] * 6, 24, 6, num_ubatches=3)
    assert s == [S(0, 2, 0, 8), S(2, 4, 8, 16), S(4, 6, 16, 24)] and p == s


def test_slices_bad_input():
    with pytest.raises(ValueError):
        lowlevel.maybe_create_ubatch_slices(True, [8, 8], 10, 2)
    with pytest.raises(ValueError):
        lowlevel.maybe_create_ubatch_slices(True, [8, 8], 16, 2, num_ubatches=3, split_point=[5])


# --- real torch.distributed over gloo, one process per rank -----------------------------------

def _spawn(world, tmp_path, steps, mode="plan", timeout=240):
    sys.path.insert(0, HERE)
    import dp_worker

    try:
        return dp_worker.spawn(world, tmp_path, steps, mode, "gloo", timeout)
    except AssertionError as e:  # a rank hung or died
        pytest.fail(str(e))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_gloo_ranks_agree_and_match_reference(world, tmp_path):
    steps = 60
    res = _spawn(world, tmp_path, steps)
    for r in res:
        assert r["steps"] == steps
        assert all(p["ok"] for p in r["plans"]), [p for p in r["plans"] if not p["ok"]][:3]
        assert all(p["dtype"] == "torch.int32" for p in r["plans"])
    for step in range(steps):
        assert len({json.dumps(r["plans"][step]["got"]) for r in res}) == 1  # identical plan everywhere
    # the random steps exercised every branch
    gots = [p["got"] for p in res[0]["plans"]]
    assert any(g[0] for g in gots) and not all(g[0] for g in gots)
    assert {g[2] for g in gots} >= {0, 1}


def test_gloo_timeout_names_step_and_rank(tmp_path):
    res = _spawn(2, tmp_path, 0, mode="timeout", timeout=120)
    err = res[0]["error"]
    assert err is not None and "step 0" in err and "dp_rank 0" in err, err
    assert res[0]["elapsed"] < 7.5


MISMATCH = {  # kind -> (what every rank's message names, error class on the ranks that are themselves wrong)
    "dp_size": "dp_size differs from the group's size",
    "dp_size_all": "dp_size differs from the group's size",
    "dup_rank": "duplicate dp_rank 0",
    "num_ubatches": "num_ubatches differs",
    "step": "different steps",
}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", sorted(MISMATCH))
def test_gloo_mismatch_raises_on_every_rank(world, kind, tmp_path):
    res = [r["kinds"][kind] for r in _spawn(world, tmp_path, 0, mode=f"mismatch-{kind}", timeout=120)]
    for rank, r in enumerate(res):
        assert r["error"] is not None and MISMATCH[kind] in r["error"], r
        assert "DPSyncError" in r["error_types"], r
        assert r["elapsed"] < 20 and r["step"] == (1 if kind == "step" and rank == world - 1 else 0)
        assert r["after"] == world  # the group still works: nothing was left half-done
    if kind == "dup_rank":
        assert "missing dp_rank [" + str(world - 1) + "]" in res[0]["error"]
    if kind.startswith("dp_size"):  # the ranks whose own dp_size is wrong also raise a ValueError
        for rank, r in enumerate(res):
            own_wrong = kind == "dp_size_all" or rank > 0
            assert ("ValueError" in r["error_types"]) == own_wrong, r
            assert ("dp_size must equal the group's size" in r["error"]) == own_wrong


def test_gloo_other_wait_in_real_processes(tmp_path, monkeypatch):
    """Plans, the async vote and a timeout with the gloo wait that this host does not pick by
    default (spin where it has fewer than 8 cores, else timeout); the tests above cover the default."""
    import lowlevel.dp as dp

    wait = "timeout" if dp._cpus() >= dp._SPIN_MIN_CPUS else "spin"
    monkeypatch.setenv("LOWLEVEL_DP_GLOO_WAIT", wait)
    for d in ("plan", "async", "timeout"):
        (tmp_path / d).mkdir()
    for r in _spawn(2, tmp_path / "plan", 20):
        assert r["steps"] == 20 and all(p["ok"] for p in r["plans"])
    for r in _spawn(2, tmp_path / "async", 10, mode="async", timeout=180):
        assert all(r["same"]) and r["gen_error"] and "different steps" in r["gen_error"]
    err = _spawn(2, tmp_path / "timeout", 0, mode="timeout", timeout=120)[0]
    assert err["error"] and "timed out" in err["error"] and "step 0" in err["error"] and err["elapsed"] < 7.5


def test_gloo_async_vote_equals_blocking_and_detects_generation(tmp_path):
    res = _spawn(2, tmp_path, 30, mode="async", timeout=180)
    for r in res:
        assert all(r["same"]) and len(r["same"]) == 30 and r["step"] == 30
        assert r["second_start"] and "already in flight" in r["second_start"]
        assert r["gen_error"] and "different steps" in r["gen_error"] and r["gen_elapsed"] < 20


def test_results_are_never_reused(monkeypatch):
    import lowlevel.dp as dp

    _fake_peers(monkeypatch, {1: {"padded": 7, "mode": 0}})
    cfg = lowlevel.DPConfig(2, 0)
    outs = []
    for k in range(dp._OUT_BLOCK + 5):  # across a block boundary
        outs.append(lowlevel.coordinate_batch_across_dp(k, False, True, cfg)[1])
    assert [o.tolist() for o in outs] == [[k, 7] for k in range(dp._OUT_BLOCK + 5)]
    outs[0][0] = -1  # a caller writing its result touches no other step's
    assert outs[1].tolist() == [1, 7]


# --- merged traces of several ranks -----------------------------------------------------------

def test_merge_traces_aligns_ranks_and_plots(tmp_path):
    from lowlevel.trace_merge import merge_traces, plot_merged

    traces = []
    for rank, offset in ((0, 0.0), (1, 5.0)):  # rank 1's clock reads 5 ms later for the same moment
        tl = lowlevel.Timeline()
        tl.add("align", "compute", offset + 0.0, offset + 1.0)
        tl.add("ub0.0", "compute", offset + 1.0, offset + 3.0)
        tl.add("ub0.1", "comm", offset + 3.0, offset + 4.0 + rank)
        traces.append(tl.to_chrome_trace(str(tmp_path / f"r{rank}.json")))
    merged = merge_traces([traces[0], str(tmp_path / "r1.json")], path=str(tmp_path / "m.json"))
    ev = [e for e in merged["traceEvents"] if e["ph"] == "X"]
    by = {(e["pid"], e["name"]): e for e in ev}
    assert by[(0, "align")]["ts"] + by[(0, "align")]["dur"] == by[(1, "align")]["ts"] + by[(1, "align")]["dur"]
    assert by[(1, "ub0.1")]["ts"] == by[(0, "ub0.1")]["ts"] == 3000.0 and by[(1, "ub0.1")]["dur"] == 2000.0
    assert min(e["ts"] for e in ev) == 0.0
    procs = {e["pid"]: e["args"]["name"] for e in merged["traceEvents"] if e["name"] == "process_name"}
    assert procs == {0: "rank 0", 1: "rank 1"}
    tracks = {(e["pid"], e["args"]["name"]) for e in merged["traceEvents"] if e["name"] == "thread_name"}
    assert tracks == {(0, "comm"), (0, "compute"), (1, "comm"), (1, "compute")}
    png = plot_merged(str(tmp_path / "m.json"), str(tmp_path / "m.png"))
    assert os.path.getsize(png) > 1000
    with pytest.raises(ValueError, match="no span named"):
        merge_traces(traces, align="barrier")
    with pytest.raises(TypeError):
        merge_traces([{"events": []}])


# --- property tests: the table logic against plain single-process statements ---------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st

_col = st.tuples(st.integers(0, 5000), st.integers(0, 64), st.booleans(), st.booleans(), st.integers(0, 2))


@settings(max_examples=300, deadline=None)
@given(cols=st.lists(_col, min_size=2, max_size=8), n=st.integers(2, 4))
def test_plan_matches_reference(cols, n):
    sys.path.insert(0, HERE)
    import dp_worker

    full = [(u, u + p, int(w), int(a), m) for u, p, w, a, m in cols]
    got = post_process_dp_table(np.array(full, dtype=np.int32).T, n)
    want = dp_worker.reference_plan(full, n)
    assert (got[0], got[1], got[2]) == (want[0], list(want[1]), want[2])
    assert got[3] == (want[0] or (all(c[3] for c in full) and want[2] != 0))


@settings(max_examples=300, deadline=None)
@given(data=st.data(), w=st.integers(1, 6))
def test_table_check_finds_exactly_the_mismatches(data, w):
    from lowlevel import dp

    ranks = data.draw(st.lists(st.integers(0, w), min_size=w, max_size=w), label="dp_rank per group rank")
    sizes = data.draw(st.lists(st.sampled_from([w, w, w + 1]), min_size=w, max_size=w), label="dp_size")
    nubs = data.draw(st.lists(st.sampled_from([2, 2, 3]), min_size=w, max_size=w), label="num_ubatches")
    steps = data.draw(st.lists(st.sampled_from([7, 7, 8]), min_size=w, max_size=w), label="steps")
    t = np.zeros((dp.ROWS, w), dtype=np.int32)
    for c in range(w):  # what each process writes, summed as the all-reduce would
        if ranks[c] < w:
            t[dp.R_PRESENT, ranks[c]] += 1
        t[dp.R_DP_RANK, c], t[dp.R_DP_SIZE, c] = ranks[c], sizes[c]
        t[dp.R_NUM_UBATCHES, c], t[dp.R_STEP, c] = nubs[c], steps[c]
    text = " ".join(dp.check_dp_table(t))
    assert ("dp_size differs" in text) == any(s != w for s in sizes)
    assert ("duplicate dp_rank" in text) == (len({r for r in ranks if r < w}) < sum(r < w for r in ranks))
    assert ("missing dp_rank" in text) == (set(range(w)) - set(ranks) != set())
    assert ("out-of-range dp_rank" in text) == any(r >= w for r in ranks)
    assert ("num_ubatches differs" in text) == (len(set(nubs)) > 1)
    assert ("different steps" in text) == (len(set(steps)) > 1)
    assert (text == "") == (sorted(ranks) == list(range(w)) and set(sizes) == {w} and len(set(nubs)) == 1
                            and len(set(steps)) == 1)


# --- the gloo path's own code (two tables, fast check), against a fake group -----------------------

class _FakeGroup:
    """Sums this process's table with the peers' columns, as a gloo all-reduce would; ``peers``:
    group rank -> dict of row values (``dp_rank``, ``step`` ... and the five plan values)."""

    def __init__(self, world, done=True):
        self.world, self.peers, self.done, self.calls = world, {}, done, 0

    def allreduce(self, tensors, opts):
        from lowlevel import dp

        self.calls += 1
        t = tensors[0].numpy()
        assert t.shape == (dp.ROWS, self.world)
        for c, p in self.peers.items():
            t[:dp.PLAN_ROWS, c] += p["plan"]
            if 0 <= p["dp_rank"] < self.world:
                t[dp.R_PRESENT, p["dp_rank"]] += 1
            t[dp.R_DP_RANK, c] += p["dp_rank"]
            t[dp.R_DP_SIZE, c] += p.get("dp_size", self.world)
            t[dp.R_NUM_UBATCHES, c] += p.get("num_ubatches", 2)
            t[dp.R_STEP, c] += p["step"]
        return _DoneWork() if self.done else _NeverWork()


class _NeverWork:
    def __init__(self):
        self.waits = []

    def wait(self, timeout=None):
        self.waits.append(timeout)
        return False

    def is_completed(self):
        return False


def _fake_group_config(monkeypatch, world, group_rank, dp_rank, done=True, **kw):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: group_rank)
    cfg = lowlevel.DPConfig(world, dp_rank, **kw)
    g = _FakeGroup(world, done)
    object.__setattr__(cfg, "group", g)  # a stand-in for a ProcessGroup (the constructor checks the type)
    return cfg, g


@pytest.mark.parametrize("wait", ["timeout", "spin"])
def test_gloo_fast_path_equals_the_full_check(monkeypatch, wait):
    """Many steps through the real gloo start/finish (a dp_rank order other than the group's): every
    plan equals the reference, every mismatch raises (also after the fast path took over), the full
    check runs only at the first step and at mismatches, and results are never reused."""
    import random

    import lowlevel.dp as dp

    sys.path.insert(0, HERE)
    import dp_worker

    monkeypatch.setattr(dp, "_GLOO_WAIT", wait)
    full_checks = []
    real_check = dp.check_dp_table
    monkeypatch.setattr(dp, "check_dp_table", lambda t: full_checks.append(1) or real_check(t))
    world, me = 3, 1  # group rank 1 is dp_rank 0; group rank 0 is dp_rank 2, group rank 2 dp_rank 1
    dp_rank_of = {0: 2, 1: 0, 2: 1}
    cfg, g = _fake_group_config(monkeypatch, world, me, dp_rank_of[me], enable_microbatching=True,
                                timeout_s=30)
    rng = random.Random(7)
    outs, mismatches = [], 0
    for k in range(300):
        inputs = {c: dp_worker.step_inputs(k, c) for c in range(world)}
        cols = {}
        for c, a in inputs.items():
            wants = int(a["allow_microbatching"] and lowlevel.check_ubatch_thresholds(
                cfg, a["num_tokens_unpadded"], a["uniform_decode"]))
            cols[c] = (a["num_tokens_unpadded"], a["num_tokens_padded"], wants, int(a["allow_dp_padding"]),
                       a["cudagraph_mode"])
        g.peers = {c: {"plan": cols[c], "dp_rank": dp_rank_of[c], "step": cfg.step % 2**31}
                   for c in range(world) if c != me}
        bad = k > 0 and rng.random() < 0.1
        if bad:
            peer = g.peers[rng.choice([0, 2])]
            key, value = rng.choice([("step", cfg.step + 1), ("num_ubatches", 3), ("dp_size", world + 1),
                                     ("dp_rank", dp_rank_of[me])])
            peer[key] = value
        step, checks = cfg.step, len(full_checks)
        if bad:
            mismatches += 1
            with pytest.raises(lowlevel.DPSyncError, match="disagree"):
                lowlevel.coordinate_batch_across_dp(**inputs[me], config=cfg)
            assert cfg.step == step and cfg._state.inflight is None and len(full_checks) == checks + 1
            continue
        should, counts, mode = lowlevel.coordinate_batch_across_dp(**inputs[me], config=cfg)
        by_dp_rank = [cols[c] for c in sorted(cols, key=dp_rank_of.__getitem__)]
        want = dp_worker.reference_plan(by_dp_rank, 2)
        assert (should, counts.tolist(), mode) == (want[0], list(want[1]), want[2]), k
        assert counts.dtype == __import__("torch").int32 and cfg.step == step + 1
        # the full check runs at the first step and after a mismatch (which does not set the rows)
        assert len(full_checks) == checks + (k == 0)
        outs.append((counts, list(want[1])))
    assert mismatches > 10 and g.calls == 300
    assert all(o.tolist() == w for o, w in outs)  # no later step wrote over an earlier result


def test_gloo_spin_wait_keeps_the_timeout(monkeypatch):
    import datetime

    import lowlevel.dp as dp

    monkeypatch.setattr(dp, "_GLOO_WAIT", "spin")
    monkeypatch.setattr(dp, "_GLOO_SPIN_S", 0.05)
    cfg, g = _fake_group_config(monkeypatch, 2, 0, 0, done=False, timeout_s=0.2)
    vote = cfg.start(5, False, True)
    work = vote._work
    t0 = time.monotonic()
    with pytest.raises(lowlevel.DPSyncError, match="timed out after 0.2 s"):
        vote.result()
    assert 0.04 < time.monotonic() - t0 < 5
    # spun for the spin budget, then waited for the rest of the timeout, never longer
    assert len(work.waits) == 1 and isinstance(work.waits[0], datetime.timedelta)
    assert 0.1 <= work.waits[0].total_seconds() <= 0.16
    with pytest.raises(lowlevel.DPSyncError, match="earlier vote failed"):
        cfg.start(5, False, True)
