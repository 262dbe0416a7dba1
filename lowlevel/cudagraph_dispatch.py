"""vLLM's CUDA graph modes, batch descriptors and dispatcher, standalone and pure Python.

The dispatcher holds the set of batch descriptors for which graphs are (or will be) captured,
per runtime mode, and maps each incoming batch to ``(mode, descriptor)``: a FULL graph for the
exact padded batch, else a PIECEWISE graph for the relaxed batch, else NONE (eager, unpadded).
No GPU is needed here.

Validation: every public constructor and call checks its arguments before it changes any
state (keys, memo): integers are anything :func:`operator.index` accepts (NumPy integers
included) and never ``bool``; a mode is a :class:`CUDAGraphMode` or its int value (see
:func:`as_cudagraph_mode`). Wrong types raise ``TypeError``, values out of range
``ValueError``; messages name the argument.
"""
from __future__ import annotations

import bisect
import enum
import operator
from collections.abc import Iterable
from typing import Any, NamedTuple

from .errors import LowlevelError, check_bool, check_int, check_ints, describe, is_bool

__all__ = [
    "CUDAGraphMode",
    "BatchDescriptor",
    "CudagraphDispatcher",
    "as_cudagraph_mode",
    "default_capture_sizes",
    "padding_table",
    "captured_lora_counts",
]


class CUDAGraphMode(enum.Enum):
    """NONE, PIECEWISE and FULL are runtime modes; FULL_DECODE_ONLY and FULL_AND_PIECEWISE
    name a (decode mode, mixed mode) pair. Lower values are safer: DP ranks agree on the
    minimum of their modes. Where lowlevel takes a mode it also takes the runtime modes' int
    values 0, 1, 2 (what DP sync exchanges); see :func:`as_cudagraph_mode`."""

    NONE = 0
    PIECEWISE = 1
    FULL = 2
    FULL_DECODE_ONLY = (2, 0)
    FULL_AND_PIECEWISE = (2, 1)

    def separate_routine(self) -> bool:
        """True for the pair modes, which treat uniform-decode and mixed batches differently."""
        return isinstance(self.value, tuple)

    def decode_mode(self) -> CUDAGraphMode:
        return CUDAGraphMode(self.value[0]) if self.separate_routine() else self

    def mixed_mode(self) -> CUDAGraphMode:
        return CUDAGraphMode(self.value[1]) if self.separate_routine() else self

    def has_mode(self, mode: CUDAGraphMode | int) -> bool:
        """Whether this mode uses the runtime mode ``mode`` (a runtime mode or its int;
        ``FULL_DECODE_ONLY`` has NONE). A pair mode raises ``ValueError``, anything else that
        is not a mode ``TypeError``."""
        mode = as_cudagraph_mode(mode, "mode", runtime=True)
        if self.separate_routine():
            return mode.value in self.value
        return self is mode

    def requires_piecewise_compilation(self) -> bool:
        return self.has_mode(CUDAGraphMode.PIECEWISE)

    def max_cudagraph_mode(self) -> CUDAGraphMode:
        return CUDAGraphMode(max(self.value)) if self.separate_routine() else self

    def has_full_cudagraphs(self) -> bool:
        return self.max_cudagraph_mode() == CUDAGraphMode.FULL

    def has_piecewise_cudagraphs(self) -> bool:
        return self.requires_piecewise_compilation()

    @classmethod
    def valid_runtime_modes(cls) -> frozenset[CUDAGraphMode]:
        return _RUNTIME_MODES

    def is_valid_runtime_mode(self) -> bool:
        return self in _RUNTIME_MODES

    def __str__(self) -> str:
        return self.name

    def __bool__(self) -> bool:
        return self != CUDAGraphMode.NONE


_RUNTIME_MODES = frozenset({CUDAGraphMode.NONE, CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL})
_NONE, _PIECEWISE, _FULL = CUDAGraphMode.NONE, CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL
_ZERO = 0  # dispatch's fast path: ``x is _ZERO`` holds for the int 0 only (not False, 0.0 or a NumPy 0)
_BY_INT = {0: _NONE, 1: _PIECEWISE, 2: _FULL}
_MODE_WHAT = "a CUDAGraphMode or its int value (0 NONE, 1 PIECEWISE, 2 FULL)"


def as_cudagraph_mode(value: Any, name: str = "mode", *, runtime: bool = False) -> CUDAGraphMode:
    """``value`` as a :class:`CUDAGraphMode`: the enum itself, or the int value of a runtime
    mode (0 NONE, 1 PIECEWISE, 2 FULL; Python or NumPy ints), as returned by
    :func:`lowlevel.coordinate_batch_across_dp`.

    ``bool``, ``float``, ``str`` (mode names included) and other types raise ``TypeError``;
    an int that is no mode, or a pair mode when ``runtime`` is true, raises ``ValueError``.
    Messages name ``name``. The enum and plain ints are a dict lookup."""
    if runtime is not False and runtime is not True:
        runtime = check_bool(runtime, "runtime")
    cls = type(value)
    if cls is CUDAGraphMode:
        if runtime and type(value.value) is tuple:
            raise ValueError(f"{name} must be a runtime mode (NONE, PIECEWISE or FULL), got {value.name}")
        return value
    if cls is int:
        mode = _BY_INT.get(value)
    else:
        if is_bool(value) or isinstance(value, bool):
            raise TypeError(f"{name} must be {_MODE_WHAT}, got a bool: {describe(value)}")
        try:
            mode = _BY_INT.get(operator.index(value))
        except TypeError:
            raise TypeError(f"{name} must be {_MODE_WHAT}, got {describe(value)}") from None
    if mode is None:
        raise ValueError(f"{name} must be {_MODE_WHAT}, got {value!r}")
    return mode


def _batch_args(num_tokens: Any, uniform: Any, has_lora: Any, num_active_loras: Any,
                uniform_name: str) -> tuple[int, bool, bool, int]:
    """The batch fields shared by :class:`BatchDescriptor` and ``dispatch``, checked: token and
    LoRA counts non-negative ints, flags bools, no active LoRAs without ``has_lora``."""
    if type(num_tokens) is not int or num_tokens < 0:
        num_tokens = check_int(num_tokens, "num_tokens", 0)
    if uniform is not False and uniform is not True:
        uniform = check_bool(uniform, uniform_name)
    if has_lora is not False and has_lora is not True:
        has_lora = check_bool(has_lora, "has_lora")
    if type(num_active_loras) is not int or num_active_loras < 0:
        num_active_loras = check_int(num_active_loras, "num_active_loras", 0)
    if num_active_loras and not has_lora:
        raise ValueError(f"num_active_loras must be 0 when has_lora is False, got {num_active_loras}")
    return num_tokens, uniform, has_lora, num_active_loras


class _BatchDescriptorFields(NamedTuple):
    num_tokens: int
    num_reqs: int | None = None
    uniform: bool = False
    has_lora: bool = False
    num_active_loras: int = 0


_tuple_new = tuple.__new__


class BatchDescriptor(_BatchDescriptorFields):
    """The key of a captured graph. ``num_reqs=None`` means "any number of requests" (PIECEWISE
    graphs); ``uniform`` marks a uniform-decode batch. Immutable and hashable (a named tuple).

    Validated on construction (also through ``_make`` / ``_replace``): ``num_tokens`` and
    ``num_reqs`` non-negative ints (``num_reqs`` may be None), ``uniform`` and ``has_lora``
    bools (NumPy bools accepted), ``num_active_loras`` a non-negative int that is 0 unless
    ``has_lora``. Wrong types raise ``TypeError``, bad values ``ValueError``."""

    __slots__ = ()

    def __new__(cls, num_tokens: int, num_reqs: int | None = None, uniform: bool = False,
                has_lora: bool = False, num_active_loras: int = 0) -> BatchDescriptor:
        num_tokens, uniform, has_lora, num_active_loras = _batch_args(num_tokens, uniform, has_lora,
                                                                      num_active_loras, "uniform")
        if num_reqs is not None and (type(num_reqs) is not int or num_reqs < 0):
            num_reqs = check_int(num_reqs, "num_reqs", 0)
        if num_reqs is not None and num_reqs > num_tokens:
            raise ValueError(f"num_reqs must be at most num_tokens ({num_tokens}): every request has a token, "
                             f"got {num_reqs}")
        return _tuple_new(cls, (num_tokens, num_reqs, uniform, has_lora, num_active_loras))

    @classmethod
    def _make(cls, iterable: Iterable[Any]) -> BatchDescriptor:  # type: ignore[override]
        return cls(*iterable)

    def relax_for_mixed_batch_cudagraphs(self) -> BatchDescriptor:
        """The same batch with ``num_reqs=None, uniform=False`` (the PIECEWISE key)."""
        return _tuple_new(BatchDescriptor, (self[0], None, False, self[3], self[4]))


def _bd(num_tokens: int, num_reqs: int | None = None, uniform: bool = False, has_lora: bool = False,
        num_active_loras: int = 0) -> BatchDescriptor:
    """A BatchDescriptor from values already validated (the dispatcher's internal path)."""
    return _tuple_new(BatchDescriptor, (num_tokens, num_reqs, uniform, has_lora, num_active_loras))


def _check_sizes(sizes: Any, name: str) -> list[int]:
    """Positive ints, de-duplicated and sorted; may be empty."""
    return sorted(set(check_ints(sizes, name, 1)))


def default_capture_sizes(max_size: int) -> list[int]:
    """vLLM's default capture sizes up to ``max_size`` (a positive int): 1, 2, 4, then every 8
    below 256, then every 16 from 256, and ``max_size`` itself, so the named maximum is always
    a capture size (``default_capture_sizes(42)`` ends ``..., 40, 42``)."""
    max_size = check_int(max_size, "max_size", 1)
    sizes = [s for s in (1, 2, 4) if s <= max_size]
    sizes += range(8, min(max_size + 1, 256), 8)
    sizes += range(256, max_size + 1, 16)
    sizes.append(max_size)
    return sorted(set(sizes))


def padding_table(capture_sizes: Iterable[int], max_size: int | None = None) -> list[int]:
    """``table[n]`` is the capture size a batch of ``n`` tokens is padded to, for ``n`` in
    ``0..max_size``: exact sizes map to themselves, 0 to 0, others round up to the next size.

    ``capture_sizes``: an iterable of positive ints (a list, a NumPy array...), in any order,
    duplicates allowed; empty means graphs are disabled (the table is ``[0]``). ``max_size``
    defaults to the largest size and may not exceed it."""
    sizes = _check_sizes(capture_sizes, "capture_sizes")
    largest = sizes[-1] if sizes else 0
    top = largest if max_size is None else check_int(max_size, "max_size", 0)
    if top > largest:
        raise ValueError(f"max_size must be <= the largest capture size ({largest}): a batch of "
                         f"{top} tokens could not be padded; got {top}")
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
    ``max_loras + 1`` (the no-adapter slot counted in); only the latter without specialisation.
    ``max_loras`` is a non-negative int; 0 gives ``[]``."""
    max_loras = check_int(max_loras, "max_loras", 0)
    specialize = check_bool(specialize, "specialize")
    if max_loras == 0:
        return []
    if not specialize:
        return [max_loras + 1]
    counts, p = [], 1
    while p <= max_loras:
        counts.append(p)
        p *= 2
    counts.append(max_loras + 1)
    return sorted(set(counts))


def _check_modes(modes: Any, name: str) -> frozenset[CUDAGraphMode]:
    if (type(modes) is set or type(modes) is frozenset) and modes <= _RUNTIME_MODES:
        return modes if type(modes) is frozenset else frozenset(modes)  # enum members only: no int or bool
    if isinstance(modes, (CUDAGraphMode, int, str, bytes)) or is_bool(modes) or not hasattr(modes, "__iter__"):
        raise TypeError(f"{name} must be a collection of runtime modes (CUDAGraphMode or 0, 1, 2), "
                        f"got {describe(modes)}")
    return frozenset(as_cudagraph_mode(m, f"{name} element", runtime=True) for m in modes)


class CudagraphDispatcher:
    """Maps batches to captured CUDA graphs, as vLLM's ``CudagraphDispatcher`` does.

    ``capture_sizes`` (default: :func:`default_capture_sizes` of ``max_capture_size``, itself
    defaulting to ``min(2 * max_num_seqs, 512)``; the named maximum is then a capture size)
    are positive ints (NumPy arrays accepted), de-duplicated, filtered to
    ``<= max_capture_size`` and sorted. Graphs are disabled, as vLLM's config allows, with
    ``capture_sizes=[]`` or ``max_capture_size=0``: only ``CUDAGraphMode.NONE`` can then be
    initialised and every batch dispatches to NONE.

    Keys exist only after :meth:`initialize_cudagraph_keys`. :meth:`dispatch` is the hot path:
    results for valid batches up to the largest capture size are memoised, so a repeated batch
    costs a few type checks and one dict lookup. Not thread-safe for concurrent mutation
    (``add_cudagraph_key`` / ``initialize_cudagraph_keys``) and dispatch.
    """

    def __init__(self, capture_sizes: Iterable[int] | None = None, *, max_capture_size: int | None = None,
                 max_num_seqs: int = 256, max_loras: int = 0, specialize_lora: bool = True,
                 piecewise_supported: bool = True) -> None:
        max_num_seqs = check_int(max_num_seqs, "max_num_seqs", 1)
        max_loras = check_int(max_loras, "max_loras", 0)
        specialize_lora = check_bool(specialize_lora, "specialize_lora")
        piecewise_supported = check_bool(piecewise_supported, "piecewise_supported")
        if max_capture_size is not None:
            max_capture_size = check_int(max_capture_size, "max_capture_size", 0)
        if capture_sizes is None:
            top = max_capture_size if max_capture_size is not None else min(2 * max_num_seqs, 512)
            sizes = default_capture_sizes(top) if top > 0 else []
        else:
            sizes = _check_sizes(capture_sizes, "capture_sizes")
            if max_capture_size == 0:
                sizes = []  # graphs disabled
            elif max_capture_size is not None:
                kept = [s for s in sizes if s <= max_capture_size]
                if sizes and not kept:
                    raise ValueError(f"capture_sizes must have a size <= max_capture_size={max_capture_size}, "
                                     f"got {sizes}")
                sizes = kept
        self.capture_sizes: list[int] = sizes
        self.max_capture_size: int = sizes[-1] if sizes else 0
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
        # Only validated calls are stored, under exact int/bool keys; dispatch looks up only
        # calls whose arguments have exactly those types, so 5.0 or True cannot hit 5 or 1.
        self._memo: dict[tuple[int, bool, bool, int], tuple[CUDAGraphMode, BatchDescriptor]] = {}
        # The same results for the plain batch (not uniform, no LoRA), keyed by num_tokens alone:
        # dispatch(n) looks them up without building a key. Always cleared with _memo.
        self._memo_plain: dict[int, tuple[CUDAGraphMode, BatchDescriptor]] = {}

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
            return _bd(padded, min(padded // q, self.max_num_seqs), True, has_lora, num_active_loras)
        return _bd(padded, min(padded, self.max_num_seqs), False, has_lora, num_active_loras)

    def add_cudagraph_key(self, runtime_mode: CUDAGraphMode | int, batch_descriptor: BatchDescriptor) -> None:
        """Register ``batch_descriptor`` as captured for ``runtime_mode`` (PIECEWISE or FULL,
        or 1, 2). Idempotent.

        Raises ``TypeError`` for a mode or descriptor of the wrong type; ``ValueError`` for
        NONE or a pair mode, a descriptor whose ``num_tokens`` is not a capture size or a
        PIECEWISE key that is not relaxed (``num_reqs=None, uniform=False``), both of which
        :meth:`dispatch` could never return; :class:`LowlevelError` before
        :meth:`initialize_cudagraph_keys` (which replaces every key) or when the mode is NONE
        (dispatch then never looks keys up). Nothing changes when it raises."""
        mode = as_cudagraph_mode(runtime_mode, "runtime_mode", runtime=True)
        if mode is _NONE:
            raise ValueError("runtime_mode must be CUDAGraphMode.PIECEWISE or FULL (1 or 2), got NONE")
        if not isinstance(batch_descriptor, BatchDescriptor):
            raise TypeError(f"batch_descriptor must be a BatchDescriptor, got {describe(batch_descriptor)}")
        if not self.keys_initialized:
            raise LowlevelError("add_cudagraph_key before initialize_cudagraph_keys: the key would be "
                                "replaced by it; call initialize_cudagraph_keys(mode) first")
        if self.cudagraph_mode is _NONE:
            raise LowlevelError("add_cudagraph_key on a dispatcher initialised with CUDAGraphMode.NONE: "
                                "dispatch never uses keys in that mode")
        n = batch_descriptor.num_tokens
        if n not in self.capture_sizes:
            raise ValueError(f"batch_descriptor.num_tokens must be one of the capture sizes "
                             f"{self.capture_sizes} (dispatch pads every batch to one), got {n}")
        if mode is _PIECEWISE and (batch_descriptor.num_reqs is not None or batch_descriptor.uniform):
            raise ValueError(f"a PIECEWISE batch_descriptor must be relaxed (num_reqs=None, uniform=False), "
                             f"got {batch_descriptor}")
        self.cudagraph_keys[mode].add(batch_descriptor)
        self._memo.clear()
        self._memo_plain.clear()

    def initialize_cudagraph_keys(self, cudagraph_mode: CUDAGraphMode | int,
                                  uniform_decode_query_len: int = 1) -> None:
        """Build the keys for ``cudagraph_mode`` (any mode, or a runtime mode's int), replacing
        any earlier ones.

        Mixed keys: every capture size x LoRA case, relaxed when the mixed mode is PIECEWISE.
        Decode keys (pair modes with FULL decode): capture sizes in ``[q, q * max_num_seqs]``,
        uniform. With ``q = uniform_decode_query_len > 1`` (spec decode), every mode but NONE
        requires the capture sizes in ``[q, q * max_num_seqs]`` (those a uniform-decode batch
        pads to) to be multiples of ``q``; ``ValueError`` otherwise, listing them. Also
        ``ValueError`` for a piecewise mode with ``piecewise_supported=False`` and for any mode
        but NONE when graphs are disabled. Nothing changes when it raises."""
        mode = as_cudagraph_mode(cudagraph_mode, "cudagraph_mode")
        q = check_int(uniform_decode_query_len, "uniform_decode_query_len", 1)
        if mode is not _NONE:
            if mode.requires_piecewise_compilation() and not self.piecewise_supported:
                raise ValueError(f"cudagraph_mode {mode} needs piecewise graphs, but piecewise_supported=False")
            if not self.capture_sizes:
                raise ValueError(f"cudagraph_mode must be NONE when graphs are disabled (no capture sizes), "
                                 f"got {mode}")
            if q > 1:
                bad = [x for x in self.capture_sizes if q <= x <= q * self.max_num_seqs and x % q]
                if bad:
                    raise ValueError(
                        f"capture sizes that uniform-decode batches pad to (between q and q * max_num_seqs) "
                        f"must be multiples of the query length q=uniform_decode_query_len={q}; these are "
                        f"not: {bad}")
        decode_sizes: list[int] = []
        if mode.separate_routine() and mode.decode_mode() is _FULL:
            decode_sizes = [x for x in self.capture_sizes if q <= x <= q * self.max_num_seqs]
        self.cudagraph_mode = mode
        self.uniform_decode_query_len = q
        self.cudagraph_keys = {_PIECEWISE: set(), _FULL: set()}
        self._memo.clear()
        self._memo_plain.clear()
        self._table = padding_table(self.capture_sizes)
        if mode is _NONE:
            self.keys_initialized = True
            return
        cases = self._lora_cases()
        self._lora_counts = [c for c in cases if c > 0]
        mixed = mode.mixed_mode()
        if mixed is not _NONE:
            for x in self.capture_sizes:
                for c in cases:
                    d = self._padded(x, False, c > 0, c)
                    if mixed is _PIECEWISE:
                        d = d.relax_for_mixed_batch_cudagraphs()
                    self.cudagraph_keys[mixed].add(d)
        for x in decode_sizes:
            for c in cases:
                self.cudagraph_keys[_FULL].add(self._padded(x, True, c > 0, c))
        self.keys_initialized = True

    # --- dispatch -----------------------------------------------------------------------------
    def dispatch(self, num_tokens: int, uniform_decode: bool = False, has_lora: bool = False,
                 num_active_loras: int = 0, valid_modes: Iterable[CUDAGraphMode | int] | None = None,
                 invalid_modes: Iterable[CUDAGraphMode | int] | None = None,
                 ) -> tuple[CUDAGraphMode, BatchDescriptor]:
        """``(mode, descriptor)`` for a batch of ``num_tokens``: FULL if the exact padded batch
        has a FULL key, else PIECEWISE if the relaxed one has a PIECEWISE key, else NONE with
        the unpadded batch. Batches above the largest capture size always get NONE.

        ``num_tokens``, ``num_active_loras``: non-negative ints (NumPy ints accepted, never
        bool); ``num_active_loras`` must be 0 unless ``has_lora``. ``uniform_decode``,
        ``has_lora``: bools (NumPy bools accepted).
        ``has_lora`` requires ``max_loras > 0`` and ``num_active_loras <= max_loras + 1`` (the
        adapters plus the no-adapter slot, the largest captured count), else ``ValueError``.
        ``valid_modes`` / ``invalid_modes``: collections of runtime modes (or their ints); what
        they leave must not be empty, and when they exclude NONE a batch that would get NONE
        (no graph for it, above the largest capture size, keys not initialised) raises
        ``ValueError``. ``TypeError`` / ``ValueError`` naming the argument,
        checked on every call (a memo hit requires exactly-typed arguments that were valid)."""
        # Memo hits, checks first: the plain batch (the defaults; ``is _ZERO`` holds only for
        # the int 0) is one lookup by num_tokens, other exactly-typed batches one by the key.
        if type(num_tokens) is int and valid_modes is None and invalid_modes is None:
            if uniform_decode is False and has_lora is False and num_active_loras is _ZERO:
                hit = self._memo_plain.get(num_tokens)
                if hit is not None:
                    return hit
            elif ((uniform_decode is False or uniform_decode is True) and (has_lora is False or has_lora is True)
                  and type(num_active_loras) is int):
                hit = self._memo.get((num_tokens, uniform_decode, has_lora, num_active_loras))
                if hit is not None:
                    return hit
        return self._dispatch_checked(num_tokens, uniform_decode, has_lora, num_active_loras,
                                      valid_modes, invalid_modes)

    def _dispatch_checked(self, num_tokens: Any, uniform_decode: Any, has_lora: Any, num_active_loras: Any,
                          valid_modes: Any, invalid_modes: Any) -> tuple[CUDAGraphMode, BatchDescriptor]:
        num_tokens, uniform_decode, has_lora, num_active_loras = _batch_args(
            num_tokens, uniform_decode, has_lora, num_active_loras, "uniform_decode")
        if has_lora and (self.max_loras == 0 or num_active_loras > self.max_loras + 1):
            if self.max_loras == 0:
                raise ValueError("has_lora must be False on a dispatcher made with max_loras=0 (no LoRA graphs), "
                                 "got True")
            raise ValueError(f"num_active_loras must be at most max_loras + 1 = {self.max_loras + 1} (the adapters "
                             f"plus the no-adapter slot), got {num_active_loras}")
        if valid_modes is None and invalid_modes is None:
            allowed = _RUNTIME_MODES
        else:
            valid = _RUNTIME_MODES if valid_modes is None else _check_modes(valid_modes, "valid_modes")
            invalid = frozenset() if invalid_modes is None else _check_modes(invalid_modes, "invalid_modes")
            allowed = valid - invalid
            if not allowed:
                raise ValueError("valid_modes minus invalid_modes must leave a mode to dispatch to, got none")
        if (not self.keys_initialized or self.cudagraph_mode is _NONE or num_tokens > self.max_capture_size
                or allowed <= {_NONE}):
            if _NONE not in allowed:
                raise ValueError(f"valid_modes/invalid_modes exclude NONE, but a batch of {num_tokens} tokens has "
                                 f"no graph (keys initialised: {self.keys_initialized}, mode "
                                 f"{self.cudagraph_mode.name}, largest capture size {self.max_capture_size})")
            return _NONE, _bd(num_tokens)
        result = self._dispatch(num_tokens, uniform_decode, has_lora, num_active_loras, allowed)
        if allowed is _RUNTIME_MODES and num_active_loras <= self.max_loras + 1:
            self._memo[(num_tokens, uniform_decode, has_lora, num_active_loras)] = result
            if not (uniform_decode or has_lora):  # num_active_loras is 0 (checked above)
                self._memo_plain[num_tokens] = result
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
        uniform = uniform_decode and self.cudagraph_mode.separate_routine()
        desc = self._padded(num_tokens, uniform, has_lora, num_active_loras)
        if _FULL in allowed and desc in self.cudagraph_keys[_FULL]:
            return _FULL, desc
        if _PIECEWISE in allowed:
            relaxed = desc.relax_for_mixed_batch_cudagraphs()
            if relaxed in self.cudagraph_keys[_PIECEWISE]:
                return _PIECEWISE, relaxed
        if _NONE not in allowed:
            raise ValueError(f"valid_modes/invalid_modes exclude NONE, but there is no graph for {desc}")
        return _NONE, _bd(num_tokens)

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
