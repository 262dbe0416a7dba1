"""lowlevel: overlap and replay GPU work across CuPy, torch and Triton.

Streams and events (:class:`Stream`, :func:`use_stream`, :class:`Event`), zero-copy interop
(:func:`as_torch`, :func:`as_cupy`). Importing lowlevel needs no GPU; creating a stream or an
event without one raises :class:`CudaUnavailableError`.
"""
from __future__ import annotations

from .device import cuda_available, device_count, require_cuda
from .errors import CaptureError, CudaUnavailableError, LowlevelError
from .cpu_gpu_event import CpuGpuEvent
from .cudagraph_dispatch import (
    BatchDescriptor,
    CUDAGraphMode,
    CudagraphDispatcher,
    default_capture_sizes,
    padding_table,
)
from .dp import DPConfig, DPSyncError, coordinate_batch_across_dp
from .event import Event, record_event, wait_event
from .graph_runner import CUDAGraphRunner
from .graphs import Graph, GraphPool, capture
from .interop import as_cupy, as_torch
from .parallel import ParallelRunner, execute_in_parallel, maybe_execute_in_parallel
from .sm_control import SMControlContextManager, SMPartition, sm_limit, sm_partition
from .stream import Stream, current_stream, stream_handle, use_stream
from .timeline import Span, Timeline
from .ubatch_runner import UBatchRunner
from .ubatching import TO_COMM, TO_COMPUTE, YIELD, UBatchAbort, UBatchContext, make_ubatch_contexts, run_generators
from .ubatch_slices import UBatchSlice, check_ubatch_thresholds, maybe_create_ubatch_slices

__version__ = "0.1.0"

__all__ = [
    "BatchDescriptor",
    "CUDAGraphMode",
    "CUDAGraphRunner",
    "CudagraphDispatcher",
    "DPConfig",
    "DPSyncError",
    "UBatchRunner",
    "UBatchSlice",
    "UBatchAbort",
    "UBatchContext",
    "make_ubatch_contexts",
    "run_generators",
    "TO_COMM",
    "TO_COMPUTE",
    "YIELD",
    "check_ubatch_thresholds",
    "coordinate_batch_across_dp",
    "maybe_create_ubatch_slices",
    "Graph",
    "GraphPool",
    "capture",
    "default_capture_sizes",
    "padding_table",
    "CaptureError",
    "CpuGpuEvent",
    "CudaUnavailableError",
    "Event",
    "LowlevelError",
    "ParallelRunner",
    "SMControlContextManager",
    "SMPartition",
    "Stream",
    "Span",
    "Timeline",
    "sm_limit",
    "sm_partition",
    "as_cupy",
    "as_torch",
    "cuda_available",
    "current_stream",
    "device_count",
    "execute_in_parallel",
    "maybe_execute_in_parallel",
    "record_event",
    "require_cuda",
    "stream_handle",
    "use_stream",
    "wait_event",
]
