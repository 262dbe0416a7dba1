"""SM control: cap lowlevel's persistent Triton kernels to an SM budget, per thread or process.

``sm_limit(n)`` caps the kernels this thread launches inside the block (no recompilation);
``SMControlContextManager`` is vLLM's split for overlap: ``comm_sms`` SMs to communication
kernels, the rest to compute, both restored on exit. Without a GPU, the kernels run under
Triton's interpreter on small shapes (so the caps can be seen working on a CPU machine).
Run: ``python examples/sm_split.py --size 4096 --comm-sms 16``.
"""
from __future__ import annotations

import argparse
import os
import time

from _util import have_gpu

import lowlevel


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096, help="matmul size on the GPU")
    p.add_argument("--comm-sms", type=int, default=16, help="SMs given to the copy (the 'communication')")
    args = p.parse_args(argv)
    gpu = have_gpu("sm_split")
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before lowlevel.kernels is imported
    import torch

    from lowlevel import kernels as K

    dev = "cuda" if gpu else "cpu"
    total = lowlevel.device_sm_count()
    n = args.size if gpu else 48
    dtype = torch.bfloat16 if gpu else torch.float32
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    ref = (a.double() @ b.double())
    for cap in sorted({total, max(1, total // 2), 2}, reverse=True):
        with lowlevel.sm_limit(cap):
            assert lowlevel.get_num_sms() == cap
            c = K.matmul(a, b)
        rel = float((c.double() - ref).norm() / ref.norm())
        print(f"matmul {n}^3 capped at {cap:>3} of {total} SMs: rel. error {rel:.1e}")
        assert rel < 2e-2
    assert lowlevel.get_num_sms() == total  # the cap ended with the block
    if not gpu:
        return 0

    # vLLM's split: compute kernels get total - comm_sms SMs (process-wide cap), the copy comm_sms.
    comm_cap = [total]
    ctl = lowlevel.SMControlContextManager(args.comm_sms, set_comm_sms=lambda k: comm_cap.__setitem__(0, k),
                                           set_compute_sms=lowlevel.set_num_sms)
    src = torch.randn(256 << 20, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    out = torch.empty(n, n, device="cuda", dtype=dtype)
    s_comm = lowlevel.Stream()
    ev = lowlevel.Event()

    def overlapped():
        with ctl:
            ev.record()
            with lowlevel.use_stream(s_comm), lowlevel.sm_limit(comm_cap[0]):
                s_comm.wait(ev)
                K.copy(src, dst)
            K.matmul(a, b, out=out)  # capped by the process-wide cap: total - comm_sms
            lowlevel.current_stream().wait(s_comm)

    def in_sequence():
        K.copy(src, dst)
        K.matmul(a, b, out=out)

    for name, fn in (("in sequence, uncapped", in_sequence),
                     (f"overlapped, matmul {total - args.comm_sms} SMs || copy {args.comm_sms} SMs", overlapped)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        print(f"{name}: {(time.perf_counter() - t0) / 10 * 1e3:.3f} ms")
    assert torch.equal(dst, src) and comm_cap[0] == total and lowlevel.get_num_sms() == total
    print("after the block both budgets are every SM again: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
