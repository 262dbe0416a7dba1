"""Fork/join: run independent work on aux streams and join it back (vLLM's semantics).

``execute_in_parallel`` (events and streams passed in), ``ParallelRunner`` (owns them) and
``maybe_execute_in_parallel`` (one aux stream or none). Without aux streams each falls back to
running everything in order on the current stream, which is what runs on a CPU machine.
Run: ``python examples/fork_join.py --size 2048``.
"""
from __future__ import annotations

import argparse
import time

import torch
from _util import have_gpu

import lowlevel


def branches(x: torch.Tensor, w: torch.Tensor):
    """Three independent pieces of work on ``x``: a matmul, an elementwise op, a reduction."""
    return (lambda: x @ w), [lambda: torch.tanh(x) * 2, lambda: x.float().pow(2).sum(dim=1)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=2048, help="rows and columns of the inputs")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions on the GPU")
    args = p.parse_args(argv)

    # Sequential fallback (any machine): aux_streams=None runs default_fn, then each aux fn.
    x, w = torch.randn(64, 64), torch.randn(64, 64)
    main_fn, aux = branches(x, w)
    out, (t, s) = lowlevel.execute_in_parallel(main_fn, aux, None, [None, None], aux_streams=None)
    assert torch.equal(out, x @ w) and torch.equal(t, torch.tanh(x) * 2)
    a, b = lowlevel.maybe_execute_in_parallel(main_fn, aux[0], None, None, aux_stream=None)
    print(f"sequential fallback (no aux stream): outputs {tuple(out.shape)}, {tuple(t.shape)}, {tuple(s.shape)}: ok")
    if not have_gpu("fork_join"):
        return 0

    n = args.size
    x, w = torch.randn(n, n, device="cuda"), torch.randn(n, n, device="cuda")
    main_fn, aux = branches(x, w)
    ref_out, ref_aux = main_fn(), [f() for f in aux]

    # 1. execute_in_parallel: the caller owns the streams and events.
    streams = [lowlevel.Stream(), lowlevel.Stream()]
    start, done = lowlevel.Event(), [lowlevel.Event(), lowlevel.Event()]
    out, (t, s) = lowlevel.execute_in_parallel(main_fn, aux, start, done, streams, enable=True)
    # Work enqueued on the current stream after the call sees every branch's result.
    assert torch.equal(out, ref_out) and torch.equal(t, ref_aux[0]) and torch.allclose(s, ref_aux[1])
    print("execute_in_parallel: 1 default + 2 aux branches joined: ok")

    # 2. ParallelRunner: owns its aux streams and events; a None slot skips that stream.
    runner = lowlevel.ParallelRunner(2)
    out, (t, none) = runner(main_fn, [aux[0], None])
    assert none is None and torch.equal(t, ref_aux[0])
    print(f"ParallelRunner({runner.num_aux}): a None slot is skipped: ok")

    # 3. maybe_execute_in_parallel: the pattern of an MoE layer's shared expert.
    ev0, ev1 = lowlevel.Event(), lowlevel.Event()
    a, b = lowlevel.maybe_execute_in_parallel(main_fn, aux[0], ev0, ev1, aux_stream=streams[0])
    assert torch.equal(a, ref_out) and torch.equal(b, ref_aux[0])
    print("maybe_execute_in_parallel with an aux stream: ok")

    # Time: all three on one stream vs forked (the aux work overlaps the matmul).
    def seq():
        main_fn(), [f() for f in aux]

    def par():
        runner(main_fn, aux)

    for name, fn in (("in sequence", seq), ("forked", par)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.reps):
            fn()
        torch.cuda.synchronize()
        print(f"{name:>12}: {(time.perf_counter() - t0) / args.reps * 1e3:.3f} ms per step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
