"""Collectives that leave every SM to compute: NCCL's copy-engine all-to-all.

NCCL runs a collective as kernels: CTAs that the overlapped compute cannot have. A persistent
matmul that gives NCCL the ~30 CTAs an all-to-all needs to be fast loses a whole wave of tiles
(:func:`lowlevel.comm_sm_candidates`). NCCL 2.28 can instead move an all-to-all with the GPU's
copy engines and stream memory operations, using no SM, when three things hold:

1. the communicator was made with the zero-CTA policy (``ncclConfig_t.CTAPolicy =
   NCCL_CTA_POLICY_ZERO``): :func:`zero_sm_group` makes one;
2. both buffers lie in memory registered as a symmetric window of that communicator
   (``ncclMemAlloc`` + ``ncclCommWindowRegister(..., NCCL_WIN_COLL_SYMMETRIC)``), the same
   offset on every rank: :class:`SymmetricBuffers` allocates them;
3. the call is enqueued on a stream other than the legacy default stream: NCCL's copy path
   (``cudaMemcpyBatchAsync``) refuses stream 0 and NCCL reports "unhandled cuda error".
   :func:`all_to_all_single` forks onto a cached side stream when the caller is on stream 0.

Elsewhere (another backend, an ordinary communicator, unregistered buffers) the same calls run
NCCL's ordinary kernels: the result is the same, only the SMs differ. Under graph capture NCCL
records ``cudaMemcpyAsync`` nodes and memory-operation syncs, so the exchange replays without
SMs as well.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from . import _runtime as rt
from .device import require_cuda
from .errors import LowlevelError, check_int, describe
from .stream import Stream, use_stream

__all__ = ["SymmetricBuffers", "all_to_all_single", "zero_sm_group"]

_side: dict[int, Stream] = {}  # device index -> the stream a call from stream 0 is forked onto
_side_lock = threading.Lock()


def _side_stream(device: int) -> Stream:
    s = _side.get(device)
    if s is None:
        with _side_lock:
            s = _side.get(device)
            if s is None:
                rt.use_device(device)
                s = _side[device] = Stream()
    return s


def _zero_policy() -> int:
    import torch.distributed as dist

    pg = getattr(dist, "ProcessGroupNCCL", None)
    policy = getattr(pg, "NCCL_CTA_POLICY_ZERO", None)
    if pg is None or policy is None or not hasattr(pg.Options().config, "cta_policy"):
        raise LowlevelError("this torch build does not expose NCCL's CTA policy "
                            "(ProcessGroupNCCL.Options().config.cta_policy, NCCL_CTA_POLICY_ZERO); "
                            "the zero-SM collectives need torch with NCCL >= 2.28")
    return int(policy)


def zero_sm_group(ranks: Sequence[int] | None = None, *, device: int | None = None) -> Any:
    """A new NCCL process group whose communicator has the zero-CTA policy
    (``NCCL_CTA_POLICY_ZERO``): NCCL uses no CTA wherever it can (an all-to-all, all-gather,
    gather or scatter between buffers of a :class:`SymmetricBuffers` of this group, within one
    NVLink domain) and its ordinary kernels elsewhere.

    ``ranks``: the global ranks of the group (default: all). ``device``: the CUDA device
    index of this rank (default: the current device); the communicator is made at once
    (``device_id``), as window registration needs it. Collective: every rank of the default
    group calls it, like :func:`torch.distributed.new_group`. Raises
    :class:`~lowlevel.LowlevelError` when torch lacks NCCL's CTA policy or the default group is
    not initialised (:class:`~lowlevel.CudaUnavailableError` without a GPU), ``ValueError`` for
    a bad ``device``."""
    import torch
    import torch.distributed as dist

    require_cuda()
    policy = _zero_policy()
    if not dist.is_initialized():
        raise LowlevelError("zero_sm_group needs torch.distributed initialised (init_process_group)")
    dev = torch.cuda.current_device() if device is None else check_int(device, "device", 0)
    o = dist.ProcessGroupNCCL.Options()
    setattr(o.config, "cta_policy", policy)  # noqa: B010 (the CPU build's stubs lack the field)
    return dist.new_group(ranks=None if ranks is None else list(ranks), backend="nccl", pg_options=o,
                          device_id=torch.device("cuda", dev))


class SymmetricBuffers:
    """Tensors in memory that NCCL can reach on every rank of ``group`` at the same offset: a
    ``torch.cuda.MemPool`` over NCCL's allocator (``ncclMemAlloc``), registered as symmetric
    windows of the group's communicator (``register_mem_pool(pool, symm=True)``).

    ``shapes``: one shape per tensor; ``dtype``: their dtype (a ``torch.dtype``); ``group``: an
    NCCL group (e.g. :func:`zero_sm_group`); ``device``: this rank's CUDA device (default: the
    current one). Collective: every rank of ``group`` makes its buffers with the same shapes in
    the same order, as the registration is a collective call. ``.tensors`` holds the tensors
    (uninitialised). The registration covers exactly these allocations: tensors allocated in
    the pool later are not windows (torch registers late segments as ordinary buffers), so
    make every buffer here. :meth:`close` (or leaving a ``with`` block) deregisters, also
    collectively; use the tensors in collectives only before that. Raises ``TypeError`` /
    ``ValueError`` for bad arguments, :class:`~lowlevel.CudaUnavailableError` without a GPU and
    :class:`~lowlevel.LowlevelError` when the group's backend has no NCCL allocator, before
    allocating anything."""

    def __init__(self, group: Any, shapes: Sequence[Sequence[int]], dtype: Any, *,
                 device: int | None = None) -> None:
        import torch

        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {describe(dtype)}")
        if isinstance(shapes, (str, bytes)) or not isinstance(shapes, Sequence) or not shapes:
            raise ValueError(f"shapes must be a non-empty sequence of shapes, got {describe(shapes)}")
        dims = [[check_int(d, f"shapes[{i}][{j}]", 0) for j, d in enumerate(s)] for i, s in enumerate(shapes)]
        require_cuda()
        dev = torch.device("cuda", torch.cuda.current_device() if device is None else check_int(device, "device", 0))
        try:
            backend = group._get_backend(dev)
            allocator = backend.mem_allocator
        except Exception as exc:
            raise LowlevelError(f"group has no NCCL backend with a memory allocator on {dev} "
                                f"({type(exc).__name__}: {exc}); make it with zero_sm_group()") from exc
        self._backend = backend
        self._pool = torch.cuda.MemPool(allocator)
        with torch.cuda.use_mem_pool(self._pool, device=dev):
            self.tensors: list[Any] = [torch.empty(d, dtype=dtype, device=dev) for d in dims]
        backend.register_mem_pool(self._pool, symm=True)
        self._registered = True

    def close(self) -> None:
        """Deregister the windows (collective, idempotent). The tensors stay valid memory but
        are no longer windows: a zero-SM collective on them falls back to NCCL's kernels."""
        if self._registered:
            self._registered = False
            self._backend.deregister_mem_pool(self._pool)

    def __enter__(self) -> SymmetricBuffers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        shapes = [tuple(t.shape) for t in self.tensors]
        return f"SymmetricBuffers({shapes}, registered={self._registered})"


def _check(output: Any, input: Any) -> None:
    import torch

    for name, t in (("output", output), ("input", input)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {describe(t)}")
        if t.dim() < 1 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous tensor of at least one dimension, got shape "
                             f"{tuple(t.shape)} with strides {t.stride()}")
    if output.shape != input.shape or output.dtype != input.dtype or output.device != input.device:
        raise ValueError(f"output must match input in shape, dtype and device: output is {tuple(output.shape)} "
                         f"{output.dtype} on {output.device}, input is {tuple(input.shape)} {input.dtype} on "
                         f"{input.device}")
    o0, i0 = output.data_ptr(), input.data_ptr()
    nbytes = input.numel() * input.element_size()
    if nbytes and o0 < i0 + nbytes and i0 < o0 + nbytes:
        raise ValueError("output must not overlap input (an all-to-all cannot run in place)")


def all_to_all_single(output: Any, input: Any, *, group: Any = None) -> Any:
    """``torch.distributed.all_to_all_single(output, input, group=group)`` (equal splits) on a
    stream NCCL's copy engines accept.

    ``input``, ``output``: contiguous torch tensors of one shape ``(n, ...)``, dtype and device,
    ``n`` divisible by the group's size ``w``, not overlapping. Rows ``[j*n/w, (j+1)*n/w)`` of
    ``input`` land at rows ``[r*n/w, (r+1)*n/w)`` of rank ``j``'s ``output`` (``r``: this
    rank's index in ``group``, default the world group). With a :func:`zero_sm_group` and both
    tensors from one :class:`SymmetricBuffers` of it, NCCL moves the rows with copy engines and
    uses no SM; otherwise it runs its usual kernels.

    Ordering: as torch's synchronous call, on the caller's current stream. When that is the
    legacy default stream (handle 0), which the copy path refuses, the call is enqueued on a
    cached per-device stream that first waits for the caller's stream, and the caller's stream
    waits for it before this returns (a fork/join; also inside a graph capture). Returns
    ``output``. Raises ``TypeError``/``ValueError`` naming the argument before anything is
    enqueued (``n`` not divisible is torch's ``ValueError``/``RuntimeError``); backend errors
    propagate."""
    import torch.distributed as dist

    _check(output, input)
    world = dist.get_world_size(group)
    if output.shape[0] % world:
        raise ValueError(f"input.shape[0] must divide into the group's {world} ranks, got {input.shape[0]}")
    if not input.is_cuda or rt.torch_get_raw(-1) != 0:
        dist.all_to_all_single(output, input, group=group)
        return output
    side = _side_stream(input.device.index)
    cur = rt.current_handle()
    rt.order(cur, side.ptr)
    try:
        with use_stream(side):
            dist.all_to_all_single(output, input, group=group)
    finally:
        rt.order(side.ptr, cur)
    return output
