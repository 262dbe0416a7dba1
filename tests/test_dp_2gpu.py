"""DP sync on 2 GPUs, one process a GPU, NCCL (``use_device_collective=True``): plans equal to
gloo's and to a reference over random steps, the async vote equal to the blocking one, a
generation mismatch and configuration mismatches raise on both ranks within the timeout, a
timeout holds."""
import os
import sys

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.gpu2]
torch = pytest.importorskip("torch")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dp_worker  # noqa: E402


@pytest.fixture(autouse=True)
def _two_gpus():
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs, found {torch.cuda.device_count() if torch.cuda.is_available() else 0}")


def spawn(tmp_path, steps, mode, timeout=240):
    try:
        return dp_worker.spawn(2, tmp_path, steps, mode, "nccl", timeout)
    except AssertionError as e:
        pytest.fail(str(e))


def test_nccl_plans_equal_gloo_and_reference(tmp_path):
    steps = 200
    res = spawn(tmp_path, steps, "plan")
    for r in res:
        assert r["steps"] == steps
        assert all(p["ok"] for p in r["plans"]), [p for p in r["plans"] if not p["ok"]][:3]
        assert all(p["gloo_same"] for p in r["plans"])
        assert all(p["pinned"] and p["dtype"] == "torch.int32" for p in r["plans"])
    assert [p["got"] for p in res[0]["plans"]] == [p["got"] for p in res[1]["plans"]]
    gots = [p["got"] for p in res[0]["plans"]]
    assert any(g[0] for g in gots) and not all(g[0] for g in gots)


def test_nccl_async_vote_equals_blocking_and_detects_generation(tmp_path):
    res = spawn(tmp_path, 50, "async")
    for r in res:
        assert len(r["same"]) == 50 and all(r["same"]) and r["step"] == 50
        assert r["second_start"] and "already in flight" in r["second_start"]
        assert r["gen_error"] and "different steps" in r["gen_error"] and r["gen_elapsed"] < 20


NCCL_MISMATCH = {"dp_size": "dp_size differs", "dup_rank": "duplicate dp_rank 0",
                 "num_ubatches": "num_ubatches differs", "step": "different steps"}


def test_nccl_mismatch_raises_on_both_ranks(tmp_path):
    res = spawn(tmp_path, 0, "mismatch-" + ",".join(NCCL_MISMATCH))  # one after another in one group
    for r in res:
        for kind, names in NCCL_MISMATCH.items():
            k = r["kinds"][kind]
            assert k["error"] and names in k["error"] and "DPSyncError" in k["error_types"], (kind, k)
            assert k["elapsed"] < 20 and k["after"] == 2


def test_nccl_timeout_names_step_and_rank(tmp_path):
    res = spawn(tmp_path, 0, "timeout", timeout=60)
    err = res[0]["error"]
    assert err is not None and "timed out" in err and "step 0" in err and "dp_rank 0" in err, err
    assert res[0]["elapsed"] < 3.9  # before the late peer joined (4 s)
    assert "earlier vote failed" in res[0]["after_timeout"]


def test_ubatch_overlap_with_nccl_matches_sequential_and_reference(tmp_path):
    """2 microbatches x 3 layers of (matmul -> NCCL collective) on each of 2 GPUs, for both comm
    stages: an in-place all-reduce, and an all-to-all of MoE-dispatch shape (T/2 rows to each
    rank). Threads and generators, with and without the SM split (NCCL communicator limited to
    16 CTAs), each run into poisoned (NaN) buffers, equal to the sequential run (the all-to-all
    exactly: the same ops in the same order, and a copy adds no rounding), the all-to-all both
    as torch's NCCL call and on a zero-CTA communicator between symmetric buffers (copy engines, no
    SM: ``lowlevel.zero_sm_group``, ``SymmetricBuffers``, ``all_to_all_single``); each
    run also captured as one FULL graph (NCCL inside) and replayed into a poisoned output. The
    sequential run of each matches a float32 reference."""
    sys.path.insert(0, os.path.dirname(HERE))
    from bench.bench_ubatch_nccl import spawn as spawn_ub

    try:
        res = spawn_ub(str(tmp_path), 512, 512, 3, False, timeout=120)
    except AssertionError as e:
        pytest.fail(str(e))
    for r in res:
        assert r["ctas_error"] is None and r["ctas_groups"] == [16], r
        cfgs = {c["comm"]: c for c in r["configs"]}
        assert sorted(cfgs) == ["allreduce", "alltoall", "alltoall_zero_sm"], r["configs"]
        for comm, c in cfgs.items():
            assert (c["H"], c["T"], c["layers"]) == (512, 512, 3)
            assert c["seq_finite"] and c["seq_vs_reference_rel"] < 2e-2, (comm, c)
            diffs = c["max_abs_diff"]
            assert {"threads_k0", "threads_k16", "generators_k0", "generators_k16"} <= set(diffs), diffs
        for c in cfgs.values():
            assert c["graph_error"] is None, c["graph_error"]
            assert "graph" in c["max_abs_diff"]
        ar = cfgs["allreduce"]
        tol = 1e-2 * ar["seq_abs_max"]
        assert all(v <= tol for v in ar["max_abs_diff"].values()), (ar["max_abs_diff"], tol)  # NaN fails too
        for a2a in (cfgs["alltoall"], cfgs["alltoall_zero_sm"]):  # SM kernels or copy engines: the same bits
            assert all(v == 0.0 for v in a2a["max_abs_diff"].values()), a2a["max_abs_diff"]


def test_ubatch_overlap_with_nvlink_all_to_all_matches_sequential_and_reference(tmp_path):
    """The same model with lowlevel's NVLink all-to-all (``kernels.all_to_all_single`` into
    ``PeerBuffers``) as the comm stage, in its own worker launch: threads and generators, with
    and without the SM split (16 programs for the exchange, the rest for the matmul), into
    poisoned buffers, bit-exact against the sequential run (the same kernels in order), which
    matches a float32 reference; captured as one FULL graph and replayed; no wait gave up."""
    sys.path.insert(0, os.path.dirname(HERE))
    from bench.bench_ubatch_nccl import spawn as spawn_ub

    try:
        res = spawn_ub(str(tmp_path), 512, 512, 3, False, timeout=120, group="nvlink")
    except AssertionError as e:
        pytest.fail(str(e))
    for r in res:
        (c,) = r["configs"]
        assert c["comm"] == "alltoall_nvlink" and (c["H"], c["T"], c["layers"]) == (512, 512, 3)
        assert c["seq_finite"] and c["seq_vs_reference_rel"] < 2e-2, c
        diffs = c["max_abs_diff"]
        assert {"threads_k0", "threads_k16", "generators_k0", "generators_k16", "graph"} <= set(diffs), diffs
        assert c["graph_error"] is None, c["graph_error"]
        assert all(v == 0.0 for v in diffs.values()), diffs
        assert c["nvlink_error"] is None, c["nvlink_error"]
