"""``lowlevel.PeerBuffers`` and ``lowlevel.kernels.all_to_all_single`` on two GPUs, one process
each (NCCL carries the IPC handles and the reference): results equal to an independent
reference and to torch's NCCL all-to-all at many shapes, dtypes and program counts; 50 calls
in a row; beside a matmul that reads the buffer the peer stores into next; captured in a CUDA
graph and replayed; a program-count mismatch between the ranks reported instead of a hang; bad
arguments refused before anything launched. The CPU tier is ``test_all_to_all_cpu.py``."""
import os
import sys

import pytest

torch = pytest.importorskip("torch")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import peer_worker  # noqa: E402

BAD = {"not_peer_output": ("ValueError", "output must be one of this PeerBuffers"),
       "slice_output": ("ValueError", "output must be one of this PeerBuffers"),
       "dtype": ("ValueError", "input must match output"), "shape": ("ValueError", "input must match output"),
       "strided": ("ValueError", "input must be contiguous"), "in_place": ("ValueError", "overlaps input"),
       "peer_input": ("ValueError", "input must be this rank's memory"),
       "programs_zero": ("ValueError", "programs"), "programs_big": ("ValueError", "programs"),
       "programs_bool": ("TypeError", "programs"), "spins_zero": ("ValueError", "max_spins"),
       "peers_type": ("TypeError", "peers must be a lowlevel.PeerBuffers"),
       "cpu_input": ("ValueError", "input must be on")}


@pytest.mark.gpu
@pytest.mark.gpu2
def test_nvlink_all_to_all_on_two_gpus(tmp_path):
    try:
        res = peer_worker.spawn(2, tmp_path, timeout=240)
    except AssertionError as e:
        pytest.fail(str(e))
    for r in res:
        assert len(r["cases"]) == 5 * 3 * 3, r["cases"]
        for c in r["cases"]:
            assert c["returned_output"] and c["equal_reference"] and c["equal_torch"] and c["input_unchanged"], c
        assert r["repeat_equal"] == [True] * 50, r["repeat_equal"]
        assert r["beside_matmul_equal"], r["beside_matmul_max_diff"]
        assert r["beside_matmul_ref_rel"] < 2e-2, r["beside_matmul_ref_rel"]
        assert r["graph_replays_equal"] == [True] * 10, r["graph_replays_equal"]
        for name, (typ, words) in BAD.items():
            err = r["errors"][name]
            assert err is not None and err.startswith(typ) and words in err, (name, err)
        assert r["errors_output_unchanged"] and r["after_errors_ok"]
        assert r["closed_error"].startswith("LowlevelError") and "closed" in r["closed_error"]
        assert r["closed_call_error"].startswith("LowlevelError"), r["closed_call_error"]
        assert "closed=True" in r["repr"]
    # rank 0 launched 4 programs, rank 1 two: rank 0's programs 2 and 3 wait for partners that
    # never come, give up, and check() says so; rank 1's programs all found theirs
    assert res[0]["mismatch_error"] and res[0]["mismatch_error"].startswith("LowlevelError"), res[0]["mismatch_error"]
    assert res[1]["mismatch_error"] is None, res[1]["mismatch_error"]
