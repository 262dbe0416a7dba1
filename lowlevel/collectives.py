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

What it buys (two NVLink-linked H200s, bf16, 2026-11-30; ``bench_ubatch_nccl``)
------------------------------------------------------------------------------
Alone it is as fast as NCCL's kernels (16384 x 1536: 117 against 118 µs). Overlapped with a
matmul it keeps the matmul on every SM, but it does not run for free: copy engines share HBM,
L2 and NVLink with the matmul. Inside the overlapped graph the all-to-all takes 134 µs beside
the matmul and 112 µs beside a sleep kernel of the same length, and the matmul itself grows
too (126 against 104 µs). A pipeline of equal stages therefore gains about 1.3x over the best
sequential run (16384 tokens x H 1536, 2 microbatches x 6 layers: 1.33x; NCCL's kernels on an
SM share: 1.27x), not the 1.8x an equal split of time would suggest. Capping the matmul a
little (``SMControlContextManager``: 16 SMs in that run) lightens its traffic and helps.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from . import _runtime as rt
from .device import require_cuda
from .errors import LowlevelError, check_int, check_ints, describe
from .interop import overlaps
from .stream import Stream, use_stream

__all__ = ["PeerBuffers", "SymmetricBuffers", "all_to_all_single", "zero_sm_group"]

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


def _check_group(group: Any, non_member: bool = False) -> None:
    """``group`` is ``None`` (the default group) or a ``torch.distributed.ProcessGroup`` (or, with
    ``non_member``, what ``new_group`` returns on a rank outside the group)."""
    import torch.distributed as dist

    if non_member and type(group) is int and group == dist.GroupMember.NON_GROUP_MEMBER:
        return
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None (the default group), "
                        f"got {describe(group)}")


def _require_init(caller: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        raise LowlevelError(f"{caller} needs torch.distributed initialised (init_process_group)")


def _check_device(device: Any) -> int | None:
    """``device`` as a CUDA device index (``None`` kept): a non-negative int, never a bool."""
    return None if device is None else check_int(device, "device", 0)


def _device_index(device: int | None) -> int:
    """The checked ``device`` (or the current device), refused past the last GPU; after ``require_cuda``."""
    import torch

    if device is None:
        return int(torch.cuda.current_device())
    n = torch.cuda.device_count()
    if device >= n:
        raise ValueError(f"device must be a CUDA device index below {n} (the GPUs visible), got {device}")
    return device


def zero_sm_group(ranks: Iterable[int] | None = None, *, device: int | None = None) -> Any:
    """A new NCCL process group whose communicator has the zero-CTA policy
    (``NCCL_CTA_POLICY_ZERO``): NCCL uses no CTA wherever it can (an all-to-all, all-gather,
    gather or scatter between buffers of a :class:`SymmetricBuffers` of this group, within one
    NVLink domain) and its ordinary kernels elsewhere.

    ``ranks``: the global ranks of the group, an iterable of distinct ints below the world size
    (default: all). ``device``: the CUDA device index of this rank, an int (default: the current
    device); the communicator is made at once (``device_id``), as window registration needs it.
    Collective: every rank of the default group calls it with the same ``ranks``, like
    :func:`torch.distributed.new_group`. Returns the ``ProcessGroup``. Raises, before any
    collective call: ``TypeError`` for ``ranks`` not an iterable of ints or ``device`` not an
    int (bools refused), ``ValueError`` for a negative, repeated or out-of-range rank or device;
    :class:`~lowlevel.CudaUnavailableError` without a GPU; :class:`~lowlevel.LowlevelError` when
    torch lacks NCCL's CTA policy or the default group is not initialised."""
    import torch
    import torch.distributed as dist

    rank_list = None if ranks is None else check_ints(ranks, "ranks", 0)
    if rank_list is not None and len(set(rank_list)) != len(rank_list):
        raise ValueError(f"ranks must not repeat a rank, got {rank_list}")
    device = _check_device(device)
    require_cuda()
    policy = _zero_policy()
    _require_init("zero_sm_group")
    world = dist.get_world_size()
    if rank_list is not None and any(r >= world for r in rank_list):
        raise ValueError(f"ranks must be global ranks below the world size {world}, got {rank_list}")
    dev = _device_index(device)
    o = dist.ProcessGroupNCCL.Options()
    setattr(o.config, "cta_policy", policy)  # noqa: B010 (the CPU build's stubs lack the field)
    return dist.new_group(ranks=rank_list, backend="nccl", pg_options=o,
                          device_id=torch.device("cuda", dev))


def _shapes_bytes(shapes: Any, dtype: Any) -> list[list[int]]:
    """Each shape of ``shapes`` checked (a non-empty sequence of sequences of non-negative ints,
    under 2**63 bytes of ``dtype`` each) as a list of ints."""
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, Sequence):
        raise TypeError(f"shapes must be a sequence (list or tuple) of shapes, got {describe(shapes)}")
    if not shapes:
        raise ValueError("shapes must be a non-empty sequence of shapes, got an empty one")
    dims: list[list[int]] = []
    for i, shape in enumerate(shapes):
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
            hint = " (for one tensor, pass [shape])" if isinstance(shape, int) else ""
            raise TypeError(f"shapes[{i}] must be a sequence of ints (a shape){hint}, got {describe(shape)}")
        d = [check_int(v, f"shapes[{i}][{j}]", 0) for j, v in enumerate(shape)]
        size = math.prod(d) * dtype.itemsize
        if size >= 2**63:
            raise ValueError(f"shapes[{i}] is too large: {tuple(d)} of {dtype} is {size} bytes")
        dims.append(d)
    return dims


def _buffer_args(group: Any, shapes: Any, dtype: Any, device: Any) -> tuple[list[list[int]], int | None]:
    """The checks both buffer classes make before allocating: ``group``, ``dtype`` (a
    ``torch.dtype``), ``shapes`` (:func:`_shapes_bytes`), ``device``; then a usable GPU.
    Returns the shapes as lists of ints and the device index (or None)."""
    import torch

    _check_group(group)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {describe(dtype)}")
    dims = _shapes_bytes(shapes, dtype)
    device = _check_device(device)
    require_cuda()
    return dims, device


class SymmetricBuffers:
    """Tensors in memory that NCCL can reach on every rank of ``group`` at the same offset: a
    ``torch.cuda.MemPool`` over NCCL's allocator (``ncclMemAlloc``), registered as symmetric
    windows of the group's communicator (``register_mem_pool(pool, symm=True)``).

    ``group``: an NCCL ``ProcessGroup`` (e.g. :func:`zero_sm_group`; ``None``: the default
    group); ``shapes``: a non-empty list or tuple with one shape (a sequence of non-negative
    ints, e.g. ``[(rows, cols)]`` for one tensor) per tensor; ``dtype``: their dtype (a
    ``torch.dtype``); ``device``: this rank's CUDA device index (default: the current one).
    Collective: every rank of ``group`` makes its buffers with the same shapes in the same order,
    as the registration is a collective call. ``.tensors`` holds the tensors
    (uninitialised). The registration covers exactly these allocations: tensors allocated in
    the pool later are not windows (torch registers late segments as ordinary buffers), so
    make every buffer here. :meth:`close` (or leaving a ``with`` block) deregisters, also
    collectively; use the tensors in collectives only before that. Raises, before allocating
    anything: ``TypeError`` for a ``group`` that is not a ``ProcessGroup``, a non-``torch.dtype``
    ``dtype``, ``shapes`` or one of its shapes not a sequence, a dimension or ``device`` not an
    int; ``ValueError`` for empty ``shapes``, a negative dimension, a tensor of 2**63 bytes or
    more, a negative or out-of-range ``device``; :class:`~lowlevel.CudaUnavailableError` without
    a GPU; :class:`~lowlevel.LowlevelError` when ``group`` is ``None`` and torch.distributed is
    not initialised or the group's backend has no NCCL allocator."""

    def __init__(self, group: Any, shapes: Sequence[Sequence[int]], dtype: Any, *,
                 device: int | None = None) -> None:
        import torch
        import torch.distributed as dist

        dims, device = _buffer_args(group, shapes, dtype, device)
        if group is None:
            _require_init("SymmetricBuffers(group=None)")
            group = dist.group.WORLD
        dev = torch.device("cuda", _device_index(device))
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


PEER_ALIGN = 256  # bytes: every buffer of a PeerBuffers starts on this boundary (16-byte vectors and more)
PEER_SIGNAL_WORDS = 1 << 16  # int32 words of signal space at the start of every rank's allocation
_IPC_LAZY_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess


class PeerBuffers:
    """Buffers that every rank of ``group`` can read and write directly, over NVLink: one
    ``cudaMalloc`` per rank, exported with ``cudaIpcGetMemHandle`` and opened on every other
    rank (``cudaIpcOpenMemHandle``, peer access enabled lazily). What lowlevel's own
    collective kernels (:func:`lowlevel.kernels.all_to_all_single`) store into.

    ``group``: a ``torch.distributed`` ``ProcessGroup`` (``None``: the default group) whose
    ranks are processes on GPUs of one host with peer access between them; the handles travel
    over it once, here. ``shapes``: a non-empty sequence with one shape per tensor; ``dtype``:
    their ``torch.dtype``; ``device``: this rank's CUDA device index (default: the current one).
    Collective: every rank calls it with the same shapes and dtype in the same order.

    :attr:`tensors` are this rank's buffers (uninitialised), :meth:`peer` ``(r)`` the same
    buffers of group rank ``r`` mapped into this process (the same shapes; ``peer(rank)`` is
    :attr:`tensors`). Each allocation starts with :data:`PEER_SIGNAL_WORDS` int32 words of
    signal space, zeroed here, that the kernels use for their cross-GPU barriers
    (:meth:`signals`). Every buffer starts on a :data:`PEER_ALIGN`-byte boundary at the same
    offset on every rank.

    :meth:`close` (or leaving a ``with`` block) is collective too: every rank unmaps its peers,
    waits for the others at a barrier, then frees its own memory. The tensors must not be used
    after it (they point at freed memory; :attr:`tensors` and :meth:`peer` then raise).

    Raises, before anything is allocated: ``TypeError`` for a ``group`` that is not a
    ``ProcessGroup``, a ``dtype`` that is not a ``torch.dtype``, bad ``shapes`` or ``device``
    types; ``ValueError`` for empty ``shapes``, a negative dimension, a negative or
    out-of-range ``device``; :class:`~lowlevel.CudaUnavailableError` without a GPU;
    :class:`~lowlevel.LowlevelError` when torch.distributed is not initialised. A failure to
    open a peer's handle (no peer access between the GPUs, ranks on different hosts) raises
    :class:`~lowlevel.LowlevelError` after freeing what was made."""

    def __init__(self, group: Any, shapes: Sequence[Sequence[int]], dtype: Any, *,
                 device: int | None = None) -> None:
        import torch.distributed as dist

        dims, device = _buffer_args(group, shapes, dtype, device)
        _require_init("PeerBuffers")
        if group is None:
            group = dist.group.WORLD
        self.device = _device_index(device)
        self.group, self.dtype = group, dtype
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.offsets: list[int] = []  # bytes from the allocation's start to each buffer
        self._sizes = [math.prod(d) * dtype.itemsize for d in dims]  # bytes of each buffer
        at = PEER_SIGNAL_WORDS * 4
        for size in self._sizes:
            self.offsets.append(at)
            at += -(-size // PEER_ALIGN) * PEER_ALIGN
        self.nbytes, self._dims = at, dims
        self._base = 0
        self._opened: dict[int, int] = {}  # group rank -> this process's mapping of its allocation
        self._views: dict[int, tuple[Any, list[Any]]] = {}
        self._plans: dict[Any, Any] = {}
        cp = rt.cp
        rt.use_device(self.device)
        try:
            self._base = int(cp.cuda.runtime.malloc(self.nbytes))
            cp.cuda.runtime.memset(self._base, 0, self.nbytes)
            cp.cuda.runtime.deviceSynchronize()  # zeroed before any peer can signal into it
            handle = bytes(cp.cuda.runtime.ipcGetMemHandle(self._base))
            handles: list[Any] = [None] * self.world
            dist.all_gather_object(handles, handle, group=group)
            for r, h in enumerate(handles):
                if r != self.rank:
                    try:
                        self._opened[r] = int(cp.cuda.runtime.ipcOpenMemHandle(h, _IPC_LAZY_PEER_ACCESS))
                    except Exception as exc:
                        raise LowlevelError(f"PeerBuffers: cannot map rank {r}'s memory on cuda:{self.device} "
                                            f"({type(exc).__name__}: {exc}); the ranks need GPUs of one host "
                                            "with peer access between them") from exc
            dist.barrier(group=group)  # every rank mapped every other: nobody frees early
        except BaseException:
            self._unmap()
            self._free()
            raise
        self._closed = False

    def _unmap(self) -> None:
        for ptr in self._opened.values():
            rt.cp.cuda.runtime.ipcCloseMemHandle(ptr)
        self._opened.clear()
        self._views.clear()
        self._plans.clear()

    def _free(self) -> None:
        if self._base:
            rt.cp.cuda.runtime.free(self._base)
            self._base = 0

    def _mapped(self, r: int) -> tuple[Any, list[Any]]:
        """(int32 signal words, the buffers) of group rank ``r``, as torch tensors on this device."""
        self._check_open()
        r = check_int(r, "rank", 0, self.world - 1)
        v = self._views.get(r)
        if v is None:
            import torch

            cp = rt.cp
            addr = self._base if r == self.rank else self._opened[r]
            mem = cp.cuda.UnownedMemory(addr, self.nbytes, self, device_id=self.device)
            raw = torch.from_dlpack(cp.ndarray((self.nbytes,), dtype=cp.uint8, memptr=cp.cuda.MemoryPointer(mem, 0)))
            sig = raw[:PEER_SIGNAL_WORDS * 4].view(torch.int32)
            bufs = []
            for off, size, d in zip(self.offsets, self._sizes, self._dims):
                bufs.append(raw[off:off + size].view(self.dtype).view(d))
            v = self._views[r] = (sig, bufs)
        return v

    @property
    def tensors(self) -> list[Any]:
        """This rank's buffers (torch tensors of the given shapes and dtype)."""
        return self._mapped(self.rank)[1]

    def peer(self, rank: int) -> list[Any]:
        """Group rank ``rank``'s buffers, mapped into this process (writes land in its memory)."""
        return self._mapped(rank)[1]

    def signals(self, rank: int) -> Any:
        """Group rank ``rank``'s :data:`PEER_SIGNAL_WORDS` int32 signal words, mapped here."""
        return self._mapped(rank)[0]

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran (the memory is freed)."""
        return self._closed

    def plans(self) -> dict[Any, Any]:
        """The launch plans of the kernels that use these buffers (their arguments hold views
        of this memory), kept here so that they go when the memory goes: emptied by
        :meth:`close`. :class:`~lowlevel.LowlevelError` once closed."""
        self._check_open()
        return self._plans

    def _check_open(self) -> None:
        if self._closed:
            raise LowlevelError("PeerBuffers is closed: its memory was freed")

    def index(self, t: Any) -> int:
        """Which buffer of :attr:`tensors` is the torch tensor ``t`` (exactly that buffer: same
        start, shape, strides and dtype); ``TypeError`` for a ``t`` that is not a torch tensor,
        ``ValueError`` otherwise (the message names it ``output``, as the kernels call it)."""
        import torch

        if not isinstance(t, torch.Tensor):
            raise TypeError(f"t must be a torch.Tensor (one of this PeerBuffers' tensors), got {describe(t)}")
        for i, b in enumerate(self.tensors):
            if (t.data_ptr() == b.data_ptr() and t.shape == b.shape and t.dtype == b.dtype
                    and t.stride() == b.stride()):
                return i
        raise ValueError("output must be one of this PeerBuffers' tensors (the whole buffer, this rank's own), "
                         f"got a tensor of shape {tuple(t.shape)} {t.dtype} at {t.data_ptr():#x}")

    def close(self) -> None:
        """Unmap the peers, wait for every rank (a barrier over the group), free this rank's
        memory. Collective and idempotent. Work that uses the buffers must have finished
        (this synchronises the device first)."""
        if self._closed:
            return
        import torch.distributed as dist

        self._closed = True
        rt.use_device(self.device)
        rt.cp.cuda.runtime.deviceSynchronize()
        self._unmap()
        dist.barrier(group=self.group)  # no rank still writes into this rank's memory
        self._free()

    def __enter__(self) -> PeerBuffers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        shapes = [tuple(d) for d in self._dims]
        return (f"PeerBuffers({shapes}, {self.dtype}, rank={self.rank}, world={self.world}, "
                f"closed={self._closed})")


def _check(output: Any, input: Any) -> None:
    import torch

    for name, t in (("output", output), ("input", input)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {describe(t)}")
        if t.layout != torch.strided or t.device.type == "meta":
            raise ValueError(f"{name} must be a dense tensor with storage, got layout {t.layout} on {t.device}")
        if t.dim() < 1:
            raise ValueError(f"{name} must have at least one dimension (rows to split), got a 0-dim tensor")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous tensor, got shape {tuple(t.shape)} with strides "
                             f"{t.stride()}")
        if t.is_conj() or t.is_neg():  # lazy views: the memory sent is not the values the tensor shows
            raise ValueError(f"{name} must not be a lazy conjugate/negative view (is_conj={t.is_conj()}, "
                             f"is_neg={t.is_neg()}); pass {name}.resolve_conj().resolve_neg()")
    if output.shape != input.shape or output.dtype != input.dtype or output.device != input.device:
        raise ValueError(f"output must match input in shape, dtype and device: output is {tuple(output.shape)} "
                         f"{output.dtype} on {output.device}, input is {tuple(input.shape)} {input.dtype} on "
                         f"{input.device}")
    if overlaps(output, input):
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

    Any dtype the backend supports; ``n`` may be 0 and the other dimensions any size. Every rank
    of ``group`` must pass the same shape and dtype: a mismatch between ranks is not detected
    here (that would cost a second exchange) and is the backend's failure (gloo aborts the
    process, NCCL may hang). On a rank outside ``group`` nothing is sent and ``output`` is
    returned unwritten, as torch does.

    Ordering: as torch's synchronous call, on the caller's current stream. When that is the
    legacy default stream (handle 0), which the copy path refuses, the call is enqueued on a
    cached per-device stream that first waits for the caller's stream, and the caller's stream
    waits for it before this returns (a fork/join; also inside a graph capture). Returns
    ``output``. Raises, on this rank before anything is sent: ``TypeError`` for a non-tensor
    ``output``/``input`` or a ``group`` that is not a ``ProcessGroup`` (nor the
    ``NON_GROUP_MEMBER`` that ``new_group`` returns to the ranks outside it); ``ValueError`` for a
    0-dim, sparse, meta, non-contiguous or lazily conjugated/negated tensor, tensors that differ
    in shape, dtype or device or overlap in memory, or ``n`` not divisible by ``w``;
    :class:`~lowlevel.LowlevelError` when torch.distributed is not initialised. Backend errors
    propagate."""
    import torch.distributed as dist

    _check(output, input)
    _check_group(group, non_member=True)
    _require_init("all_to_all_single")
    world = dist.get_world_size(group)
    if world < 1:  # this rank is not in ``group``: torch's call does nothing here
        return output
    if output.shape[0] % world:
        raise ValueError(f"input.shape[0] must be divisible by the group's size {world}, got {input.shape[0]}")
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
