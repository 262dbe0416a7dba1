"""Fork/join host cost (execute_in_parallel vs vLLM's torch-event pattern) and real overlap."""
from __future__ import annotations

from .common import Report, host_us_side_by_side, wall_ms

NEEDS_GPU = True


def _vllm_pattern(torch, streams, start, done):
    """vLLM's execute_in_parallel body, with torch events and torch.cuda.stream."""
    def run(default_fn, aux_fns):
        start.record()
        res = [None] * len(aux_fns)
        pending = []
        for i, fn in enumerate(aux_fns):
            with torch.cuda.stream(streams[i]):
                start.wait()
                res[i] = fn()
                done[i].record()
            pending.append(done[i])
        d = default_fn()
        for ev in pending:
            ev.wait()
        return d, res
    return run


def _raw_floor(aux, start, done, fn):
    """What one fork/join must do at least, with nothing checked or cached: record start on the
    current stream, switch CuPy and torch to the aux stream, wait, run, record done, switch
    back, run the default fn, wait on done."""
    import cupy

    from lowlevel import _runtime as rt

    rec, wait = cupy.cuda.runtime.eventRecord, cupy.cuda.runtime.streamWaitEvent
    sp, dp, hp, cs, key = start.ptr, done.ptr, aux.ptr, aux.cupy, aux._key()

    def floor():
        c = rt.torch_get_raw(-1)
        rec(sp, c)
        pt, pc = rt.torch_get_current(-1), rt.cupy_get_current()
        cs.use()
        rt.torch_set_current(*key)
        wait(hp, sp, 0)
        fn()
        rec(dp, hp)
        rt.torch_set_current(*pt)
        pc.use()
        fn()
        wait(c, dp, 0)
    return floor


def run(rep: Report) -> None:
    import torch

    import lowlevel
    from lowlevel.testing import spin

    sync = torch.cuda.synchronize
    noop = lambda: None  # noqa: E731
    for n in (1, 2, 4):
        runner = lowlevel.ParallelRunner(n)
        streams = runner.streams
        start, done = lowlevel.Event(), [lowlevel.Event() for _ in range(n)]
        fns = [noop] * n
        tstreams = [torch.cuda.Stream() for _ in range(n)]
        tstart, tdone = torch.cuda.Event(), [torch.cuda.Event() for _ in range(n)]
        vllm = _vllm_pattern(torch, tstreams, tstart, tdone)
        ours, theirs, run_us = host_us_side_by_side(
            lambda: lowlevel.execute_in_parallel(noop, fns, start, done, streams, True), lambda: vllm(noop, fns),
            lambda: runner(noop, fns), sync=sync)
        rep.add(f"execute_in_parallel, {n} aux slot(s), empty fns", ours, "us", "vLLM torch-event pattern", theirs,
                target="<= 5 us, >= 7x" if n == 1 else "")
        rep.add(f"ParallelRunner, {n} aux slot(s), empty fns", run_us, "us", "vLLM torch-event pattern", theirs)
        if n == 1:
            ours, floor = host_us_side_by_side(
                lambda: lowlevel.execute_in_parallel(noop, fns, start, done, streams, True),
                _raw_floor(runner.streams[0], start, done[0], noop), sync=sync)
            rep.add("execute_in_parallel, 1 aux slot, empty fns", ours, "us",
                    "raw floor: its 4 runtime calls + 2-framework switch, inline", floor)
    e0, e1, aux = lowlevel.Event(), lowlevel.Event(), lowlevel.Stream()
    vllm1 = _vllm_pattern(torch, [torch.cuda.Stream()], torch.cuda.Event(), [torch.cuda.Event()])
    ours, theirs = host_us_side_by_side(lambda: lowlevel.maybe_execute_in_parallel(noop, noop, e0, e1, aux),
                                        lambda: vllm1(noop, [noop]), sync=sync)
    rep.add("maybe_execute_in_parallel, empty fns", ours, "us", "vLLM torch-event pattern (1 slot)", theirs)

    # Overlap of two half-SM kernels: parallel wall time vs the longer branch alone.
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    half = sms // 2
    ns = 2_000_000  # 2 ms each
    runner = lowlevel.ParallelRunner(1)
    longer = wall_ms(lambda: spin(ns, blocks=half))
    par = wall_ms(lambda: runner(lambda: spin(ns, blocks=half), [lambda: spin(ns, blocks=half)]))
    seq = wall_ms(lambda: (spin(ns, blocks=half), spin(ns, blocks=half)))
    rep.add("two half-SM kernels in parallel (wall)", par, "ms", "longer branch alone", longer,
            target="<= 1.05x the longer branch", extra={"parallel_over_longer": par / longer})
    rep.add("two half-SM kernels: parallel vs sequential", par, "ms", "sequential", seq)
