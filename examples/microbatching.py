"""Microbatch overlap (dual-batch overlap): one microbatch's comm stage under another's compute.

One body serves both runtimes: a generator yielding ``TO_COMM`` / ``TO_COMPUTE`` at its switch
points, run by ``UBatchRunner(mode="generators")`` as is, and by ``mode="threads"`` through
``thread_fn_from_generator`` (which calls the ``dbo_*`` helpers). Below the runner:
``make_ubatch_contexts`` with two threads of your own. Outputs equal the sequential run.
Run: ``python examples/microbatching.py --tokens 512 --hidden 1024``.
"""
from __future__ import annotations

import argparse
import threading
import time

from _util import have_gpu

import lowlevel
from lowlevel import TO_COMM, TO_COMPUTE


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    args = p.parse_args(argv)
    if not have_gpu("microbatching"):
        return 0
    import torch

    torch.manual_seed(0)
    n, h = args.tokens, args.hidden
    w = torch.randn(h, h, device="cuda") / h ** 0.5
    x = torch.randn(n, h, device="cuda")

    def layer(ubatch_id: int, xs: torch.Tensor):
        y = torch.relu(xs @ w)       # compute stage
        z = torch.empty_like(y)      # a buffer the comm stage writes: allocated on compute
        yield TO_COMM
        torch.mul(y, 2.0, out=z)     # "communication" stage (an all-to-all in a real MoE)
        yield TO_COMPUTE
        return z @ w                 # compute again, after this microbatch's comm stage

    slices, _ = lowlevel.maybe_create_ubatch_slices(True, [1] * n, n, n, num_ubatches=2)
    as_thread_fn = lowlevel.thread_fn_from_generator(layer)
    ref = torch.cat([as_thread_fn(i, x[s.token_slice]) for i, s in enumerate(slices)])  # sequential

    for mode, fn in (("generators", layer), ("threads", as_thread_fn)):
        runner = lowlevel.UBatchRunner(fn, mode=mode, timeout_s=30.0)
        out = runner([x], slices)
        diff = (out - ref).abs().max().item()
        print(f"UBatchRunner(mode={mode!r}): {len(slices)} microbatches of "
              f"{[s.num_tokens for s in slices]} tokens, max |overlapped - sequential| = {diff:.2e}")
        assert diff < 1e-4
        if mode == "generators":  # the whole overlapped run as one CUDA graph
            g_out = runner([x], slices, graph=True)
            diff = (g_out - ref).abs().max().item()
            print(f"  as one FULL graph: max diff {diff:.2e}")
            assert diff < 1e-4
        runner.close()

    # The thread ring by hand: two threads, one compute and one comm stream.
    compute, comm = lowlevel.current_stream(), lowlevel.Stream()
    barrier = threading.Barrier(3)
    ctxs = lowlevel.make_ubatch_contexts(2, compute, comm, barrier, timeout_s=30.0)
    outs: list = [None, None]

    def worker(i: int) -> None:
        with ctxs[i]:
            outs[i] = as_thread_fn(i, x[slices[i].token_slice])
            assert lowlevel.dbo_current_ubatch_id() == i

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    barrier.wait(30.0)          # both threads are parked in their contexts
    lowlevel.start_ubatches(ctxs)
    for t in threads:
        t.join(30.0)
    assert lowlevel.first_ubatch_error(ctxs) is None
    diff = (torch.cat(outs) - ref).abs().max().item()
    print(f"make_ubatch_contexts + 2 threads: max diff {diff:.2e}")
    assert diff < 1e-4

    runner = lowlevel.UBatchRunner(layer, mode="generators")
    def sequential():
        return torch.cat([as_thread_fn(i, x[s.token_slice]) for i, s in enumerate(slices)])

    for name, fn in (("sequential", sequential),
                     ("generators", lambda: runner([x], slices))):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        print(f"{name:>11}: {(time.perf_counter() - t0) / 20 * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
