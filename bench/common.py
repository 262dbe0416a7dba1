"""What every benchmark module uses: a figure type, host and device timers.

The timers return :class:`Timing`, a float (the median) that also carries the 20th and 80th
percentiles of its trials; :meth:`Report.add` copies that spread into the figure's ``extra``
(``extra["spread"]``), so the results JSON and the report show it beside each median.
"""
from __future__ import annotations

import json
import math
import os
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# Time budgets, in the spirit of triton.testing.do_bench (warm-up 25 ms, 100 ms of repeats):
# the trial count follows from the budget and the measured cost of one trial.
HOST_BUDGET_MS = 100.0  # measured time per function, all its trials together
HOST_TRIAL_MS = 5.0  # target length of one trial when ``n`` is sized automatically
WALL_BUDGET_MS = 300.0
WALL_MIN_REPS = 15
MIN_TRIALS = 7  # enough for a median and p20/p80 that mean something
MAX_TRIALS = 1001


class Timing(float):
    """A median (the float value itself) with the spread of the trials it came from.

    ``p20``/``p80``: 20th and 80th percentiles of the per-trial figures (same unit);
    ``trials``: how many trials; ``n``: calls per trial (1 for :func:`wall_ms`). Arithmetic on
    it gives plain floats (a derived figure has no measured spread)."""

    p20: float
    p80: float
    trials: int
    n: int

    def __new__(cls, median: float, p20: float, p80: float, trials: int, n: int = 1) -> Timing:
        self = super().__new__(cls, median)
        self.p20, self.p80, self.trials, self.n = float(p20), float(p80), int(trials), int(n)
        return self

    @classmethod
    def of(cls, samples: list[float], n: int = 1) -> Timing:
        """The median and p20/p80 of ``samples`` (one figure per trial, at least one)."""
        if not samples:
            raise ValueError("samples must hold at least one trial, got none")
        p20, p80 = _p20_p80(samples)
        return cls(statistics.median(samples), p20, p80, len(samples), n)

    def __reduce__(self) -> Any:  # copy, deepcopy and pickle keep the spread
        return (Timing, (float(self), self.p20, self.p80, self.trials, self.n))

    def __repr__(self) -> str:
        return f"Timing({float(self)!r}, p20={self.p20!r}, p80={self.p80!r}, trials={self.trials}, n={self.n})"

    def spread(self) -> dict[str, float | int]:
        """``{"p20", "p80", "trials", "n"}`` for the results JSON."""
        return {"p20": self.p20, "p80": self.p80, "trials": self.trials, "n": self.n}


def _p20_p80(samples: list[float]) -> tuple[float, float]:
    if len(samples) == 1:
        return samples[0], samples[0]
    q = statistics.quantiles(samples, n=5, method="inclusive")  # the 20/40/60/80th percentiles
    return q[0], q[3]


@dataclass
class Figure:
    """One measured figure beside the alternative it is compared with, in the same run.

    ``ratio`` is always "how many times better lowlevel is": baseline/value when lower is
    better (times), value/baseline when higher is better (throughput). ``extra["spread"]``,
    when the figures came from the timers here, holds ``{"value": {...}, "baseline": {...}}``
    with each side's p20/p80, trial count and calls per trial."""

    name: str
    value: float
    unit: str
    baseline_name: str = ""
    baseline: float | None = None
    lower_is_better: bool = True
    target: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        spread = {side: v.spread() for side, v in (("value", self.value), ("baseline", self.baseline))
                  if isinstance(v, Timing)}
        if spread:
            self.extra = {**self.extra, "spread": {**spread, **self.extra.get("spread", {})}}
        if isinstance(self.value, Timing):
            self.value = float(self.value)
        if isinstance(self.baseline, Timing):
            self.baseline = float(self.baseline)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or not self.value or not self.baseline:
            return None
        return self.baseline / self.value if self.lower_is_better else self.value / self.baseline

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


class Report:
    """Collects figures and files (PNGs, traces) for one benchmark module."""

    def __init__(self, module: str, out_dir: str) -> None:
        self.module = module
        self.out_dir = out_dir
        self.figures: list[Figure] = []
        self.files: list[str] = []

    def add(self, *args: Any, **kw: Any) -> Figure:
        """``Figure(*args, **kw)``, kept; a :class:`Timing` value or baseline brings its spread."""
        f = Figure(*args, **kw)
        self.figures.append(f)
        return f


def _trials_for(budget_ms: float, one_trial_ms: float) -> int:
    if one_trial_ms <= 0:
        return MAX_TRIALS
    return max(MIN_TRIALS, min(MAX_TRIALS, math.ceil(budget_ms / one_trial_ms)))


def host_us(fn: Callable[[], Any], *, n: int | None = None, trials: int | None = None,
            sync: Callable[[], Any] | None = None, warmup: int = 200, budget_ms: float = HOST_BUDGET_MS) -> Timing:
    """Host time per call of ``fn`` in µs: the median over trials of the mean of ``n`` calls,
    with ``sync`` (if given) inside each timed trial, so device back-pressure is counted.
    See :func:`host_us_side_by_side` for ``n``, ``trials`` and ``budget_ms``."""
    return host_us_side_by_side(fn, n=n, trials=trials, sync=sync, warmup=warmup, budget_ms=budget_ms)[0]


def host_us_side_by_side(*fns: Callable[[], Any], n: int | None = None, trials: int | None = None,
                         sync: Callable[[], Any] | None = None, warmup: int = 200,
                         budget_ms: float = HOST_BUDGET_MS, sync_timed: bool = True) -> list[Timing]:
    """:func:`host_us` of each of ``fns``, their trials interleaved (a trial of the first, of the
    second, ..., then again), so that a host whose speed drifts during the run (shared machines
    do) slows all of them alike and their ratios stay meaningful.

    ``warmup`` calls of each function come first. ``n`` (calls per trial, the same for all
    functions) defaults to what makes one trial of the slowest function last about
    ``HOST_TRIAL_MS``, estimated from the warm-up (or from 10 probe calls when ``warmup`` is 0).
    ``trials`` defaults to what the first interleaved round says fits ``budget_ms`` of measured
    time per function, between ``MIN_TRIALS`` and ``MAX_TRIALS``. Each result is a
    :class:`Timing` (median in µs per call, with p20/p80 over the trials). ``sync`` runs
    before each trial and, with ``sync_timed``, at its end inside the timing (the device's
    time counts); without it, only once after the last trial (host time alone)."""
    if not fns:
        raise ValueError("host_us_side_by_side needs at least one function, got none")
    if n is not None and n < 1:
        raise ValueError(f"n must be a positive number of calls per trial or None, got {n!r}")
    if trials is not None and trials < 1:
        raise ValueError(f"trials must be positive or None, got {trials!r}")
    per_call_s = []
    for fn in fns:
        k = warmup if warmup > 0 else (10 if n is None else 0)
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        per_call_s.append((time.perf_counter() - t0) / k if k else 0.0)
    if n is None:
        n = max(1, min(100_000, round(HOST_TRIAL_MS * 1e-3 / max(max(per_call_s), 1e-9))))
    per: list[list[float]] = [[] for _ in fns]

    def one_round() -> float:
        t_round = 0.0
        for fn, out in zip(fns, per):
            if sync:
                sync()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            if sync and sync_timed:
                sync()
            dt = time.perf_counter() - t0
            t_round += dt
            out.append(dt / n * 1e6)
        return t_round

    first_ms = one_round() * 1e3
    total = trials if trials is not None else _trials_for(budget_ms * len(fns), first_ms)
    for _ in range(total - 1):
        one_round()
    if sync and not sync_timed:
        sync()
    return [Timing.of(p, n) for p in per]


def wall_ms(fn: Callable[[], Any], *, warmup: int = 3, reps: int | None = None,
            budget_ms: float = WALL_BUDGET_MS) -> Timing:
    """Wall time (ms) of ``fn`` followed by a device synchronize (for multi-stream work, where
    one stream's events do not bracket the others): median over ``reps`` runs, with p20/p80.
    ``reps`` defaults to what fits ``budget_ms`` as estimated from the warm-up, between
    ``WALL_MIN_REPS`` and ``MAX_TRIALS``."""
    import torch

    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    est_ms = (time.perf_counter() - t0) * 1e3 / warmup if warmup > 0 else 0.0
    if reps is None:
        reps = max(WALL_MIN_REPS, _trials_for(budget_ms, est_ms)) if warmup > 0 else WALL_MIN_REPS
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing.of(times, 1)


# --- processes, one a rank -----------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``init_method="tcp://..."``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(argvs: Sequence[Sequence[str]], out_dir: str, *, env: dict[str, str], timeout: float,
              cwd: str | None = None, what: str = "") -> list[dict[str, Any]]:
    """Start one process per command of ``argvs`` (rank ``r`` runs ``argvs[r]``), wait for all
    of them within ``timeout`` s in total, and return each rank's results: the JSON it wrote to
    ``out_dir/rank{r}.json``. ``AssertionError`` when a rank hangs (then every rank is
    killed), exits non-zero or writes no results, naming the rank and ``what``, with the tail of
    every rank's output (a peer's state often explains a death)."""
    procs = [subprocess.Popen(list(a), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for a in argvs]
    outs: dict[int, str] = {}
    deadline = time.monotonic() + timeout

    def tails() -> str:
        for i, q in enumerate(procs):
            if i not in outs:
                try:
                    out = q.communicate(timeout=max(deadline - time.monotonic(), 10))[0]
                except subprocess.TimeoutExpired:
                    q.kill()
                    out = q.communicate()[0]
                outs[i] = out.decode(errors="replace")
        return "\n".join(f"--- rank {i} (exit {q.returncode}) ---\n{outs[i][-4000:]}" for i, q in enumerate(procs))

    try:
        for r, p in enumerate(procs):
            try:
                outs[r] = p.communicate(timeout=max(deadline - time.monotonic(), 1))[0].decode(errors="replace")
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise AssertionError(f"rank {r} hung{what}\n" + tails()) from None
            if p.returncode != 0:
                raise AssertionError(f"rank {r} died with {p.returncode}{what}\n" + tails())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for r in range(len(procs)):
        path = os.path.join(out_dir, f"rank{r}.json")
        if not os.path.exists(path):
            raise AssertionError(f"rank {r} wrote no results{what}\n" + outs[r][-3000:])
        with open(path) as f:
            results.append(json.load(f))
    return results
