"""vLLM's CUDA graph modes, batch descriptors and dispatcher, standalone and pure Python.

The dispatcher holds the set of batch descriptors for which graphs are (or will be) captured,
per runtime mode, and maps each incoming batch to ``(mode, descriptor)``: a FULL graph for the
exact padded batch, else a PIECEWISE graph for the relaxed batch, else NONE (eager, unpadded).
No GPU is needed here.
"""
from __future__ import annotations

import bisect
import enum
import operator
from typing import Iterable, NamedTuple

from .errors import check_int

__all__ = [
    "CUDAGraphMode",
    "BatchDescriptor",
    "CudagraphDispatcher",
    "default_capture_sizes",
    "padding_table",
    "captured_lora_counts",
]


class CUDAGraphMode(enum.Enum):
    """NONE, PIECEWISE and FULL are runtime modes; FULL_DECODE_ONLY and FULL_AND_PIECEWISE
    name a (decode mode, mixed mode) pair. Lower values are safer: DP ranks agree on the
    minimum of their modes."""

    NONE = 0
    PIECEWISE = 1
    FULL = 2
    FULL_DECODE_ONLY = (2, 0)
    FULL_AND_PIECEWISE = (2, 1)

    def separate_routine(self) -> bool:
        """True for the pair modes, which treat uniform-decode and mixed batches differently."""
        return isinstance(self.value, tuple)

    def decode_mode(self) -> "CUDAGraphMode":
        return CUDAGraphMode(self.value[0]) if self.separate_routine() else self

    def mixed_mode(self) -> "CUDAGraphMode":
        return CUDAGraphMode(self.value[1]) if self.separate_routine() else self

    def has_mode(self, mode: "CUDAGraphMode") -> bool:
        """Whether this mode uses the runtime mode ``mode`` (``FULL_DECODE_ONLY`` has NONE)."""
        if mode.separate_routine():
            raise ValueError(f"has_mode takes a runtime mode, got {mode.name}")
        if self.separate_routine():
            return mode.value in self.value
        return self == mode

    def requires_piecewise_compilation(self) -> bool:
        return self.has_mode(CUDAGraphMode.PIECEWISE)

    def max_cudagraph_mode(self) -> "CUDAGraphMode":
        return CUDAGraphMode(max(self.value)) if self.separate_routine() else self

    def has_full_cudagraphs(self) -> bool:
        return self.max_cudagraph_mode() == CUDAGraphMode.FULL

    def has_piecewise_cudagraphs(self) -> bool:
        return self.requires_piecewise_compilation()

    @classmethod
    def valid_runtime_modes(cls) -> frozenset["CUDAGraphMode"]:
        return _RUNTIME_MODES

    def is_valid_runtime_mode(self) -> bool:
        return self in _RUNTIME_MODES

    def __str__(self) -> str:
        return self.name

    def __bool__(self) -> bool:
        return self != CUDAGraphMode.NONE


_RUNTIME_MODES = frozenset({CUDAGraphMode.NONE, CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL})
_NONE, _PIECEWISE, _FULL = CUDAGraphMode.NONE, CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL


class BatchDescriptor(NamedTuple):
    """The key of a captured graph. ``num_reqs=None`` means "any number of requests" (PIECEWISE
    graphs); ``uniform`` marks a uniform-decode batch. Immutable and hashable."""

    num_tokens: int
    num_reqs: int | None = None
    uniform: bool = False
    has_lora: bool = False
    num_active_loras: int = 0

    def relax_for_mixed_batch_cudagraphs(self) -> "BatchDescriptor":
        """The same batch with ``num_reqs=None, uniform=False`` (the PIECEWISE key)."""
        return BatchDescriptor(self.num_tokens, None, False, self.has_lora, self.num_active_loras)


def _check_sizes(sizes: Iterable[int], what: str) -> list[int]:
    out = []
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ValueError(f"{what} must be integers, got {s!r}")
        if s <= 0:
            raise ValueError(f"{what} must be positive, got {s}")
        out.append(s)
    if not out:
        raise ValueError(f"{what} must not be empty")
    return sorted(set(out))


def default_capture_sizes(max_size: int) -> list[int]:
    """vLLM's default capture sizes up to ``max_size``: 1, 2, 4, then every 8 below 256, then
    every 16 from 256."""
    check_int(max_size, "max_size", 1)
    sizes = [s for s in (1, 2, 4) if s <= max_size]
    sizes += range(8, min(max_size + 1, 256), 8)
    sizes += range(256, max_size + 1, 16)
    return sorted(set(sizes))


def padding_table(capture_sizes: Iterable[int], max_size: int | None = None) -> list[int]:
    """``table[n]`` is the capture size a batch of ``n`` tokens is padded to, for ``n`` in
    ``0..max_size``: exact sizes map to themselves, 0 to 0, others round up to the next size.
    ``max_size`` defaults to the largest size and may not exceed it."""
    sizes = _check_sizes(capture_sizes, "capture sizes")
    top = sizes[-1] if max_size is None else max_size
    check_int(top, "max_size", 0)
    if top > sizes[-1]:
        raise ValueError(f"max_size {top} exceeds the largest capture size {sizes[-1]}: it could not be padded")
    table = [0] * (top + 1)
    start = 0
    for end in sizes:
        if start > top:
            break
        table[start] = start
        for n in range(start + 1, min(end, top + 1)):
            table[n] = end
        start = end
    if start <= top:
        table[start] = start
    return table


def captured_lora_counts(max_loras: int, specialize: bool = True) -> list[int]:
    """Active-LoRA counts that get graphs of their own: powers of two up to ``max_loras``, and
    ``max_loras + 1`` (the no-adapter slot counted in); only the latter without specialisation."""
    if max_loras <= 0:
        return []
    if not specialize:
        return [max_loras + 1]
    counts, p = [], 1
    while p <= max_loras:
        counts.append(p)
        p *= 2
    counts.append(max_loras + 1)
    return sorted(set(counts))


class CudagraphDispatcher:
    """Maps batches to captured CUDA graphs, as vLLM's ``CudagraphDispatcher`` does.

    ``capture_sizes`` (default: :func:`default_capture_sizes` of ``max_capture_size``, itself
    defaulting to ``min(2 * max_num_seqs, 512)``) are de-duplicated, filtered to
    ``<= max_capture_size`` and sorted. Keys exist only after :meth:`initialize_cudagraph_keys`.
    :meth:`dispatch` is the hot path: results for batches up to the largest capture size are
    memoised, so a repeated batch costs one dict lookup. Not thread-safe for concurrent
    mutation (``add_cudagraph_key`` / ``initialize_cudagraph_keys``) and dispatch.
    """

    def __init__(self, capture_sizes: Iterable[int] | None = None, *, max_capture_size: int | None = None,
                 max_num_seqs: int = 256, max_loras: int = 0, specialize_lora: bool = True,
                 piecewise_supported: bool = True) -> None:
        check_int(max_num_seqs, "max_num_seqs", 1)
        check_int(max_loras, "max_loras", 0)
        if max_capture_size is not None:
            check_int(max_capture_size, "max_capture_size", 1)
        if capture_sizes is None:
            top = max_capture_size if max_capture_size is not None else min(2 * max_num_seqs, 512)
            sizes = default_capture_sizes(top)
        else:
            sizes = _check_sizes(list(capture_sizes), "capture sizes")
            if max_capture_size is not None:
                sizes = [s for s in sizes if s <= max_capture_size]
                if not sizes:
                    raise ValueError(f"no capture size is <= max_capture_size={max_capture_size}")
        self.capture_sizes: list[int] = sizes
        self.max_capture_size: int = sizes[-1]
        self.max_num_seqs = max_num_seqs
        self.max_loras = max_loras
        self.specialize_lora = specialize_lora
        self.piecewise_supported = piecewise_supported
        self.cudagraph_mode = _NONE
        self.uniform_decode_query_len = 1
        self.cudagraph_keys: dict[CUDAGraphMode, set[BatchDescriptor]] = {_PIECEWISE: set(), _FULL: set()}
        self.keys_initialized = False
        self._table: list[int] = []
        self._lora_counts: list[int] = []
        self._memo: dict[tuple[int, bool, bool, int], tuple[CUDAGraphMode, BatchDescriptor]] = {}

    # --- keys ---------------------------------------------------------------------------------
    def _lora_cases(self) -> list[int]:
        if self.max_loras == 0:
            return [0]
        if self.specialize_lora:
            return [0] + captured_lora_counts(self.max_loras, True)
        return [self.max_loras + 1]

    def _padded(self, num_tokens: int, uniform_decode: bool, has_lora: bool,
                num_active_loras: int) -> BatchDescriptor:
        padded = self._table[num_tokens]
        if uniform_decode and self.cudagraph_mode.has_mode(_FULL):
            q = self.uniform_decode_query_len
            return BatchDescriptor(padded, min(padded // q, self.max_num_seqs), True, has_lora, num_active_loras)
        return BatchDescriptor(padded, min(padded, self.max_num_seqs), False, has_lora, num_active_loras)

    def add_cudagraph_key(self, runtime_mode: CUDAGraphMode, batch_descriptor: BatchDescriptor) -> None:
        """Register ``batch_descriptor`` as captured for ``runtime_mode`` (PIECEWISE or FULL)."""
        if runtime_mode not in (_PIECEWISE, _FULL):
            raise ValueError(f"keys are PIECEWISE or FULL, got {runtime_mode}")
        if not isinstance(batch_descriptor, BatchDescriptor):
            raise TypeError(f"expected a BatchDescriptor, got {type(batch_descriptor).__qualname__}")
        self.cudagraph_keys[runtime_mode].add(batch_descriptor)
        self._memo.clear()

    def initialize_cudagraph_keys(self, cudagraph_mode: CUDAGraphMode, uniform_decode_query_len: int = 1) -> None:
        """Build the keys for ``cudagraph_mode`` (replacing any earlier ones).

        Mixed keys: every capture size x LoRA case, relaxed when the mixed mode is PIECEWISE.
        Decode keys (pair modes with FULL decode): capture sizes in ``[q, q * max_num_seqs]``,
        uniform, each of which must be a multiple of ``q = uniform_decode_query_len``."""
        if not isinstance(cudagraph_mode, CUDAGraphMode):
            raise TypeError(f"cudagraph_mode must be a CUDAGraphMode, got {cudagraph_mode!r}")
        q = uniform_decode_query_len
        check_int(q, "uniform_decode_query_len", 1)
        if cudagraph_mode.requires_piecewise_compilation() and not self.piecewise_supported:
            raise ValueError(f"{cudagraph_mode} needs piecewise graphs, but piecewise_supported=False")
        decode_sizes: list[int] = []
        if cudagraph_mode.decode_mode() == _FULL and cudagraph_mode.separate_routine():
            decode_sizes = [x for x in self.capture_sizes if q <= x <= q * self.max_num_seqs]
            bad = [x for x in decode_sizes if x % q]
            if bad:
                raise ValueError(f"uniform-decode capture sizes must be multiples of the query length {q}; "
                                 f"these are not: {bad}")
        self.cudagraph_mode = cudagraph_mode
        self.uniform_decode_query_len = q
        self.cudagraph_keys = {_PIECEWISE: set(), _FULL: set()}
        self._memo.clear()
        if cudagraph_mode == _NONE:
            self.keys_initialized = True
            return
        self._table = padding_table(self.capture_sizes)
        cases = self._lora_cases()
        self._lora_counts = [c for c in cases if c > 0]
        mixed = cudagraph_mode.mixed_mode()
        if mixed != _NONE:
            for x in self.capture_sizes:
                for c in cases:
                    d = self._padded(x, False, c > 0, c)
                    if mixed == _PIECEWISE:
                        d = d.relax_for_mixed_batch_cudagraphs()
                    self.cudagraph_keys[mixed].add(d)
        for x in decode_sizes:
            for c in cases:
                self.cudagraph_keys[_FULL].add(self._padded(x, True, c > 0, c))
        self.keys_initialized = True

    # --- dispatch -----------------------------------------------------------------------------
    def dispatch(self, num_tokens: int, uniform_decode: bool = False, has_lora: bool = False,
                 num_active_loras: int = 0, valid_modes: Iterable[CUDAGraphMode] | None = None,
                 invalid_modes: Iterable[CUDAGraphMode] | None = None) -> tuple[CUDAGraphMode, BatchDescriptor]:
        """``(mode, descriptor)`` for a batch of ``num_tokens``: FULL if the exact padded batch
        has a FULL key, else PIECEWISE if the relaxed one has a PIECEWISE key, else NONE with
        the unpadded batch. Batches above the largest capture size always get NONE."""
        if valid_modes is None and invalid_modes is None:
            hit = self._memo.get((num_tokens, uniform_decode, has_lora, num_active_loras))
            if hit is not None:
                return hit
        if isinstance(num_tokens, bool):
            raise TypeError("num_tokens must be an int, got a bool")
        num_tokens = operator.index(num_tokens)  # TypeError for floats and other non-integers
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be non-negative, got {num_tokens}")
        if valid_modes is None and invalid_modes is None:
            allowed = _RUNTIME_MODES
        else:
            allowed = frozenset(_RUNTIME_MODES if valid_modes is None else valid_modes) - frozenset(invalid_modes or ())
            if not allowed:
                raise ValueError("valid_modes minus invalid_modes leaves no mode to dispatch to")
        if (not self.keys_initialized or self.cudagraph_mode == _NONE or num_tokens > self.max_capture_size
                or allowed <= {_NONE}):
            return _NONE, BatchDescriptor(num_tokens)
        result = self._dispatch(num_tokens, uniform_decode, has_lora, num_active_loras, allowed)
        if allowed is _RUNTIME_MODES:
            self._memo[(num_tokens, uniform_decode, has_lora, num_active_loras)] = result
        return result

    def _dispatch(self, num_tokens: int, uniform_decode: bool, has_lora: bool, num_active_loras: int,
                  allowed: frozenset[CUDAGraphMode]) -> tuple[CUDAGraphMode, BatchDescriptor]:
        if has_lora and num_active_loras > 0:
            if self.specialize_lora:
                i = bisect.bisect_left(self._lora_counts, num_active_loras)
                if i < len(self._lora_counts):
                    num_active_loras = self._lora_counts[i]
            else:
                num_active_loras = self.max_loras + 1
        # Normalise the uniform flag before deriving the key (vLLM #36165).
        uniform = bool(uniform_decode) and self.cudagraph_mode.separate_routine()
        desc = self._padded(num_tokens, uniform, has_lora, num_active_loras)
        if _FULL in allowed and desc in self.cudagraph_keys[_FULL]:
            return _FULL, desc
        if _PIECEWISE in allowed:
            relaxed = desc.relax_for_mixed_batch_cudagraphs()
            if relaxed in self.cudagraph_keys[_PIECEWISE]:
                return _PIECEWISE, relaxed
        if _NONE not in allowed:
            raise ValueError(f"no graph for {desc} and NONE is not an allowed mode")
        return _NONE, BatchDescriptor(num_tokens)

    def get_capture_descs(self) -> list[tuple[CUDAGraphMode, list[BatchDescriptor]]]:
        """``[(PIECEWISE, descs), (FULL, descs)]`` to capture, empty groups left out, each
        sorted largest first (so that one shared pool serves them all)."""
        if not self.keys_initialized or self.cudagraph_mode == _NONE:
            return []
        out = []
        for mode in (_PIECEWISE, _FULL):
            descs = sorted(self.cudagraph_keys[mode], key=lambda d: (d.num_tokens, d.num_active_loras),
                           reverse=True)
            if descs:
                out.append((mode, descs))
        return out
