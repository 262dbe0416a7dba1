"""lowlevel: overlap and replay GPU work across CuPy, torch and Triton.

* streams and events: :class:`Stream`, :func:`use_stream`, :class:`Event`, zero-copy interop
  (:func:`as_torch`, :func:`as_cupy`);
* fork/join: :func:`execute_in_parallel`, :func:`maybe_execute_in_parallel`,
  :class:`ParallelRunner`, :class:`CpuGpuEvent`;
* CUDA graphs: :func:`capture`, :class:`GraphPool`, :class:`CUDAGraphMode`,
  :class:`BatchDescriptor`, :class:`CudagraphDispatcher`, :class:`CUDAGraphRunner`;
* SM control: :func:`sm_limit`, :class:`SMControlContextManager`, :func:`sm_partition`, and
  the persistent kernels of :mod:`lowlevel.kernels`;
* DP padding sync: :class:`DPConfig`, :func:`coordinate_batch_across_dp`, microbatch slices;
* microbatch overlap: :class:`UBatchRunner`, :mod:`lowlevel.ubatching`;
* :class:`Timeline`: what ran on which stream.

Importing lowlevel needs no GPU; creating a stream or an event without one raises
:class:`CudaUnavailableError`.
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
    "as_cupy",
    "as_torch",
    "BatchDescriptor",
    "capture",
    "CaptureError",
    "check_ubatch_thresholds",
    "coordinate_batch_across_dp",
    "CpuGpuEvent",
    "cuda_available",
    "CudagraphDispatcher",
    "CUDAGraphMode",
    "CUDAGraphRunner",
    "CudaUnavailableError",
    "current_stream",
    "default_capture_sizes",
    "device_count",
    "DPConfig",
    "DPSyncError",
    "Event",
    "execute_in_parallel",
    "Graph",
    "GraphPool",
    "LowlevelError",
    "make_ubatch_contexts",
    "maybe_create_ubatch_slices",
    "maybe_execute_in_parallel",
    "padding_table",
    "ParallelRunner",
    "record_event",
    "require_cuda",
    "run_generators",
    "sm_limit",
    "sm_partition",
    "SMControlContextManager",
    "SMPartition",
    "Span",
    "Stream",
    "stream_handle",
    "Timeline",
    "TO_COMM",
    "TO_COMPUTE",
    "UBatchAbort",
    "UBatchContext",
    "UBatchRunner",
    "UBatchSlice",
    "use_stream",
    "wait_event",
    "YIELD",
]
