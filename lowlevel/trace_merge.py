"""Merge the :class:`~lowlevel.Timeline` traces of several processes (one a rank) into one
Chrome trace / Perfetto JSON with a process track per rank, and draw them as one Gantt chart.

Each rank's timeline has its own clock (milliseconds from its own first span). To put them on
one clock, every rank records a span of the same name (default ``"align"``) around a step that
ends at the same moment everywhere, such as a small all-reduce or a barrier on the device:

>>> with tl.span("align"):
...     dist.all_reduce(flag)          # ends when the last rank joins, on every rank
>>> trace = tl.to_chrome_trace()       # each rank sends this dict (or its JSON file) to rank 0
>>> merged = merge_traces([t0, t1])    # rank r's "align" span ends at the same time everywhere

The residual misalignment is the skew of the aligning step's end between ranks (microseconds
for an NVLink all-reduce).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from .errors import check_path, describe

__all__ = ["merge_traces", "plot_merged"]


def _load(t: dict[str, Any] | str, what: str = "trace") -> dict[str, Any]:
    """A Chrome trace dict (given, or read from a JSON path), its events checked: a list of
    dicts whose complete (``"X"``) events carry numeric ``ts`` and ``dur``."""
    src = t
    if isinstance(t, (str, os.PathLike)):
        with open(t) as f:
            t = json.load(f)
    if not isinstance(t, dict) or "traceEvents" not in t:
        raise TypeError(f"{what} must be a Chrome trace dict (with traceEvents) or a path to one, got {describe(src)}")
    events = t["traceEvents"]
    if not isinstance(events, list):
        raise TypeError(f"{what}: traceEvents must be a list of events, got {describe(events)}")
    for j, e in enumerate(events):
        if not isinstance(e, dict):
            raise TypeError(f"{what}: traceEvents[{j}] must be an event dict, got {describe(e)}")
        if e.get("ph") == "X":
            for k in ("ts", "dur"):
                v = e.get(k)
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ValueError(f"{what}: traceEvents[{j}] (a complete event) needs a numeric {k!r}, got "
                                     f"{describe(v)}")
    return t


def merge_traces(traces: Sequence[dict[str, Any] | str], *, align: str | None = "align",
                 names: Sequence[str] | None = None, path: str | None = None) -> dict[str, Any]:
    """One Chrome trace from ``traces`` (:meth:`Timeline.to_chrome_trace` dicts or their JSON
    files), trace ``i`` becoming process ``i`` named ``names[i]`` (default ``"rank i"``), its
    tracks kept. With ``align``, each trace is shifted so that the *end* of its first span
    named ``align`` falls at the same time as in trace 0 (``ValueError`` if a trace has none);
    then all are shifted so the earliest event starts at 0. Times are in microseconds (``ts``,
    ``dur``), as in the inputs. Written to ``path`` (a str or os.PathLike) if given.
    ``TypeError`` for a ``path`` or trace of another type."""
    if isinstance(traces, (str, bytes, dict)) or not isinstance(traces, Sequence):
        raise TypeError(f"traces must be a list of Chrome-trace dicts or JSON paths, got {type(traces).__name__}")
    if path is not None:
        check_path(path, "path")
    loaded = [_load(t, f"traces[{i}]") for i, t in enumerate(traces)]
    if not loaded:
        raise ValueError("traces must not be empty")
    if names is not None:
        if isinstance(names, (str, bytes)) or not isinstance(names, Sequence) \
                or not all(isinstance(n, str) for n in names):
            raise TypeError(f"names must be a sequence of str (one per trace) or None, got {describe(names)}")
        if len(names) != len(loaded):
            raise ValueError(f"names must have one entry per trace ({len(loaded)}), got {len(names)}")
    shifts = [0.0] * len(loaded)
    if align is not None:
        ends = []
        for i, t in enumerate(loaded):
            hit = next((e for e in t["traceEvents"] if e.get("ph") == "X" and e.get("name") == align), None)
            if hit is None:
                raise ValueError(f"trace {i} has no span named {align!r} to align on")
            ends.append(float(hit["ts"]) + float(hit["dur"]))
        shifts = [ends[0] - e for e in ends]
    xs = [float(e["ts"]) + shifts[i] for i, t in enumerate(loaded) for e in t["traceEvents"] if e.get("ph") == "X"]
    base = min(xs) if xs else 0.0
    events: list[dict[str, Any]] = []
    for i, t in enumerate(loaded):
        name = names[i] if names is not None else f"rank {i}"
        events.append({"name": "process_name", "ph": "M", "pid": i, "args": {"name": name}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": i, "args": {"sort_index": i}})
        for e in t["traceEvents"]:
            if e.get("ph") == "M" and e.get("name") == "process_name":
                continue
            e = dict(e, pid=i)
            if e.get("ph") == "X":
                e["ts"] = round(float(e["ts"]) + shifts[i] - base, 3)
            events.append(e)
    merged = {"traceEvents": events, "displayTimeUnit": "ms",
              "otherData": {"aligned_on": align, "shift_us": shifts}}
    if path is not None:
        with open(path, "w") as f:
            json.dump(merged, f)
    return merged


def plot_merged(trace: dict[str, Any] | str, path: str, title: str = "ranks") -> str:
    """A Gantt chart (PNG at ``path``) of a merged trace: one row per (process, track), rows of a
    process together, times in ms. ``path``: a str or os.PathLike and ``title`` a str
    (``TypeError`` otherwise); ``ValueError`` for a trace without spans."""
    check_path(path, "path")
    if not isinstance(title, str):
        raise TypeError(f"title must be a str, got {describe(title)}")
    t = _load(trace)
    if not any(e.get("ph") == "X" for e in t["traceEvents"]):
        raise ValueError("trace has no spans (complete events) to draw")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    pname = {e["pid"]: e["args"]["name"] for e in t["traceEvents"] if e.get("name") == "process_name"}
    tname = {(e["pid"], e["tid"]): e["args"]["name"] for e in t["traceEvents"] if e.get("name") == "thread_name"}
    spans = [e for e in t["traceEvents"] if e.get("ph") == "X"]
    rows = sorted({(e["pid"], e.get("tid", 0)) for e in spans})
    row_of = {r: k for k, r in enumerate(rows)}
    names = sorted({e["name"].split(".")[0] for e in spans})
    cmap = plt.get_cmap("tab10")
    color = {n: cmap(k % 10) for k, n in enumerate(names)}
    fig, ax = plt.subplots(figsize=(13, 1.0 + 0.55 * len(rows)))
    for e in spans:
        ax.barh(row_of[(e["pid"], e.get("tid", 0))], e["dur"] / 1e3, left=e["ts"] / 1e3,
                color=color[e["name"].split(".")[0]], edgecolor="black", linewidth=0.3)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{pname.get(p, p)}: {tname.get((p, tid), tid)}" for p, tid in rows])
    ax.invert_yaxis()
    ax.set_xlabel("ms (clocks aligned on the end of the 'align' span)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    handles = [Patch(color=color[n], label=n) for n in names]
    ax.legend(handles=handles, loc="upper right", fontsize=7, ncol=min(6, len(names)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
