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

BAD = {"odd_rows": ("ValueError", "input.shape[0] must be divisible"),
       "same_storage": ("ValueError", "must not overlap"), "group_type": ("TypeError", "group must be a"),
       "zero_dim": ("ValueError", "output must have at least one dimension"),
       "meta": ("ValueError", "output must be a dense tensor"),
       "sparse": ("ValueError", "input must be a dense tensor"),
       "conj": ("ValueError", "input must not be a lazy conjugate"), "neg": ("ValueError", "input must not be a lazy"),
       "shape": ("ValueError", "output must match"),
       "dtype": ("ValueError", "output must match"), "not_tensor": ("TypeError", "output must be a torch.Tensor"),
       "strided": ("ValueError", "output must be a contiguous"), "in_place": ("ValueError", "must not overlap"),
       "overlap": ("ValueError", "must not overlap")}
BAD_CPU = {"symmetric_dtype": ("TypeError", "dtype must be a torch.dtype"),
           "symmetric_shapes": ("ValueError", "shapes must be a non-empty sequence")}
if torch.cuda.is_available():  # the CPU tier on a GPU machine: the gloo group has no NCCL allocator
    BAD_CPU["symmetric_gloo"] = ("LowlevelError", "no NCCL backend")
else:
    BAD_CPU.update(symmetric_gloo=("CudaUnavailableError", "CUDA"), zero_sm_gloo=("CudaUnavailableError", "CUDA"))


def _check(res, cuda):
    for r in res:
        assert r["cases"], r
        for c in r["cases"]:
            assert c["returned_output"] and c["equal_torch"] and c["equal_reference"] and c["input_unchanged"], c
        for name, (typ, words) in {**BAD, **({} if cuda else BAD_CPU)}.items():
            err = r["errors"][name]
            assert err is not None and err.startswith(typ) and words in err, (name, err)
        assert r["after_errors_ok"]
        if not cuda and len(res) > 2:
            assert r["outside_group"] is True, r
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
    try:
        res = collectives_worker.spawn(2, tmp_path, "nccl", timeout=240)
    except AssertionError as e:
        pytest.fail(str(e))
    _check(res, cuda=True)
    # what the wrapper exists for: torch's own call from stream 0 fails on the copy-engine path
    print("torch's all_to_all_single on the legacy default stream:", res[0]["torch_on_stream0"])


def _no_init_cases():
    import lowlevel

    x = torch.randn(4, 3)
    f32 = torch.float32
    return {
        "a2a_no_init": (lambda: lowlevel.all_to_all_single(torch.empty(4, 3), x), lowlevel.LowlevelError,
                        "needs torch.distributed initialised"),
        "a2a_group": (lambda: lowlevel.all_to_all_single(torch.empty(4, 3), x, group=0), TypeError, "group must be"),
        "zero_ranks_str": (lambda: lowlevel.zero_sm_group("01"), TypeError, "ranks must be an iterable of ints"),
        "zero_ranks_bool": (lambda: lowlevel.zero_sm_group([0, True]), TypeError, "ranks[1]"),
        "zero_ranks_neg": (lambda: lowlevel.zero_sm_group([0, -1]), ValueError, "ranks[1]"),
        "zero_ranks_repeat": (lambda: lowlevel.zero_sm_group([1, 1]), ValueError, "ranks must not repeat"),
        "zero_device_bool": (lambda: lowlevel.zero_sm_group(device=True), TypeError, "device must be"),
        "zero_device_float": (lambda: lowlevel.zero_sm_group(device=0.0), TypeError, "device must be"),
        "zero_device_neg": (lambda: lowlevel.zero_sm_group(device=-1), ValueError, "device must be"),
        "sym_group": (lambda: lowlevel.SymmetricBuffers("g", [(4, 4)], f32), TypeError, "group must be"),
        "sym_generator": (lambda: lowlevel.SymmetricBuffers(None, ((4, 4) for _ in range(2)), f32), TypeError,
                          "shapes must be a sequence"),
        "sym_none": (lambda: lowlevel.SymmetricBuffers(None, None, f32), TypeError, "shapes must be a sequence"),
        "sym_empty": (lambda: lowlevel.SymmetricBuffers(None, [], f32), ValueError, "shapes must be a non-empty"),
        "sym_one_shape": (lambda: lowlevel.SymmetricBuffers(None, (4, 4), f32), TypeError, "pass [shape]"),
        "sym_shape_none": (lambda: lowlevel.SymmetricBuffers(None, [(4, 4), None], f32), TypeError, "shapes[1] must"),
        "sym_dim_float": (lambda: lowlevel.SymmetricBuffers(None, [(4.0, 4)], f32), TypeError, "shapes[0][0]"),
        "sym_dim_neg": (lambda: lowlevel.SymmetricBuffers(None, [(4, -1)], f32), ValueError, "shapes[0][1]"),
        "sym_huge": (lambda: lowlevel.SymmetricBuffers(None, [(2**40, 2**40)], f32), ValueError,
                     "shapes[0] is too large"),
        "sym_device_bool": (lambda: lowlevel.SymmetricBuffers(None, [(4,)], f32, device=False), TypeError,
                            "device must be"),
        "sym_device_float": (lambda: lowlevel.SymmetricBuffers(None, [(4,)], f32, device=1.5), TypeError,
                             "device must be"),
    }


@pytest.mark.parametrize("name", sorted(_no_init_cases()))
def test_bad_arguments_refused_before_anything(name):
    """Argument errors name the argument and come before any GPU or process-group requirement."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    fn, typ, words = _no_init_cases()[name]
    with pytest.raises(typ) as info:
        fn()
    assert type(info.value) is typ and words in str(info.value), (name, info.value)
