"""CUDA graph modes, batch descriptors, and the dispatcher's padding (pure Python: no GPU).

A serving loop captures graphs for a ladder of batch sizes once; each step asks the
dispatcher which graph serves its batch: the padded size and the mode (FULL, PIECEWISE or NONE,
i.e. eager). Run: ``python examples/dispatcher.py --max-size 64 --sizes 1 3 9 33 64 65``.
"""
from __future__ import annotations

import argparse

from lowlevel import BatchDescriptor, CudagraphDispatcher, CUDAGraphMode, default_capture_sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-size", type=int, default=64, help="largest captured batch (tokens)")
    p.add_argument("--sizes", type=int, nargs="*", default=[1, 3, 9, 17, 33, 64, 65],
                   help="batch sizes to dispatch")
    p.add_argument("--mode", choices=[m.name for m in CUDAGraphMode], default="FULL_AND_PIECEWISE")
    args = p.parse_args(argv)

    ladder = default_capture_sizes(args.max_size)  # vLLM's: 1, 2, 4, then every 8 (16 from 256)
    d = CudagraphDispatcher(ladder, max_num_seqs=args.max_size)
    d.initialize_cudagraph_keys(CUDAGraphMode[args.mode], uniform_decode_query_len=1)
    print(f"capture sizes: {ladder}")
    for mode, descs in d.get_capture_descs():  # what a runner would capture, largest first
        print(f"{mode}: {len(descs)} graphs, largest {descs[0]}")
    print(f"{'tokens':>6}  {'uniform':>7}  {'mode':<9}  {'padded':>6}  {'reqs':>5}")
    for n in args.sizes:
        for uniform in (False, True):
            mode, desc = d.dispatch(n, uniform_decode=uniform)
            reqs = "any" if desc.num_reqs is None else desc.num_reqs
            print(f"{n:>6}  {str(uniform):>7}  {mode.name:<9}  {desc.num_tokens:>6}  {reqs:>5}")
    # A descriptor is a hashable key: PIECEWISE graphs use the relaxed form (any request count).
    key = BatchDescriptor(16, num_reqs=16, uniform=True)
    print(f"relaxed key of {key}: {key.relax_for_mixed_batch_cudagraphs()}")
    mode, desc = d.dispatch(args.max_size + 1)
    print(f"above the largest capture size: {mode.name} (eager, unpadded {desc.num_tokens})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
