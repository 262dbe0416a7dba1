"""Every GPU example, run as a user runs it (subprocesses, time-bounded, small sizes), and
serve_decode's tiny models: tokens of the replayed steps equal eager's on the same padded batch."""
import json
import os
import subprocess
import sys

import pytest

import lowlevel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EX = os.path.join(ROOT, "examples")
pytestmark = pytest.mark.gpu


def run_example(name, *args, timeout=150):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               LOWLEVEL_REQUIRE_GPU="1")  # a GPU example must not pass by skipping
    r = subprocess.run([sys.executable, os.path.join(EX, name), *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"{name} exited {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    assert "GPU part skipped" not in r.stdout
    return r.stdout


def test_fork_join():
    out = run_example("fork_join.py", "--size", "1024", "--reps", "5")
    for line in ("execute_in_parallel: 1 default + 2 aux branches joined: ok", "ParallelRunner(2): a None slot",
                 "maybe_execute_in_parallel with an aux stream: ok", "forked:"):
        assert line in out, out


def test_graphs():
    out = run_example("graphs.py", "--hidden", "256", "--max-size", "32", "--steps", "40")
    assert "captured 7 graphs" in out and "40 steps:" in out and "graph replay" in out, out


def test_microbatching():
    out = run_example("microbatching.py", "--tokens", "256", "--hidden", "256")
    for line in ("UBatchRunner(mode='generators')", "as one FULL graph", "UBatchRunner(mode='threads')",
                 "make_ubatch_contexts + 2 threads"):
        assert line in out, out


def test_sm_split():
    out = run_example("sm_split.py", "--size", "2048", "--comm-sms", "16")
    assert "after the block both budgets are every SM again: ok" in out and "overlapped, matmul" in out, out


def test_timeline_gpu_spans(tmp_path):
    out = run_example("timeline.py", "--out", str(tmp_path))
    assert "[gpu]" in out and (tmp_path / "gpu_trace.json").exists(), out
    names = {e["name"] for e in json.load(open(tmp_path / "gpu_trace.json"))["traceEvents"] if e["ph"] == "X"}
    assert {"matmul x4", "copy 128 MB", "default", "aux0"} <= names, names


def _serve(tmp_path, *args, timeout=150):
    pytest.importorskip("transformers")
    js = tmp_path / "r.json"
    out = run_example("serve_decode.py", "--tiny", "--no-progress", "--json", str(js), *args, timeout=timeout)
    return out, json.load(open(js))


@pytest.mark.parametrize("model", ["llama", "qwen2moe"])
def test_serve_decode_tiny_tokens_equal_eager(model, tmp_path):
    out, (r,) = _serve(tmp_path, "--model", model, "--steps", "24")
    assert "TOKENS MATCH EAGER" in out, out
    assert r["replayed"] > 0 and r["graphs"] == 11 and r["checked_steps"] == r["replayed"]
    assert r["checked_tokens"] > 0 and r["mismatched_tokens"] == 0
    assert r["patched"]["final_norm"] == 1 and r["patched"]["moe_blocks_forked"] == (2 if model == "qwen2moe" else 0)


def test_serve_decode_cupy_kernel_sampler_equals_eager(tmp_path):
    """The CuPy RawKernel argmax (one block a row) picks eager's greedy tokens, ragged sizes included."""
    out, (r,) = _serve(tmp_path, "--model", "llama", "--steps", "24", "--sampler", "cupy-kernel")
    assert "TOKENS MATCH EAGER" in out, out
    assert r["sampler"] == "cupy-kernel" and r["checked_tokens"] > 0 and r["mismatched_tokens"] == 0


def test_argmax_rows_matches_torch_on_ties_and_strided_rows():
    """Both kernels (16-byte loads for aligned rows whose length is a multiple of 4; scalar
    loads for a ragged length or a misaligned start) against torch's argmax: ties to the lowest
    column, the last column of the last row, rows with a stride."""
    import cupy
    import torch

    sys.path.insert(0, EX)
    import serve_decode as sd

    cases = [torch.randn(37, 32000 + 64, device="cuda")[:, :32000],  # aligned: vector loads
             torch.randn(37, 32001 + 7, device="cuda")[:, :32001],  # ragged length: scalar loads
             torch.randn(9, 4097, device="cuda")[:, 1:]]  # start 4 bytes in: scalar loads
    for x in cases:
        n, v = x.shape
        x[5, 100] = x[5, v - 1] = x[5].max() + 1  # a tie: the lowest column wins
        x[n - 1, v - 1] = x[n - 1].max() + 1  # the last column of the last row
        x[2, 1:] = float("-inf")  # a row of -inf but its first column
        got = lowlevel.as_torch(sd.argmax_rows(lowlevel.as_cupy(x)))
        cupy.cuda.get_current_stream().synchronize()
        want = x.argmax(dim=-1)
        assert torch.equal(got.cpu(), want.cpu()), (x.shape, x.stride())
        assert int(got[5]) == 100 and int(got[n - 1]) == v - 1 and int(got[2]) == 0
    with pytest.raises(ValueError, match="float32"):
        sd.argmax_rows(lowlevel.as_cupy(cases[0].half()))


@pytest.mark.gpu2
def test_serve_decode_tiny_dp2_microbatched(tmp_path):
    if lowlevel.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, found {lowlevel.device_count()}")
    out, rs = _serve(tmp_path, "--model", "qwen2moe", "--dp", "2", "--steps", "16", "--prefill-frac", "0.4",
                     timeout=240)
    assert "TOKENS MATCH EAGER" in out, out
    assert [r["rank"] for r in rs] == [0, 1] and all(r["backend"] == "nccl" for r in rs)
    assert all(r["ubatched"] > 0 and r["replayed"] > 0 for r in rs), rs
    for r in rs:  # microbatched prefill: other GEMM shapes, so equal up to rare rounding flips
        assert r["ubatch_mismatched_tokens"] <= 0.02 * r["ubatch_checked_tokens"], r
