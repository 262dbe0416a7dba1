"""SM-limited persistent Triton kernels (installed as ``lowlevel.kernels``).

Each kernel launches ``min(cap, work)`` programs that stride over the work, where the cap is
:func:`get_num_sms` (see :func:`set_num_sms` and :func:`lowlevel.sm_limit`); changing the cap
never recompiles. Inputs may be torch tensors or CuPy arrays; launches go to lowlevel's current
stream (:func:`lowlevel.use_stream`), or, for a launch prepared with ``stream=``, to that stream.
"""
from ..sm_control import get_num_sms, set_num_sms, sm_limit
from ._launch import PreparedLaunch, StreamLaunch
from .all_to_all import all_to_all_single
from .copy import copy, prepare_copy
from .matmul import matmul, prepare_matmul
from .rms_norm import prepare_rms_norm, rms_norm
from .tile_overlap import TileOverlap, matmul_then_rms_norm, tile_overlap

__all__ = ["PreparedLaunch", "StreamLaunch", "TileOverlap", "all_to_all_single", "copy", "get_num_sms", "matmul",
           "matmul_then_rms_norm", "prepare_copy", "prepare_matmul", "prepare_rms_norm", "rms_norm", "set_num_sms",
           "sm_limit", "tile_overlap"]
