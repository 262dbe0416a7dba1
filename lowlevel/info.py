"""`python -m lowlevel info`: what this machine offers lowlevel."""
from __future__ import annotations

import importlib
from typing import Any

from .device import probe

__all__ = ["device_info", "format_info"]


def _version(mod: str) -> str | None:
    try:
        m = importlib.import_module(mod)
    except Exception:
        return None
    return str(getattr(m, "__version__", "unknown"))


def _green_contexts() -> tuple[bool, str]:
    try:
        from cuda.bindings import driver  # noqa: F401
    except Exception:
        driver = None
    torch_gc = False
    try:
        import torch.cuda.green_contexts as gc

        torch_gc = hasattr(gc, "GreenContext")
    except Exception:
        pass
    if driver is not None and hasattr(driver, "cuGreenCtxCreate"):
        return True, "cuda.bindings driver API" + (" and torch.cuda.green_contexts" if torch_gc else "")
    if torch_gc:
        return True, "torch.cuda.green_contexts"
    return False, "neither cuda.bindings' cuGreenCtxCreate nor torch.cuda.green_contexts is available"


def device_info() -> dict[str, Any]:
    """A dict describing the GPU (if any) and the library versions."""
    n, why = probe()
    info: dict[str, Any] = {
        "gpu": None,
        "reason": why or None,
        "versions": {
            "lowlevel": _version("lowlevel"),
            "cupy": _version("cupy"),
            "torch": _version("torch"),
            "triton": _version("triton"),
            "cuda-bindings": _version("cuda.bindings"),
            "numpy": _version("numpy"),
        },
    }
    if n:
        import cupy

        rt = cupy.cuda.runtime
        dev = rt.getDevice()
        props = rt.getDeviceProperties(dev)
        name = props["name"]
        free, total = rt.memGetInfo()
        info["gpu"] = {
            "device": dev,
            "count": n,
            "name": name.decode() if isinstance(name, bytes) else str(name),
            "sm_count": int(props["multiProcessorCount"]),
            "compute_capability": f"{props['major']}.{props['minor']}",
            "memory_total_gib": round(total / 2**30, 2),
            "memory_free_gib": round(free / 2**30, 2),
            "driver_version": rt.driverGetVersion(),
            "runtime_version": rt.runtimeGetVersion(),
        }
        ok, how = _green_contexts()
        info["gpu"]["green_contexts"] = ok and int(props["major"]) >= 9
        info["gpu"]["green_contexts_via"] = how if ok else None
    return info


def _cuda_ver(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def format_info(info: dict[str, Any]) -> str:
    lines = []
    g = info["gpu"]
    if g is None:
        lines.append(f"GPU: none ({info['reason']})")
    else:
        lines += [
            f"GPU: {g['name']} (device {g['device']} of {g['count']})",
            f"  SMs: {g['sm_count']}   compute capability: {g['compute_capability']}",
            f"  memory: {g['memory_total_gib']} GiB total, {g['memory_free_gib']} GiB free",
            f"  driver: CUDA {_cuda_ver(g['driver_version'])}   runtime: CUDA {_cuda_ver(g['runtime_version'])}",
            f"  green contexts: {'yes' if g['green_contexts'] else 'no'}"
            + (f" ({g['green_contexts_via']})" if g["green_contexts_via"] else ""),
        ]
    lines.append("versions: " + ", ".join(f"{k} {v or 'missing'}" for k, v in info["versions"].items()))
    return "\n".join(lines)
