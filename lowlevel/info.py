"""`python -m lowlevel info`: what this machine offers lowlevel."""
from __future__ import annotations

import importlib
from typing import Any

from .device import probe

__all__ = ["device_info", "format_info", "graph_memory", "format_graph_memory"]


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
        info["graph_memory"] = graph_memory()
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
    if info.get("graph_memory") is not None:
        lines.append(format_graph_memory(info["graph_memory"]))
    return "\n".join(lines)


def graph_memory(*runners: Any) -> dict[str, Any]:
    """Graph memory of this process: every live :class:`~lowlevel.GraphPool` (torch and CuPy
    bytes it holds, live graphs), and for each of ``runners`` (:class:`~lowlevel.CUDAGraphRunner`)
    its graph count, pool bytes and per-graph growth. Without a GPU: no pools."""
    from .device import cuda_available
    from .graphs import live_pools

    pools = []
    if cuda_available():
        for p in live_pools():
            b = p.memory()
            pools.append({"id": id(p), "torch_bytes": b.torch, "cupy_bytes": b.cupy, "total_bytes": b.total,
                          "live_graphs": len(p.live_graphs())})
    out: dict[str, Any] = {"pools": pools, "total_bytes": sum(p["total_bytes"] for p in pools), "runners": []}
    for r in runners:
        m = r.memory()
        m["per_graph"] = {d.num_tokens if hasattr(d, "num_tokens") else str(d): tuple(v)
                          for d, v in m["per_graph"].items()}
        m["pool_id"] = id(r._pool) if r._pool is not None else None
        st = r.last_capture
        m["last_capture"] = {"graphs": st.graphs, "total_s": st.total_s, "warmup_s": st.warmup_s,
                             "capture_s": st.capture_s, "instantiate_s": st.instantiate_s,
                             "updated": st.updated}
        out["runners"].append(m)
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def format_graph_memory(mem: dict[str, Any]) -> str:
    """Text for :func:`graph_memory`'s dict, one line a pool and a runner."""
    if not mem["pools"] and not mem["runners"]:
        return "graph memory: no graph pools in this process"
    lines = [f"graph memory: {_mib(mem['total_bytes'])} in {len(mem['pools'])} pool(s)"]
    for p in mem["pools"]:
        lines.append(f"  pool 0x{p['id']:x}: torch {_mib(p['torch_bytes'])}, cupy {_mib(p['cupy_bytes'])}, "
                     f"{p['live_graphs']} live graph(s)")
    for r in mem["runners"]:
        st = r["last_capture"]
        lines.append(f"  {r['mode']} runner: {r['graphs']} graph(s), torch {_mib(r['torch_bytes'])}, "
                     f"cupy {_mib(r['cupy_bytes'])}; last capture_all {st['graphs']} graph(s) in {st['total_s']:.2f} s "
                     f"(warm-up {st['warmup_s']:.2f}, capture {st['capture_s']:.2f}, "
                     f"instantiate {st['instantiate_s']:.2f}, {st['updated']} updated in place)")
        if r["per_graph"]:
            top = list(r["per_graph"].items())[:8]
            lines.append("    growth per graph: " + ", ".join(f"{k}: {_mib(t + c)}" for k, (t, c) in top)
                         + (" ..." if len(r["per_graph"]) > 8 else ""))
    return "\n".join(lines)
