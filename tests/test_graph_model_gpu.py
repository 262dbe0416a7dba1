"""GPU tier: a real model (HF transformers Llama, random weights, small config) through
CudagraphDispatcher + CUDAGraphRunner; replays equal eager at the same padded size."""
import numpy as np
import pytest

import lowlevel
from lowlevel import CUDAGraphMode as M

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="the model test needs HF transformers")

VOCAB = 1000
SIZES = [1, 2, 4, 8, 16, 24, 32]


def _model(dtype):
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


@pytest.mark.parametrize("dtype, weak", [(torch.float32, False), (torch.bfloat16, True)])
def test_llama_decode_replays_equal_eager_at_the_padded_size(dtype, weak):
    model = _model(dtype)
    ids = torch.zeros(SIZES[-1], 1, dtype=torch.long, device="cuda")

    @torch.no_grad()
    def fn(x):
        return model(input_ids=x, use_cache=False).logits

    d = lowlevel.CudagraphDispatcher(SIZES, max_num_seqs=SIZES[-1])
    d.initialize_cudagraph_keys(M.FULL)
    r = lowlevel.CUDAGraphRunner(fn, M.FULL, weak_outputs=weak)
    fn(ids)  # compile/initialise once eagerly
    assert r.capture_all(d, lambda desc: (ids[: desc.num_tokens],)) == len(SIZES)
    r.capturing_enabled = False
    rng = np.random.default_rng(7)
    identical = 0
    for n in [1, 3, 5, 8, 13, 20, 32, 7, 24]:
        ids.copy_(torch.from_numpy(rng.integers(0, VOCAB, (SIZES[-1], 1))))
        mode, desc = d.dispatch(n)
        assert mode is M.FULL
        out = r(mode, desc, ids[: desc.num_tokens], num_tokens=n)
        got = out.float().cpu()
        ref = fn(ids[: desc.num_tokens]).float().cpu()
        assert got.shape == (desc.num_tokens, 1, VOCAB) and float(ref.std()) > 0
        identical += bool(torch.equal(got, ref))
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref)
        else:
            torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)
    print(f"{dtype}: {identical} of 9 replays bit-identical to eager")
    assert r.captures == len(SIZES) and r.hits == 9
