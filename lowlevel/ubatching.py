"""Microbatch overlap (dual-batch overlap) from inside a microbatch: vLLM's ``dbo_*`` helpers.

Microbatches take turns on a compute stream and a communication stream, so that one
microbatch's communication runs under another's compute. Model code marks its switch points
with the helpers below; each acts on the microbatch context of the calling thread (see
:mod:`lowlevel.ubatch_ring`) and does nothing outside a microbatch thread, so the same model
code runs unchanged without microbatching. The generator runtime (:mod:`lowlevel.ubatch_generators`)
marks the same points with yielded markers; :func:`thread_fn_from_generator` lets one body
serve both runtimes.
"""
from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from .errors import describe
from .ubatch_generators import TO_COMM, TO_COMPUTE, YIELD
from .ubatch_ring import any_ubatch_active, current_ubatch_context

__all__ = [
    "dbo_enabled", "dbo_current_ubatch_id", "dbo_yield", "dbo_yield_and_switch_from_compute_to_comm",
    "dbo_yield_and_switch_from_comm_to_compute", "dbo_switch_to_comm", "dbo_switch_to_compute",
    "dbo_switch_to_comm_sync", "dbo_switch_to_compute_sync", "dbo_register_recv_hook", "dbo_maybe_run_recv_hook",
    "thread_fn_from_generator",
]


def dbo_enabled() -> bool:
    """True while any microbatch thread is running."""
    return any_ubatch_active()


def dbo_current_ubatch_id() -> int:
    """The calling microbatch's id; 0 outside a microbatch thread."""
    c = current_ubatch_context()
    return 0 if c is None else c.id


def dbo_yield() -> None:
    """:meth:`UBatchContext.yield_` of the calling microbatch: let the next microbatch run
    Python, resume on the same stream. Nothing outside a microbatch thread."""
    c = current_ubatch_context()
    if c is not None:
        c.yield_()


def dbo_yield_and_switch_from_compute_to_comm() -> None:
    """:meth:`UBatchContext.yield_and_switch_from_compute_to_comm` of the calling microbatch:
    record its compute work, let the next microbatch run, continue on the comm stream after
    that work. Nothing outside a microbatch thread."""
    c = current_ubatch_context()
    if c is not None:
        c.yield_and_switch_from_compute_to_comm()


def dbo_yield_and_switch_from_comm_to_compute() -> None:
    """:meth:`UBatchContext.yield_and_switch_from_comm_to_compute` of the calling microbatch:
    record its comm work, let the next microbatch run, continue on the compute stream after
    that work. Nothing outside a microbatch thread."""
    c = current_ubatch_context()
    if c is not None:
        c.yield_and_switch_from_comm_to_compute()


def dbo_switch_to_comm() -> None:
    """:meth:`UBatchContext.switch_to_comm`: continue on the comm stream, not ordered against
    compute, no CPU yield. Nothing outside a microbatch thread."""
    c = current_ubatch_context()
    if c is not None:
        c.switch_to_comm()


def dbo_switch_to_compute() -> None:
    """:meth:`UBatchContext.switch_to_compute`: continue on the compute stream, not ordered
    against comm, no CPU yield. Nothing outside a microbatch thread."""
    c = current_ubatch_context()
    if c is not None:
        c.switch_to_compute()


def dbo_switch_to_comm_sync() -> None:
    """:meth:`UBatchContext.switch_to_comm_sync`: continue on the comm stream after this
    microbatch's compute work, no CPU yield. Nothing outside a microbatch thread."""
    c = current_ubatch_context()
    if c is not None:
        c.switch_to_comm_sync()


def dbo_switch_to_compute_sync() -> None:
    """:meth:`UBatchContext.switch_to_compute_sync`: continue on the compute stream after this
    microbatch's comm work, no CPU yield. Nothing outside a microbatch thread."""
    c = current_ubatch_context()
    if c is not None:
        c.switch_to_compute_sync()


def dbo_register_recv_hook(hook: Callable[[], Any]) -> None:
    """Hand ``hook`` to the next microbatch, which runs it at its next
    :func:`dbo_maybe_run_recv_hook` (or when it finishes). Nothing outside a microbatch thread."""
    if not callable(hook):
        raise TypeError(f"hook must be callable, got {describe(hook)}")
    c = current_ubatch_context()
    if c is not None:
        c.register_recv_hook(hook)


def dbo_maybe_run_recv_hook() -> None:
    """Run the hook the previous microbatch handed to this one, if any. Nothing outside a
    microbatch thread."""
    c = current_ubatch_context()
    if c is not None:
        c.maybe_run_recv_hook()


_ACTIONS: dict[str, Callable[[], None]] = {
    TO_COMM: dbo_yield_and_switch_from_compute_to_comm,
    TO_COMPUTE: dbo_yield_and_switch_from_comm_to_compute,
    YIELD: dbo_yield,
}


def thread_fn_from_generator(gen_fn: Callable[..., Generator[str, None, Any]]) -> Callable[..., Any]:
    """Turn a generator-style microbatch (yielding TO_COMM / TO_COMPUTE / YIELD) into a
    thread-style one that calls the matching ``dbo_*`` helper at each marker, so one body serves
    both runtimes (and, run outside a microbatch thread, runs sequentially on one stream).
    A marker that is none of the three raises ``ValueError``."""
    if not callable(gen_fn):
        raise TypeError(f"gen_fn must be a generator function, got {type(gen_fn).__name__}")

    def run(*args: Any) -> Any:
        g = gen_fn(*args)
        if not hasattr(g, "__next__"):
            raise TypeError(f"gen_fn must return a generator (a function with yield), returned {describe(g)}")
        try:
            while True:
                marker = next(g)
                act = _ACTIONS.get(marker)
                if act is None:
                    raise ValueError(f"microbatch yielded {marker!r}; expected TO_COMM, TO_COMPUTE or YIELD")
                act()
        except StopIteration as stop:
            return stop.value
    return run
