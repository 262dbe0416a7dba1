"""The generator runtime of microbatch overlap: no threads, one generator per microbatch.

Each microbatch is a generator that yields :data:`TO_COMM`, :data:`TO_COMPUTE` or
:data:`YIELD` at its switch points; :func:`run_generators` steps them in turn on the calling
thread. Ordering at a switch is the thread runtime's (see :mod:`lowlevel.ubatch_ring`): the
stream a microbatch leaves records an event, and the stream it continues on waits on it.
"""
from __future__ import annotations

from collections.abc import Generator, Iterable
from typing import Any

from . import _runtime as rt
from .errors import check_int, describe
from .event import Event
from .stream import Stream, StreamLike, adopt_arg

__all__ = ["TO_COMM", "TO_COMPUTE", "YIELD", "run_generators"]

TO_COMM = "to_comm"
"""Yielded at a switch point: continue on the comm stream after this microbatch's compute work."""
TO_COMPUTE = "to_compute"
"""Yielded at a switch point: continue on the compute stream after this microbatch's comm work."""
YIELD = "yield"
"""Yielded at a switch point: let the next microbatch run; continue on the same stream."""


def run_generators(gens: Iterable[Generator[str, None, Any]], compute_stream: StreamLike,
                   comm_stream: StreamLike, *, stage_offset: int = 1) -> list[Any]:
    """Step microbatch generators in turn on the calling thread; return their return values.

    A generator yields :data:`TO_COMM`, :data:`TO_COMPUTE` or :data:`YIELD` at a switch point.
    Microbatch ``i`` starts once microbatch 0 has taken ``i * stage_offset`` steps; then they
    take one step each in turn. Streams and events are as in the thread runtime; the calling
    thread's current streams are restored at the end, and the comm stream is joined into the
    compute stream. An exception in one generator closes the others and propagates."""
    check_int(stage_offset, "stage_offset", 0)
    if isinstance(gens, (str, bytes)) or not hasattr(gens, "__iter__"):
        raise TypeError(f"gens must be an iterable of generators, got {describe(gens)}")
    gs = list(gens)
    for i, g in enumerate(gs):
        if not (hasattr(g, "__next__") and hasattr(g, "close")):
            raise TypeError(f"gens[{i}] must be a generator (call the generator function), got {describe(g)}")
    n = len(gs)
    compute, comm = adopt_arg(compute_stream, "compute_stream"), adopt_arg(comm_stream, "comm_stream")
    on: list[Stream] = [compute] * n
    pending: list[Event | None] = [None] * n  # event the microbatch's stream must wait on at resume
    done_ev = [(Event(), Event()) for _ in range(n)]  # (compute done, comm done)
    results: list[Any] = [None] * n
    finished = [False] * n
    started = [False] * n
    steps = [0] * n  # steps each microbatch has taken
    prev = rt.save()
    try:
        while not all(finished):
            for i in range(n):
                if finished[i]:
                    continue
                if not started[i]:
                    if i and steps[0] < i * stage_offset and not finished[0]:
                        continue
                    started[i] = True
                s = on[i]
                rt.make_current(s)
                if pending[i] is not None:
                    pending[i].wait(s)  # type: ignore[union-attr]
                    pending[i] = None
                tl = rt.tracer
                try:
                    if tl is None:
                        marker = next(gs[i])
                    else:
                        with tl.span(f"ub{i}.{steps[i]}", s):
                            marker = next(gs[i])
                    steps[i] += 1
                except StopIteration as stop:
                    results[i] = stop.value
                    finished[i] = True
                    continue
                if marker == TO_COMM:
                    pending[i] = done_ev[i][0].record(compute)
                    on[i] = comm
                elif marker == TO_COMPUTE:
                    pending[i] = done_ev[i][1].record(comm)
                    on[i] = compute
                elif marker != YIELD:
                    raise ValueError(f"microbatch {i} yielded {marker!r}; expected TO_COMM, TO_COMPUTE or YIELD")
    except BaseException:
        for g in gs:
            g.close()
        raise
    finally:
        rt.restore(prev)
        rt.order(comm.ptr, compute.ptr)
    return results
