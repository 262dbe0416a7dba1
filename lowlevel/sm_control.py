"""How many SMs compute may use: a software cap for lowlevel's persistent kernels, vLLM's
SM control context manager, and hardware SM partitions (green contexts).

The cap: lowlevel's persistent kernels launch ``min(cap, tiles)`` programs that stride over the
tiles, so a cap of ``k`` keeps them on at most ``k`` SMs at a time and changing it never
recompiles. The cap is resolved per call as: the innermost :func:`sm_limit` of the calling
thread, else the process-wide value of :func:`set_num_sms`, else every SM of the device.
"""
from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

from . import _runtime as rt
from .device import cuda_available, require_cuda
from .errors import LowlevelError, check_int
from .stream import Stream

__all__ = ["set_num_sms", "get_num_sms", "device_sm_count", "sm_limit", "SMControlContextManager",
           "SMPartition", "sm_partition"]

INTERPRETER_SMS = 8
"""The SM count assumed where no GPU exists (Triton's interpreter on the CPU)."""

class _ThreadCaps(threading.local):
    """Per-thread stack of :class:`sm_limit` caps, and the process-wide cap as a class attribute
    (:func:`set_num_sms`). Class defaults, not ``getattr(local, ..., None)``: a thread that
    never entered ``sm_limit`` then reads ``None`` without an AttributeError raised and caught
    on every launch."""

    stack: list[int] | None = None
    global_cap: int | None = None  # set on the class: every thread reads it


_tls = _ThreadCaps()
caps = _tls
"""The cap state the launch paths read inline (a hot path saves the call of :func:`capped`):
``caps.stack`` (this thread's :class:`sm_limit` caps, innermost last, or None / empty) and
``caps.global_cap`` (:func:`set_num_sms`'s, or None). Read it, never write it."""


@functools.cache
def _sm_count(device: int) -> int:
    import cupy

    return int(cupy.cuda.runtime.getDeviceProperties(device)["multiProcessorCount"])


def device_sm_count(device: int | None = None) -> int:
    """SMs of ``device`` (default: the current one); :data:`INTERPRETER_SMS` without a GPU.
    ``TypeError`` / ``ValueError`` for a ``device`` that is no non-negative int."""
    if device is not None and (type(device) is not int or device < 0):
        device = check_int(device, "device", 0)
    if not cuda_available():
        return INTERPRETER_SMS
    if device is None:
        device = rt.bind().get_device()
    return _sm_count(device)


def set_num_sms(n: int | None) -> None:
    """Set the process-wide SM cap of lowlevel's kernels (None: every SM). Threads inside an
    :func:`sm_limit` block keep their own cap."""
    _ThreadCaps.global_cap = None if n is None else check_int(n, "n (num_sms)", 1)


def get_num_sms() -> int:
    """The SM cap that a kernel launched now from this thread uses (never above the device's)."""
    return capped(device_sm_count())


def capped(total: int) -> int:
    """The calling thread's SM cap on a device with ``total`` SMs (the launch paths' fast form
    of :func:`get_num_sms`, for callers that know their device)."""
    stack = _tls.stack
    cap = stack[-1] if stack else _tls.global_cap
    return total if cap is None or cap > total else cap


class sm_limit:
    """Cap lowlevel's kernels launched from this thread to ``n`` SMs inside the block; nests
    (the innermost wins) and restores on exit, exceptions included. Other threads are not
    affected. The caps are per thread, not per asyncio task or generator: blocks that one
    thread enters and leaves out of order (two tasks awaiting inside their blocks, two
    interleaved generators) see each other's caps; keep such blocks strictly nested."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = check_int(n, "n", 1)

    def __enter__(self) -> int:
        stack = _tls.stack
        if stack is None:
            stack = _tls.stack = []
        stack.append(self.n)
        return self.n

    def __exit__(self, *exc: object) -> None:
        stack = _tls.stack
        if not stack:
            raise LowlevelError("sm_limit.__exit__ without a matching __enter__ in this thread")
        stack.pop()


class SMControlContextManager:
    """vLLM's SM control for overlap: on entry give ``comm_sms`` to communication kernels and
    the rest to compute (``set_comm_sms(comm_sms)`` then ``set_compute_sms(total - comm_sms)``);
    on exit, exceptions included, give both every SM again. Entering it again while it is
    active nests: only the outermost exit gives the SMs back.

    ``total_sms`` defaults to the device's SM count. ``comm_sms`` must be in ``[0, total)``."""

    def __init__(self, comm_sms: int, set_comm_sms: Callable[[int], Any], set_compute_sms: Callable[[int], Any], *,
                 total_sms: int | None = None) -> None:
        if not callable(set_comm_sms):
            raise TypeError(f"set_comm_sms must be callable, got {type(set_comm_sms).__name__}")
        if not callable(set_compute_sms):
            raise TypeError(f"set_compute_sms must be callable, got {type(set_compute_sms).__name__}")
        total = device_sm_count() if total_sms is None else check_int(total_sms, "total_sms", 1)
        comm_sms = check_int(comm_sms, "comm_sms", 0)
        if comm_sms >= total:
            raise ValueError(f"comm_sms must be in [0, {total}) (total_sms), got {comm_sms!r}")
        self.total_sms = total
        self.comm_sms = comm_sms
        self.compute_sms = total - comm_sms
        self.set_comm_sms = set_comm_sms
        self.set_compute_sms = set_compute_sms
        self._depth = 0

    def __enter__(self) -> SMControlContextManager:
        if self._depth:  # nested: the split is already in force
            self._depth += 1
            return self
        try:
            self.set_comm_sms(self.comm_sms)
            self.set_compute_sms(self.compute_sms)
        except BaseException:
            self._give_back()  # a callback failed: both budgets back to every SM, then the error
            raise
        self._depth = 1
        return self

    def __exit__(self, *exc: object) -> None:
        if self._depth == 0:
            raise LowlevelError("SMControlContextManager.__exit__ without a matching __enter__")
        self._depth -= 1
        if self._depth == 0:
            self._give_back()

    def _give_back(self) -> None:
        """Every SM to both sides; both callbacks run even if the first raises (its error
        propagates after the second)."""
        try:
            self.set_comm_sms(self.total_sms)
        finally:
            self.set_compute_sms(self.total_sms)


# --- hardware partitions ----------------------------------------------------------------------

def _drv() -> Any:
    try:
        from cuda.bindings import driver
    except Exception as exc:
        raise LowlevelError(f"SM partitions need cuda-bindings (cuda.bindings.driver): {exc}") from exc
    if not hasattr(driver, "cuGreenCtxCreate"):
        raise LowlevelError("this cuda-bindings has no green-context API (cuGreenCtxCreate)")
    return driver


def _ok(result: Any, call: str) -> Any:
    err = result[0]
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        raise LowlevelError(f"{call} failed with {name} ({int(err)})")
    return result[1] if len(result) == 2 else result[1:]


class SMPartition:
    """Streams confined to disjoint groups of SMs (green contexts). Work on ``streams[i]`` runs
    only on its group of ``sm_counts[i]`` SMs. :meth:`close` (or leaving a ``with`` block)
    destroys the streams and contexts; synchronize them first."""

    def __init__(self, streams: list[Any], sm_counts: list[int], handles: list[tuple[Any, Any]], drv: Any) -> None:
        self.streams = streams
        self.sm_counts = sm_counts
        self._handles = handles
        self._drv = drv

    def close(self) -> None:
        drv = self._drv
        if not self._handles:
            return
        err, cur = drv.cuCtxGetCurrent()
        for stream, ctx in self._handles:
            drv.cuStreamDestroy(stream)
            drv.cuGreenCtxDestroy(ctx)
        self._handles = []
        self.streams = []
        if int(err) == 0 and cur is not None:
            drv.cuCtxSetCurrent(cur)  # leave the thread on the context it had

    def __enter__(self) -> SMPartition:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        return iter(self.streams)


def sm_partition(sm_counts: list[int], device: int | None = None) -> SMPartition:
    """Split the device's SMs into disjoint groups of ``sm_counts[i]`` SMs and return an
    :class:`SMPartition` with one :class:`~lowlevel.Stream` per group.

    On sm_90 a group has at least 8 SMs and a multiple of 8 (``ValueError`` otherwise, and
    when the counts add up to more SMs than the device has). The driver splits into equal
    groups, so either all counts are equal (SMs left over get no stream), or there are two and
    the second group is everything the first leaves (``sm_counts`` on the result says how many).
    Raises :class:`~lowlevel.LowlevelError` where the driver or bindings lack green contexts.
    """
    if isinstance(sm_counts, (str, bytes)) or not hasattr(sm_counts, "__len__"):
        raise TypeError(f"sm_counts must be a list of ints, got {type(sm_counts).__name__}")
    if not sm_counts:
        raise ValueError("sm_counts must name at least one group")
    sm_counts = [check_int(c, f"sm_counts[{i}]", 1) for i, c in enumerate(sm_counts)]
    if device is not None:
        device = check_int(device, "device", 0)
    require_cuda()
    import cupy

    dev = cupy.cuda.runtime.getDevice() if device is None else device
    props = cupy.cuda.runtime.getDeviceProperties(dev)
    total = int(props["multiProcessorCount"])
    gran = 8 if int(props["major"]) >= 9 else 2
    for c in sm_counts:
        if c < gran or c % gran:
            raise ValueError(f"each SM group needs at least {gran} SMs and a multiple of {gran} on this "
                             f"device (compute capability {props['major']}.{props['minor']}), got {c!r}")
    if sum(sm_counts) > total:
        raise ValueError(f"the groups ask for {sum(sm_counts)} SMs; the device has {total}")
    drv = _drv()
    cupy.cuda.runtime.free(0)  # make sure the primary context exists
    _ok(drv.cuInit(0), "cuInit")
    cu_dev = _ok(drv.cuDeviceGet(dev), "cuDeviceGet")
    current = _ok(drv.cuDeviceGetDevResource(cu_dev, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM),
                  "cuDeviceGetDevResource")
    # The driver splits a resource once: into equal groups plus what is left. Unequal sizes are
    # served as one group plus the remainder (which may hold a few more SMs than asked).
    split = "cuDevSmResourceSplitByCount"
    if len(set(sm_counts)) == 1:
        res, _n, _rest = _ok(drv.cuDevSmResourceSplitByCount(len(sm_counts), current, 0, sm_counts[0]), split)
        groups = list(res)[:len(sm_counts)]
    elif len(sm_counts) == 2:
        res, _n, rest = _ok(drv.cuDevSmResourceSplitByCount(1, current, 0, sm_counts[0]), split)
        if int(rest.sm.smCount) < sm_counts[1]:
            raise ValueError(f"only {int(rest.sm.smCount)} SMs are left for the second group of {sm_counts[1]}")
        groups = [res[0], rest]
    else:
        raise ValueError("the driver splits SMs into equal groups (plus the remainder): give equal counts, "
                         f"or two counts, the second served by the remainder; got {sm_counts}")
    handles, streams, counts = [], [], []
    _e, prev_ctx = drv.cuCtxGetCurrent()
    try:
        for g in groups:
            desc = _ok(drv.cuDevResourceGenerateDesc([g], 1), "cuDevResourceGenerateDesc")
            ctx = _ok(drv.cuGreenCtxCreate(desc, cu_dev, drv.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM),
                      "cuGreenCtxCreate")
            st = _ok(drv.cuGreenCtxStreamCreate(ctx, drv.CUstream_flags.CU_STREAM_NON_BLOCKING, 0),
                     "cuGreenCtxStreamCreate")
            handles.append((st, ctx))
            streams.append(Stream.from_external(int(st)))
            counts.append(int(g.sm.smCount))
    except BaseException:
        SMPartition([], [], handles, drv).close()
        raise
    finally:
        if int(_e) == 0 and prev_ctx is not None:
            drv.cuCtxSetCurrent(prev_ctx)  # creating green contexts must not change the thread's context
    return SMPartition(streams, counts, handles, drv)
