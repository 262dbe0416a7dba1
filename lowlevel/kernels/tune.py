"""Measure tile configurations of lowlevel's kernels on this device and print the winners.

``python -m lowlevel.kernels.tune [--budget-s 150] [--json PATH]`` compiles the candidate
configurations of :func:`lowlevel.kernels.matmul` for the decode grid (M in 1, 16, 64, 256;
(N, K) in (4096, 4096), (14336, 4096), (4096, 14336)) and the squares 4096 and 8192 in parallel
worker processes (Triton's on-disk cache then serves this process), checks each against
``torch.mm``, times each with ``triton.testing.do_bench`` beside ``torch.mm`` (cuBLAS), and prints
a table and the entries to paste into :data:`lowlevel.kernels.matmul.TABLE` (keyed by the
device's compute capability and SM count). The same for rms_norm's (rows, warps, stages) against
the copy bandwidth. Nothing runs at import; kernels never tune themselves.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from typing import Any

__all__ = ["candidates", "main"]

DECODE_M = (1, 16, 64, 256)
DECODE_NK = ((4096, 4096), (14336, 4096), (4096, 14336))
SQUARES = (4096, 8192)
SMEM = 200 * 1024


def _splits(M: int, N: int, K: int, bm: int, bn: int, bk: int, sms: int) -> list[int]:
    tiles = -(-M // bm) * -(-N // bn)
    out = [1]
    for s in (2, 3, 4, 6, 8, 12, 16):
        if tiles * s <= 2.2 * sms and K // s >= 2 * bk:
            out.append(s)
    return out


def candidates(M: int, N: int, K: int, sms: int, focus: bool = False) -> list[Any]:
    """Configurations worth measuring for an (M, K) x (K, N) bf16 product on ``sms`` SMs
    (``focus``: a second, narrower set around the first round's near misses)."""
    from .matmul import Config

    out = []
    if focus:
        if M <= 64:
            grid = [(16, 64, 256, 4, 5), (16, 64, 256, 4, 4), (32, 64, 256, 4, 4), (64, 64, 256, 4, 3),
                    (64, 32, 256, 4, 4), (64, 32, 128, 4, 5), (64, 32, 128, 4, 6), (32, 32, 256, 4, 5),
                    (64, 64, 128, 8, 5), (64, 128, 128, 8, 4), (64, 64, 64, 4, 6)]
        else:
            grid = [(256, 64, 64, 8, 4), (256, 64, 64, 8, 3), (256, 32, 64, 8, 4), (256, 128, 64, 8, 3),
                    (128, 64, 64, 4, 4), (128, 64, 64, 8, 5), (128, 64, 128, 8, 3), (256, 64, 128, 8, 3),
                    (128, 128, 64, 8, 5), (64, 64, 128, 4, 5), (128, 256, 64, 8, 4)]
        for bm, bn, bk, w, st in grid:
            if st * (bm * bk + bk * bn) * 2 > SMEM:
                continue
            for s in _splits(M, N, K, bm, bn, bk, sms)[:4]:
                out.append(Config(bm, bn, bk, 8, w, st, s))
        return out
    if M >= 1024:
        for bm, bn, bk, w, st in ((128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4),
                                  (128, 128, 64, 4, 4), (256, 128, 64, 8, 3), (128, 256, 32, 8, 4)):
            for fl in (False, True):
                out.append(Config(bm, bn, bk, 8, w, st, 1, fl))
        return out
    if M <= 16:
        grid = [(16, bn, bk, 4, st) for bn in (32, 64, 128) for bk in (128, 256) for st in (3, 4, 5)]
    elif M <= 64:
        grid = [(bm, bn, bk, w, st) for bm in (32, 64) for bn in (32, 64, 128) for bk in (64, 128, 256)
                for w in (4, 8) for st in (3, 4, 5, 6)]
    else:
        grid = [(bm, bn, bk, w, st) for bm, w in ((64, 4), (128, 8), (128, 4)) for bn in (64, 128, 256)
                for bk in (64, 128) for st in (3, 4, 5)]
    for bm, bn, bk, w, st in grid:
        if st * (bm * bk + bk * bn) * 2 > SMEM:
            continue
        for s in _splits(M, N, K, bm, bn, bk, sms):
            flats = (False, True) if M > 64 and s == 1 else (False,)
            for fl in flats:
                out.append(Config(bm, bn, bk, 8, w, st, s, fl))
    return out


def _shapes(only: str | None = None) -> list[tuple[int, int, int]]:
    if only:
        return [tuple(int(v) for v in s.split("x")) for s in only.split(",")]  # type: ignore[misc]
    return [(M, N, K) for M in DECODE_M for N, K in DECODE_NK] + [(n, n, n) for n in SQUARES]


def _compile_worker(jobs: list[tuple[int, int, int, tuple]]) -> list[str]:
    import torch

    from .matmul import Config, plan

    errors = []
    bufs: dict[tuple, Any] = {}
    for M, N, K, cfg in jobs:
        key = (M, N, K)
        if key not in bufs:
            bufs.clear()
            bufs[key] = (torch.randn(M, K, device="cuda", dtype=torch.bfloat16),
                         torch.randn(K, N, device="cuda", dtype=torch.bfloat16),
                         torch.empty(M, N, device="cuda", dtype=torch.bfloat16))
        a, b, c = bufs[key]
        try:
            plan(a, b, c, "ieee", cfg=Config(*cfg)).launch()
        except Exception as exc:  # noqa: BLE001 - out of shared memory, ...: record, go on
            errors.append(f"{key} {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
    torch.cuda.synchronize()
    return errors


def _compile_all(jobs: list[tuple[int, int, int, tuple]], workers: int) -> list[str]:
    """Compile every job's kernel in ``workers`` processes (fills Triton's on-disk cache)."""
    # one job per distinct specialisation: M == 1 or not (M, N, K are all 1 or multiples of 16 here)
    seen, uniq = set(), []
    for M, N, K, cfg in jobs:
        k = (M == 1, cfg[:6], cfg[6], cfg[7], K % cfg[2] == 0)
        if k not in seen:
            seen.add(k)
            uniq.append((M, N, K, cfg))
    chunks = [uniq[i::workers] for i in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        errs = pool.map(_compile_worker, [c for c in chunks if c])
    return [e for es in errs for e in es]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop measuring after this many seconds")
    ap.add_argument("--json", default=None, help="write every measurement here")
    ap.add_argument("--shapes", default=None, help="MxNxK,MxNxK,... instead of the decode grid and squares")
    ap.add_argument("--focus", action="store_true", help="the narrower second-round candidate set")
    ap.add_argument("--no-rms-norm", action="store_true")
    ap.add_argument("--workers", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 2)))
    ns = ap.parse_args(argv)
    t_start = time.perf_counter()

    import importlib

    import torch
    from triton.testing import do_bench

    from lowlevel.sm_control import device_sm_count

    rn = importlib.import_module("lowlevel.kernels.rms_norm")
    from .matmul import plan

    sms = device_sm_count()
    cc = torch.cuda.get_device_capability()
    shapes = _shapes(ns.shapes)
    jobs = [(M, N, K, tuple(cfg)) for M, N, K in shapes for cfg in candidates(M, N, K, sms, ns.focus)]
    print(f"device cc {cc}, {sms} SMs; {len(jobs)} (shape, config) pairs; compiling in {ns.workers} processes",
          flush=True)
    errs = _compile_all(jobs, ns.workers)
    print(f"compiled in {time.perf_counter() - t_start:.0f} s; {len(errs)} failures", flush=True)
    for e in errs[:20]:
        print("  ", e)

    def bench(fn: Any) -> float:
        return do_bench(fn, warmup=5, rep=20, return_mode="median") * 1e3  # µs

    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "cc": list(cc), "sms": sms, "matmul": [],
                               "rms_norm": []}
    table: dict[tuple[int, int, int], tuple[Any, float, float]] = {}
    deadline = t_start + ns.budget_s
    for M, N, K in shapes:
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
        c = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        ref = torch.mm(a.float(), b.float())
        cublas = bench(lambda a=a, b=b, c=c: torch.mm(a, b, out=c))
        rows = []
        for cfg in candidates(M, N, K, sms, ns.focus):
            if time.perf_counter() > deadline:
                print("  budget spent: stopping", flush=True)
                break
            try:
                c.fill_(float("nan"))
                run = plan(a, b, c, "ieee", cfg=cfg, own_ws=True).prepare()
                torch.cuda.synchronize()
                err = float((c.float() - ref).norm() / ref.norm())
                us = bench(run) if err < 2e-2 else float("inf")
            except Exception as exc:  # noqa: BLE001 - a config that fails is skipped
                print(f"  {cfg}: {type(exc).__name__}: {str(exc)[:100]}")
                continue
            rows.append((us, cfg, err))
            results["matmul"].append({"M": M, "N": N, "K": K, "cfg": list(cfg), "us": us, "cublas_us": cublas,
                                      "rel_err": err})
        rows.sort(key=lambda r: r[0])
        if rows:
            best = rows[0]
            table[(M, N, K)] = (best[1], best[0], cublas)
            print(f"{M}x{N}x{K}: cuBLAS {cublas:.1f} us; best {best[0]:.1f} us ({cublas / best[0]:.2f}x) "
                  f"{tuple(best[1])}; next: " + "; ".join(f"{u:.1f} {tuple(cf)}" for u, cf, _ in rows[1:4]),
                  flush=True)
        del a, b, c, ref

    # rms_norm against the copy bandwidth
    rms_configs = [] if ns.no_rms_norm else [
        (r, w, 1, pf) for r in (1, 2, 4) for w in (8, 16, 32) for pf in (False, True)]
    x = torch.randn(16384, 8192, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8192, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    copy_bw = 2 * src.nbytes / bench(lambda: dst.copy_(src)) / 1e3
    rrows = []
    for rows_per, warps, stages, pf in rms_configs:
        try:
            run = rn.plan(x, w, 1e-6, None, y, cfg=(rows_per, warps, stages, pf)).prepare()
            bw = 2 * x.nbytes / bench(run) / 1e3
        except Exception as exc:  # noqa: BLE001 - a config that fails is skipped
            print(f"  rms_norm {(rows_per, warps, stages, pf)}: {type(exc).__name__}: {str(exc)[:80]}")
            continue
        rrows.append((bw, (rows_per, warps, stages, pf)))
        results["rms_norm"].append({"cfg": [rows_per, warps, stages, pf], "GBps": bw, "copy_GBps": copy_bw})
    rrows.sort(reverse=True)
    default = 2 * x.nbytes / bench(lambda: rn.rms_norm(x, w, out=y)) / 1e3
    print(f"rms_norm bf16 16384x8192: copy {copy_bw:.0f} GB/s; default {default:.0f} ({default / copy_bw:.3f}x); "
          + "; ".join(f"{bw:.0f} ({bw / copy_bw:.3f}x) {cf}" for bw, cf in rrows[:5]), flush=True)

    print("\n# TABLE entry for", (cc, sms))
    print("{")
    from .matmul import m_bucket

    for (M, N, K), (cfg, us, cub) in table.items():
        print(f"    ({m_bucket(M)}, {N}, {K}): Config{tuple(cfg)},  # {us:.1f} us, cuBLAS {cub:.1f} us, "
              f"{cub / us:.2f}x")
    print("}")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return results


if __name__ == "__main__":
    main()
