"""Python-side host cost of lowlevel's hot paths, this tree against another, on the CPU.

``python tools/host_cpu_compare.py [--old DIR] [--only NAME ...] [--rounds N] [--json FILE] [--device]``

Both trees are imported in one process (the other tree's ``lowlevel`` package is copied to a
temporary directory as ``lowlevel_old``; the package uses relative imports only). Their runtime
calls (CuPy's event record and wait, torch's private current-stream calls, CuPy's current
stream) are replaced, in both trees alike, by the same C builtins that do nothing, so what is
timed is lowlevel's own Python overhead: the figure the GPU benchmarks cannot separate from the
driver. ``dispatch`` is pure Python and needs no fakes. With ``--device`` (a GPU) nothing is
faked: the same cases, made with the public constructors, time both trees' real host cost side by
side in one process.

Each case runs as rounds of one trial per tree, the order alternating between rounds; a trial is
``n`` calls timed with ``time.perf_counter_ns``. Printed per case and tree: the median µs per
call over the rounds with its p20-p80, the same less the timing loop's own cost (an empty
callable's), and the median over rounds of the paired ratio this/other (below 1: this tree is
faster).
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
NEW_ROOT = os.path.dirname(HERE)
OLD_DEFAULT = "/work/main/.wt/old"


def _load_trees(old_root: str) -> tuple[Any, Any]:
    tmp = tempfile.mkdtemp(prefix="ll_old_")
    shutil.copytree(os.path.join(old_root, "lowlevel"), os.path.join(tmp, "lowlevel_old"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, tmp)
    sys.path.insert(0, NEW_ROOT)
    new = importlib.import_module("lowlevel")
    old = importlib.import_module("lowlevel_old")
    if os.path.dirname(new.__file__) != os.path.join(NEW_ROOT, "lowlevel"):
        raise SystemExit(f"imported the wrong lowlevel: {new.__file__}")
    return old, new


# --- the shared fakes: C builtins, so that they cost the same, little, in both trees -----------

class _FakeCupyStream:
    __slots__ = ("ptr", "use")

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr
        self.use = int  # stream.use() -> int(): a C call that does nothing


MAIN = _FakeCupyStream(1)
AUX = [_FakeCupyStream(100 + i) for i in range(8)]
TORCH_MAIN_KEY = (1, 0, 1)
torch_get_current = {-1: TORCH_MAIN_KEY, 0: TORCH_MAIN_KEY}.get  # (device) -> key
torch_set_current = max  # (*key) -> ignored
torch_get_raw = abs  # (-1) -> 1, a non-default current stream
cupy_get_current = itertools.repeat(MAIN).__next__
event_record = max  # (event, stream)
stream_wait_event = max  # (stream, event, 0)
is_capturing = {}.get  # (handle) -> None


class _FakeArray:
    """Stands for a CuPy array (the isinstance check and the attributes as_torch reads)."""

    device = types.SimpleNamespace(id=0)

    def __dlpack__(self, stream: Any = None) -> Any:
        return self


FAKE_CP = types.SimpleNamespace(
    ndarray=_FakeArray,
    cuda=types.SimpleNamespace(get_current_stream=cupy_get_current,
                               runtime=types.SimpleNamespace(getDevice=int, streamIsCapturing=is_capturing)))


def _fake_ops() -> Any:
    import torch

    return types.SimpleNamespace(get_raw=torch_get_raw, get_current=torch_get_current, set_current=torch_set_current,
                                 get_device=int, torch=torch, from_dlpack=id)


def _patch_new(ll: Any) -> None:
    rt = importlib.import_module("lowlevel._runtime")
    ops = _fake_ops()
    rt.torch_ops = ops
    rt.torch_get_raw, rt.torch_get_current, rt.torch_set_current = torch_get_raw, torch_get_current, torch_set_current
    rt.torch_get_device = int
    rt.cupy_get_current = cupy_get_current
    rt.event_record, rt.stream_wait_event = event_record, stream_wait_event
    rt.is_capturing = is_capturing
    rt._tls.event = types.SimpleNamespace(ptr=7)
    rt.cp = FAKE_CP
    for name in ("stream", "event", "parallel", "interop"):  # any module that kept a cp of its own
        m = importlib.import_module(f"lowlevel.{name}")
        for attr in ("_cp", "cp"):
            if hasattr(m, attr):
                setattr(m, attr, FAKE_CP)


def _patch_old(ll: Any) -> None:
    st = importlib.import_module("lowlevel_old.stream")
    ev = importlib.import_module("lowlevel_old.event")
    par = importlib.import_module("lowlevel_old.parallel")
    inter = importlib.import_module("lowlevel_old.interop")
    st._torch_ops = _fake_ops()
    st._t_get_raw, st._t_get_current, st._t_set_current = torch_get_raw, torch_get_current, torch_set_current
    st._c_get_current = cupy_get_current
    st._cp = FAKE_CP
    for m in (ev, par):
        m._rt_record, m._rt_wait = event_record, stream_wait_event
    ev._cp = FAKE_CP
    ev._tls.event = types.SimpleNamespace(ptr=7)
    par._is_capturing = is_capturing
    inter._cp = FAKE_CP


def _stream(ll: Any, i: int) -> Any:
    s = ll.Stream.__new__(ll.Stream)
    s._cupy, s.ptr, s.device_id, s._torch, s._torch_key = AUX[i], AUX[i].ptr, 0, None, (AUX[i].ptr, 0, 1)
    return s


def _event(ll: Any, ptr: int) -> Any:
    e = ll.Event.__new__(ll.Event)
    e._cupy, e.ptr, e.timing = None, ptr, False
    return e


# --- the cases: each makes, for one tree, the callable that is timed --------------------------

def case_dispatch(ll: Any) -> Callable[[], Any]:
    d = ll.CudagraphDispatcher(max_num_seqs=256)
    d.initialize_cudagraph_keys(ll.CUDAGraphMode.FULL_AND_PIECEWISE)
    sizes = list(range(1, 513))
    for _ in range(2):
        for n in sizes:
            d.dispatch(n)
    it = itertools.cycle(sizes).__next__
    dispatch = d.dispatch
    return lambda: dispatch(it())


def case_use_stream(ll: Any) -> Callable[[], Any]:
    s = _stream(ll, 0)

    def f() -> None:
        with ll.use_stream(s):
            pass
    return f


def case_record_stream(ll: Any) -> Callable[[], Any]:
    s, e = _stream(ll, 0), _event(ll, 11)
    return lambda: e.record(s)


def case_record_current(ll: Any) -> Callable[[], Any]:
    e = _event(ll, 11)
    return lambda: e.record()


def _fork_join(ll: Any, s: Any, e0: Any, e1: Any) -> Callable[[], Any]:
    """A fork/join by hand: record, switch to ``s`` and wait, record there, wait back."""
    def f() -> None:
        e0.record()
        with ll.use_stream(s):
            e0.wait()
            e1.record()
        e1.wait()
    return f


def case_fork_join_primitive(ll: Any) -> Callable[[], Any]:
    return _fork_join(ll, _stream(ll, 0), _event(ll, 11), _event(ll, 12))


def _noop() -> None:
    return None


def _eip(n: int) -> Callable[[Any], Callable[[], Any]]:
    def make(ll: Any) -> Callable[[], Any]:
        streams = [_stream(ll, i) for i in range(n)]
        start, done = _event(ll, 20), [_event(ll, 21 + i) for i in range(n)]
        fns = [_noop] * n
        return lambda: ll.execute_in_parallel(_noop, fns, start, done, streams, True)
    return make


def _runner(n: int) -> Callable[[Any], Callable[[], Any]]:
    def make(ll: Any) -> Callable[[], Any]:
        r = ll.ParallelRunner.__new__(ll.ParallelRunner)
        r.streams = [_stream(ll, i) for i in range(n)]
        r.num_aux = n
        r._start, r._done = _event(ll, 20), [_event(ll, 21 + i) for i in range(n)]
        r._capture_events = []
        fns = [_noop] * n
        return lambda: r(_noop, fns)
    return make


def case_maybe(ll: Any) -> Callable[[], Any]:
    e0, e1, aux = _event(ll, 11), _event(ll, 12), _stream(ll, 0)
    return lambda: ll.maybe_execute_in_parallel(_noop, _noop, e0, e1, aux)


def case_as_torch(ll: Any) -> Callable[[], Any]:
    x = _FakeArray()
    return lambda: ll.as_torch(x)


# --- the same cases on a GPU, real runtime calls (``--device``): public constructors only -----

def _real_stream_cases() -> dict[str, Callable[[Any], Callable[[], Any]]]:
    def use(ll: Any) -> Callable[[], Any]:
        s = ll.Stream()

        def f() -> None:
            with ll.use_stream(s):
                pass
        return f

    def rec_s(ll: Any) -> Callable[[], Any]:
        s, e = ll.Stream(), ll.Event()
        return lambda: e.record(s)

    def rec(ll: Any) -> Callable[[], Any]:
        e = ll.Event()
        return lambda: e.record()

    def fj(ll: Any) -> Callable[[], Any]:
        return _fork_join(ll, ll.Stream(), ll.Event(), ll.Event())

    def eip(n: int) -> Callable[[Any], Callable[[], Any]]:
        def make(ll: Any) -> Callable[[], Any]:
            streams = [ll.Stream() for _ in range(n)]
            start, done, fns = ll.Event(), [ll.Event() for _ in range(n)], [_noop] * n
            return lambda: ll.execute_in_parallel(_noop, fns, start, done, streams, True)
        return make

    def runner(ll: Any) -> Callable[[], Any]:
        r = ll.ParallelRunner(1)
        return lambda: r(_noop, [_noop])

    def maybe(ll: Any) -> Callable[[], Any]:
        e0, e1, s = ll.Event(), ll.Event(), ll.Stream()
        return lambda: ll.maybe_execute_in_parallel(_noop, _noop, e0, e1, s)

    def as_torch(ll: Any) -> Callable[[], Any]:
        import cupy

        x = cupy.random.standard_normal((256, 256), dtype=cupy.float32)
        return lambda: ll.as_torch(x)

    def as_cupy(ll: Any) -> Callable[[], Any]:
        import torch

        x = torch.randn(256, 256, device="cuda")
        return lambda: ll.as_cupy(x)

    return {
        "dispatch memo hit, 512 sizes round-robin": case_dispatch,
        "use_stream enter+exit": use,
        "Event.record(stream)": rec_s,
        "Event.record() current stream": rec,
        "fork/join primitive (events + use_stream)": fj,
        "execute_in_parallel 1 slot": eip(1),
        "execute_in_parallel 2 slots": eip(2),
        "execute_in_parallel 4 slots": eip(4),
        "ParallelRunner 1 slot": runner,
        "maybe_execute_in_parallel": maybe,
        "as_torch(cupy array)": as_torch,
        "as_cupy(torch tensor)": as_cupy,
    }


CASES: dict[str, Callable[[Any], Callable[[], Any]]] = {
    "dispatch memo hit, 512 sizes round-robin": case_dispatch,
    "use_stream enter+exit": case_use_stream,
    "Event.record(stream)": case_record_stream,
    "Event.record() current stream": case_record_current,
    "fork/join primitive (events + use_stream)": case_fork_join_primitive,
    "execute_in_parallel 1 slot": _eip(1),
    "execute_in_parallel 2 slots": _eip(2),
    "execute_in_parallel 4 slots": _eip(4),
    "ParallelRunner 1 slot": _runner(1),
    "maybe_execute_in_parallel": case_maybe,
    "as_torch (faked DLPack)": case_as_torch,
}


# --- timing -----------------------------------------------------------------------------------

def _trial(fn: Callable[[], Any], n: int) -> float:
    r = range(n)
    t0 = time.perf_counter_ns()
    for _ in r:
        fn()
    return (time.perf_counter_ns() - t0) / n / 1e3


def _pct(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=5, method="inclusive")
    return statistics.median(xs), q[0], q[3]


def compare(fns: list[Callable[[], Any]], rounds: int, trial_ms: float = 2.0,
            sync: Callable[[], Any] | None = None) -> list[list[float]]:
    """Per-call µs of each fn per round, interleaved, the order alternating; ``sync`` (a device
    synchronize) runs before each trial, outside the timed part."""
    for f in fns:
        for _ in range(2000):
            f()
        if sync:
            sync()
    est = max(_trial(f, 2000) for f in fns)
    n = max(100, int(trial_ms * 1e3 / est))
    per: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    for r in range(rounds):
        for k in (order if r % 2 == 0 else order[::-1]):
            if sync:
                sync()
            per[k].append(_trial(fns[k], n))
    return per


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", default=OLD_DEFAULT, help="root of the other tree (holds lowlevel/)")
    ap.add_argument("--only", nargs="*", default=[], help="substrings of case names")
    ap.add_argument("--rounds", type=int, default=61)
    ap.add_argument("--json", default="", help="write the figures here")
    ap.add_argument("--device", action="store_true",
                    help="on a GPU: the real runtime calls, no fakes (a device synchronize before each trial)")
    a = ap.parse_args(argv)
    old, new = _load_trees(a.old)
    import torch

    sync = None
    cases = CASES
    if a.device:
        sync, cases = torch.cuda.synchronize, _real_stream_cases()
    else:
        _patch_old(old)
        _patch_new(new)
        torch.utils.dlpack.from_dlpack = id  # as_torch's last step, a C call in both trees
    out = {}
    print(f"{'case':44s} {'old us (p20-p80)':>24s} {'new us (p20-p80)':>24s} {'net old':>8s} {'net new':>8s} "
          f"{'new/old':>8s}")
    for name, make in cases.items():
        if a.only and not any(o in name for o in a.only):
            continue
        fo, fn = make(old), make(new)
        per = compare([_noop, fo, fn], a.rounds, sync=sync)
        base = statistics.median(per[0])
        (mo, lo, ho), (mn, ln, hn) = _pct(per[1]), _pct(per[2])
        ratio = statistics.median([y / x for x, y in zip(per[1], per[2])])
        print(f"{name:44s} {mo:8.3f} ({lo:.3f}-{ho:.3f}) {mn:8.3f} ({ln:.3f}-{hn:.3f}) {mo - base:8.3f} "
              f"{mn - base:8.3f} {ratio:8.3f}")
        out[name] = {"old_us": [mo, lo, ho], "new_us": [mn, ln, hn], "loop_us": base, "new_over_old": ratio}
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
