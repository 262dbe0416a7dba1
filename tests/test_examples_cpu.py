"""The examples that need no GPU, run as a user runs them (subprocesses, time-bounded), and the
GPU examples' behaviour on a machine without one (they say why and exit 0)."""
import json
import os
import subprocess
import sys

import pytest

import lowlevel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EX = os.path.join(ROOT, "examples")


def run_example(name, *args, timeout=120, env=None):
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
             OMP_NUM_THREADS="1", **(env or {}))
    e.pop("LOWLEVEL_REQUIRE_GPU", None)
    r = subprocess.run([sys.executable, os.path.join(EX, name), *args], cwd=ROOT, env=e, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"{name} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_dispatcher_pads_to_the_ladder_and_falls_back_to_eager():
    out = run_example("dispatcher.py", "--max-size", "32", "--sizes", "3", "9", "33")
    rows = {(int(line.split()[0]), line.split()[1]): line.split()[2:4] for line in out.splitlines()
            if line.strip() and line.split()[0].isdigit()}
    assert rows[(3, "False")] == ["PIECEWISE", "4"] and rows[(3, "True")] == ["FULL", "4"]
    assert rows[(9, "True")] == ["FULL", "16"]
    assert rows[(33, "False")] == ["NONE", "33"]  # above the ladder: eager, unpadded
    assert "above the largest capture size: NONE" in out


def test_dispatcher_help():
    assert "--max-size" in run_example("dispatcher.py", "--help")


def test_slicing_splits_requests_and_pads_the_last_microbatch():
    out = run_example("slicing.py", "--tokens", "5", "1", "7", "3", "--padded", "18")
    assert "ubatch 0: requests [0, 3) tokens [0, 9) = 9; padded tokens [0, 9)" in out
    assert "ubatch 1: requests [2, 4) tokens [9, 16) = 7; padded tokens [9, 18)" in out
    out = run_example("slicing.py", "--tokens", "1", "1", "1", "1", "--padded", "8")
    assert "a microbatch has no real tokens" in out


def test_timeline_from_recorded_spans(tmp_path):
    out = run_example("timeline.py", "--out", str(tmp_path))
    assert "[recorded] 6 spans; busy ms: comm 1.800, compute 3.000; wall 3.600 ms" in out
    assert "overlap of 'comm' and 'compute': 1.200 ms" in out
    trace = json.load(open(tmp_path / "recorded_trace.json"))
    names = sorted(e["name"] for e in trace["traceEvents"] if e["ph"] == "X")
    assert names == ["a2a ub0", "a2a ub0", "a2a ub1", "attn ub0", "attn ub0", "attn ub1"]


def test_dp_sync_two_gloo_ranks_agree():
    out = run_example("dp_sync.py", "--world", "2", "--steps", "5", "--seed", "3", timeout=180)
    assert "2 ranks agreed on all 5 steps" in out
    rows = [line.split() for line in out.splitlines()[1:] if line.split() and line.split()[1].startswith("[")]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3, 4]


def test_fork_join_sequential_fallback():
    out = run_example("fork_join.py")
    assert "sequential fallback (no aux stream): outputs (64, 64), (64, 64), (64,): ok" in out


def test_sm_split_caps_kernels():
    out = run_example("sm_split.py", timeout=240)
    caps = [line for line in out.splitlines() if line.startswith("matmul")]
    assert len(caps) >= 2, out
    if not lowlevel.cuda_available():
        assert "capped at   2 of 8 SMs" in out


@pytest.mark.skipif(lowlevel.cuda_available(), reason="the GPU tier runs these examples in full")
@pytest.mark.parametrize("name", ["graphs.py", "microbatching.py", "fork_join.py", "timeline.py"])
def test_gpu_examples_say_why_without_a_gpu(name):
    out = run_example(name)
    assert "GPU part skipped" in out


def test_serve_decode_help():
    out = run_example("serve_decode.py", "--help")
    assert "--model" in out and "--dp" in out and "--tiny" in out


@pytest.mark.skipif(lowlevel.cuda_available(), reason="the GPU tier runs serve_decode on the GPU")
def test_serve_decode_cpu_smoke(tmp_path):
    """The model plumbing (MoE fork fallback, Triton RMSNorm under the interpreter, padding) on
    the CPU, where transformers is installed."""
    pytest.importorskip("transformers")
    js = tmp_path / "r.json"
    out = run_example("serve_decode.py", "--model", "qwen2moe", "--tiny", "--steps", "3", "--max-batch", "4",
                      "--no-progress", "--json", str(js), timeout=240)
    assert "TOKENS MATCH EAGER" in out
    (r,) = json.load(open(js))
    assert r["steps"] == 3 and r["patched"] == {"final_norm": 1, "moe_blocks_forked": 2}
    assert r["checked_tokens"] > 0 and r["mismatched_tokens"] == 0


@pytest.mark.skipif(lowlevel.cuda_available(), reason="the GPU tier runs serve_decode --dp 2 on two GPUs; on a GPU "
                    "machine the CPU path needs Triton's interpreter, which NumPy >= 2.4 breaks")
def test_serve_decode_cpu_dp2_gloo_async_vote(tmp_path):
    """Two ranks over gloo on the CPU: the async DP vote pads both ranks of a step to one size
    (tokens still equal eager's on the padded batch), on any machine with transformers."""
    pytest.importorskip("transformers")
    js = tmp_path / "r.json"
    out = run_example("serve_decode.py", "--model", "llama", "--tiny", "--steps", "4", "--max-batch", "4",
                      "--dp", "2", "--device", "cpu", "--no-progress", "--json", str(js), timeout=240)
    assert "TOKENS MATCH EAGER" in out, out
    rs = json.load(open(js))
    assert [r["rank"] for r in rs] == [0, 1] and all(r["backend"] == "gloo" and r["steps"] == 4 for r in rs)
    assert all(r["checked_tokens"] == r["tokens"] > 0 and r["mismatched_tokens"] == 0 for r in rs), rs
    assert rs[0]["tokens"] + rs[0]["padded_tokens"] == rs[1]["tokens"] + rs[1]["padded_tokens"], rs  # one size a step
