"""Microbatch overlap on 2 GPUs with a real NCCL collective as the communication stage.

Each rank (one process a GPU) runs 2 microbatches x ``LAYERS`` layers of
``h = matmul(x, w)`` (``lowlevel.kernels.matmul``, bf16, ``T`` tokens a microbatch, ``H x H``
weights) followed by a collective on ``h``, with ``UBatchRunner`` (threads and generators),
against the *best sequential run* (every stage on all SMs, one stream, the faster of NCCL's
default communicator and its most-CTA limited one). Two comm stages:

- ``allreduce``: an in-place NCCL all-reduce of ``h`` (the next layer's input; tensor parallel);
- ``alltoall``: ``dist.all_to_all_single`` of ``h`` into a second buffer, each rank sending
  ``T / 2`` rows of ``H`` bf16 to each rank (a MoE dispatch's shape; the next layer's input);
- ``alltoall_zero_sm``: the same NCCL all-to-all on a communicator with the zero-CTA policy
  (:func:`lowlevel.zero_sm_group`) between buffers in its symmetric windows
  (:class:`lowlevel.SymmetricBuffers`), through :func:`lowlevel.all_to_all_single`: NCCL moves
  the rows with copy engines and no SM, so the matmul keeps every SM (no split to find);
- ``alltoall_nvlink``: the same exchange by lowlevel's own kernel,
  :func:`lowlevel.kernels.all_to_all_single`, storing into the peer's buffer
  (:class:`lowlevel.PeerBuffers`) on ``k`` programs (the comm share of the split), no NCCL.

Every all-to-all's sequential baseline is the best of the three (every CTA setting, eager or one
graph).

The SM split comes from :func:`lowlevel.find_sm_split` (a sweep, warm-up and median per
candidate) over ``k`` in :data:`CTAS` and the wave-aligned shares of
:func:`lowlevel.comm_sm_candidates` for the configuration's matmul (a cap just below a wave
boundary costs the matmul a whole wave): compute gets ``total - k`` SMs
(``kernels.set_num_sms``), NCCL a communicator limited to ``k`` CTAs
(``ProcessGroupNCCL.Options().config.max_ctas``), switched by ``SMControlContextManager``.
Configurations (one worker run, one NCCL start-up): the main one (all-reduce, ``H = 4096``),
and for each comm stage the ``H`` among :data:`H_BALANCE` whose
comm stage alone takes closest to its matmul alone (both measured in the run as *device*
time, 5 calls in one graph: the best sequential run is often a graph, and eager wall times
carry the host's launch cost, which differs between the two all-to-alls; matmul FLOPs grow
with ``H**2``, the collective's bytes with ``H``; for the all-to-all, the two closest within
:data:`BAND`; and each all-to-all at 2x, 4x and 8x the tokens, at the ``H`` among those of
:data:`LONG` whose stages alone are closest, longer stages that carry the per-stage costs
better) -- the issue's target (>= 1.4x) is for stages of about equal length: a configuration
is named balanced, and carries that target, only when its stages alone are within ``BAND``
(:func:`plan_configs`; the closest ``H`` is timed anyway when none is).
Also: the overlapped run captured as one FULL graph (the collective inside: NCCL's kernels or
copy engines, or lowlevel's NVLink kernel) and
replayed on both ranks, checked against the sequential result; each stage's device time
inside that graph, beside the matmul and beside a sleep kernel of the matmul's length
(:func:`pipeline_stages`: what the matmul's memory traffic costs the collective); both ranks'
timelines merged
into one Perfetto trace and one Gantt PNG per configuration under the results folder.
Every time is the slower rank's (all-reduced with MAX per call), so both ranks take the same
decisions. Skipped (with the reason) when fewer than 2 GPUs exist.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from .common import Report, Timing, free_port, run_ranks

NEEDS_GPU = True
LAYERS = 6
H_MAIN, T_MAIN = 4096, 4096
# T: hidden sizes. The all-to-all also at 2x, 4x and 8x the tokens (longer stages: per-stage costs weigh
# less), each all-to-all at the H among these whose stages alone are closest in length (NCCL's
# and lowlevel's NVLink one balance at different H: the NVLink one moves the same bytes faster)
LONG = {8192: (1536, 2048), 16384: (1024, 1280, 1536), 32768: (1024, 1280)}
H_BALANCE = (1024, 2048, 2560, 3072, 4096)  # hidden sizes whose stage balance the full run measures
BAND = 1.25  # "about the same time alone": comm / matmul within [1 / BAND, BAND]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_NVLS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
CTAS = (8, 16, 24, 32)  # NCCL CTA limits the sweep tries (one communicator each) ...
MAX_WAVE_CTAS = 48  # ... beside the wave-aligned ones of lowlevel.comm_sm_candidates, up to this
COMMS = ("allreduce", "alltoall", "alltoall_zero_sm", "alltoall_nvlink")
A2A = ("alltoall", "alltoall_zero_sm", "alltoall_nvlink")  # implementations of one exchange: the same result
# The comm stages run in two worker launches: NCCL's (with a zero-CTA communicator and symmetric
# windows) and lowlevel's NVLink all-to-all (peer buffers, NCCL's all-to-all on ordinary buffers
# beside it), so that neither set of buffers meets the other's machinery in one process. The
# best sequential run of an all-to-all is taken over both launches' runs of the same shape.
GROUPS = {"nccl": ("allreduce", "alltoall", "alltoall_zero_sm"), "nvlink": ("alltoall_nvlink",)}
GROUP_TIMEOUT_S = {"nccl": 420, "nvlink": 300}  # bounds a hang only
# The launches a plain run makes (``UB_GROUPS`` picks others). The NVLink launch hung three times
# on 2026-11-30 (session 9) until UBatchRunner's first replay was made to wait for its eager
# warm-up (two launches of the all-to-all at once raced on one rank's epoch counters); it has run
# through since (session 10).
DEFAULT_GROUPS = "nccl,nvlink"


class Clock:
    """Wall times on a rank, agreed by every rank: each timed call starts after a barrier and
    ends with a device synchronize; its figure is the slowest rank's (all-reduce MAX)."""

    def __init__(self, torch: Any, dist: Any, rank: int) -> None:
        self.torch, self.dist, self.rank = torch, dist, rank
        self.t = torch.zeros(1, device="cuda", dtype=torch.float64)

    def step_ms(self, fn: Callable[[], Any], n: int = 1) -> float:
        """ms per call of ``n`` back-to-back calls of ``fn``, the slowest rank's."""
        torch, dist = self.torch, self.dist
        dist.barrier(device_ids=[self.rank])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        self.t.fill_((time.perf_counter() - t0) * 1e3 / n)
        dist.all_reduce(self.t, op=dist.ReduceOp.MAX)
        return float(self.t.item())

    def samples(self, fn: Callable[[], Any], reps: int = 10, warmup: int = 2, n: int = 1) -> list[float]:
        """``reps`` figures of :meth:`step_ms` after ``warmup`` untimed calls."""
        for _ in range(warmup):
            fn()
        self.torch.cuda.synchronize()
        return [self.step_ms(fn, n) for _ in range(reps)]


def wave_ctas(T: int, H: int, total: int) -> list[int]:
    """The comm shares :func:`lowlevel.comm_sm_candidates` proposes for this matmul (at most
    :data:`MAX_WAVE_CTAS`)."""
    import lowlevel
    from lowlevel.kernels.matmul import work_units

    return lowlevel.comm_sm_candidates(work_units(T, H, H), total, max_comm=MAX_WAVE_CTAS)


def make_groups(dist: Any, ctas: Sequence[int]) -> tuple[dict[int, Any], str | None]:
    """``{0: the default group, c: a communicator limited to c CTAs}``; the error text when the
    torch build lacks per-communicator CTA limits (then only what was made before)."""
    groups: dict[int, Any] = {0: dist.group.WORLD}
    for c in ctas:
        try:
            o = dist.ProcessGroupNCCL.Options()
            o.config.max_ctas = c
            groups[c] = dist.new_group(backend="nccl", pg_options=o)
        except Exception as exc:  # the torch build lacks per-communicator CTA limits
            return groups, f"{type(exc).__name__}: {exc}"
    return groups, None


class Model:
    """One rank's microbatched model: weights, inputs, per-microbatch ping-pong buffers, the
    comm stage (one of :data:`COMMS`) on a switchable NCCL communicator, runners."""

    def __init__(self, rank: int, world: int, H: int, T: int, layers: int, groups: dict[int, Any],
                 comm: str = "allreduce", zero_group: Any = None) -> None:
        import torch
        import torch.distributed as dist

        import lowlevel
        from lowlevel import kernels as K
        from lowlevel import ubatching as ub
        from lowlevel.sm_control import device_sm_count

        if comm not in COMMS:
            raise ValueError(f"comm must be one of {COMMS}, got {comm!r}")
        if comm in A2A and T % world:
            raise ValueError(f"alltoall needs T divisible by the world size {world}, got T={T}")
        self.torch, self.dist, self.K, self.lowlevel, self.ub = torch, dist, K, lowlevel, ub
        self.rank, self.world, self.H, self.T, self.layers, self.kind = rank, world, H, T, layers, comm
        self.total = device_sm_count()
        g = torch.Generator(device="cuda").manual_seed(1234 + H)
        self.w = torch.randn(H, H, device="cuda", dtype=torch.bfloat16, generator=g) / 64
        self.xs = [self.make_x(r) for r in range(world)]
        self.x = self.xs[rank]
        self.zero_group, self.symmetric, self.peers, self.home = zero_group, None, None, comm

        def pairs(t: list[Any]) -> list[tuple[Any, Any]]:  # each microbatch's (h, next x)
            return [(t[0], t[1]), (t[2], t[3])]

        if comm == "alltoall_zero_sm":  # every buffer an all-to-all touches in the zero-CTA group's windows
            self.symmetric = lowlevel.SymmetricBuffers(zero_group, [(T, H)] * 4, torch.bfloat16)
            self.plain = self.own = pairs(self.symmetric.tensors)
        else:  # NCCL's own buffers; the NVLink stage's peers store into buffers of their own
            self.plain = self.own = pairs([torch.empty(T, H, device="cuda", dtype=torch.bfloat16) for _ in range(4)])
            if comm == "alltoall_nvlink":
                self.peers = lowlevel.PeerBuffers(None, [(T, H)] * 4, torch.bfloat16)
                self.own = pairs(self.peers.tensors)
        self.bufs = self.own
        self.programs = self.total  # the NVLink all-to-all's programs (set_comm_sms)
        self.groups = groups
        self.comm = [groups[0]]
        self.slices = [lowlevel.UBatchSlice(slice(0, 1), slice(0, T)),
                       lowlevel.UBatchSlice(slice(1, 2), slice(T, 2 * T))]
        self.sleep_cycles = 0  # > 0: the compute stage is a sleep kernel of that many cycles (no memory traffic)
        self.marks: list[tuple[str, Any]] | None = None  # not None: a timing event after every stage

    def make_x(self, r: int) -> Any:
        torch = self.torch
        g = torch.Generator(device="cuda").manual_seed(100 + r)
        return torch.randn(2 * self.T, self.H, device="cuda", dtype=torch.bfloat16, generator=g)

    def set_comm_sms(self, n: int) -> None:
        self.comm[0] = self.groups.get(n, self.groups[0])
        self.programs = n or self.total

    def kinds(self) -> tuple[str, ...]:
        """The comm stages this model runs for its best sequential run: its own and, for an
        all-to-all, NCCL's (in the NCCL launch also the zero-SM call, which runs NCCL's kernels
        outside symmetric windows)."""
        if self.home not in A2A:
            return (self.home,)
        return ("alltoall", "alltoall_nvlink") if self.peers is not None else ("alltoall", "alltoall_zero_sm")

    def set_kind(self, kind: str) -> None:
        """Switch the comm stage to another implementation of the same exchange (the NVLink one
        on the peer buffers, NCCL's on plain ones)."""
        if kind not in self.kinds():
            raise ValueError(f"this model cannot run {kind!r}")
        self.kind = kind
        self.bufs = self.own if kind == self.home else self.plain

    def check(self) -> str | None:
        """The NVLink all-to-all's error word (a wait that gave up), as text; None when clean."""
        if self.peers is None:
            return None
        try:
            self.K.all_to_all.check(self.peers)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def close(self) -> None:
        """Free the collective buffers (collective: both ranks, same order)."""
        for b in (self.symmetric, self.peers):
            if b is not None:
                b.close()

    def poison(self) -> None:
        """NaN in every microbatch buffer: a run that does not rewrite its output shows."""
        for a, b in self.bufs:
            a.fill_(float("nan"))
            b.fill_(float("nan"))

    def mark(self, name: str) -> None:
        """With :attr:`marks` set, a timing event on the current stream (external: inside a
        capture it becomes a graph node that every replay records again)."""
        if self.marks is not None:
            e = self.torch.cuda.Event(enable_timing=True, external=True)
            e.record()
            self.marks.append((name, e))

    def layer_gen(self, i: int, xs: Any) -> Any:
        a, b = self.bufs[i]
        cur = xs
        if i == 0:
            self.mark("start")
        for layer in range(self.layers):
            out = a if self.kind != "allreduce" or layer % 2 == 0 else b
            if self.sleep_cycles:
                self.torch.cuda._sleep(self.sleep_cycles)  # a stand-in of the matmul's length, moving no bytes
            else:
                self.K.matmul(cur, self.w, out=out)  # compute stage
            self.mark(f"c{i}.{layer}")
            yield self.ub.TO_COMM
            if self.kind == "allreduce":
                self.dist.all_reduce(out, group=self.comm[0])  # comm stage: NCCL, SMs per its communicator
                cur = out
            else:  # MoE dispatch shape: T/world rows of H to each rank; b = the next layer's input
                if self.kind == "alltoall":
                    self.dist.all_to_all_single(b, a, group=self.comm[0])
                elif self.kind == "alltoall_zero_sm":
                    self.lowlevel.all_to_all_single(b, a, group=self.zero_group)  # copy engines, no SM
                else:  # stores into the peer's b over NVLink, on self.programs SMs
                    self.K.all_to_all_single(b, a, peers=self.peers, programs=self.programs)
                cur = b
            self.mark(f"a{i}.{layer}")
            yield self.ub.TO_COMPUTE
        return cur

    def sequential(self) -> Any:
        outs = []
        for i, s in enumerate(self.slices):
            g = self.layer_gen(i, self.x[s.token_slice])
            try:
                while True:
                    next(g)
            except StopIteration as stop:
                outs.append(stop.value)  # each microbatch's own buffer: cat copies, as the runner's does
        return self.torch.cat(outs)

    def control(self, k: int) -> Any:
        if k == 0:
            return None
        return self.lowlevel.SMControlContextManager(k, self.set_comm_sms, self.K.set_num_sms, total_sms=self.total)

    def runner(self, mode: str, k: int) -> Any:
        fn = self.layer_gen if mode == "generators" else self.ub.thread_fn_from_generator(self.layer_gen)
        return self.lowlevel.UBatchRunner(fn, mode=mode, sm_control=self.control(k), timeout_s=60)

    def reference(self) -> Any:
        """float32 reference of this rank's output with bf16 rounding where the model rounds,
        every rank's inputs regenerated from their seeds; per microbatch and layer
        ``y_r = bf16(x_r @ w)``, then all-reduce: ``x_r <- bf16(sum_r y_r)``; all-to-all:
        ``x_r <- concat_j(rows r*T/world..(r+1)*T/world of y_j)``."""
        torch, T, n = self.torch, self.T, self.world
        w = self.w.float()
        outs = []
        for i in range(2):
            xs = [x[i * T:(i + 1) * T].float() for x in self.xs]
            for _ in range(self.layers):
                ys = [(x @ w).bfloat16().float() for x in xs]
                if self.kind == "allreduce":
                    s = ys[0]
                    for y in ys[1:]:
                        s = s + y
                    xs = [s.bfloat16().float()] * n
                else:
                    h = T // n
                    xs = [torch.cat([ys[j][r * h:(r + 1) * h] for j in range(n)]) for r in range(n)]
            outs.append(xs[self.rank])
        return torch.cat(outs)


def _rel(a: Any, b: Any) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def _max_diff(a: Any, b: Any) -> float:
    return float((a.float() - b.float()).abs().max())


def graph_samples(torch: Any, clock: Clock, fn: Callable[[], Any], n: int = 5, reps: int = 7) -> list[float]:
    """ms per call of ``fn`` as device time: ``n`` back-to-back calls captured into one CUDA
    graph (NCCL inside), ``reps`` replays after a warm-up (each the slower rank's), divided by
    ``n``. No host launch cost, as in the sequential run's FULL graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # lazy set-up off the capture
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    out = [ms / n for ms in clock.samples(g.replay, reps=reps)]
    torch.cuda.synchronize()
    del g
    return out


def measure_alone(torch: Any, dist: Any, clock: Clock, K: Any, T: int, hs: Sequence[int],
                  zero_group: Any, group: str = "nccl") -> dict[int, dict[str, Any]]:
    """Per ``H`` in ``hs``: ms samples of one microbatch's stages alone, each on all SMs and the
    default communicator: the matmul of ``T x H`` by ``H x H`` and the comm stages of ``group``
    (:data:`GROUPS`) on ``T x H`` bf16: NCCL's in-place all-reduce, all-to-all and zero-SM
    all-to-all, or NCCL's all-to-all and lowlevel's NVLink one (every program). ``samples_ms``:
    device time (5 calls in one graph, :func:`graph_samples`); ``eager_samples_ms``: wall time
    of 5 eager calls (host launch cost included: a copy-engine all-to-all call costs the host
    more than NCCL's kernel). ``ratio``: each comm stage's median device time over the
    matmul's, 1 = balanced."""
    import contextlib

    import lowlevel

    out: dict[int, dict[str, Any]] = {}
    for H in hs:
        g = torch.Generator(device="cuda").manual_seed(7 + H)
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=g)
        w = torch.randn(H, H, device="cuda", dtype=torch.bfloat16, generator=g) / 64
        h = torch.empty(T, H, device="cuda", dtype=torch.bfloat16)
        z = torch.zeros(T, H, device="cuda", dtype=torch.bfloat16)  # all-reduced in place: stays finite
        o = torch.empty(T, H, device="cuda", dtype=torch.bfloat16)
        with contextlib.ExitStack() as stack:
            fns = {"matmul": lambda: K.matmul(x, w, out=h), "alltoall": lambda: dist.all_to_all_single(o, x)}
            if group == "nccl":
                zs = stack.enter_context(lowlevel.SymmetricBuffers(zero_group, [(T, H), (T, H)], torch.bfloat16))
                xs, os_ = zs.tensors
                xs.copy_(x)
                fns["allreduce"] = lambda: dist.all_reduce(z)
                fns["alltoall_zero_sm"] = lambda: lowlevel.all_to_all_single(os_, xs, group=zero_group)
            else:
                pb = stack.enter_context(lowlevel.PeerBuffers(None, [(T, H)], torch.bfloat16))
                fns["alltoall_nvlink"] = lambda: K.all_to_all_single(pb.tensors[0], x, peers=pb)
            eager = {k: clock.samples(f, reps=7, n=5) for k, f in fns.items()}
            dev = {k: graph_samples(torch, clock, f) for k, f in fns.items()}
            torch.cuda.synchronize()
        med = {k: statistics.median(v) for k, v in dev.items()}
        out[H] = {"samples_ms": dev, "ms": med, "eager_samples_ms": eager,
                  "eager_ms": {k: statistics.median(v) for k, v in eager.items()},
                  "ratio": {c: med[c] / med["matmul"] for c in med if c != "matmul"}}  # 1 = balanced
    return out


def stage_times(marks: list[tuple[str, Any]], layers: int) -> tuple[list[float], list[float]]:
    """Device µs of every compute and comm stage of one overlapped run of 2 microbatches, from
    the events :meth:`Model.mark` recorded after each stage (the last ``start`` onwards): a
    stage starts when the one before it on its stream ended and what it waits for ended
    (compute ``i`` of layer ``L``: comm ``i`` of layer ``L - 1``; comm: its own compute)."""
    last = max(j for j, (n, _) in enumerate(marks) if n == "start")
    t0 = marks[last][1]
    t = {n: t0.elapsed_time(e) * 1e3 for n, e in marks[last + 1:]}
    cs, as_ = [], []
    for layer in range(layers):
        for i in range(2):
            prev_c = t[f"c0.{layer}"] if i else t.get(f"c1.{layer - 1}", 0.0)
            cs.append(t[f"c{i}.{layer}"] - max(prev_c, t.get(f"a{i}.{layer - 1}", 0.0)))
            prev_a = t[f"a0.{layer}"] if i else t.get(f"a1.{layer - 1}", 0.0)
            as_.append(t[f"a{i}.{layer}"] - max(prev_a, t[f"c{i}.{layer}"]))
    return cs, as_


def pipeline_stages(m: Model, clock: Clock, k: int, reps: int = 5) -> dict[str, Any]:
    """How long each stage takes *inside* the overlapped FULL graph (generators, split ``k``),
    from timing events captured into the graph (:meth:`Model.mark`): median µs of the compute
    and comm stages past the first layer, over ``reps`` replays. Twice: with the matmul, and
    with the matmul replaced by a sleep kernel of the matmul's length alone (one SM, no memory
    traffic). What the comm stage loses beside the matmul but not beside the sleep is
    contention for the memory system (HBM, L2, copy engines), not the pipeline's ordering."""
    torch = m.torch
    out: dict[str, Any] = {"k": k}
    mm_us = statistics.median(graph_samples(torch, clock, lambda: m.K.matmul(m.x[:m.T], m.w, out=m.bufs[0][0]))) * 1e3
    probe = graph_samples(torch, clock, lambda: torch.cuda._sleep(100_000))
    cycles = int(100_000 * mm_us / (statistics.median(probe) * 1e3))
    for what, sleep in (("matmul", 0), ("sleep", cycles)):
        m.sleep_cycles, m.marks = sleep, []
        r = m.runner("generators", k)
        try:
            r([m.x], m.slices, graph=True)  # warm-up and capture: the captured events re-record per replay
            marks, m.marks = m.marks, None
            cs, as_ = [], []
            for _ in range(reps):
                torch.cuda.synchronize()
                m.dist.barrier(device_ids=[m.rank])
                r([m.x], m.slices, graph=True)
                torch.cuda.synchronize()
                c, a = stage_times(marks, m.layers)
                cs += c[2:]
                as_ += a[2:]
            out[what] = {"compute_us": statistics.median(cs), "comm_us": statistics.median(as_)}
        finally:
            m.sleep_cycles, m.marks = 0, None
            r.clear()
            r.close()
    out["matmul_alone_us"] = mm_us
    return out


def pick_balanced(alone: dict[int, dict[str, Any]], comm: str) -> int:
    """The ``H`` whose ``comm`` stage alone is closest to its matmul alone (|log ratio|
    smallest; ties to the larger H)."""
    return _by_balance(alone, comm)[0]


def _by_balance(alone: dict[int, dict[str, Any]], comm: str) -> list[int]:
    """The ``H`` of ``alone``, ``comm``'s stage closest to its matmul's first (|log ratio|; ties
    to the larger H)."""
    return sorted(alone, key=lambda H: (abs(math.log(alone[H]["ratio"][comm])), -H))


def within_band(alone: dict[int, dict[str, Any]], H: int, comm: str) -> bool:
    """Whether ``comm``'s stage alone at ``H`` is within :data:`BAND` of the matmul alone: what
    makes a configuration *balanced* (its figures' names say so and carry the 1.4x target)."""
    return abs(math.log(alone[H]["ratio"][comm])) <= math.log(BAND)


def plan_configs(H: int, T: int, comms: Sequence[str], alone: dict[int, dict[str, Any]],
                 alone_long: dict[int, dict[int, dict[str, Any]]]) -> list[tuple[str, int, int, str, bool]]:
    """The configurations a full run times, from the stages measured alone: ``(name, H, T,
    comm, balanced)``. The all-reduce at ``H`` (the main one) and at the ``H`` of ``alone``
    closest to balance; each all-to-all at the (up to) two ``H`` of :func:`balanced_hs` at
    ``T``, and at the closest ``H`` of each :data:`LONG` entry (``alone_long``: ``T -> H ->``
    what :func:`measure_alone` returns). ``balanced`` is :func:`within_band`, for every
    configuration: a pick outside the band (the closest there was) is timed but not called
    balanced."""
    plan: list[tuple[str, int, int, str, bool]] = []
    if "allreduce" in comms:
        plan.append((f"allreduce_H{H}", H, T, "allreduce", H in alone and within_band(alone, H, "allreduce")))
        best = pick_balanced(alone, "allreduce")
        if best != H:
            plan.append((f"allreduce_H{best}", best, T, "allreduce", within_band(alone, best, "allreduce")))
    a2as = [c for c in comms if c in A2A]
    for comm in a2as:
        for h in balanced_hs(alone, comm):
            plan.append((f"{comm}_H{h}", h, T, comm, within_band(alone, h, comm)))
    # longer stages, the same balance (both stages scale with T): per-stage costs weigh less
    for t_long, long in alone_long.items():
        for comm in a2as:
            h_long = pick_balanced(long, comm)
            plan.append((f"{comm}_H{h_long}_T{t_long}", h_long, t_long, comm, within_band(long, h_long, comm)))
    return plan


def balanced_hs(alone: dict[int, dict[str, Any]], comm: str, most: int = 2) -> list[int]:
    """Up to ``most`` hidden sizes whose ``comm`` stage alone is within :data:`BAND` of its
    matmul alone, closest first (none within: the closest one). Two balanced sizes can overlap
    very differently: a matmul whose tiles just fill the SMs loses a whole wave to any comm
    share (``lowlevel.comm_sm_candidates``), so both are timed and reported."""
    order = _by_balance(alone, comm)
    inside = [H for H in order if within_band(alone, H, comm)]
    return (inside or order)[:most]


def check_config(m: Model, k_test: int, graph: bool) -> tuple[dict[str, Any], Any]:
    """Correctness of one configuration: sequential vs the float32 reference; threads and
    generators, without and with the SM split ``k_test``, each into poisoned buffers, vs the
    sequential run; with ``graph``, the overlapped run captured as one FULL graph and replayed
    into a poisoned output. Returns the results and the sequential output."""
    torch = m.torch
    res: dict[str, Any] = {}
    seq = m.sequential()
    torch.cuda.synchronize()
    res["seq_vs_reference_rel"] = _rel(seq, m.reference())
    res["seq_abs_max"] = float(seq.float().abs().max())
    res["seq_finite"] = bool(torch.isfinite(seq.float()).all())
    diffs = {}
    for mode in ("threads", "generators"):
        for k in sorted({0, k_test}):
            r = m.runner(mode, k)
            m.poison()
            out = r([m.x], m.slices)
            torch.cuda.synchronize()
            diffs[f"{mode}_k{k}"] = _max_diff(out, seq)
            r.close()
    res["max_abs_diff"] = diffs
    res["graph_error"] = None
    if graph:
        g = m.runner("generators", k_test)
        try:
            out = g([m.x], m.slices, graph=True)  # capture (after an eager warm-up), then replay
            torch.cuda.synchronize()
            out.fill_(float("nan"))  # poison the static output: the replay must rewrite it
            m.poison()
            g([m.x], m.slices, graph=True)
            torch.cuda.synchronize()
            diffs["graph"] = _max_diff(out, seq)
        except Exception as exc:
            res["graph_error"] = f"{type(exc).__name__}: {exc}"
        g.clear()  # free the graph that holds NCCL kernels before the communicators go
        g.close()
    return res, seq


def seq_graph(m: Model, clock: Clock, seq: Any) -> tuple[list[float] | None, float | None, str | None]:
    """The sequential run captured as one FULL graph (NCCL inside), replayed into poisoned
    buffers: (ms samples, max abs difference from ``seq``, None) or (None, None, the error)."""
    torch = m.torch
    try:
        sg = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            m.sequential()  # warm-up off the capture
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(sg):
            sg_out = m.sequential()
        m.poison()
        sg_out.fill_(float("nan"))
        sg.replay()
        torch.cuda.synchronize()
        return clock.samples(sg.replay), _max_diff(sg_out, seq), None
    except Exception as exc:
        return None, None, f"{type(exc).__name__}: {exc}"


def time_config(m: Model, clock: Clock, name: str, out_dir: str, seq: Any) -> dict[str, Any]:
    """Timings of one configuration (every figure: ms samples, the slower rank's): the
    sequential run on the default and the most-CTA communicator; the SM sweep
    (:func:`lowlevel.find_sm_split`); overlapped threads and generators at the best split and
    threads without a split; for all-reduce, the FULL graph replay; one timeline per rank."""
    import lowlevel

    torch, dist = m.torch, m.dist
    res: dict[str, Any] = {}
    name_kind = m.kind
    for kind in m.kinds():  # the best sequential run of any all-to-all these buffers take
        print(f"[{time.strftime('%H:%M:%S')}] rank {m.rank}: {name}: sequential {kind}", flush=True)
        m.set_kind(kind)
        seq_s = {}
        for c in sorted({0, max(m.groups)}):
            m.set_comm_sms(c)
            seq_s[c] = clock.samples(m.sequential)
        m.set_comm_sms(0)
        res.setdefault("seq_samples_ms", {})[kind] = seq_s
        # The sequential run captured as one graph too (NCCL inside): the best sequential run may
        # be a replay, and a replayed overlap is only fairly compared with a replayed sequence.
        samples, diff, err = seq_graph(m, clock, seq)
        res.setdefault("seq_graph_samples_ms", {})[kind] = samples
        res.setdefault("seq_graph_max_abs_diff", {})[kind] = diff
        res.setdefault("seq_graph_error", {})[kind] = err
    m.set_kind(name_kind)
    runners: dict[tuple[str, int], Any] = {}

    def get(mode: str, k: int) -> Any:
        r = runners.get((mode, k))
        if r is None:
            r = runners[(mode, k)] = m.runner(mode, k)
        return r

    sweep_s: dict[int, list[float]] = {}

    def run_k(k: int) -> float:
        r = get("generators", k)
        ms = clock.step_ms(lambda: r([m.x], m.slices))
        sweep_s.setdefault(k, []).append(ms)
        return ms

    want = set(CTAS) | set(wave_ctas(m.T, m.H, m.total))
    # the zero-SM all-to-all takes no SM; capping the matmul can still help it (less memory
    # traffic beside the copy engines): k caps the matmul only, the communicator stays the same
    ks = [0] + sorted(k for k in m.groups if k and k in (set(CTAS) if m.kind == "alltoall_zero_sm" else want))
    best, sweep = lowlevel.find_sm_split(run_k, ks, reps=5)
    res["sweep_ms"], res["sweep_samples_ms"], res["best_k"] = sweep, sweep_s, best
    for key, mode, k in (("threads", "threads", best), ("generators", "generators", best),
                         ("threads_nosplit", "threads", 0)):
        r = get(mode, k)
        res[f"overlap_{key}_samples_ms"] = clock.samples(lambda r=r: r([m.x], m.slices))
    if True:  # the overlapped run as one FULL graph, both comm stages
        g = m.runner("generators", best)
        try:
            out = g([m.x], m.slices, graph=True)
            torch.cuda.synchronize()
            res["graph_timed_max_abs_diff"] = _max_diff(out, seq)
            res["graph_samples_ms"] = clock.samples(lambda: g([m.x], m.slices, graph=True))
            res["graph_timed_error"] = None
        except Exception as exc:
            res["graph_timed_error"] = f"{type(exc).__name__}: {exc}"
        g.clear()
        g.close()
    # each stage's time inside the overlapped graph, beside the matmul and beside a sleep kernel
    res["pipeline_stages"] = pipeline_stages(m, clock, best)
    # one timeline per rank, aligned on a small all-reduce
    rb = get("generators", best)
    tl = lowlevel.Timeline(labels={lowlevel.current_stream(): "compute", rb.comm_stream: f"comm ({m.kind})"})
    flag = torch.ones(1, device="cuda")
    torch.cuda.synchronize()
    dist.barrier(device_ids=[m.rank])
    with tl.activate():
        with tl.span("align"):
            dist.all_reduce(flag)
        rb([m.x], m.slices)
    torch.cuda.synchronize()
    tl.to_chrome_trace(os.path.join(out_dir, f"trace_{name}_rank{m.rank}.json"))
    res["timeline_stats"] = tl.stats()
    for r in runners.values():
        r.close()
    return res


def worker(rank: int, world: int, port: int, out_dir: str, H: int, T: int, layers: int, full: int,
           hs: str = "-", group: str = "nccl") -> None:
    """One rank of the comm stages of ``group`` (:data:`GROUPS`): correctness of every variant
    against the sequential run and the reference at ``H x T``; with ``full``, also the stage
    balance over ``hs`` (comma separated hidden sizes, ``-`` for none), the timings and the
    merged-trace inputs of the main configuration (NCCL: all-reduce at ``H``) and of each comm
    stage at its most balanced ``H`` and at the :data:`LONG` shapes."""
    os.environ.update(NO_NVLS)
    if float(os.environ.get("UB_DUMP_S", "0")) > 0:  # a hang prints every thread's stack first
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["UB_DUMP_S"]), exit=True)
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))
    from lowlevel import kernels as K
    from lowlevel.sm_control import device_sm_count

    hl = [int(h) for h in str(hs).split(",") if h.strip() not in ("", "-")]
    shapes = {(T, h) for h in {H, *hl}} | ({(t, h) for t, hs_long in LONG.items() for h in hs_long} if hl else set())
    ctas = sorted(set(CTAS).union(*(wave_ctas(t, h, device_sm_count()) for t, h in shapes))) if full else [16]
    groups, ctas_error = make_groups(dist, ctas)
    import lowlevel

    comms = GROUPS[group]
    # NCCL's zero-CTA policy (the copy-engine all-to-all): the NCCL launch only
    zero_group = lowlevel.zero_sm_group() if group == "nccl" else None
    clock = Clock(torch, dist, rank)
    res: dict[str, Any] = {"rank": rank, "group": group, "total_sms": device_sm_count(), "ctas_error": ctas_error,
                           "ctas_groups": sorted(k for k in groups if k), "configs": []}
    k_test = 16 if 16 in groups else 0
    # (name, H, T, comm, balanced for that comm)
    plan: list[tuple[str, int, int, str, bool]] = [(f"{c}_H{H}", H, T, c, False) for c in comms]
    if full and hl:
        alone = measure_alone(torch, dist, clock, K, T, hl, zero_group, group)
        res["alone"] = alone
        res["balanced_H"] = {c: pick_balanced(alone, c) for c in comms}
        res["alone_long"] = {t_long: measure_alone(torch, dist, clock, K, t_long, hs_long, zero_group, group)
                             for t_long, hs_long in LONG.items()}
        plan = plan_configs(H, T, comms, alone, res["alone_long"])
    for name, Hc, Tc, comm, balanced in plan:
        print(f"[{time.strftime('%H:%M:%S')}] rank {rank}: {name}", flush=True)  # where a hang happened
        m = Model(rank, world, Hc, Tc, layers, groups, comm, zero_group)
        cfg: dict[str, Any] = {"name": name, "H": Hc, "T": Tc, "layers": layers, "comm": comm, "balanced": balanced}
        chk, seq = check_config(m, k_test, graph=True)
        cfg.update(chk)
        cfg["nvlink_error"] = m.check()
        if full:
            cfg.update(time_config(m, clock, name, out_dir, seq))
            cfg["nvlink_error"] = cfg["nvlink_error"] or m.check()
        res["configs"].append(cfg)
        m.close()  # collective: both ranks, same order
        del m, seq
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    torch.cuda.synchronize()
    dist.barrier(device_ids=[rank])
    # Teardown, bounded: destroy_process_group() hung here on the device (torch 2.11) when a
    # graph was still alive; whether it finishes is part of the result.
    import threading

    t = threading.Thread(target=dist.destroy_process_group, daemon=True)
    t.start()
    t.join(30)
    res["teardown_ok"] = not t.is_alive()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    sys.stdout.flush()
    os._exit(0)


def spawn(out_dir: str, H: int, T: int, layers: int, full: bool, timeout: float = 300,
          hs: Sequence[int] = (), group: str = "nccl") -> list[dict[str, Any]]:
    """Run 2 ranks of :func:`worker` for the comm stages of ``group``; their JSON results
    (AssertionError if one died or hung). ``hs``: the hidden sizes whose stage balance a
    ``full`` run measures (none: no balance)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", UB_DUMP_S=str(max(timeout - 10, 5)), **NO_NVLS)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    code = ("import sys; from bench.bench_ubatch_nccl import worker; "
            "worker(*[int(a) if a.isdigit() else a for a in sys.argv[1:]])")
    hs_arg = ",".join(str(int(h)) for h in hs) or "-"
    port = free_port()
    return run_ranks([[sys.executable, "-c", code, str(r), "2", str(port), out_dir, str(H), str(T), str(layers),
                       str(int(full)), hs_arg, group] for r in range(2)], out_dir, env=env, timeout=timeout,
                     cwd=ROOT, what=f" ({group})")


def _t(samples: list[float]) -> Timing:
    return Timing.of(samples)


COMM_LABELS = {"allreduce": "NCCL all-reduce", "alltoall": "NCCL all-to-all (MoE dispatch)",
               "alltoall_zero_sm": "NCCL all-to-all (MoE dispatch), zero-CTA policy: copy engines, no SM",
               "alltoall_nvlink": "lowlevel NVLink all-to-all (MoE dispatch): stores into the peer, k programs"}


def _label(cfg: dict[str, Any]) -> str:
    comm = COMM_LABELS[cfg["comm"]]
    return f"{comm}, H={cfg['H']}, T={cfg['T']}" + (" (balanced)" if cfg["balanced"] else "")


def report_config(rep: Report, cfg: dict[str, Any], alone: dict[str, Any] | None, files: dict[str, str],
                  same_shape: Sequence[dict[str, Any]] = ()) -> None:
    """The figures of one configuration (rank 0's record: every time is already the slower
    rank's). ``same_shape``: the other all-to-all configurations of the same ``T x H``, whose
    sequential runs (in their own buffers: the zero-SM one in symmetric windows) count for
    the best sequential run too."""
    seq_all = {f"{kind}, comm {c} CTAs": _t(s) for kind, by_c in cfg["seq_samples_ms"].items()
               for c, s in by_c.items()}  # every all-to-all implementation for an all-to-all
    for o in same_shape:
        seq_all.update({f"{kind} ({o['name']}'s buffers), comm {c} CTAs": _t(s)
                        for kind, by_c in o["seq_samples_ms"].items() for c, s in by_c.items()})
    best_c = min(seq_all, key=lambda c: float(seq_all[c]))
    seq = seq_all[best_c]
    best = cfg["best_k"]
    lab = _label(cfg)
    target = ">= 1.4x" if cfg["balanced"] else ""
    extra = {"config": cfg["name"], "sweep_ms": cfg["sweep_ms"], "best_comm_ctas": best,
             "seq_ms": {c: float(v) for c, v in seq_all.items()}, "best_seq": best_c,
             "alone_ms": alone["ms"] if alone else None, "alone_eager_ms": alone.get("eager_ms") if alone else None,
             "alone_ratio_comm_over_matmul":
             alone["ratio"][cfg["comm"]] if alone else None,
             "max_abs_diff": cfg["max_abs_diff"], "seq_vs_reference_rel": cfg["seq_vs_reference_rel"],
             "graph_error": cfg.get("graph_error"), "graph_timed_error": cfg.get("graph_timed_error"),
             "graph_timed_max_abs_diff": cfg.get("graph_timed_max_abs_diff"), "files": files,
             "nvlink_error": cfg.get("nvlink_error")}
    rep.add(f"2 GPUs, {lab}: overlap, threads, SM split (comm {best} CTAs)", _t(cfg["overlap_threads_samples_ms"]),
            "ms", "best sequential run (all SMs each stage)", seq, target=target, extra=extra)
    rep.add(f"2 GPUs, {lab}: overlap, generators, SM split (comm {best} CTAs)",
            _t(cfg["overlap_generators_samples_ms"]), "ms", "best sequential run", seq, target=target)
    rep.add(f"2 GPUs, {lab}: overlap, threads, no SM split", _t(cfg["overlap_threads_nosplit_samples_ms"]), "ms",
            "best sequential run", seq)
    if cfg.get("graph_samples_ms"):
        inside = "the NVLink kernel inside" if cfg["comm"] == "alltoall_nvlink" else "NCCL inside"
        rep.add(f"2 GPUs, {lab}: overlapped FULL graph replay ({inside})", _t(cfg["graph_samples_ms"]), "ms",
                "eager overlapped, generators", _t(cfg["overlap_generators_samples_ms"]))
    seq_gs = {k: _t(v) for k, v in cfg["seq_graph_samples_ms"].items() if v}
    for o in same_shape:
        seq_gs.update({f"{k} ({o['name']}'s buffers)": _t(v) for k, v in o["seq_graph_samples_ms"].items() if v})
    if seq_gs:
        seq_g = min(seq_gs.values(), key=float)
        best_any = min(seq, seq_g, key=float)
        rep.add(f"2 GPUs, {lab}: sequential run as one FULL graph (best of {', '.join(seq_gs)})", seq_g, "ms",
                "best sequential run, eager", seq,
                extra={"max_abs_diff": cfg.get("seq_graph_max_abs_diff"),
                       "ms": {k: float(v) for k, v in seq_gs.items()}})
        if cfg.get("graph_samples_ms"):
            rep.add(f"2 GPUs, {lab}: overlapped FULL graph vs the best sequential (eager or graph)",
                    _t(cfg["graph_samples_ms"]), "ms", "best sequential run, eager or one FULL graph", best_any,
                    target=target, extra={"graph_max_abs_diff": cfg.get("graph_timed_max_abs_diff")})
    if any(cfg["seq_graph_error"].values()):
        rep.add(f"2 GPUs, {lab}: sequential FULL graph failed", 0.0, "-", extra={"error": cfg["seq_graph_error"]})
    ps = cfg.get("pipeline_stages")
    if ps:
        rep.add(f"2 GPUs, {lab}: comm stage inside the overlapped FULL graph (split {ps['k']}), beside the matmul",
                ps["matmul"]["comm_us"], "us",
                "the same beside a sleep kernel of the matmul's length (no memory traffic)",
                ps["sleep"]["comm_us"], lower_is_better=True,
                extra={**ps, "note": "medians over replays, stages past the first layer; the gap is memory-system "
                                     "contention between the matmul and the collective"})
    st = cfg["timeline_stats"]
    rep.add(f"2 GPUs, {lab}: timeline achieved speedup", st["achieved_speedup"], "x",
            "ideal (total busy / busiest stream)", st["ideal_speedup"], lower_is_better=False)


def run(rep: Report) -> None:
    """The worker launches of :data:`GROUPS` named by ``UB_GROUPS`` (comma separated; default
    :data:`DEFAULT_GROUPS`), their figures, the merged traces and pictures. A launch that dies
    or hangs is reported and the other's figures stand."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        print(f"bench_ubatch_nccl: skipped: needs 2 CUDA GPUs, found {n}", file=sys.stderr)
        return
    from lowlevel.trace_merge import merge_traces, plot_merged

    os.makedirs(rep.out_dir, exist_ok=True)
    traces: dict[str, str] = {}
    results: dict[str, list[dict[str, Any]]] = {}
    errors: dict[str, str] = {}
    for group in [g for g in os.environ.get("UB_GROUPS", DEFAULT_GROUPS).split(",") if g]:
        with tempfile.TemporaryDirectory() as d:
            try:
                results[group] = spawn(d, H_MAIN, T_MAIN, LAYERS, True, timeout=GROUP_TIMEOUT_S[group], hs=H_BALANCE,
                                       group=group)
            except AssertionError as exc:
                errors[group] = str(exc)[-6000:]
                print(f"bench_ubatch_nccl: the {group} launch failed:\n{errors[group]}", file=sys.stderr)
                continue
            for cfg in results[group][0]["configs"]:
                suffix = "" if cfg["name"] == f"allreduce_H{H_MAIN}" else f"_{cfg['name']}"
                traces[cfg["name"]] = os.path.join(rep.out_dir, f"ubatch_nccl_2gpu{suffix}_trace.json")
                merge_traces([os.path.join(d, f"trace_{cfg['name']}_rank{r}.json") for r in range(2)],
                             path=traces[cfg["name"]])
    raw = os.path.join(rep.out_dir, "ubatch_nccl_2gpu_ranks.json")
    with open(raw, "w") as f:
        json.dump({"launches": results, "errors": errors}, f, indent=1)
    rep.files.append(raw)
    every = [c for res in results.values() for c in res[0]["configs"]]
    for group, res in results.items():
        r0 = res[0]
        alone = {int(h): v for h, v in r0.get("alone", {}).items()}
        alone_long = {(int(t), int(h)): v for t, by_h in r0.get("alone_long", {}).items() for h, v in by_h.items()}
        for cfg in r0["configs"]:
            tr = traces[cfg["name"]]
            png = plot_merged(tr, tr.replace("_trace.json", ".png"),
                              f"2 GPUs: 2 microbatches x {cfg['layers']} layers (matmul -> {cfg['comm']}), "
                              f"H={cfg['H']}, generators, SM split {cfg['best_k']}")
            rep.files += [tr, png]
            same = [o for o in every if o is not cfg and o["comm"] in A2A and cfg["comm"] in A2A
                    and (o["T"], o["H"]) == (cfg["T"], cfg["H"])]
            report_config(rep, cfg,
                          alone.get(cfg["H"]) if cfg["T"] == T_MAIN else alone_long.get((cfg["T"], cfg["H"])),
                          {"trace": tr, "png": png}, same)
        for h, v in sorted(alone.items()):  # the stage balance the configurations were picked by
            for comm in GROUPS[group]:
                what = {"allreduce": "NCCL in-place all-reduce",
                        "alltoall": "NCCL all-to-all (T/2 rows to each rank)",
                        "alltoall_zero_sm": "NCCL all-to-all, zero-CTA policy (copy engines)",
                        "alltoall_nvlink": "lowlevel NVLink all-to-all (all SMs)"}[comm]
                rep.add(f"2 GPUs, stages alone (device time), H={h}, T={T_MAIN}: {what} (ratio 1 = balanced)",
                        _t(v["samples_ms"][comm]), "ms", "matmul alone (all SMs)", _t(v["samples_ms"]["matmul"]),
                        extra={"balanced": r0["balanced_H"][comm] == h,
                               "eager_ms": {k: v["eager_ms"][k] for k in ("matmul", comm)}})
        if alone and rep.figures:
            rep.figures[0].extra.setdefault("stage_balance", {})[group] = {
                "alone_ms": {h: v["ms"] for h, v in alone.items()},
                "alone_eager_ms": {h: v["eager_ms"] for h, v in alone.items()},
                "ratio_comm_over_matmul": {h: v["ratio"] for h, v in alone.items()},
                "balanced_H": r0["balanced_H"], "ctas_error": r0["ctas_error"],
                "teardown_ok": [r["teardown_ok"] for r in res]}
    for group, err in errors.items():
        rep.add(f"2 GPUs, the {group} launch failed (its figures are missing)", 0.0, "-", extra={"error": err})


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "bench", "results")
    rep = Report("bench_ubatch_nccl", out)
    run(rep)
    print(json.dumps([f.to_json() for f in rep.figures], indent=1))
