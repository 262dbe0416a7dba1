"""Host cost of the stream primitives: switch, event record, fork/join, DLPack conversion.

Each figure is a median over trials of the mean µs per call, wall clock including a device
synchronize at the end of each trial, beside the torch-native and raw-CuPy ways in the same run,
their trials interleaved (``host_us_side_by_side``) so that host drift slows all alike.
"""
from __future__ import annotations

from .common import Report, host_us_side_by_side

NEEDS_GPU = True


def run(rep: Report) -> None:
    import cupy as cp
    import torch

    import lowlevel

    sync = torch.cuda.synchronize
    s = lowlevel.Stream()
    ts = s.torch

    # --- stream switch --------------------------------------------------------------------
    def ours():
        with lowlevel.use_stream(s):
            pass

    def naive():
        with s.cupy, torch.cuda.stream(torch.cuda.ExternalStream(s.ptr)):
            pass

    def torch_only():
        with torch.cuda.stream(ts):
            pass

    def cupy_only():
        with s.cupy:
            pass

    us, t_naive, t_torch, t_cupy = host_us_side_by_side(ours, naive, torch_only, cupy_only, sync=sync)
    rep.add("use_stream enter+exit (CuPy+torch)", us, "us", "naive nested cupy+torch contexts",
            t_naive, target="<= 3 us")
    rep.add("use_stream vs torch.cuda.stream (torch only)", us, "us", "with torch.cuda.stream(s)", t_torch)
    rep.add("use_stream vs with cupy_stream (CuPy only)", us, "us", "with cupy stream", t_cupy)

    # --- event record ---------------------------------------------------------------------
    ev, cev, tev = lowlevel.Event(), cp.cuda.Event(disable_timing=True), torch.cuda.Event()
    cur = cp.cuda.get_current_stream()
    r_ours, r_cupy, r_torch, r_cur, r_cupy_cur = host_us_side_by_side(
        lambda: ev.record(s), lambda: cev.record(s.cupy), lambda: tev.record(ts), lambda: ev.record(),
        lambda: cev.record(), sync=sync, n=5000)
    rep.add("Event.record(stream)", r_ours, "us", "cupy Event.record", r_cupy, target="<= 1.5x CuPy raw")
    rep.add("Event.record(stream) vs torch", r_ours, "us", "torch Event.record", r_torch)
    rep.add("Event.record() on current stream", r_cur, "us", "cupy Event.record()", r_cupy_cur)
    del cur

    # --- fork/join primitive (record, wait, switch, record, wait; empty body) --------------
    e0, e1 = lowlevel.Event(), lowlevel.Event()

    def fj_ours():
        e0.record()
        with lowlevel.use_stream(s):
            e0.wait()
            e1.record()
        e1.wait()

    te0, te1 = torch.cuda.Event(), torch.cuda.Event()

    def fj_torch():
        te0.record()
        with torch.cuda.stream(ts):
            te0.wait()
            te1.record()
        te1.wait()

    ce0, ce1 = cp.cuda.Event(disable_timing=True), cp.cuda.Event(disable_timing=True)

    def fj_cupy():
        ce0.record()
        with s.cupy:
            ce0_wait = s.cupy.wait_event
            ce0_wait(ce0)
            ce1.record()
        cp.cuda.get_current_stream().wait_event(ce1)

    f, f_torch, f_cupy = host_us_side_by_side(fj_ours, fj_torch, fj_cupy, sync=sync)
    rep.add("fork/join, events + use_stream", f, "us", "torch events + torch.cuda.stream (vLLM)", f_torch)
    rep.add("fork/join vs raw CuPy (CuPy stream only)", f, "us", "cupy events + cupy stream", f_cupy)

    # --- DLPack conversion ---------------------------------------------------------------
    x_c = cp.random.standard_normal((256, 256), dtype=cp.float32)
    x_t = torch.randn(256, 256, device="cuda")
    xb = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    a_t, a_tref, a_c, a_cref, a_arr, b_c, b_cref = host_us_side_by_side(
        lambda: lowlevel.as_torch(x_c), lambda: torch.from_dlpack(x_c), lambda: lowlevel.as_cupy(x_t),
        lambda: cp.from_dlpack(x_t), lambda: cp.asarray(x_t), lambda: lowlevel.as_cupy(xb),
        lambda: cp.from_dlpack(xb), sync=sync)
    rep.add("as_torch(cupy array)", a_t, "us", "torch.from_dlpack(cupy array)", a_tref, target="<= 10 us")
    rep.add("as_cupy(torch tensor)", a_c, "us", "cupy.from_dlpack(tensor)", a_cref, target="<= 10 us")
    rep.add("as_cupy(torch tensor) vs CUDA array interface", a_c, "us", "cupy.asarray(tensor)", a_arr)
    rep.add("as_cupy(bf16 tensor)", b_c, "us", "cupy.from_dlpack(bf16 tensor)", b_cref)
