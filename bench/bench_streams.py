"""Host cost of the stream primitives: switch, event record, fork/join, DLPack conversion.

Each figure is a median over trials of the mean µs per call, wall clock including a device
synchronize at the end of each trial, beside the torch-native and raw-CuPy ways in the same run.
"""
from __future__ import annotations

from .common import Report, host_us

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
        with s.cupy:
            with torch.cuda.stream(torch.cuda.ExternalStream(s.ptr)):
                pass

    def torch_only():
        with torch.cuda.stream(ts):
            pass

    def cupy_only():
        with s.cupy:
            pass

    us = host_us(ours, sync=sync)
    rep.add("use_stream enter+exit (CuPy+torch)", us, "us", "naive nested cupy+torch contexts",
            host_us(naive, sync=sync), target="<= 3 us")
    rep.add("use_stream vs torch.cuda.stream (torch only)", us, "us", "with torch.cuda.stream(s)",
            host_us(torch_only, sync=sync))
    rep.add("use_stream vs with cupy_stream (CuPy only)", us, "us", "with cupy stream",
            host_us(cupy_only, sync=sync))

    # --- event record ---------------------------------------------------------------------
    ev, cev, tev = lowlevel.Event(), cp.cuda.Event(disable_timing=True), torch.cuda.Event()
    cur = cp.cuda.get_current_stream()
    r_ours = host_us(lambda: ev.record(s), sync=sync, n=5000)
    r_cupy = host_us(lambda: cev.record(s.cupy), sync=sync, n=5000)
    r_torch = host_us(lambda: tev.record(ts), sync=sync, n=5000)
    rep.add("Event.record(stream)", r_ours, "us", "cupy Event.record", r_cupy, target="<= 1.5x CuPy raw")
    rep.add("Event.record(stream) vs torch", r_ours, "us", "torch Event.record", r_torch)
    rep.add("Event.record() on current stream", host_us(lambda: ev.record(), sync=sync, n=5000), "us",
            "cupy Event.record()", host_us(lambda: cev.record(), sync=sync, n=5000))
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

    f = host_us(fj_ours, sync=sync)
    rep.add("fork/join, events + use_stream", f, "us", "torch events + torch.cuda.stream (vLLM)",
            host_us(fj_torch, sync=sync))
    rep.add("fork/join vs raw CuPy (CuPy stream only)", f, "us", "cupy events + cupy stream",
            host_us(fj_cupy, sync=sync))

    # --- DLPack conversion ---------------------------------------------------------------
    x_c = cp.random.standard_normal((256, 256), dtype=cp.float32)
    x_t = torch.randn(256, 256, device="cuda")
    rep.add("as_torch(cupy array)", host_us(lambda: lowlevel.as_torch(x_c), sync=sync), "us",
            "torch.from_dlpack(cupy array)", host_us(lambda: torch.from_dlpack(x_c), sync=sync), target="<= 10 us")
    rep.add("as_cupy(torch tensor)", host_us(lambda: lowlevel.as_cupy(x_t), sync=sync), "us",
            "cupy.from_dlpack(tensor)", host_us(lambda: cp.from_dlpack(x_t), sync=sync), target="<= 10 us")
    rep.add("as_cupy(torch tensor) vs CUDA array interface", host_us(lambda: lowlevel.as_cupy(x_t), sync=sync),
            "us", "cupy.asarray(tensor)", host_us(lambda: cp.asarray(x_t), sync=sync))
    xb = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    rep.add("as_cupy(bf16 tensor)", host_us(lambda: lowlevel.as_cupy(xb), sync=sync), "us",
            "cupy.from_dlpack(bf16 tensor)", host_us(lambda: cp.from_dlpack(xb), sync=sync))
