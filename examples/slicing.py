"""Microbatch slices (pure NumPy: no GPU): how a batch of requests is cut into microbatches.

Token boundaries fall at multiples of ``padded // num_ubatches``; a request cut by a boundary
appears in both slices; the second list extends the last slice over the padding.
Run: ``python examples/slicing.py --tokens 5 1 7 3 --padded 16``.
"""
from __future__ import annotations

import argparse

import numpy as np

import lowlevel


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[5, 1, 7, 3], help="scheduled tokens per request")
    p.add_argument("--padded", type=int, default=None, help="padded token count (default: the total)")
    p.add_argument("--ubatches", type=int, default=2)
    args = p.parse_args(argv)

    tokens = np.array(args.tokens, dtype=np.int64)
    total = int(tokens.sum())
    padded = total if args.padded is None else args.padded
    # Should this batch be microbatched at all? The DP config's thresholds decide (no collective here).
    cfg = lowlevel.DPConfig(1, 0, enable_microbatching=True, num_ubatches=args.ubatches,
                            decode_token_threshold=2, prefill_token_threshold=8)
    wants = lowlevel.check_ubatch_thresholds(cfg, total, uniform_decode=bool((tokens == 1).all()))
    print(f"{len(tokens)} requests, {total} tokens (padded to {padded}); worth microbatching: {wants}")
    if wants and (padded // args.ubatches) * (args.ubatches - 1) >= total:  # vLLM's is_last_ubatch_empty
        print("a microbatch has no real tokens: a runner would not microbatch this step")
        return 0
    slices, padded_slices = lowlevel.maybe_create_ubatch_slices(wants, tokens, padded, len(tokens),
                                                                num_ubatches=args.ubatches)
    if slices is None:
        print("no microbatches")
        return 0
    for i, (s, ps) in enumerate(zip(slices, padded_slices)):
        r, t = s.request_slice, s.token_slice
        print(f"ubatch {i}: requests [{r.start}, {r.stop}) tokens [{t.start}, {t.stop}) = {s.num_tokens}; "
              f"padded tokens [{ps.token_slice.start}, {ps.token_slice.stop})")
    assert sum(s.num_tokens for s in padded_slices) == padded
    # The plan DP ranks derive from the all-reduced table (here two ranks' columns, built by hand):
    # rows = unpadded, padded, wants to microbatch, allows DP padding, graph mode.
    table = np.array([[total, total // 2], [padded, padded], [1, 1], [1, 1], [2, 1]], dtype=np.int32)
    should, counts, mode, pad = lowlevel.post_process_dp_table(table, args.ubatches)
    print(f"two ranks with {total} and {total // 2} tokens: microbatch={should}, padded to {counts}, "
          f"graph mode {lowlevel.CUDAGraphMode(mode).name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
