"""``python -m bench``: run every ``bench/bench_*.py`` module, print one table, write JSON.

``python -m bench --only streams`` runs the modules whose name contains ``streams``;
``python -m bench --compare A.json B.json`` prints what changed between two runs.
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


def print_table(results: list[dict[str, Any]]) -> None:
    rows = [("module", "figure", "lowlevel", "unit", "compared with", "theirs", "ratio", "target")]
    for r in results:
        for f in r["figures"]:
            rows.append((r["module"].removeprefix("bench_"), f["name"], _fmt(f["value"]), f["unit"],
                         f["baseline_name"] or "-", _fmt(f["baseline"]),
                         (_fmt(f["ratio"]) + "x") if f["ratio"] else "-", f["target"] or ""))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))


def compare(a_path: str, b_path: str) -> int:
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--only", nargs="*", default=[], help="run modules whose name contains one of these")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two results files")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for JSON and pictures")
    p.add_argument("--report", metavar="RESULTS_JSON", help="only (re)write bench/REPORT.md from a results file")
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if args.report:
        print(f"wrote {write_report(args.report, os.path.join(HERE, 'REPORT.md'))}")
        return 0

    import lowlevel
    from lowlevel.info import device_info

    if not lowlevel.cuda_available():  # Triton kernels can still run, under the interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")

    info = device_info()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    os.makedirs(args.out, exist_ok=True)
    gpu = lowlevel.cuda_available()
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
    report_dir = HERE if os.path.abspath(args.out) == os.path.join(HERE, "results") else args.out
    print(f"wrote {write_report(path, os.path.join(report_dir, 'REPORT.md'))}")
    return 1 if any(w.startswith("failed") for _, w in skipped) else 0


if __name__ == "__main__":
    sys.exit(main())
