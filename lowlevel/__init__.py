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
* microbatch overlap: :class:`UBatchRunner`, the ``dbo_*`` helpers of :mod:`lowlevel.ubatching`,
  the thread ring (:mod:`lowlevel.ubatch_ring`) and the generator runtime
  (:mod:`lowlevel.ubatch_generators`);
* :class:`Timeline`: what ran on which stream.

Importing lowlevel needs no GPU; creating a stream or an event without one raises
:class:`CudaUnavailableError`.

The public API is exactly the union of the submodules' ``__all__`` lists (composed below);
:mod:`lowlevel.kernels` is imported on its own (it needs Triton).
"""
from __future__ import annotations

from . import (
    collectives,
    cpu_gpu_event,
    cudagraph_dispatch,
    device,
    dp,
    errors,
    event,
    graph_runner,
    graphs,
    interop,
    lifetime,
    parallel,
    sm_control,
    stream,
    timeline,
    trace_merge,
    ubatch_generators,
    ubatch_ring,
    ubatch_runner,
    ubatch_slices,
    ubatching,
)
from ._version import __version__ as __version__
from .collectives import *  # noqa: F403
from .cpu_gpu_event import *  # noqa: F403
from .cudagraph_dispatch import *  # noqa: F403
from .device import *  # noqa: F403
from .dp import *  # noqa: F403
from .errors import *  # noqa: F403
from .event import *  # noqa: F403
from .graph_runner import *  # noqa: F403
from .graphs import *  # noqa: F403
from .interop import *  # noqa: F403
from .lifetime import *  # noqa: F403
from .parallel import *  # noqa: F403
from .sm_control import *  # noqa: F403
from .stream import *  # noqa: F403
from .timeline import *  # noqa: F403
from .trace_merge import *  # noqa: F403
from .ubatch_generators import *  # noqa: F403
from .ubatch_ring import *  # noqa: F403
from .ubatch_runner import *  # noqa: F403
from .ubatch_slices import *  # noqa: F403
from .ubatching import *  # noqa: F403

_MODULES = (errors, device, stream, event, interop, lifetime, graphs, sm_control, parallel, cpu_gpu_event,
            cudagraph_dispatch, graph_runner, dp, collectives, ubatch_slices, ubatch_ring, ubatch_generators, ubatching,
            ubatch_runner, timeline, trace_merge)
__all__ = sorted({name for m in _MODULES for name in m.__all__}, key=str.lower)
