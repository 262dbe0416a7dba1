"""``lowlevel.all_to_all_single``, ``zero_sm_group`` and ``SymmetricBuffers``. Real processes:
gloo on CPU tensors (2 and 3 ranks: the call, its argument checks, the clear refusals of the
NCCL-only pieces) here; NCCL on 2 GPUs (an ordinary, a CTA-limited and a zero-CTA communicator;
the copy-engine path from the legacy default stream and from a side stream with a consumer
right after; graph capture and replay) in the gpu2 tier."""
import os
import sys

import pytest

torch = pytest.importorskip("torch")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import collectives_worker  # noqa: E402

BAD = {"odd_rows": ("ValueError", "input.shape[0] must divide"), "shape": ("ValueError", "output must match"),
       "dtype": ("ValueError", "output must match"), "not_tensor": ("TypeError", "output must be a torch.Tensor"),
       "strided": ("ValueError", "output must be a contiguous"), "in_place": ("ValueError", "must not overlap"),
       "overlap": ("ValueError", "must not overlap")}
BAD_CPU = {"symmetric_gloo": ("CudaUnavailableError", "CUDA"), "zero_sm_gloo": ("CudaUnavailableError", "CUDA"),
           "symmetric_dtype": ("TypeError", "dtype must be a torch.dtype"),
           "symmetric_shapes": ("ValueError", "shapes must be a non-empty sequence")}


def _check(res, cuda):
    for r in res:
        assert r["cases"], r
        for c in r["cases"]:
            assert c["returned_output"] and c["equal_torch"] and c["equal_reference"] and c["input_unchanged"], c
        for name, (typ, words) in {**BAD, **({} if cuda else BAD_CPU)}.items():
            err = r["errors"][name]
            assert err is not None and err.startswith(typ) and words in err, (name, err)
        assert r["after_errors_ok"]
        if cuda:
            assert {c["group"] for c in r["cases"]} == {"world", "ctas8", "zero_sm"}
            assert r["zero_sm_runs"] == {"default stream": True, "side stream": True, "default stream again": True}
            assert r["graph_replays_equal"] == [True] * 5, r["graph_replays_equal"]
            assert "registered=False" in r["closed_repr"]


@pytest.mark.parametrize("world", [2, 3])
def test_gloo_equals_torch_and_reference(world, tmp_path):
    try:
        res = collectives_worker.spawn(world, tmp_path, "gloo", timeout=240)
    except AssertionError as e:
        pytest.fail(str(e))
    _check(res, cuda=False)


@pytest.mark.gpu
@pytest.mark.gpu2
def test_nccl_zero_sm_equals_torch_reference_and_replays(tmp_path):
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        pytest.skip(f"needs 2 CUDA GPUs, found {n}")
    try:
        res = collectives_worker.spawn(2, tmp_path, "nccl", timeout=240)
    except AssertionError as e:
        pytest.fail(str(e))
    _check(res, cuda=True)
    # what the wrapper exists for: torch's own call from stream 0 fails on the copy-engine path
    print("torch's all_to_all_single on the legacy default stream:", res[0]["torch_on_stream0"])
