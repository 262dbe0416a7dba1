"""Turn one results JSON (and the pictures beside it) into a Markdown report."""
from __future__ import annotations

import json
import os
from typing import Any


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def _cell(f: dict[str, Any], side: str) -> str:
    """The median, followed by ``(p20 – p80)`` when the figure carries its within-run spread."""
    sp = (f.get("extra") or {}).get("spread", {}).get(side)
    if sp and f.get(side) is not None:
        return f"{_fmt(f[side])} ({_fmt(sp['p20'])} – {_fmt(sp['p80'])})"
    return _fmt(f.get(side))


def render(run: dict[str, Any], rel_dir: str = "results") -> str:
    """The Markdown report of one run: device, versions, one table per module, pictures, skips."""
    dev = run.get("device") or {}
    lines = [f"# lowlevel benchmark report ({run.get('stamp', '?')})", ""]
    if dev.get("name"):
        lines.append(f"Device: {dev['name']}, {dev.get('sm_count')} SMs, compute capability "
                     f"{dev.get('compute_capability')}.")
    else:
        lines.append(f"Device: none ({dev.get('reason')}); GPU benchmarks were skipped.")
    vers = run.get("versions") or {}
    lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()), "",
              "Ratio = how many times better lowlevel is than the alternative measured in the same run "
              "(theirs / ours for times, ours / theirs for rates). Times are medians over trials; "
              "where given, (p20 – p80) is the 20th to 80th percentile of the same trials.", ""]
    for res in run.get("results", []):
        lines += [f"## {res['module'].removeprefix('bench_')}", "",
                  "| figure | lowlevel | unit | compared with | theirs | ratio | target |",
                  "| --- | ---: | --- | --- | ---: | ---: | --- |"]
        for f in res["figures"]:
            ratio = f"{f['ratio']:.2f}x" if f.get("ratio") else "-"
            lines.append(f"| {f['name']} | {_cell(f, 'value')} | {f['unit']} | {f.get('baseline_name') or '-'} | "
                         f"{_cell(f, 'baseline')} | {ratio} | {f.get('target') or ''} |")
        lines.append("")
        for path in res.get("files", []):
            name = os.path.basename(path)
            if name.endswith(".png"):
                lines += [f"![{name}]({rel_dir}/{name})", ""]
            else:
                lines += [f"- [{name}]({rel_dir}/{name}) (open in https://ui.perfetto.dev or chrome://tracing)", ""]
    for name, why in run.get("skipped", []):
        lines.append(f"- skipped `{name}`: {why}")
    return "\n".join(lines).rstrip() + "\n"


def write_report(results_path: str, out_path: str) -> str:
    """Render ``results_path`` into ``out_path`` (pictures linked relative to it); returns ``out_path``."""
    with open(results_path) as f:
        run = json.load(f)
    rel = os.path.relpath(os.path.dirname(os.path.abspath(results_path)), os.path.dirname(os.path.abspath(out_path)))
    text = render(run, rel)
    with open(out_path, "w") as f:
        f.write(text)
    return out_path
