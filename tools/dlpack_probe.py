"""Which CuPy -> torch DLPack export works without the deprecated toDlpack(), and what it costs."""
import time

import cupy as cp
import torch

x = cp.arange(1 << 20, dtype=cp.float32)
for name, make in [("toDlpack", lambda: x.toDlpack()),
                   ("__dlpack__(stream=-1)", lambda: x.__dlpack__(stream=-1)),
                   ("__dlpack__(stream=-1, max_version=(1,0))", lambda: x.__dlpack__(stream=-1, max_version=(1, 0)))]:
    try:
        t = torch.utils.dlpack.from_dlpack(make())
        assert t.data_ptr() == x.data.ptr and t.shape == (1 << 20,)
        t0 = time.perf_counter()
        for _ in range(5000):
            torch.utils.dlpack.from_dlpack(make())
        print(f"{name}: ok, {(time.perf_counter() - t0) / 5000 * 1e6:.2f} us")
    except Exception as exc:
        print(f"{name}: {type(exc).__name__}: {exc}")
