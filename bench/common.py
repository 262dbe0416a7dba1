"""What every benchmark module uses: a figure type, host and device timers."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable


@dataclass
class Figure:
    """One measured figure beside the alternative it is compared with, in the same run.

    ``ratio`` is always "how many times better lowlevel is": baseline/value when lower is
    better (times), value/baseline when higher is better (throughput)."""

    name: str
    value: float
    unit: str
    baseline_name: str = ""
    baseline: float | None = None
    lower_is_better: bool = True
    target: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

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
        f = Figure(*args, **kw)
        self.figures.append(f)
        return f


def host_us(fn: Callable[[], Any], *, n: int = 2000, trials: int = 7, sync: Callable[[], Any] | None = None,
            warmup: int = 200) -> float:
    """Median over ``trials`` of the mean host time per call (µs) of ``n`` calls, with ``sync``
    (if given) inside each timed trial, so device back-pressure is counted."""
    return host_us_side_by_side(fn, n=n, trials=trials, sync=sync, warmup=warmup)[0]


def host_us_side_by_side(*fns: Callable[[], Any], n: int = 500, trials: int = 31,
                         sync: Callable[[], Any] | None = None, warmup: int = 200) -> list[float]:
    """:func:`host_us` of each of ``fns``, their trials interleaved (a trial of the first, of the
    second, ..., then again), so that a host whose speed drifts during the run (shared machines
    do) slows all of them alike and their ratios stay meaningful."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    per: list[list[float]] = [[] for _ in fns]
    for _ in range(trials):
        for fn, out in zip(fns, per):
            if sync:
                sync()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            if sync:
                sync()
            out.append((time.perf_counter() - t0) / n * 1e6)
    return [statistics.median(p) for p in per]


def wall_ms(fn: Callable[[], Any], *, warmup: int = 3, reps: int = 15) -> float:
    """Median wall time (ms) of ``fn`` followed by a device synchronize (for multi-stream work,
    where one stream's events do not bracket the others)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
