"""Timeline: what ran on which stream, when, measured with CUDA timing events.

``with tl.span("name", stream=s):`` records a timing event on ``s`` (default: the current
stream) at entry and at exit; :meth:`Timeline.resolve` synchronizes and turns every span into
start/end milliseconds on one clock (the device's). From there: a Chrome trace / Perfetto JSON
with one track per stream, a PNG Gantt chart, and overlap figures.

``with tl.activate():`` also lets lowlevel's own runtimes add spans (execute_in_parallel's
branches, CUDAGraphRunner replays, microbatch stages). The active timeline is process-wide, not
per thread: parked microbatch threads and the runtimes' helper threads must record into the
timeline that the launching thread activated. The runtimes find it through the tracing hook of
the bottom layer (``lowlevel._runtime.tracer``), which :meth:`Timeline.activate` sets, so they
never import this module. A disabled timeline records nothing,
and its ``span`` costs about a method call. Each live span also pushes an NVTX range of its
name (through the ``nvtx`` package when it is installed, else ``torch.cuda.nvtx``), popped at
its end, so Nsight Systems shows the same stages. Not thread-safe for
concurrent ``resolve``; spans may be recorded from several threads.
"""
from __future__ import annotations

import contextlib
import json
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from . import _runtime as rt
from .errors import check_bool, check_path, check_real, describe
from .event import Event
from .stream import stream_handle

__all__ = ["Timeline", "Span", "active_timeline"]


def _nvtx_calls() -> tuple[Any, Any]:
    """(push, pop) of NVTX ranges: the ``nvtx`` package when installed, else torch's."""
    try:
        import nvtx

        return nvtx.push_range, nvtx.pop_range
    except Exception:  # not installed: torch's binding is always there on a CUDA build
        import torch

        return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop


_nvtx: tuple[Any, Any] | None = None


@dataclass(frozen=True)
class Span:
    name: str
    track: str
    start_ms: float
    end_ms: float

    @property
    def duration_ms(self) -> float:
        return self.end_ms - self.start_ms


class _NullSpan:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NULL = _NullSpan()


def active_timeline() -> Timeline | None:
    """The timeline lowlevel's runtimes record into (set by :meth:`Timeline.activate`), or None.
    Process-wide: see the module docstring."""
    return rt.tracer


class _LiveSpan:
    __slots__ = ("tl", "name", "stream", "h", "ev0")

    def __init__(self, tl: Timeline, name: str, stream: Any) -> None:
        self.tl, self.name, self.stream = tl, name, stream

    def __enter__(self) -> None:
        global _nvtx
        self.h = stream_handle(self.stream)
        self.ev0 = Event(timing=True).record(self.h)
        if _nvtx is None:
            _nvtx = _nvtx_calls()
        _nvtx[0](self.name)

    def __exit__(self, *exc: object) -> None:
        ev1 = Event(timing=True).record(self.h)
        _nvtx[1]()  # type: ignore[index]
        with self.tl._lock:
            self.tl._pending.append((self.name, self.h, self.ev0, ev1))


def _stats(spans: list[Any]) -> dict[str, Any]:
    """:meth:`Timeline.stats` of ``spans``."""
    if not spans:
        return {"wall_ms": 0.0, "busy_ms": {}, "total_busy_ms": 0.0, "achieved_speedup": 0.0,
                "ideal_speedup": 0.0}
    busy: dict[str, float] = {}
    for track in {s.track for s in spans}:
        iv = sorted((s.start_ms, s.end_ms) for s in spans if s.track == track)
        total, cur_s, cur_e = 0.0, iv[0][0], iv[0][1]
        for a, b in iv[1:]:
            if a > cur_e:
                total += cur_e - cur_s
                cur_s, cur_e = a, b
            else:
                cur_e = max(cur_e, b)
        busy[track] = total + cur_e - cur_s
    wall = max(s.end_ms for s in spans) - min(s.start_ms for s in spans)
    tot = sum(busy.values())
    return {"wall_ms": wall, "busy_ms": busy, "total_busy_ms": tot,
            "achieved_speedup": tot / wall if wall else 0.0,
            "ideal_speedup": tot / max(busy.values()) if tot else 0.0}


class Timeline:
    """Spans per stream, resolved after a synchronize. ``labels`` maps stream handles (or
    Streams) to track names; unnamed streams get ``stream 0x...``."""

    def __init__(self, enabled: bool = True, labels: dict[Any, str] | None = None) -> None:
        self.enabled = check_bool(enabled, "enabled")
        if labels is not None and not isinstance(labels, dict):
            raise TypeError(f"labels must be a dict of stream -> track name, got {describe(labels)}")
        self._pending: list[tuple[str, int, Any, Any]] = []
        self.spans: list[Span] = []
        self._lock = threading.Lock()
        self._labels: dict[int, str] = {}
        self._base: Any = None
        for k, v in (labels or {}).items():
            self.label(k, v)

    def label(self, stream: Any, name: str) -> None:
        """Name the track of ``stream``."""
        if not isinstance(name, str):
            raise TypeError(f"a track name must be a str, got {describe(name)}")
        self._labels[stream if type(stream) is int and stream >= 0 else stream_handle(stream)] = name

    def span(self, name: str, stream: Any = None) -> Any:
        """A context manager timing the work enqueued on ``stream`` inside it. A disabled
        timeline returns a shared no-op at the cost of a method call and looks at nothing;
        an enabled one raises ``TypeError`` for a name that is not a str."""
        if not self.enabled:
            return _NULL
        if type(name) is not str:
            raise TypeError(f"name must be a str, got {describe(name)}")
        return _LiveSpan(self, name, stream)

    @contextlib.contextmanager
    def activate(self) -> Iterator[Timeline]:
        """Let lowlevel's runtimes record their spans into this timeline inside the block (in
        every thread: the active timeline is process-wide); the previous one is active again
        after it."""
        prev = rt.set_tracer(self)
        try:
            yield self
        finally:
            rt.set_tracer(prev)

    def add(self, name: str, track: str, start_ms: float, end_ms: float) -> None:
        """Add an already-resolved span (for imported or synthetic timings); times in ms on any
        one clock. ``TypeError`` / ``ValueError`` for non-str names, times that are not finite
        real numbers, or a span that ends before it starts."""
        for what, v in (("name", name), ("track", track)):
            if not isinstance(v, str):
                raise TypeError(f"{what} must be a str, got {describe(v)}")
        times: list[float] = []
        for arg, t in (("start_ms", start_ms), ("end_ms", end_ms)):
            times.append(check_real(t, arg, "a finite number of milliseconds"))
        if times[1] < times[0]:
            raise ValueError(f"span {name!r} ends ({times[1]} ms) before it starts ({times[0]} ms)")
        self.spans.append(Span(name, track, times[0], times[1]))

    def resolve(self) -> list[Span]:
        """Wait for the recorded spans to finish and convert them to milliseconds on one clock,
        0 being the earliest span start seen so far. Returns all spans, sorted by start."""
        with self._lock:
            pending, self._pending = self._pending, []
        if pending:
            for _, _, _, ev1 in pending:
                ev1.synchronize()
            if self._base is None:
                self._base = min((p[2] for p in pending), key=lambda ev: pending[0][2].elapsed_ms(ev))
            base = self._base
            for name, h, ev0, ev1 in pending:
                track = self._labels.get(h, "default stream" if h == 0 else f"stream 0x{h:x}")
                self.spans.append(Span(name, track, base.elapsed_ms(ev0), base.elapsed_ms(ev1)))
        self.spans.sort(key=lambda s: (s.start_ms, s.track))
        return list(self.spans)

    # --- figures ---------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Busy time per track (union of its spans), wall time (first start to last end), and
        the achieved speedup (total busy time / wall) beside the ideal (total busy / busiest)."""
        return _stats(self.resolve())

    def overlap_ms(self, track_a: str, track_b: str) -> float:
        """Milliseconds during which both tracks had a span running. A track is named as
        :meth:`stats` and the trace name it: its label, ``"default stream"`` or
        ``"stream 0x..."`` (or the ``track`` of :meth:`add`). ``TypeError`` for a name that is
        not a str, ``ValueError`` for a track that has no span and no label."""
        for arg, v in (("track_a", track_a), ("track_b", track_b)):
            if type(v) is not str:
                raise TypeError(f"{arg} must be a track name (a str), got {describe(v)}")
        spans = self.resolve()
        known = {s.track for s in spans} | set(self._labels.values())
        for arg, v in (("track_a", track_a), ("track_b", track_b)):
            if v not in known:
                raise ValueError(f"{arg} must name a track of this timeline ({sorted(known)}), got {v!r}")
        a = [(s.start_ms, s.end_ms) for s in spans if s.track == track_a]
        b = [(s.start_ms, s.end_ms) for s in spans if s.track == track_b]
        return sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b)

    def to_chrome_trace(self, path: str | None = None) -> dict[str, Any]:
        """Chrome trace / Perfetto JSON: one complete ("X") event per span, one track (tid) per
        stream, times in microseconds. Written to ``path`` (a str or os.PathLike; ``TypeError``
        otherwise) if given."""
        if path is not None:
            check_path(path, "path")
        spans = self.resolve()
        tracks = sorted({s.track for s in spans})
        tid = {t: i for i, t in enumerate(tracks)}
        events: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "lowlevel"}}]
        events += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": tid[t], "args": {"name": t}} for t in tracks]
        events += [{"name": s.name, "cat": "gpu", "ph": "X", "pid": 0, "tid": tid[s.track],
                    "ts": round(s.start_ms * 1e3, 3), "dur": round(s.duration_ms * 1e3, 3)} for s in spans]
        trace = {"traceEvents": events, "displayTimeUnit": "ms"}
        if path is not None:
            with open(path, "w") as f:
                json.dump(trace, f)
        return trace

    def plot(self, path: str, title: str = "timeline", *, window_ms: tuple[float, float] | None = None) -> str:
        """Draw a Gantt chart (one row per stream) to a PNG at ``path`` (a str or os.PathLike;
        ``title`` a str: ``TypeError`` otherwise). ``window_ms``: ``(start, end)`` in ms on the
        timeline's clock (as :meth:`resolve` gives it), ``start < end``: only the spans that
        overlap it are drawn, on that range, and the title's figures cover those spans
        (``TypeError``/``ValueError`` naming ``window_ms`` otherwise)."""
        check_path(path, "path")
        if not isinstance(title, str):
            raise TypeError(f"title must be a str, got {describe(title)}")
        lo, hi = -math.inf, math.inf  # no window: every span, whole
        if window_ms is not None:
            if not isinstance(window_ms, (tuple, list)) or len(window_ms) != 2:
                raise TypeError(f"window_ms must be a (start, end) pair of ms, got {describe(window_ms)}")
            lo = check_real(window_ms[0], "window_ms[0]")
            hi = check_real(window_ms[1], "window_ms[1]")
            if not lo < hi:
                raise ValueError(f"window_ms must have start < end, got ({lo}, {hi})")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        spans = [s for s in self.resolve() if s.end_ms > lo and s.start_ms < hi]
        tracks = sorted({s.track for s in spans})
        names = sorted({s.name for s in spans})
        cmap = plt.get_cmap("tab20")
        color = {n: cmap(i % 20) for i, n in enumerate(names)}
        fig, ax = plt.subplots(figsize=(12, 1.0 + 0.6 * len(tracks)))
        try:
            view_ms = hi - lo if window_ms is not None else max([1e-9] + [x.end_ms for x in spans])  # labels fit
            for row, t in enumerate(tracks):
                for s in spans:
                    if s.track == t:
                        ax.barh(row, s.duration_ms, left=s.start_ms, color=color[s.name], edgecolor="black",
                                linewidth=0.4)
                        # the label in the middle of the part drawn (a span may cross the window's edges)
                        a, b = max(s.start_ms, lo), min(s.end_ms, hi)
                        if b - a > 0.04 * view_ms:
                            ax.text(a + (b - a) / 2, row, s.name, ha="center", va="center", fontsize=7)
            ax.set_yticks(range(len(tracks)))
            ax.set_yticklabels(tracks)
            ax.set_xlabel("ms")
            if window_ms is not None:
                ax.set_xlim(lo, hi)
            st = _stats(spans)
            ax.set_title(f"{title}: wall {st['wall_ms']:.2f} ms, achieved speedup {st['achieved_speedup']:.2f}x "
                         f"(ideal {st['ideal_speedup']:.2f}x)")
            ax.grid(axis="x", alpha=0.3)
            fig.tight_layout()
            fig.savefig(path, dpi=110)
        finally:
            plt.close(fig)  # also when drawing or saving fails: pyplot keeps every open figure
        return path
