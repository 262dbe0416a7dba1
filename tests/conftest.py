import os

import pytest

import lowlevel


def pytest_collection_modifyitems(config, items):
    if lowlevel.cuda_available():
        return
    n, why = lowlevel.device._probe()
    if os.environ.get("LOWLEVEL_REQUIRE_GPU") == "1":
        raise pytest.UsageError(f"LOWLEVEL_REQUIRE_GPU=1 but {why}")
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: {why}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
