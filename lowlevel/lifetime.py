"""Keep memory made on one stream valid while another stream still uses it.

An event join orders *execution*; it does not tell a caching allocator that a second stream
reads a block. Once Python drops the last reference, the allocator may hand the block to a new
allocation on the producing stream while the consumer has not read it yet.

* torch tensors: ``Tensor.record_stream(consumer)``, torch's own answer.
* CuPy arrays: CuPy has no ``record_stream``. :class:`KeepAlive` holds a reference; once the
  caller has dropped theirs, it records an event on the consumer stream (covering every read
  enqueued up to then) and lets go only when that event has completed.

Both are skipped while the consumer stream is being captured into a CUDA graph: graph-pool
memory is owned by the graph, not recycled per stream.
"""
from __future__ import annotations

import sys
import threading
from typing import Any, Iterator

from ._runtime import cp as _cp

__all__ = ["KeepAlive", "iter_arrays", "protect_outputs"]


def iter_arrays(obj: Any, _depth: int = 0) -> Iterator[Any]:
    """Yield the torch tensors and CuPy arrays in ``obj`` (nested tuples, lists and dict values)."""
    if _depth > 16 or obj is None:
        return
    cls = type(obj)
    if cls in (tuple, list):
        for x in obj:
            yield from iter_arrays(x, _depth + 1)
    elif cls is dict:
        for x in obj.values():
            yield from iter_arrays(x, _depth + 1)
    elif _cp is not None and isinstance(obj, _cp.ndarray):
        yield obj
    elif cls.__module__.startswith("torch") and hasattr(obj, "record_stream"):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from iter_arrays(x, _depth + 1)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from iter_arrays(x, _depth + 1)


class KeepAlive:
    """References to CuPy arrays that must outlive the consumer stream's reads of them.

    Thread-safe. :meth:`collect` (called on every :meth:`keep`, or by hand) releases what is
    safe to release; :meth:`pending` says how many arrays are held."""

    def __init__(self) -> None:
        self._items: list[list[Any]] = []  # [array, consumer handle, release event or None]
        self._lock = threading.Lock()

    def keep(self, array: Any, consumer: int) -> None:
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


def protect_outputs(result: Any, consumer: int, consumer_torch: Any) -> None:
    """Make the arrays in ``result`` safe to use on the ``consumer`` stream after their producer
    stream recycles memory: ``record_stream`` for torch, :class:`KeepAlive` for CuPy.
    ``consumer_torch`` is a zero-argument callable returning the consumer's torch stream."""
    tstream = None
    for arr in iter_arrays(result):
        if _cp is not None and isinstance(arr, _cp.ndarray):
            default_keep_alive.keep(arr, consumer)
        elif getattr(arr, "is_cuda", False):
            if tstream is None:
                tstream = consumer_torch()
            arr.record_stream(tstream)
