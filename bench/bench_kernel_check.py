"""Kernel correctness as figures: each lowlevel kernel on fresh random inputs against a float64
reference, at caps 1, 3 and all. Runs everywhere: compiled on a GPU, under Triton's interpreter
(small shapes) without one."""
from __future__ import annotations

from .common import Report

NEEDS_GPU = False


def run(rep: Report) -> None:
    import torch

    import lowlevel
    from lowlevel import kernels as K
    from lowlevel.sm_control import device_sm_count

    dev = "cuda" if lowlevel.cuda_available() else "cpu"
    g = torch.Generator().manual_seed(torch.seed() % (1 << 31))

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dev)

    def rel(got, ref):
        got, ref = got.double().cpu(), ref.double().cpu()
        return float((got - ref).norm() / ref.norm())

    caps = (1, 3, device_sm_count())
    worst = {"matmul fp32 (ieee) 45x37x29": 0.0, "rms_norm fp32 13x100": 0.0, "copy fp32 1000": 0.0}
    for cap in caps:
        with lowlevel.sm_limit(cap):
            a, b = rand(45, 29), rand(29, 37)
            worst["matmul fp32 (ieee) 45x37x29"] = max(worst["matmul fp32 (ieee) 45x37x29"],
                                                       rel(K.matmul(a, b, precision="ieee"), a.double() @ b.double()))
            x, w = rand(13, 100), rand(100)
            xd = x.double()
            ref = xd / torch.sqrt((xd * xd).mean(1, keepdim=True) + 1e-6) * w.double()
            worst["rms_norm fp32 13x100"] = max(worst["rms_norm fp32 13x100"], rel(K.rms_norm(x, w), ref))
            s, d = rand(1000), torch.full((1000,), float("nan"), device=dev)
            K.copy(s, d)
            worst["copy fp32 1000"] = max(worst["copy fp32 1000"], rel(d, s))
    where = "GPU" if dev == "cuda" else "Triton interpreter"
    for name, err in worst.items():
        rep.add(f"{name}: worst relative error over caps {caps} ({where})", err, "rel err", target="< 1e-5",
                extra={"caps": list(caps)})
