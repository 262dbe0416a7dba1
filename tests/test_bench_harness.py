"""The benchmark harness on the CPU: timers and their spread, report generation, comparison,
where results go, the CPU modules run."""
import copy
import json
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import common  # noqa: E402
from bench.common import Report, Timing, host_us, host_us_side_by_side, wall_ms  # noqa: E402
from bench.report import render, write_report  # noqa: E402

SAMPLE = os.path.join(HERE, "data", "results_sample.json")


def _load(path):
    with open(path) as f:
        return json.load(f)


def _read(path):
    with open(path) as f:
        return f.read()


# ---- timers -------------------------------------------------------------------------------------


def test_timing_median_and_percentiles_match_numpy():
    rng = np.random.default_rng()
    for size in (1, 2, 7, 31, 100):
        samples = list(rng.lognormal(1.0, 0.5, size))
        t = Timing.of(samples, n=13)
        assert float(t) == pytest.approx(float(np.median(samples)), rel=1e-12)
        p20, p80 = np.percentile(samples, [20, 80])  # linear interpolation = "inclusive" quantiles
        assert (t.p20, t.p80) == pytest.approx((p20, p80), rel=1e-12)
        assert t.p20 <= t <= t.p80 and t.trials == size and t.n == 13
    with pytest.raises(ValueError, match="samples"):
        Timing.of([])


def test_timing_survives_copy_and_pickle_and_acts_as_a_float():
    t = Timing.of([3.0, 1.0, 2.0, 5.0, 4.0], n=7)
    for u in (copy.copy(t), copy.deepcopy(t), pickle.loads(pickle.dumps(t))):
        assert isinstance(u, Timing) and float(u) == 3.0 and u.spread() == t.spread()
    assert t * 2 == 6.0 and type(t * 2) is float and json.loads(json.dumps(t)) == 3.0


def test_side_by_side_interleaves_trials():
    calls = []
    fns = [lambda k=k: calls.append(k) for k in "abc"]
    res = host_us_side_by_side(*fns, n=2, trials=3, warmup=0)
    assert calls == list("aabbcc" * 3)
    assert [r.trials for r in res] == [3, 3, 3] and [r.n for r in res] == [2, 2, 2]


def test_sync_brackets_every_trial():
    log = []
    host_us_side_by_side(lambda: log.append("a"), lambda: log.append("b"), n=1, trials=2, warmup=0,
                         sync=lambda: log.append("|"))
    assert "".join(log) == "|a||b||a||b|"


def test_untimed_sync_runs_before_each_trial_and_once_at_the_end():
    log = []
    host_us_side_by_side(lambda: log.append("a"), lambda: log.append("b"), n=1, trials=2, warmup=0,
                         sync=lambda: log.append("|"), sync_timed=False)
    assert "".join(log) == "|a|b|a|b|"


def test_trial_count_follows_the_time_budget():
    def sleepy():
        time.sleep(0.002)

    (t,) = host_us_side_by_side(sleepy, n=1, warmup=1, budget_ms=30.0)
    # one trial is >= 2 ms, so 30 ms hold at most 15 trials; never fewer than MIN_TRIALS
    assert common.MIN_TRIALS <= t.trials <= 15
    assert t.p20 >= 2000.0 and t >= 2000.0  # µs per call
    (t,) = host_us_side_by_side(sleepy, n=1, warmup=0, budget_ms=1e-3)
    assert t.trials == common.MIN_TRIALS
    (t,) = host_us_side_by_side(lambda: None, n=1, warmup=0, budget_ms=1e9)
    assert t.trials == common.MAX_TRIALS


def test_calls_per_trial_follow_the_trial_length():
    def sleepy():
        time.sleep(0.002)

    (t,) = host_us_side_by_side(sleepy, trials=1, warmup=2)  # ~HOST_TRIAL_MS (5 ms) / >= 2 ms
    assert 1 <= t.n <= 3
    (t,) = host_us_side_by_side(lambda: None, trials=1, warmup=0)  # 10 probe calls size n
    assert t.n > 100


def test_host_us_and_bad_arguments():
    t = host_us(lambda: sum(range(50)), n=100, trials=9, warmup=5)
    assert isinstance(t, Timing) and t.trials == 9 and 0 < t.p20 <= t <= t.p80
    with pytest.raises(ValueError, match="at least one function"):
        host_us_side_by_side()
    with pytest.raises(ValueError, match="n must be"):
        host_us(lambda: None, n=0)
    with pytest.raises(ValueError, match="trials must be"):
        host_us(lambda: None, trials=0)


def test_wall_ms_sizes_reps_from_the_budget(monkeypatch):
    import torch

    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: syncs.append(1))
    t = wall_ms(lambda: time.sleep(0.002), warmup=2, budget_ms=40.0)
    assert common.WALL_MIN_REPS <= t.trials <= 20 and t.n == 1 and t >= 2.0  # ms
    assert len(syncs) == 1 + t.trials
    assert wall_ms(lambda: None, warmup=0, reps=4).trials == 4


def test_report_add_keeps_the_spread_beside_each_median():
    rep = Report("bench_x", "/tmp")
    ours, theirs = Timing.of([1.0, 2.0, 3.0]), Timing.of([10.0, 20.0, 30.0, 40.0])
    f = rep.add("fig", ours, "us", "alt", theirs, extra={"note": 1})
    d = json.loads(json.dumps(f.to_json()))
    assert d["value"] == 2.0 and d["baseline"] == 25.0 and d["ratio"] == 12.5 and d["extra"]["note"] == 1
    assert d["extra"]["spread"]["value"] == {"p20": 1.4, "p80": 2.6, "trials": 3, "n": 1}
    assert d["extra"]["spread"]["baseline"]["p20"] == pytest.approx(16.0)
    assert d["extra"]["spread"]["baseline"]["p80"] == pytest.approx(34.0)
    plain = rep.add("plain", 3, "SMs")  # figures that are not timings carry no spread
    assert "spread" not in plain.to_json()["extra"] and plain.value == 3
    run = {"stamp": "s", "device": {}, "results": [{"module": "bench_x", "figures": [d], "files": []}]}
    assert "| fig | 2 (1.4 – 2.6) | us | alt | 25 (16 – 34) | 12.50x |  |" in render(run)


# ---- report, compare, where results go -----------------------------------------------------------


def test_report_from_stored_results(tmp_path):
    out = write_report(SAMPLE, str(tmp_path / "REPORT.md"))
    text = _read(out)
    assert "NVIDIA H100" in text and "| use_stream enter+exit | 2.7 | us | naive | 25 | 9.26x | <= 3 us |" in text
    assert "![sm_scaling.png]" in text and "trace.json" in text and "skipped `bench_dp`" in text


def test_compare_two_runs(tmp_path):
    a = _load(SAMPLE)
    b = json.loads(json.dumps(a))
    b["results"][0]["figures"][0]["value"] = 5.4
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    r = subprocess.run([sys.executable, "-m", "bench", "--compare", str(pa), str(pb)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "use_stream enter+exit" in r.stdout and "2.00" in r.stdout


def test_default_locations_keep_the_device_report(tmp_path, monkeypatch, capsys):
    """Without a GPU a default run writes into results/cpu/; with one, results/ and REPORT.md."""
    import lowlevel
    from bench import __main__ as bm

    here = tmp_path / "bench"
    monkeypatch.setattr(bm, "DEVICE_REPORT", str(here / "REPORT.md"))
    monkeypatch.setattr(bm, "RESULTS", str(here / "results"))
    monkeypatch.setattr(bm, "CPU_RESULTS", str(here / "results" / "cpu"))
    assert bm.main(["--only", "dispatch"]) == 0
    out, err = capsys.readouterr()
    if lowlevel.cuda_available():
        folder, report = here / "results", here / "REPORT.md"
    else:
        folder, report = here / "results" / "cpu", here / "results" / "cpu" / "REPORT.md"
        assert not (here / "REPORT.md").exists() and "left as it is" in err
    (res,) = [p for p in os.listdir(folder) if p.endswith(".json")]
    assert f"wrote {folder / res}" in out and f"wrote {report}" in out
    assert "dispatch()" in _read(report)
    # --report on a stored file puts the report beside a CPU run, in bench/REPORT.md for a GPU run
    run = _load(folder / res)
    for gpu in (False, True):
        run["device"] = {"name": "NVIDIA H200", "sm_count": 132} if gpu else {"name": None, "reason": "none"}
        path = here / "results" / f"x{gpu}.json"
        path.write_text(json.dumps(run))
        assert bm._report_path(str(path)) == str(here / "REPORT.md" if gpu else here / "results" / "REPORT.md")


def test_cpu_modules_run_and_gpu_ones_are_listed(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench", "--only", "dispatch", "timeline", "streams", "check", "--out",
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (res,) = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
    run = _load(tmp_path / res)
    mods = {m["module"] for m in run["results"]}
    import lowlevel

    if lowlevel.cuda_available():
        assert "bench_streams" in mods
    else:
        assert mods == {"bench_dispatch", "bench_timeline", "bench_kernel_check"}
        assert [s[0] for s in run["skipped"]] == ["bench_streams"] and "needs a GPU" in run["skipped"][0][1]
    assert all(f["value"] > 0 for m in run["results"] for f in m["figures"] if f["unit"] != "rel err")
    errs = [f["value"] for m in run["results"] for f in m["figures"] if f["unit"] == "rel err"]
    assert len(errs) == 3 and all(e < 1e-5 for e in errs)
    timed = [f for m in run["results"] for f in m["figures"] if f["unit"] == "us"]
    assert timed and all(f["extra"]["spread"]["value"]["p20"] <= f["value"] <= f["extra"]["spread"]["value"]["p80"]
                         for f in timed)
    assert all(f["extra"]["spread"]["baseline"]["trials"] >= 5 for f in timed)
    report = _read(tmp_path / "REPORT.md")
    assert " – " in report and "p20" in report
    assert not os.path.exists(os.path.join(ROOT, "bench", "REPORT.md.tmp"))


class _FakeEvent:
    """A timing event at ``t`` µs (elapsed_time in ms, as CUDA events)."""

    def __init__(self, t):
        self.t = t

    def elapsed_time(self, other):
        return (other.t - self.t) / 1e3


@pytest.mark.parametrize("c,a", [(100.0, 150.0), (130.0, 70.0), (90.0, 90.0)])
def test_stage_times_recovers_stage_lengths_from_the_events(c, a):
    """bench_ubatch_nccl.stage_times: from the events after each stage of a 2-microbatch
    pipeline (compute stream c0 c1 c0' c1' ..., comm stream a0 a1 a0' ...; compute i of layer L
    waits for comm i of layer L-1, comm i for compute i), each stage's own length, whichever
    stream is the bottleneck; marks before the last ``start`` (a warm-up) are ignored."""
    import random

    from bench.bench_ubatch_nccl import stage_times

    layers, rng = 4, random.Random(7)
    t, ce, ae, want_c, want_a = {}, 0.0, 0.0, [], []
    for layer in range(layers):
        for i in range(2):
            dc, da = c + rng.uniform(-5, 5), a + rng.uniform(-5, 5)
            ce = max(ce, t.get(f"a{i}.{layer - 1}", 0.0)) + dc
            t[f"c{i}.{layer}"] = ce
            ae = max(ae, ce) + da
            t[f"a{i}.{layer}"] = ae
            want_c.append(dc)
            want_a.append(da)
    marks = [("start", _FakeEvent(-500.0)), ("c0.0", _FakeEvent(-400.0)), ("start", _FakeEvent(1000.0))]
    marks += [(n, _FakeEvent(1000.0 + v)) for n, v in t.items()]
    cs, as_ = stage_times(marks, layers)
    assert cs == pytest.approx(want_c) and as_ == pytest.approx(want_a)


def test_run_ranks_results_and_each_failure_named(tmp_path):
    """bench.common.run_ranks (the multi-process launcher of the 2-GPU bench and the gloo / NCCL
    test workers): every rank's JSON in rank order; a rank that dies, hangs or writes nothing
    is named, with every rank's output, and nothing is left running."""
    from bench.common import run_ranks

    def cmd(body):
        return [sys.executable, "-c", "import json, sys, time, os; r = int(sys.argv[1]); " + body]

    write = "json.dump({'rank': r, 'x': r * 7}, open(os.path.join(sys.argv[2], f'rank{r}.json'), 'w'))"
    d = str(tmp_path)
    env = dict(os.environ)
    res = run_ranks([cmd(write) + [str(r), d] for r in range(3)], d, env=env, timeout=60)
    assert res == [{"rank": r, "x": r * 7} for r in range(3)]
    for r in range(3):
        os.remove(os.path.join(d, f"rank{r}.json"))
    dies = "print('peer state', r); sys.exit(3 if r == 1 else 0)"
    with pytest.raises(AssertionError, match=r"(?s)rank 1 died with 3 \(case\).*peer state 0.*peer state 1"):
        run_ranks([cmd(dies) + [str(r)] for r in range(2)], d, env=env, timeout=60, what=" (case)")
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match=r"(?s)rank 0 hung.*rank 1 \(exit"):
        run_ranks([cmd("print('waiting', flush=True); time.sleep(60)") + [str(r)] for r in range(2)], d, env=env,
                  timeout=2)
    assert time.monotonic() - t0 < 30  # killed, not waited for
    with pytest.raises(AssertionError, match=r"rank 0 wrote no results"):
        run_ranks([cmd("print('no file')") + [str(r)] for r in range(2)], d, env=env, timeout=60)
