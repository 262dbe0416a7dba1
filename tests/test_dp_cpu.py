"""CPU tier of DP padding sync: post-processing, slicing goldens, validation, real gloo runs."""
import json
import os
import socket
import subprocess
import sys

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

    monkeypatch.setattr(dp, "_all_reduce", lambda *a: pytest.fail("no collective expected"))
    cfg = lowlevel.DPConfig(1, 0)
    assert lowlevel.coordinate_batch_across_dp(7, False, True, cfg, cudagraph_mode=2) == (False, None, 2)


def test_one_collective_per_call_with_fake(monkeypatch):
    import lowlevel.dp as dp

    calls = []

    def fake(config, column):
        calls.append(column)
        t = np.zeros((5, 2), dtype=np.int32)
        t[:, config.dp_rank] = column
        t[:, 1 - config.dp_rank] = (600, 640, 1, 1, 2)
        return t

    monkeypatch.setattr(dp, "_all_reduce", fake)
    cfg = lowlevel.DPConfig(2, 0, enable_microbatching=True)
    should, counts, mode = lowlevel.coordinate_batch_across_dp(520, True, True, cfg, num_tokens_padded=528,
                                                               uniform_decode=False, cudagraph_mode=1)
    assert calls == [(520, 528, 1, 1, 1)]
    assert should is True and mode == 1
    assert counts.dtype.is_floating_point is False and counts.tolist() == [640, 640]
    assert counts.numpy().dtype == np.int32 and cfg.step == 1


@pytest.mark.parametrize("kw,match", [
    (dict(num_tokens_unpadded=-1), "num_tokens_unpadded"),
    (dict(num_tokens_padded=3), "num_tokens_padded"),
    (dict(cudagraph_mode=3), "cudagraph_mode"),
    (dict(cudagraph_mode=lowlevel.CUDAGraphMode.FULL_AND_PIECEWISE), "cudagraph_mode"),
    (dict(allow_microbatching=True, uniform_decode=None), "uniform_decode"),
])
def test_bad_input_fails_before_any_collective(monkeypatch, kw, match):
    import lowlevel.dp as dp

    monkeypatch.setattr(dp, "_all_reduce", lambda *a: pytest.fail("collective reached"))
    args = dict(num_tokens_unpadded=5, allow_microbatching=False, allow_dp_padding=True,
                config=lowlevel.DPConfig(2, 0), num_tokens_padded=8, uniform_decode=False, cudagraph_mode=0)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        lowlevel.coordinate_batch_across_dp(**args)


def test_config_validation():
    with pytest.raises(ValueError, match="out of range"):
        lowlevel.DPConfig(2, 2)
    with pytest.raises(ValueError):
        lowlevel.DPConfig(0, 0)
    with pytest.raises(ValueError):
        lowlevel.DPConfig(2, 0, num_ubatches=1)
    with pytest.raises(ValueError):
        lowlevel.DPConfig(2, 0, timeout_s=0)


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

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world, tmp_path, steps, mode="plan", timeout=240):
    port = _free_port()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import dp_worker; "
            "dp_worker.run(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6]), sys.argv[7])")
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    procs = [subprocess.Popen([sys.executable, "-c", code, HERE, str(r), str(world), str(port), str(tmp_path),
                               str(steps), mode], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank hung")
        outs.append(out.decode(errors="replace"))
        assert p.returncode == 0, out.decode(errors="replace")[-3000:]
    return [json.load(open(tmp_path / f"rank{r}.json")) for r in range(world)]


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
