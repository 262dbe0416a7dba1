"""An all-to-all over NVLink on a capped number of SMs: each rank stores its rows straight into
the other ranks' output buffers (:class:`lowlevel.PeerBuffers`), with no NCCL and no staging.

Why: on two H200s NCCL's all-to-all of a MoE dispatch (``T x H`` bf16, ``T / 2`` rows each way)
moves its bytes through NCCL's staging buffers and needs ~32 CTAs to be fast, which a matmul
beside it cannot spare (``bench_ubatch_nccl``). Here each byte crosses once, from the source
rows to the destination rows, by plain stores of every thread of ``programs`` programs: the
cap is the comm stage's SM share exactly (:class:`lowlevel.SMControlContextManager`), and the
stores need no copy engine or proxy thread. The pattern is DeepEP's intranode dispatch and
vLLM's custom all-reduce (stores into IPC-mapped peer memory between two cross-GPU barriers),
for equal splits.

The protocol, per program ``p`` of every rank (every rank must launch the same number of
programs, in the same order of calls on one :class:`~lowlevel.PeerBuffers`, as with an NCCL
communicator):

1. **Epoch.** ``e`` = this program's counter in the rank's own signal words, plus 1; stored
   back at the end. The counter lives in device memory, so graph replays take fresh epochs with
   no reset between them.
2. **Start barrier.** Store ``e`` into slot ``(start, p, rank)`` of every rank's signal words
   (``atomic_xchg``, release, system scope), then wait until every rank ``r`` has stored ``e``
   into this rank's slot ``(start, p, r)`` (volatile polls, then an acquire at system scope).
   A peer's program ``p`` has started only after the work its stream ordered before the call
   (the kernel that last read its output buffer), so writing into that buffer is now safe.
3. **Stores.** Rows ``[d*n/w, (d+1)*n/w)`` of ``input`` go to rows ``[rank*n/w, ...)`` of
   rank ``d``'s output. Blocks of ``BLOCK`` elements are spread over the programs; each step
   of a program moves block ``j`` of every destination, the peers first (staggered by rank, so
   the links carry traffic both ways at once) and this rank's own rows last, so the local
   copy runs while the NVLink stores drain rather than in a phase of its own.
   A program whose start barrier gave up stores nothing.
4. **End barrier.** A CTA barrier, then ``e`` into slot ``(end, p, rank)`` of every rank
   (release, system scope: every store of this program is visible before it), then wait for
   every rank's ``(end, p, r)``. When a program ends, every peer's program ``p`` has stored
   its rows here; when the kernel ends, all have: the next kernel on this rank's stream reads
   the complete output.

A slot holds ``e - 1`` or ``e`` while a program waits on it, never ``e + 1`` (a peer cannot
start epoch ``e + 1`` before this program posted ``e``), so the waits test equality and the
32-bit counters may wrap. A wait gives up after ``max_spins`` polls and sets the error word
(:func:`check`): a peer that launched fewer programs, or never launched, shows as an error
instead of a hang (the output is then incomplete). The ranks' epochs are then out of step for
good, so the error is sticky: every later call on those buffers does nothing at all (no
barrier, no store), a peer still waiting on this rank gives up in turn, and :func:`check`
raises on every rank until the buffers are closed and made again. The program count must not
exceed the SMs: a waiting program holds its SM. Two calls on one ``PeerBuffers`` must never run
at once on a rank (they would share the epoch counters): keep them on one stream, or order them.

What it measures (two NVLink-linked H200s, bf16, 2026-11-30, session 10,
``bench/results/all_to_all_probe_session10_20261130.json``): alone, ``4096 x 2048`` takes 34 µs
on every SM and 35 µs on 16 programs, against NCCL's 55 µs on its own CTAs; ``16384 x 1280``
69 / 70 µs against 95 µs (16 programs took 100 µs before each step moved every destination;
with 20 - 48 programs it takes 73 - 82 µs, longer than with 16). Beside lowlevel's matmul in
``bench_ubatch_nccl`` (2 microbatches x 6 layers, ``bench/results/20261130T155559Z.json``), the
overlapped step as one graph is 1.41x / 1.49x the best sequential run at 16384 / 32768 tokens a
microbatch (H 1024, where this all-to-all alone is 1.00x / 0.96x the matmul; the sequential
runs there were NCCL's kernels and this one: NCCL's copy engines did not run at that shape, and
alone they are slower there than this kernel), 1.23x at 8192 tokens (H 1536), 1.17x - 1.19x at
4096 (H 1024 / 2048, where it is 0.71x the matmul). Inside that graph its stage takes 3 - 6 %
longer beside the matmul than beside a sleep kernel of the matmul's length (15 % at 4096 x
1024); NCCL's kernels 32 - 47 % longer (H 2048 / 1536 / 1280 at 8192 / 16384 / 32768 tokens).
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ..collectives import PEER_SIGNAL_WORDS, PeerBuffers
from ..errors import LowlevelError, check_int
from ..interop import overlaps
from ..sm_control import capped, device_sm_count
from ._launch import INTERPRET, MAX_SPINS_LIMIT, FastLauncher, check_writes, to_torch

__all__ = ["MAX_PROGRAMS", "MAX_WORLD", "all_to_all_single", "check"]

MAX_PROGRAMS = 1024
"""The most programs one call may launch (the signal words hold this many slots per rank)."""
MAX_WORLD = 8
"""The most ranks: one pointer argument per rank's output and signal words."""
DEFAULT_MAX_SPINS = MAX_SPINS_LIMIT
"""Polls of one signal word before a wait gives up: the most a 32-bit count holds, about 15 minutes
at ~0.4 µs a poll, so that a peer that is merely late (compiling a kernel, tuning, host work)
never trips it; pass fewer to turn a missing peer into an error sooner."""
# The signal words: (phase, program, source rank) slots from word 0, 2 * MAX_PROGRAMS * MAX_WORLD
# of them, then one epoch counter per program, then the error word.
_SLOTS: tl.constexpr = tl.constexpr(MAX_PROGRAMS * MAX_WORLD)  # words of one phase
_EPOCHS: tl.constexpr = tl.constexpr(2 * MAX_PROGRAMS * MAX_WORLD)
_ERROR: tl.constexpr = tl.constexpr(2 * MAX_PROGRAMS * MAX_WORLD + MAX_PROGRAMS)
assert 2 * MAX_PROGRAMS * MAX_WORLD + MAX_PROGRAMS < PEER_SIGNAL_WORDS


@triton.jit
def _pick(i: tl.constexpr, p0, p1, p2, p3, p4, p5, p6, p7):
    """The ``i``-th of eight pointers (``i`` known at compile time)."""
    if i == 0:
        r = p0
    elif i == 1:
        r = p1
    elif i == 2:
        r = p2
    elif i == 3:
        r = p3
    elif i == 4:
        r = p4
    elif i == 5:
        r = p5
    elif i == 6:
        r = p6
    else:
        r = p7
    return r


@triton.jit
def _barrier(sig, s0, s1, s2, s3, s4, s5, s6, s7, slot, e, max_spins,
             RANK: tl.constexpr, WORLD: tl.constexpr, SYNC: tl.constexpr):
    """Post ``e`` into ``slot + RANK`` of every rank's signal words, then wait until every
    rank's post reached ``sig[slot + r]`` (see the module docstring). Returns whether every
    wait saw its post (else the error word is set)."""
    ok = 1
    if SYNC:
        tl.debug_barrier()  # every thread's stores are issued before the release below
        for r in tl.static_range(WORLD):
            tl.atomic_xchg(_pick(r, s0, s1, s2, s3, s4, s5, s6, s7) + slot + RANK, e, sem="release", scope="sys")
        for r in tl.static_range(WORLD):
            seen = tl.load(sig + slot + r, volatile=True)
            spins = 0
            while (seen != e) & (spins < max_spins):
                seen = tl.load(sig + slot + r, volatile=True)
                spins += 1
            seen = tl.atomic_add(sig + slot + r, 0, sem="acquire", scope="sys")
            if seen != e:
                tl.atomic_or(sig + _ERROR, 1, sem="relaxed", scope="gpu")
                ok = 0
        tl.debug_barrier()  # the acquire by one thread orders every thread's accesses after it
    return ok


@triton.jit
def _exchange(x_ptr, o0, o1, o2, o3, o4, o5, o6, o7, s0, s1, s2, s3, s4, s5, s6, s7, sig, pid,
              n_chunk, num_progs, max_spins,
              RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, SYNC: tl.constexpr):
    """One program's epoch: start barrier, its share of the stores, end barrier. A start
    barrier that gave up stores nothing: a peer that did not start may still read its buffer."""
    WORLD_SLOTS: tl.constexpr = 8  # MAX_WORLD: one slot per source rank
    e = tl.load(sig + _EPOCHS + pid) + 1
    if _barrier(sig, s0, s1, s2, s3, s4, s5, s6, s7, pid * WORLD_SLOTS, e, max_spins, RANK, WORLD, SYNC):
        # every peer's program pid started: its stream finished reading what this one overwrites
        # 64-bit offsets (a buffer may pass 2**31 elements) only in scalars, the block's start;
        # 32-bit ones inside a block: what one step holds for every destination fits the
        # registers (a 64-bit offset per element spilled to local memory for 8-byte elements,
        # and by kilobytes for buffers not 16-byte aligned: tests/test_all_to_all_codegen_cpu.py)
        offs = tl.arange(0, BLOCK)
        n = tl.cast(n_chunk, tl.int64)  # n_chunk == 1 arrives as a constexpr int
        # Block j of every destination in one step (the peers first, this rank's own rows last):
        # the local copy then runs while the NVLink stores drain instead of in a phase of its own
        # (on two H200s, 16 programs: 70 us against 100 for 2 x 21 MB)
        for j in range(pid, tl.cdiv(n_chunk, BLOCK), num_progs):
            start = tl.cast(j, tl.int64) * BLOCK
            m = offs < tl.cast(tl.minimum(n - start, BLOCK), tl.int32)
            for step in tl.static_range(WORLD):
                d = (RANK + 1 + step) % WORLD  # constexpr
                src = x_ptr + (d * n + start)
                dst = _pick(d, o0, o1, o2, o3, o4, o5, o6, o7) + (RANK * n + start)
                tl.store(dst + offs, tl.load(src + offs, mask=m, eviction_policy="evict_first"), mask=m)
        _barrier(sig, s0, s1, s2, s3, s4, s5, s6, s7, _SLOTS + pid * WORLD_SLOTS, e, max_spins, RANK, WORLD,
                 SYNC)
    tl.store(sig + _EPOCHS + pid, e)


@triton.jit(do_not_specialize=["num_progs", "max_spins"])
def _all_to_all_kernel(x_ptr, o0, o1, o2, o3, o4, o5, o6, o7, s0, s1, s2, s3, s4, s5, s6, s7,
                       n_chunk, num_progs, max_spins,
                       RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, SYNC: tl.constexpr):
    pid = tl.program_id(0)
    sig = _pick(RANK, s0, s1, s2, s3, s4, s5, s6, s7)
    if tl.load(sig + _ERROR, volatile=True) == 0:  # after a wait gave up, every call is a no-op
        _exchange(x_ptr, o0, o1, o2, o3, o4, o5, o6, o7, s0, s1, s2, s3, s4, s5, s6, s7, sig, pid,
                  n_chunk, num_progs, max_spins, RANK, WORLD, BLOCK, SYNC)


_launch = FastLauncher(_all_to_all_kernel, ("num_progs", "max_spins"))
# Elements a program moves per step (32 KiB of bf16) and its warps: on two H200s, T x H = 4096 x
# 2048 bf16, 16 programs take 47 us with these against 55 with 8192 / 8 warps (60 % more bytes
# in flight per SM is what a few programs need to keep NVLink busy).
_BLOCK = 128 if INTERPRET else 16384
_WARPS = 1 if INTERPRET else 16


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # element size -> the dtype moved


def _bits(t: Any) -> Any:
    """``t`` (contiguous) as an integer tensor of its raw bits: one compiled kernel per element
    size, and dtypes Triton has no pointers for (complex, bool) move bit-exactly."""
    size = t.element_size()
    return t.view(_BITS[size]) if size in _BITS else t.view(torch.int64)  # complex128: two words an element


def _plan(output: Any, input: Any, peers: PeerBuffers) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Check ``output`` and ``input``; the launch arguments that follow ``input`` up to the
    program count (the peers' outputs and signal words, the chunk length) and the constexprs.
    The plan holds no reference to ``input``: a cached plan must not keep its memory alive."""
    if peers.world > MAX_WORLD:
        raise ValueError(f"peers spans {peers.world} ranks; all_to_all_single supports at most {MAX_WORLD}")
    for name, t in (("output", output), ("input", input)):  # all_to_all_single refused other layouts
        if t.is_conj() or t.is_neg():  # lazy views: the memory moved is not the values the tensor shows
            raise ValueError(f"{name} must not be a lazy conjugate/negative view; pass "
                             f"{name}.resolve_conj().resolve_neg()")
    i = peers.index(output)
    if input.dtype != output.dtype or input.shape != output.shape:
        raise ValueError(f"input must match output in shape and dtype: input is {tuple(input.shape)} {input.dtype}, "
                         f"output is {tuple(output.shape)} {output.dtype}")
    if input.device != output.device:
        raise ValueError(f"input must be on {output.device} (the PeerBuffers' device), got {input.device}")
    if not input.is_contiguous():
        raise ValueError(f"input must be contiguous, got strides {input.stride()} for shape {tuple(input.shape)}")
    if input.dim() < 1 or input.shape[0] % peers.world:
        raise ValueError(f"input.shape[0] must be divisible by the group's size {peers.world}, "
                         f"got shape {tuple(input.shape)}")
    check_writes("all_to_all_single", "output", output, ("input", input))
    if any(overlaps(input, t) for r in range(peers.world) if r != peers.rank for t in peers.peer(r)):
        raise ValueError("input must be this rank's memory, not a peer's buffer mapped here")
    if any(overlaps(input, peers.signals(r)) for r in range(peers.world)):
        raise ValueError("input must not overlap the PeerBuffers' signal words (this rank's or a peer's): every "
                         "rank's barriers rewrite them while the kernel reads its input")
    outs = [_bits(peers.peer(r)[i]) for r in range(peers.world)]
    sigs = [peers.signals(r) for r in range(peers.world)]
    outs += [outs[0]] * (MAX_WORLD - len(outs))
    sigs += [sigs[0]] * (MAX_WORLD - len(sigs))
    n_chunk = _bits(input).numel() // peers.world  # elements of the moved dtype (complex128: two words each)
    return (*outs, *sigs, n_chunk), {"RANK": peers.rank, "WORLD": peers.world, "BLOCK": _BLOCK, "SYNC": True}


def all_to_all_single(output: Any, input: Any, *, peers: PeerBuffers, programs: int | None = None,
                      max_spins: int = DEFAULT_MAX_SPINS) -> Any:
    """``torch.distributed.all_to_all_single(output, input)`` with equal splits, as one kernel of
    ``programs`` programs that stores into the peers' memory over NVLink.

    ``output``: one of ``peers.tensors`` (a whole buffer of a :class:`lowlevel.PeerBuffers`);
    ``input``: a contiguous tensor (torch or CuPy) of this rank's memory with the same shape
    ``(n, ...)`` and dtype, ``n`` divisible by the group's size ``w``, not overlapping
    ``output``. Rows ``[j*n/w, (j+1)*n/w)`` of ``input`` land at rows ``[r*n/w, (r+1)*n/w)``
    of rank ``j``'s ``output`` (``r``: this rank's index in the group). Any dtype; bit-exact.

    ``programs``: CTAs, one an SM, an int in [1, min(SMs, :data:`MAX_PROGRAMS`)] (default
    :func:`~lowlevel.kernels.get_num_sms`, the calling thread's SM cap: under a
    :class:`~lowlevel.SMControlContextManager` that caps compute through
    :func:`~lowlevel.kernels.set_num_sms` that is the *compute* share, so a comm stage passes
    its own share, e.g. from the manager's ``set_comm_sms`` callback, as ``bench_ubatch_nccl``
    does). Every rank must launch the same number
    of programs, and call in the same order (collective, like NCCL on one communicator). The
    calls on one ``peers`` must be ordered on each rank (one stream, or events between):
    they share the epoch counters.

    Ordering: on lowlevel's current stream. The call returns at once; the kernel waits (on the
    device) for every rank's call to start, so it also orders this rank's stores after the
    work each peer's stream ordered before its call, and ends after every rank's rows have
    landed here. Capturable in a CUDA graph (replays take fresh epochs). Returns ``output``.

    Raises, before anything launches: ``TypeError`` for arrays that are not torch tensors or
    CuPy arrays, ``peers`` that is not a ``PeerBuffers``, non-int ``programs``/``max_spins``;
    ``ValueError`` for an ``output`` that is not one of ``peers.tensors``, a sparse, MKL-DNN or
    nested tensor, mismatched shape, dtype or device, a non-contiguous ``input``, ``n`` not
    divisible by ``w``, ``input`` overlapping ``output`` or lying in a peer's buffer or in any
    rank's signal words, ``programs`` or ``max_spins`` out of range;
    :class:`~lowlevel.LowlevelError` for a closed ``peers``. A wait that gave up shows in
    :func:`check` (and makes this and later calls on ``peers`` do nothing)."""
    if not isinstance(peers, PeerBuffers):
        raise TypeError(f"peers must be a lowlevel.PeerBuffers, got {type(peers).__qualname__}")
    out, _ = to_torch(output, "output")
    inp, _ = to_torch(input, "input")
    if out.layout != torch.strided or inp.layout != torch.strided:  # nested ones: to_torch refused them
        for name, t in (("output", out), ("input", inp)):  # before the cache key's data_ptr() and shape
            if t.layout != torch.strided:
                raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    sms = device_sm_count(peers.device)
    programs = min(MAX_PROGRAMS, capped(sms)) if programs is None else \
        check_int(programs, "programs", 1, min(MAX_PROGRAMS, sms))
    max_spins = check_int(max_spins, "max_spins", 1, MAX_SPINS_LIMIT)
    plans = peers.plans()  # raises for a closed peers; cleared when it closes
    # every check of _plan is a function of this key (the input's address, device, layout), so a hit
    # (the same or a new tensor at a seen address) needs none; the plan holds no view of the input
    key = ("all_to_all_single", out.data_ptr(), inp.data_ptr(), inp.device, inp.shape, inp.dtype, inp.stride(),
           out.shape, out.dtype, out.stride(), inp.is_conj() or inp.is_neg() or out.is_conj() or out.is_neg())
    hit = plans.get(key)
    if hit is None:
        hit = _plan(out, inp, peers)
        if len(plans) > 256:  # bound the cache: a plan is a few views of the peers' memory
            plans.clear()
        plans[key] = hit
    if inp.numel():
        rest, constexprs = hit
        _launch(programs, (_bits(inp), *rest, programs, max_spins), constexprs, _WARPS, 1)
    return output


def check(peers: PeerBuffers) -> None:
    """Synchronise ``peers``' device and raise :class:`~lowlevel.LowlevelError` if a wait of an
    :func:`all_to_all_single` on it gave up (a peer launched fewer programs, called in another
    order, or never called). The error is sticky: that output and every later one on ``peers``
    are incomplete (the calls do nothing), until ``peers`` is closed and made again on every
    rank. ``TypeError`` for a ``peers`` that is not a ``PeerBuffers``,
    :class:`~lowlevel.LowlevelError` for a closed one."""
    if not isinstance(peers, PeerBuffers):
        raise TypeError(f"peers must be a lowlevel.PeerBuffers, got {type(peers).__qualname__}")
    sig = peers.signals(peers.rank)
    torch.cuda.synchronize(peers.device)
    if int(sig[_ERROR.value].item()):
        raise LowlevelError("all_to_all_single: a cross-GPU wait gave up after max_spins polls (a peer launched "
                            "fewer programs, called in another order, or never called): that output is "
                            "incomplete and every later call on these PeerBuffers does nothing; close() them on "
                            "every rank and make new ones")
