"""Host cost of a kernel launch, per path: lowlevel's prepared launch against Triton's own entry
points (``kernel[grid](...)``, ``CompiledKernel[grid](...)``, ``CompiledKernel.run(...)`` and
the C entry of its launcher), and the public ``matmul()`` (plan cache) against
``prepare_matmul``'s launch and the uncached plan path. Quick (well under 60 s on the device).

Host time only: before each trial the device is drained (outside the timed part), then ``n``
calls are timed back to back; the kernels are small enough, and ``n`` low enough, that the
launch queue never fills, so the figures are the host's cost of a launch, not the device's.

``python -m bench.bench_launch --cpu`` measures, without a GPU (Triton's interpreter set up, every
final launch replaced by a no-op C-like call), the Python overhead of the same paths.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

from .common import Report, Timing, host_us_side_by_side

NEEDS_GPU = True


def host_only_us(*fns: Callable[[], Any], n: int = 50, trials: int = 41, warmup: int = 50,
                 sync: Callable[[], Any] | None = None) -> list[Timing]:
    """Host µs per call of each of ``fns``, trials interleaved: ``sync()`` (untimed), then ``n``
    calls timed. Median and p20/p80 over ``trials``."""
    return host_us_side_by_side(*fns, n=n, trials=trials, warmup=warmup, sync=sync, sync_timed=False)


def launch_paths(rep: Report, n: int = 100, trials: int = 41) -> None:
    """A 1024-element copy (one program) launched six ways, interleaved, on the default stream
    and on a lowlevel Stream."""
    import torch

    import lowlevel
    from lowlevel import _runtime as rt
    from lowlevel import kernels as K
    from lowlevel.kernels.copy import _copy_kernel

    src = torch.randn(1024, device="cuda")
    dst = torch.empty_like(src)
    K.copy(src, dst)
    # the same state whatever ran before in this thread: its SM-cap stack exists (a thread that never
    # entered sm_limit pays more per launch; measured apart below, in a fresh thread)
    with lowlevel.sm_limit(1):
        pass
    block = 32768 // src.element_size()
    ck = _copy_kernel[(1,)](src, dst, 1024, 1, BLOCK=block, num_warps=16, num_stages=1)  # the CompiledKernel
    launcher = ck.run  # Triton's CudaLauncher for it
    ptrs = (src.data_ptr(), dst.data_ptr(), 1024, 1, block)  # the kernel's arguments, constexpr included
    if launcher.global_scratch_size or launcher.profile_scratch_size:  # the C entry would need scratch memory
        rep.add("launch paths: skipped (the copy kernel needs scratch memory on this Triton)", 0.0, "us")
        return
    sync = torch.cuda.synchronize
    for where, ctx in (("default stream", None), ("a lowlevel Stream", lowlevel.Stream())):
        with (lowlevel.use_stream(ctx) if ctx is not None else contextlib.nullcontext()):
            h = rt.current_handle()
            prepared = K.prepare_copy(src, dst)
            bound = K.prepare_copy(src, dst, stream=h)  # a StreamLaunch: no current-stream look-up
            runner = ck[(1, 1, 1)]
            c_args = (1, 1, 1, h, ck.function, launcher.launch_cooperative_grid, launcher.launch_pdl, None, None,
                      ck.packed_metadata, None, None, None) + ptrs
            run_args = (1, 1, 1, h, ck.function, ck.packed_metadata, None, None, None) + ptrs
            c_entry = launcher.launch
            fns = {
                "prepared": prepared,
                "prepared, stream=": bound,
                "prepared, stream=, .launch": bound.launch,
                "kernel[grid](...)": lambda: _copy_kernel[(1,)](src, dst, 1024, 1, BLOCK=block, num_warps=16,
                                                                 num_stages=1),
                "lowlevel.kernels.copy": lambda: K.copy(src, dst),
                "CompiledKernel[grid](..., stream=)": lambda: runner(*ptrs, stream=h),
                "CompiledKernel.run(...)": lambda: launcher(*run_args),
                "C entry": lambda: c_entry(*c_args),
                "C entry + current-stream lookup": lambda: c_entry(1, 1, 1, rt.torch_get_raw(-1)
                                                                   or rt.cupy_get_current().ptr, *c_args[4:]),
            }
            t = dict(zip(fns, host_only_us(*fns.values(), n=n, trials=trials, sync=sync)))
            ours = t["prepared"]
            extra = {k: float(v) for k, v in t.items()}
            rep.add(f"launch, {where}: prepare_copy(..., stream=s).launch() (host us; thread has entered sm_limit)",
                    t["prepared, stream=, .launch"], "us", "Triton's C launcher entry, called directly on s",
                    t["C entry"], target="<= 1.1x the C entry (ratio >= 0.91x)",
                    extra={"ours_over_c_entry": t["prepared, stream=, .launch"] / t["C entry"],
                           "all_paths_us": extra})
            rep.add(f"launch, {where}: prepare_copy(..., stream=s)()", t["prepared, stream="], "us",
                    "Triton's C launcher entry, called directly on s", t["C entry"],
                    extra={"ours_over_c_entry": t["prepared, stream="] / t["C entry"]})
            rep.add(f"launch, {where}: prepare_copy(...)() on the current stream", ours, "us",
                    "Triton's C launcher entry, called directly", t["C entry"],
                    extra={"ours_over_c_entry": ours / t["C entry"]})
            rep.add(f"launch, {where}: prepare_copy(...)()", ours, "us", "CompiledKernel.run(...) (launcher, Python)",
                    t["CompiledKernel.run(...)"], extra={"ours_over": ours / t["CompiledKernel.run(...)"]})
            rep.add(f"launch, {where}: prepare_copy(...)()", ours, "us", "CompiledKernel[grid](..., stream=)",
                    t["CompiledKernel[grid](..., stream=)"])
            rep.add(f"launch, {where}: prepare_copy(...)()", ours, "us", "kernel[grid](...) (Triton's usual path)",
                    t["kernel[grid](...)"], target="<= 5 us")
            rep.add(f"launch, {where}: lowlevel.kernels.copy (validation each call)", t["lowlevel.kernels.copy"], "us",
                    "kernel[grid](...) (Triton's usual path)", t["kernel[grid](...)"])
            rep.add(f"launch, {where}: prepare_copy(...)()", ours, "us",
                    "C entry + lowlevel's current-stream lookup", t["C entry + current-stream lookup"])
            print(f"launch paths on {where} (host us per call): "
                  + ", ".join(f"{k} {float(v):.2f}" for k, v in t.items()))
    # the SM cap's thread-local look-up: in a thread that never entered sm_limit it is an
    # AttributeError raised and caught inside getattr (a fresh thread, measured before and after)
    fresh: dict[str, Timing] = {}

    def in_fresh_thread() -> None:
        p = K.prepare_copy(src, dst)
        fresh["never"] = host_only_us(p, n=n, trials=trials, sync=sync)[0]
        with lowlevel.sm_limit(1):
            pass
        fresh["after"] = host_only_us(p, n=n, trials=trials, sync=sync)[0]

    th = threading.Thread(target=in_fresh_thread)
    th.start()
    th.join()
    rep.add("launch: prepare_copy(...)() in a thread that never entered sm_limit", fresh["never"], "us",
            "the same thread after an sm_limit block (measured after it, not interleaved)", fresh["after"])
    # what the current-stream lookup costs (part of any launch that follows the current stream)
    raw, cup = host_us_side_by_side(lambda: rt.torch_get_raw(-1), lambda: rt.cupy_get_current().ptr, n=2000,
                                    trials=15, warmup=100)
    rep.add("host us: torch's raw current-stream call", raw, "us", "CuPy's current stream (.ptr)", cup)


MATMUL_SHAPES = ((1, 4096, 4096), (16, 4096, 4096), (64, 4096, 4096), (64, 4096, 14336))


def matmul_call_cost(rep: Report, n: int = 50, trials: int = 41) -> None:
    """Host µs per call of ``matmul()`` (plan cache hit, with and without ``out``) beside
    ``prepare_matmul``'s launch and the uncached plan path (what ``matmul()`` did before), bf16
    decode shapes, interleaved."""
    import importlib

    import torch

    from lowlevel import kernels as K

    mm = importlib.import_module("lowlevel.kernels.matmul")
    sync = torch.cuda.synchronize
    for M, N, Kd in MATMUL_SHAPES:
        a = torch.randn(M, Kd, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(Kd, N, device="cuda", dtype=torch.bfloat16)
        c = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        run = K.prepare_matmul(a, b, out=c)
        K.matmul(a, b, out=c)
        K.matmul(a, b)
        split = mm.config_for(M, N, Kd, 2).split_k > 1
        prep, hit, hit_alloc, old = host_only_us(run, lambda a=a, b=b, c=c: K.matmul(a, b, out=c),
                                                 lambda a=a, b=b: K.matmul(a, b),
                                                 lambda a=a, b=b, c=c: mm.plan(a, b, c, "tf32").launch(),
                                                 n=n, trials=trials, sync=sync)
        label = f"{M}x{N}x{Kd}{' (split-K)' if split else ''}"
        rep.add(f"matmul() host us per call, bf16 {label}", hit, "us", "prepare_matmul(...)() launch", prep,
                extra={"without_out_us": float(hit_alloc), "uncached_plan_us": float(old), "split_k": split})
        rep.add(f"matmul() host us per call, bf16 {label}", hit, "us", "uncached plan path (before the cache)", old)
        print(f"matmul {label}: host us per call: prepared {prep:.2f}, matmul(out=) {hit:.2f}, "
              f"matmul() {hit_alloc:.2f}, uncached {old:.2f}")
        del a, b, c, run


def run(rep: Report) -> None:
    launch_paths(rep)
    matmul_call_cost(rep)


# --- the CPU measure: Python overhead with no-op launches --------------------------------------

def _noop(*args: Any) -> None:
    return None


class _FakeRun:
    launch = staticmethod(_noop)
    launch_cooperative_grid = 0
    launch_pdl = 0
    global_scratch_size = 0
    profile_scratch_size = 0


class _FakeCompiled:
    function = 0
    packed_metadata = (4, 1, 0)
    run = _FakeRun()


def cpu_overhead() -> None:  # pragma: no cover - a manual measure
    """Python overhead per call of each path with every final launch a no-op (the launchers
    behave as on a GPU: key look-up, then the C entry), interleaved; prints µs per call."""
    import importlib
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from lowlevel import _runtime as rt
    from lowlevel import kernels as K

    mm = importlib.import_module("lowlevel.kernels.matmul")
    cp_mod = importlib.import_module("lowlevel.kernels.copy")
    rt.current_handle = lambda: 7  # type: ignore[assignment]
    rt.torch_get_raw = lambda _d: 7  # type: ignore[assignment]
    for fl in (mm._launch, mm._sum_launch, cp_mod._launch):
        fl.interpret = False
        fl.check = lambda ck: None
        fl._slow = lambda *a, **k: _FakeCompiled()  # type: ignore[method-assign]
    import lowlevel

    src, dst = torch.randn(1024), torch.empty(1024)
    prepared = K.prepare_copy(src, dst)
    argv = (1, 1, 1, 7) + prepared._argv
    for state in ("no sm_limit entered yet in this thread", "after an sm_limit block"):
        if state.startswith("after"):
            with lowlevel.sm_limit(1):
                pass
        pre, c_entry = host_us_side_by_side(prepared, lambda: _noop(*argv))
        print(f"CPU, no-op launch, {state}: prepare_copy(...)() {pre:.3f} us ({pre.p20:.3f}-{pre.p80:.3f}), "
              f"the no-op C entry called directly {c_entry:.3f} us (overhead {pre - c_entry:.3f} us)")
    for M, N, Kd, split in ((64, 4096, 4096, 1), (64, 4096, 4096, 2)):
        cfg = mm.Config(64, 64, 128, 8, 8, 5, split)
        mm.config_for = lambda *a, cfg=cfg, **k: cfg
        mm.clear_plan_cache()
        a, b = torch.randn(M, Kd, dtype=torch.bfloat16), torch.randn(Kd, N, dtype=torch.bfloat16)
        c = torch.empty(M, N, dtype=torch.bfloat16)
        run = K.prepare_matmul(a, b, out=c)
        old, new, new_alloc, prep = host_us_side_by_side(lambda: mm.plan(a, b, c, "tf32").launch(),
                                                         lambda: K.matmul(a, b, out=c), lambda: K.matmul(a, b), run)
        print(f"CPU, no-op launch, matmul {M}x{N}x{Kd} split_k={split}: uncached plan {old:.2f} us, "
              f"matmul(out=) {new:.2f} us, matmul() {new_alloc:.2f} us, prepare_matmul(...)() {prep:.2f} us "
              f"(p20-p80: {old.p20:.2f}-{old.p80:.2f}, {new.p20:.2f}-{new.p80:.2f}, "
              f"{new_alloc.p20:.2f}-{new_alloc.p80:.2f}, {prep.p20:.2f}-{prep.p80:.2f})")


if __name__ == "__main__":  # pragma: no cover
    import sys

    if "--cpu" in sys.argv:
        cpu_overhead()
    else:
        import os

        import lowlevel
        from lowlevel.info import device_info

        if not lowlevel.cuda_available():
            print(f"bench_launch skipped: needs a GPU ({device_info()['reason']}); --cpu measures the Python overhead")
            sys.exit(0)
        out_dir = os.path.join(os.path.dirname(__file__), "results")
        rep = Report("bench_launch", out_dir)
        run(rep)
        for f in rep.figures:
            print(f"{f.name:70s} {f.value:8.2f} {f.unit} | {f.baseline_name:45s} {f.baseline or float('nan'):8.2f} "
                  f"{'' if f.ratio is None else f'{f.ratio:.3f}x'} {f.target}")
