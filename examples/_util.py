"""Shared by the examples: the GPU check. Not part of lowlevel's API."""
from __future__ import annotations

import os
import sys

import lowlevel


def have_gpu(example: str) -> bool:
    """True where a CUDA GPU can be used. Otherwise print why and return False, or exit with
    status 1 when ``LOWLEVEL_REQUIRE_GPU=1`` (a GPU run must not pass by skipping)."""
    try:
        lowlevel.require_cuda()
        return True
    except lowlevel.CudaUnavailableError as exc:
        why = str(exc)
    if os.environ.get("LOWLEVEL_REQUIRE_GPU") == "1":
        sys.exit(f"{example}: LOWLEVEL_REQUIRE_GPU=1 but no GPU: {why}")
    print(f"{example}: GPU part skipped: {why}")
    return False
