"""Keep memory made on one stream valid while another stream still uses it.

An event join orders *execution*; it does not tell a caching allocator that a second stream
reads a block. Once Python drops the last reference, the allocator may hand the block to a new
allocation on the producing stream while the consumer has not read it yet.

* torch tensors: ``Tensor.record_stream(consumer)``, torch's own answer.
* CuPy arrays: CuPy has no ``record_stream``. :class:`KeepAlive` holds a reference; once the
  caller has dropped theirs, it records an event on the consumer stream (covering every read
  enqueued up to then) and lets go only when that event has completed.

Results are walked as a pytree (see :func:`iter_arrays` for what is and is not walked), so an
output inside a dataclass, a named tuple, a dict or a plain object is protected like one in a
tuple. Both are skipped while the consumer stream is being captured into a CUDA graph: graph-pool
memory is owned by the graph, not recycled per stream.
"""
from __future__ import annotations

import collections
import collections.abc
import dataclasses
import sys
import threading
import types
from collections.abc import Iterable
from typing import Any

from . import _runtime as rt
from ._runtime import cp as _cp
from .errors import describe

__all__ = ["KeepAlive", "iter_arrays", "protect_outputs"]

# Values that never hold device arrays: the walk stops at once.
_ATOMS = frozenset({type(None), bool, int, float, complex, str, bytes, bytearray, range, slice,
                    type(Ellipsis), type(NotImplemented)})
# Objects of these libraries are leaves unless they are arrays or sequences (torch.return_types);
# walking e.g. a torch.nn.Module would record_stream every parameter on every call.
_OPAQUE_MODULES = ("torch", "cupy", "numpy", "triton", "lowlevel", "builtins", "functools", "threading",
                   "collections", "enum", "types", "typing")
_OPAQUE_TYPES = (type, types.ModuleType, types.FunctionType, types.MethodType, types.BuiltinFunctionType,
                 types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType, types.CodeType,
                 types.FrameType)
_MAX_DEPTH = 64


def _torch_tensor_type() -> Any:
    torch = sys.modules.get("torch")  # no tensor can exist before torch is imported
    return None if torch is None else torch.Tensor


def _pytree_nodes() -> dict[Any, Any]:
    pt = sys.modules.get("torch.utils._pytree")
    return {} if pt is None else pt.SUPPORTED_NODES


def iter_arrays(obj: Any) -> Iterable[Any]:
    """The torch tensors and CuPy arrays in ``obj``, each once (by identity), depth first in
    container order. Returns ``()`` for None and ``(obj,)`` for a bare array without walking.

    What is walked (a pytree, extended):

    * tuples and lists, named tuples and ``torch.return_types`` included; sets, frozensets,
      deques; the *values* of dicts and other mappings (keys are not walked);
    * any type registered with torch's pytree (``torch.utils._pytree.register_pytree_node`` /
      ``register_dataclass``), through its flatten function;
    * dataclass instances, through all their fields (``dataclasses.fields``);
    * other objects of user classes: the values of their ``__dict__`` and their ``__slots__``.

    What is not: objects of torch, CuPy, NumPy, Triton, lowlevel and the standard library that
    are not arrays or containers (so a returned ``torch.nn.Module``'s parameters, owned by the
    module, are not touched), classes, modules, functions (closures included), generators,
    NumPy arrays (host memory), and anything nested more than 64 levels deep. Cycles are
    visited once. How a class is walked is decided once per class and cached."""
    if obj is None:
        return ()
    cls = type(obj)
    plan = _PLANS.get(cls)
    if plan is _ATOM:
        return ()
    if plan is _ARRAY:
        return (obj,)
    out: list[Any] = []
    _walk(obj, out, set(), 0, _pytree_nodes())
    return out


# How each class is walked, decided once per class.
_ATOM, _ARRAY, _SEQ, _MAP, _OPAQUE = "atom", "array", "seq", "map", "opaque"
_PLANS: dict[type, Any] = {t: _ATOM for t in _ATOMS}


def _plan(cls: type) -> Any:
    tensor = _torch_tensor_type()
    if (tensor is not None and issubclass(cls, tensor)) or (_cp is not None and issubclass(cls, _cp.ndarray)):
        plan: Any = _ARRAY
    elif issubclass(cls, (tuple, list, set, frozenset, collections.deque)):
        plan = _SEQ
    elif issubclass(cls, dict) or issubclass(cls, collections.abc.Mapping):
        plan = _MAP
    elif issubclass(cls, _OPAQUE_TYPES) or cls.__module__.partition(".")[0] in _OPAQUE_MODULES:
        plan = _OPAQUE
    elif dataclasses.is_dataclass(cls):
        plan = ("fields", tuple(f.name for f in dataclasses.fields(cls)))
    else:
        slots = []
        for klass in cls.__mro__:
            names = klass.__dict__.get("__slots__", ())
            names = (names,) if isinstance(names, str) else names
            slots += [n for n in names if n not in ("__dict__", "__weakref__")]
        plan = ("attrs", tuple(slots))
    if len(_PLANS) > 4096:  # classes made on the fly: keep the cache bounded
        _PLANS.clear()
        _PLANS.update({t: _ATOM for t in _ATOMS})
    _PLANS[cls] = plan
    return plan


def _walk(obj: Any, out: list[Any], seen: set[int], depth: int, nodes: dict[Any, Any]) -> None:
    cls = type(obj)
    plan = _PLANS.get(cls)
    if plan is None:
        plan = _plan(cls)
    if plan is _ATOM:
        return
    if plan is _ARRAY:
        if id(obj) not in seen:
            seen.add(id(obj))
            out.append(obj)
        return
    if depth >= _MAX_DEPTH or id(obj) in seen:
        return
    seen.add(id(obj))
    depth += 1
    if plan is _SEQ:
        children: Iterable[Any] = obj
    elif plan is _MAP:
        children = obj.values()
    elif cls in nodes:  # registered with torch's pytree (possibly after the plan was made)
        children = nodes[cls].flatten_fn(obj)[0]
    elif plan is _OPAQUE:
        return
    elif plan[0] == "fields":
        children = [getattr(obj, name, None) for name in plan[1]]
    else:
        children = list(getattr(obj, "__dict__", {}).values())
        for name in plan[1]:
            try:
                children.append(getattr(obj, name))
            except AttributeError:  # an unset slot
                pass
    for child in children:
        _walk(child, out, seen, depth, nodes)


class KeepAlive:
    """References to CuPy arrays that must outlive the consumer stream's reads of them.

    Thread-safe. :meth:`collect` (called on every :meth:`keep`, or by hand) releases what is
    safe to release; :meth:`pending` says how many arrays are held."""

    def __init__(self) -> None:
        self._items: list[list[Any]] = []  # [array, consumer handle, release event or None]
        self._lock = threading.Lock()

    def keep(self, array: Any, consumer: int) -> None:
        """Hold ``array`` until it has no other user and the work enqueued on ``consumer`` (a
        raw stream handle: a non-negative int, NumPy ints accepted, or a stream object) by
        then has completed. ``TypeError`` / ``ValueError`` for another ``consumer``, before
        anything is held."""
        if type(consumer) is not int or consumer < 0:
            consumer = _consumer_handle(consumer)
        with self._lock:
            self._items.append([array, consumer, None])
        self.collect()

    def pending(self) -> int:
        return len(self._items)

    def collect(self) -> int:
        """Release arrays whose last user is gone and whose consumer reads have completed."""
        released = 0
        with self._lock:
            keep = []
            for item in self._items:
                arr, consumer, ev = item
                if ev is None:
                    # 3 = our list + the local `arr` + getrefcount's argument: nobody else holds it
                    if sys.getrefcount(arr) <= 3:
                        ev = _cp.cuda.Event(disable_timing=True)
                        _cp.cuda.runtime.eventRecord(ev.ptr, consumer)
                        item[2] = ev
                    keep.append(item)
                elif ev.done:
                    released += 1
                else:
                    keep.append(item)
                del arr
            self._items = keep
        return released


default_keep_alive = KeepAlive()


def _consumer_handle(consumer: Any) -> int:
    """``consumer`` as a raw stream handle, or ``TypeError`` / ``ValueError`` naming it."""
    if consumer is None:
        raise TypeError("consumer must be a CUDA stream handle (a non-negative int) or a stream, got None")
    try:
        return rt.stream_handle(consumer)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"consumer must be a CUDA stream handle (a non-negative int) or a stream ({exc}), "
                        f"got {describe(consumer)}") from None


def protect_outputs(result: Any, consumer: int, consumer_torch: Any) -> None:
    """Make the arrays in ``result`` (found by :func:`iter_arrays`: containers, dataclasses,
    named tuples, pytree nodes, user objects) safe to use on the ``consumer`` stream after
    their producer stream recycles memory: ``record_stream`` for CUDA tensors,
    :class:`KeepAlive` for CuPy arrays.
    ``consumer`` is the consumer's raw stream handle (a non-negative int; NumPy ints and stream
    objects accepted), ``consumer_torch`` a zero-argument callable returning its torch stream;
    ``TypeError`` / ``ValueError`` naming them, before anything is held or recorded."""
    if type(consumer) is not int or consumer < 0:
        consumer = _consumer_handle(consumer)
    if not callable(consumer_torch):
        raise TypeError(f"consumer_torch must be a zero-argument callable returning the consumer's torch stream, "
                        f"got {describe(consumer_torch)}")
    protect_arrays(iter_arrays(result), consumer, consumer_torch)


def protect_arrays(arrays: Iterable[Any], consumer: int, consumer_torch: Any) -> None:
    """:func:`protect_outputs` for arrays already found by :func:`iter_arrays` (no second walk)."""
    tstream = None
    for arr in arrays:
        if _cp is not None and isinstance(arr, _cp.ndarray):
            default_keep_alive.keep(arr, consumer)
        elif getattr(arr, "is_cuda", False):
            if tstream is None:
                tstream = consumer_torch()
            arr.record_stream(tstream)
