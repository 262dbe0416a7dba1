"""The benchmark harness on the CPU: report generation, comparison, the CPU modules run."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_report_from_stored_results(tmp_path):
    sys.path.insert(0, ROOT)
    from bench.report import write_report

    out = write_report(os.path.join(HERE, "data", "results_sample.json"), str(tmp_path / "REPORT.md"))
    text = open(out).read()
    assert "NVIDIA H100" in text and "| use_stream enter+exit | 2.7 | us | naive | 25 | 9.26x | <= 3 us |" in text
    assert "![sm_scaling.png]" in text and "trace.json" in text and "skipped `bench_dp`" in text


def test_compare_two_runs(tmp_path):
    a = json.load(open(os.path.join(HERE, "data", "results_sample.json")))
    b = json.loads(json.dumps(a))
    b["results"][0]["figures"][0]["value"] = 5.4
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    r = subprocess.run([sys.executable, "-m", "bench", "--compare", str(pa), str(pb)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "use_stream enter+exit" in r.stdout and "2.00" in r.stdout


def test_cpu_modules_run_and_gpu_ones_are_listed(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench", "--only", "dispatch", "timeline", "streams", "check", "--out",
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (res,) = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
    run = json.load(open(tmp_path / res))
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
    assert os.path.exists(tmp_path / "REPORT.md") and not os.path.exists(os.path.join(ROOT, "bench", "REPORT.md.tmp"))
