import os

import pytest

import lowlevel

if not lowlevel.cuda_available():
    # Triton kernels run under its interpreter on the CPU; set before lowlevel.kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    n, why = lowlevel.device.probe()
    if n == 0:
        if os.environ.get("LOWLEVEL_REQUIRE_GPU") == "1":
            raise pytest.UsageError(f"LOWLEVEL_REQUIRE_GPU=1 but {why}")
        skip = pytest.mark.skip(reason=f"needs a CUDA GPU: {why}")
        for item in items:
            if "gpu" in item.keywords or "gpu2" in item.keywords:
                item.add_marker(skip)
        return
    if n < 2:
        skip2 = pytest.mark.skip(reason=f"needs two CUDA GPUs: this machine has {n}")
        for item in items:
            if "gpu2" in item.keywords:
                item.add_marker(skip2)
