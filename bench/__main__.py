"""``python -m bench``: run every ``bench/bench_*.py`` module, print one table, write JSON.

``python -m bench --only streams`` runs the modules whose name contains ``streams``;
``python -m bench --compare A.json B.json`` prints what changed between two runs.

Where the results go: with a GPU, ``bench/results/<stamp>.json`` and the tracked device report
``bench/REPORT.md``; without one, ``bench/results/cpu/<stamp>.json`` and
``bench/results/cpu/REPORT.md``, so that a CPU run never overwrites the device report;
``--out DIR`` puts both in ``DIR``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import pkgutil
import sys
import traceback
from typing import Any

from .common import Report
from .report import write_report

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
DEVICE_REPORT = os.path.join(HERE, "REPORT.md")  # tracked: the report of the last GPU run
CPU_RESULTS = os.path.join(RESULTS, "cpu")


def _modules(only: list[str]) -> list[str]:
    names = sorted(m.name for m in pkgutil.iter_modules([HERE]) if m.name.startswith("bench_"))
    if only:
        names = [n for n in names if any(o in n for o in only)]
    # modules that leave the device in an unusual state (green contexts) run last
    return sorted(names, key=lambda n: (n == "bench_kernels", n))


def _progress(items: list[str]) -> Any:
    try:
        from tqdm import tqdm

        return tqdm(items, desc="bench", unit="module", file=sys.stderr)
    except ImportError:  # pragma: no cover
        return items


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def _with_spread(f: dict[str, Any], side: str) -> str:
    """``median (p20-p80)`` when the figure carries its spread, else the median alone."""
    sp = (f.get("extra") or {}).get("spread", {}).get(side)
    text = _fmt(f[side])
    return f"{text} ({_fmt(sp['p20'])}-{_fmt(sp['p80'])})" if sp and f[side] is not None else text


def print_table(results: list[dict[str, Any]]) -> None:
    """One row per figure: median (p20-p80 where measured here), alternative, ratio, target."""
    rows = [("module", "figure", "lowlevel", "unit", "compared with", "theirs", "ratio", "target")]
    for r in results:
        for f in r["figures"]:
            rows.append((r["module"].removeprefix("bench_"), f["name"], _with_spread(f, "value"), f["unit"],
                         f["baseline_name"] or "-", _with_spread(f, "baseline"),
                         (_fmt(f["ratio"]) + "x") if f["ratio"] else "-", f["target"] or ""))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))


def compare(a_path: str, b_path: str) -> int:
    """Print each figure of two results files side by side, with B/A."""
    with open(a_path) as f:
        a = json.load(f)
    with open(b_path) as f:
        b = json.load(f)

    def index(run: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
        return {(r["module"], f["name"]): f for r in run["results"] for f in r["figures"]}

    ia, ib = index(a), index(b)
    print(f"A: {a_path} ({a.get('device', {}).get('name')})\nB: {b_path} ({b.get('device', {}).get('name')})")
    print(f"{'module':<16} {'figure':<48} {'A':>10} {'B':>10} {'B/A':>7}  unit")
    for key in sorted(set(ia) | set(ib)):
        fa, fb = ia.get(key), ib.get(key)
        va = fa["value"] if fa else None
        vb = fb["value"] if fb else None
        rel = f"{vb / va:.2f}" if va and vb else "-"
        unit = (fa or fb)["unit"]
        print(f"{key[0].removeprefix('bench_'):<16} {key[1]:<48} {_fmt(va):>10} {_fmt(vb):>10} {rel:>7}  {unit}")
    return 0


def _report_path(results_path: str, run: dict[str, Any] | None = None) -> str:
    """Where the Markdown report of a results file goes: the tracked ``bench/REPORT.md`` for a GPU
    run stored in ``bench/results/``, else ``REPORT.md`` beside the results file."""
    if run is None:
        with open(results_path) as f:
            run = json.load(f)
    folder = os.path.dirname(os.path.abspath(results_path))
    on_gpu = bool((run.get("device") or {}).get("name"))
    return DEVICE_REPORT if on_gpu and folder == RESULTS else os.path.join(folder, "REPORT.md")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks (or compare two results files, or only rewrite a report)."""
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--only", nargs="*", default=[], help="run modules whose name contains one of these")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two results files")
    p.add_argument("--out", default=None,
                   help="folder for JSON, pictures and REPORT.md (default: bench/results with a GPU, "
                        "bench/results/cpu without one)")
    p.add_argument("--report", metavar="RESULTS_JSON",
                   help="only (re)write the report of a results file (bench/REPORT.md for a GPU run in bench/results)")
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if args.report:
        print(f"wrote {write_report(args.report, _report_path(args.report))}")
        return 0

    import lowlevel
    from lowlevel.info import device_info

    if not lowlevel.cuda_available():  # Triton kernels can still run, under the interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")

    info = device_info()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    gpu = lowlevel.cuda_available()
    if args.out is None:
        args.out = RESULTS if gpu else CPU_RESULTS
        if not gpu:
            print(f"no GPU ({info['reason']}): the CPU-only results and report go to "
                  f"{os.path.relpath(CPU_RESULTS)}/; the device report {os.path.relpath(DEVICE_REPORT)} "
                  "is left as it is", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    results, skipped = [], []
    for name in _progress(_modules(args.only)):
        mod = importlib.import_module(f"bench.{name}")
        if getattr(mod, "NEEDS_GPU", True) and not gpu:
            skipped.append((name, f"needs a GPU ({info['reason']})"))
            continue
        rep = Report(name, args.out)
        try:
            mod.run(rep)
        except Exception as exc:  # one failing module does not lose the others' figures
            traceback.print_exc()
            skipped.append((name, f"failed: {type(exc).__name__}: {exc}"))
        results.append({"module": name, "figures": [f.to_json() for f in rep.figures], "files": rep.files})
    print_table(results)
    for name, why in skipped:
        print(f"skipped {name}: {why}")
    payload = {"stamp": stamp, "device": info["gpu"] or {"name": None, "reason": info["reason"]},
               "versions": info["versions"], "results": results, "skipped": skipped}
    path = os.path.join(args.out, f"{stamp}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {path}")
    print(f"wrote {write_report(path, _report_path(path, payload))}")
    return 1 if any(w.startswith("failed") for _, w in skipped) else 0


if __name__ == "__main__":
    sys.exit(main())
