"""Faults found by trying ``lowlevel.kernels.all_to_all_single`` and ``lowlevel.PeerBuffers`` from
their docstrings alone (CPU tier: a stand-in ``PeerBuffers`` with CPU tensors, the kernel under
Triton's interpreter, as in ``test_all_to_all_cpu.py``).

* The plan cache kept a view of every input it saw: up to 257 inputs' memory stayed allocated
  (on a GPU, every step's fresh activation of a MoE dispatch), and since the allocator could then
  never hand the same address back, the cache never hit for fresh inputs.
* An input lying in the signal words (this rank's or a peer's mapped here) was accepted: the
  kernel reads values that the barriers of every rank are rewriting.
* ``PeerBuffers.index`` of a non-tensor raised ``AttributeError`` instead of ``TypeError``.
"""
import gc
import weakref

import numpy as np
import pytest
import torch
from test_all_to_all_cpu import SPINS, group_of, interp, rand, same_bits

from lowlevel.kernels import all_to_all as A


@interp
def test_plan_cache_keeps_no_input_alive():
    """The memory of an input is not held by the plan cache after the call: a NumPy array behind
    a torch input is freed once the caller drops it (the output is right)."""
    bufs, sigs, (p,) = group_of([(4, 6)], 1)
    refs = []
    for seed_ in range(3):
        a = rand((4, 6), torch.float32, torch.Generator().manual_seed(seed_)).numpy().copy()
        refs.append(weakref.ref(a))
        A.all_to_all_single(p.tensors[0], torch.from_numpy(a), peers=p, programs=1)
        assert same_bits(p.tensors[0], torch.from_numpy(a))
        del a
    gc.collect()
    assert [r() is None for r in refs] == [True, True, True]


@interp
def test_cache_hit_on_a_reused_address_reads_the_new_input():
    """A new tensor at an address the cache has seen (same shape, dtype, strides) is a cache hit,
    and the call moves that tensor's current values, not a stale copy's."""
    bufs, sigs, (p,) = group_of([(4, 6)], 1)
    gen = torch.Generator().manual_seed(3)
    store = torch.empty(64, dtype=torch.float32)
    for k in range(3):
        x = store[8:32].view(4, 6)  # a fresh tensor object over the same memory each time
        x.copy_(rand((4, 6), torch.float32, gen))
        p.tensors[0].fill_(float("nan"))
        A.all_to_all_single(p.tensors[0], x, peers=p, programs=2)
        assert same_bits(p.tensors[0], x), k
        assert len(p.plans()) == 1
    assert sigs[0][A._EPOCHS.value:A._EPOCHS.value + 2].tolist() == [3, 3]


@pytest.mark.parametrize("whose", [0, 1])
def test_input_in_signal_words_refused(whose):
    """An input over the signal words (this rank's own, or a peer's mapped here) raises
    ValueError naming ``input``; nothing launches, nothing is cached, no signal word changes."""
    bufs, sigs, peers = group_of([(4, 6)], 2)
    p = peers[0]
    x = p.signals(whose)[100:124].view(torch.float32).view(4, 6)
    before = [s.clone() for s in sigs]
    with pytest.raises(ValueError, match="input") as info:
        A.all_to_all_single(p.tensors[0], x, peers=p, programs=1, max_spins=SPINS)
    assert type(info.value) is ValueError and "signal" in str(info.value)
    assert all(torch.equal(s, b) for s, b in zip(sigs, before))
    assert p.plans() == {} and bufs[1][0].isnan().all() and bufs[0][0].isnan().all()


@pytest.mark.parametrize("bad", [None, "buf", np.zeros((4, 6), np.float32), 3], ids=["None", "str", "numpy", "int"])
def test_index_of_non_tensor_is_type_error(bad):
    bufs, sigs, (p,) = group_of([(4, 6)], 1)
    with pytest.raises(TypeError, match="t must be a torch.Tensor"):
        p.index(bad)
