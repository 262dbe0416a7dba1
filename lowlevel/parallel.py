"""Fork work onto auxiliary streams and join it back: vLLM's semantics, faster and safer.

Ordering contract of the parallel path of :func:`execute_in_parallel`:

1. ``start_event`` is recorded on the current stream C (it captures everything enqueued on C
   before the call);
2. each launched aux stream A_i waits on ``start_event``, runs ``aux_fns[i]`` with A_i current
   for CuPy, torch and Triton, and records ``done_events[i]``;
3. ``default_fn`` runs on C, after the aux launches (or right after step 1 with
   ``enqueue_default_first=True``); it is *not* ordered against the aux work;
4. C waits on every recorded done event, so work enqueued on C after the call sees all of it.

Beyond vLLM: an exception in any fn joins every forked stream back into C and restores the
current streams before it propagates; torch tensors and CuPy arrays returned by aux fns stay
valid on C after their Python references are dropped (skipped under graph capture).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from . import _runtime as rt
from .errors import check_bool, check_int, describe
from .event import Event, EventLike, record_event, wait_event
from .event import event_ops as _ops_for
from .lifetime import iter_arrays, protect_arrays
from .stream import Stream, StreamLike, adopt, adopt_arg

__all__ = ["execute_in_parallel", "maybe_execute_in_parallel", "ParallelRunner"]


def _rec(ev: Any, handle: int) -> None:
    if type(ev) is Event:
        rt.event_record(ev.ptr, handle)
    else:
        record_event(ev, handle)


def _wait(ev: Any, handle: int) -> None:
    if type(ev) is Event:
        rt.stream_wait_event(handle, ev.ptr, 0)
    else:
        wait_event(ev, handle)


def _spanned(tl: Any, name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with tl.span(name):
            return fn()
    return run


def _protect(results: Any, cur: int) -> None:
    if results is None:
        return
    arrays = iter_arrays(results)  # one walk: the arrays found are the ones protected
    if arrays and not rt.is_capturing(cur):
        protect_arrays(arrays, cur, lambda: adopt(cur).torch)


def execute_in_parallel(
    default_fn: Callable[[], Any],
    aux_fns: Sequence[Callable[[], Any] | None],
    start_event: EventLike | None,
    done_events: Sequence[EventLike | None],
    aux_streams: Sequence[StreamLike] | None = None,
    enable: bool = False,
    *,
    enqueue_default_first: bool = False,
) -> tuple[Any, list[Any]]:
    """Run ``default_fn`` on the current stream and each ``aux_fns[i]`` on ``aux_streams[i]``.

    Returns ``(default_result, aux_results)``; ``aux_results[i]`` is None for a None slot.

    Sequential fallback when ``aux_streams is None`` or ``enable`` is false: ``default_fn``
    first, then the non-None aux fns in slot order, all on the current stream; events and
    streams are not touched or validated. The parallel path follows the module's ordering
    contract; a None slot gets no stream switch and no record. Events and streams may be
    lowlevel, CuPy or torch objects.

    Raises, before anything is enqueued or made current: ``TypeError`` when ``default_fn`` or a
    non-None slot of ``aux_fns`` is not callable, or ``aux_fns`` is not a sequence; on the
    parallel path also ``ValueError`` when the lengths of ``aux_fns``, ``aux_streams`` and
    ``done_events`` differ or a launched slot has no done event, ``TypeError`` when
    ``start_event`` is None or a stream or event is of no kind lowlevel knows.
    """
    if enable is not True and enable is not False:
        enable = check_bool(enable, "enable")
    if enqueue_default_first is not False and enqueue_default_first is not True:
        enqueue_default_first = check_bool(enqueue_default_first, "enqueue_default_first")
    if aux_streams is None or not enable:
        _check_fns(default_fn, aux_fns)
        d = default_fn()
        return d, [None if fn is None else fn() for fn in aux_fns]
    # The common case (lists or tuples of one length, callables, lowlevel Events and Streams,
    # no active Timeline) passes in one allocation-free pass of type comparisons: this is the
    # hot path, and one launched slot has a straight-line fork/join of its own. Anything else
    # goes through the full checks, which name what is wrong or accept foreign events and streams.
    t, de, st = type(aux_fns), type(done_events), type(aux_streams)
    if ((t is list or t is tuple) and (de is list or de is tuple) and (st is list or st is tuple)
            and type(start_event) is Event and callable(default_fn) and rt.tracer is None):
        n = len(aux_fns)
        if len(done_events) == n and len(aux_streams) == n:
            fn = aux_fns[0] if n == 1 else None
            if fn is not None:
                d, s = done_events[0], aux_streams[0]
                if callable(fn) and type(d) is Event and type(s) is Stream:
                    return _fork_join_1(default_fn, fn, start_event.ptr, d.ptr, s, enqueue_default_first,
                                        rt.current_handle())
            else:
                for i in range(n):
                    fn = aux_fns[i]
                    if fn is not None and not (callable(fn) and type(done_events[i]) is Event
                                               and type(aux_streams[i]) is Stream):
                        break
                else:
                    return _fork_join_native(default_fn, aux_fns, start_event.ptr, done_events, aux_streams,
                                             enqueue_default_first, rt.current_handle())
    _check_fns(default_fn, aux_fns)
    _check_slots(aux_fns, start_event, done_events, aux_streams)
    return _fork_join(default_fn, aux_fns, start_event, done_events, aux_streams, enqueue_default_first,
                      rt.current_handle())


def _fork_join_1(default_fn: Callable[[], Any], fn: Callable[[], Any], sp: int, dp: int, s: Stream,
                 enqueue_default_first: bool, cur: int) -> tuple[Any, list[Any]]:
    """:func:`_fork_join` for one launched slot, lowlevel Events (handles ``sp``, ``dp``) and a
    lowlevel Stream ``s``, without a Timeline: the same enqueue order and the same exception
    rules, straight-line."""
    rt.event_record(sp, cur)
    default_result = default_fn() if enqueue_default_first else None  # raises: nothing forked yet
    prev_torch = rt.torch_get_current(-1)
    prev_cupy = rt.cupy_get_current()
    h = s.ptr
    try:
        s._cupy.use()
        rt.torch_set_current(*(s._torch_key or s._key()))
        rt.stream_wait_event(h, sp, 0)
    except BaseException:
        rt.torch_set_current(*prev_torch)
        prev_cupy.use()
        raise
    try:
        r = fn()
        rt.event_record(dp, h)
    except BaseException:  # capture what the slot enqueued, then join it
        rt.torch_set_current(*prev_torch)
        prev_cupy.use()
        rt.event_record(dp, h)
        rt.stream_wait_event(cur, dp, 0)
        raise
    rt.torch_set_current(*prev_torch)
    prev_cupy.use()
    if not enqueue_default_first:
        try:
            default_result = default_fn()
        except BaseException:
            rt.stream_wait_event(cur, dp, 0)
            raise
    rt.stream_wait_event(cur, dp, 0)
    results = [r]
    if r is not None:
        _protect(results, cur)
    return default_result, results


def _fork_join_native(default_fn: Callable[[], Any], aux_fns: Sequence[Callable[[], Any] | None], sp: int,
                      done_events: Sequence[Any], aux_streams: Sequence[Any], enqueue_default_first: bool,
                      cur: int) -> tuple[Any, list[Any]]:
    """:func:`_fork_join` when every launched slot has a lowlevel Event and Stream (``sp``: the
    start event's handle) and no Timeline is active: the same enqueue order and exception
    rules, every runtime call inline."""
    rt.event_record(sp, cur)
    n = len(aux_fns)
    results: list[Any] = [None] * n
    forked = -1  # the slot whose stream waited on start and has not recorded done yet
    prev_torch: Any = None  # the current streams, saved at the first switch
    prev_cupy: Any = None
    default_result = None
    returned = False
    i = 0
    try:
        if enqueue_default_first:
            default_result = default_fn()
        for i in range(n):
            fn = aux_fns[i]
            if fn is not None:
                s = aux_streams[i]
                if prev_torch is None:
                    prev_torch = rt.torch_get_current(-1)
                    prev_cupy = rt.cupy_get_current()
                s._cupy.use()
                rt.torch_set_current(*(s._torch_key or s._key()))
                h = s.ptr
                rt.stream_wait_event(h, sp, 0)
                forked = i
                r = fn()
                rt.event_record(done_events[i].ptr, h)
                forked = -1
                if r is not None:
                    results[i] = r
                    returned = True
        i = n
        if prev_torch is not None:
            p, prev_torch = prev_torch, None
            rt.torch_set_current(*p)
            prev_cupy.use()
        if not enqueue_default_first:
            default_result = default_fn()
    except BaseException:
        if prev_torch is not None:
            rt.torch_set_current(*prev_torch)
            prev_cupy.use()
        if forked >= 0:  # the slot that raised: capture what it enqueued, then join it
            rt.event_record(done_events[forked].ptr, aux_streams[forked].ptr)
            i = forked + 1
        for k in range(i):  # slots [0, i) launched and recorded done
            if aux_fns[k] is not None:
                rt.stream_wait_event(cur, done_events[k].ptr, 0)
        raise
    for i in range(n):
        if aux_fns[i] is not None:
            rt.stream_wait_event(cur, done_events[i].ptr, 0)
    if returned:
        _protect(results, cur)
    return default_result, results


def _not_a_sequence(obj: Any) -> bool:
    t = type(obj)
    return t is not list and t is not tuple and (isinstance(obj, (str, bytes)) or not isinstance(obj, Sequence))


def _check_fns(default_fn: Any, aux_fns: Any) -> None:
    """The fns of a fork/join: ``TypeError`` naming the one that is not callable (cheap when all are)."""
    if not callable(default_fn):
        raise TypeError(f"default_fn must be callable, got {describe(default_fn)}")
    if _not_a_sequence(aux_fns):
        raise TypeError(f"aux_fns must be a sequence of callables (or None slots), got {describe(aux_fns)}")
    for fn in aux_fns:
        if fn is not None and not callable(fn):
            i = next(k for k, f in enumerate(aux_fns) if f is fn)
            raise TypeError(f"aux_fns[{i}] must be callable or None, got {describe(fn)}")


def _check_slots(aux_fns: Sequence[Any], start_event: Any, done_events: Any, aux_streams: Any) -> None:
    """The parallel path's arguments, checked before anything is recorded or made current
    (lowlevel Events and Streams pass on a type comparison)."""
    if _not_a_sequence(aux_streams):
        raise TypeError(f"aux_streams must be a sequence, got {describe(aux_streams)}")
    if _not_a_sequence(done_events):
        raise TypeError(f"done_events must be a sequence, got {describe(done_events)}")
    n = len(aux_fns)
    if len(aux_streams) != n or len(done_events) != n:
        raise ValueError(
            f"aux_fns, aux_streams and done_events must be the same length "
            f"(got {n}, {len(aux_streams)}, {len(done_events)})"
        )
    if type(start_event) is not Event:
        if start_event is None:
            raise TypeError("start_event must be an event on the parallel path, got None")
        _ops_for(start_event)
    for i in range(n):
        if aux_fns[i] is None:
            continue
        d = done_events[i]
        if type(d) is not Event:
            if d is None:
                raise ValueError(f"done_events[{i}] is None but aux_fns[{i}] runs: give it an event")
            _ops_for(d)
        if type(aux_streams[i]) is not Stream:
            try:
                adopt(aux_streams[i])  # cached, so the fork's adopt is a look-up
            except (TypeError, ValueError):
                adopt_arg(aux_streams[i], f"aux_streams[{i}]")  # raises again, naming the slot


def _fork_join(default_fn: Callable[[], Any], aux_fns: Sequence[Callable[[], Any] | None], start_event: Any,
               done_events: Sequence[Any], aux_streams: Sequence[Any], enqueue_default_first: bool,
               cur: int) -> tuple[Any, list[Any]]:
    """The parallel path of execute_in_parallel, on the current stream ``cur`` (validated).

    Written for host cost: lowlevel Events go straight to the runtime (other events through
    record_event/wait_event), the current streams are saved once, at the first switch, and
    results are inspected for arrays only when a slot returned something."""
    tl = rt.tracer
    if tl is not None:  # an active Timeline gets a span per branch
        default_fn = _spanned(tl, "default", default_fn)
        aux_fns = [None if f is None else _spanned(tl, f"aux{i}", f) for i, f in enumerate(aux_fns)]
    n = len(aux_fns)
    sp = start_event.ptr if type(start_event) is Event else 0
    if sp:
        rt.event_record(sp, cur)
    else:
        record_event(start_event, cur)
    results: list[Any] = [None] * n
    reached = 0  # slots [0, reached) are done: each launched one recorded its done event
    forked = -1  # the slot whose stream waited on start and has not recorded done yet
    prev = None  # the current streams, saved at the first switch
    default_result = None
    returned = False
    try:
        if enqueue_default_first:
            default_result = default_fn()
        for i in range(n):
            fn = aux_fns[i]
            if fn is not None:
                s = aux_streams[i]
                if type(s) is not Stream:
                    s = adopt(s)
                if prev is None:  # rt.save() and rt.make_current(s), inlined: this loop is the hot path
                    prev = (rt.torch_get_current(-1), rt.cupy_get_current())
                s._cupy.use()
                rt.torch_set_current(*(s._torch_key or s._key()))
                h = s.ptr
                if sp:
                    rt.stream_wait_event(h, sp, 0)
                else:
                    wait_event(start_event, h)
                forked = i
                r = fn()
                d = done_events[i]
                if type(d) is Event:
                    rt.event_record(d.ptr, h)
                else:
                    record_event(d, h)
                forked = -1
                if r is not None:
                    results[i] = r
                    returned = True
            reached = i + 1
        if prev is not None:  # rt.restore(prev), inlined
            p, prev = prev, None
            rt.torch_set_current(*p[0])
            p[1].use()
        if not enqueue_default_first:
            default_result = default_fn()
    except BaseException:
        if prev is not None:
            rt.restore(prev)
        if forked >= 0:  # the slot that raised: capture what it enqueued, then join it
            _rec(done_events[forked], adopt(aux_streams[forked]).ptr)
            reached = forked + 1
        _join(aux_fns, done_events, reached, cur)
        raise
    if n == 1:  # the common case, without the loop
        if aux_fns[0] is not None:
            _wait(done_events[0], cur)
    else:
        _join(aux_fns, done_events, n, cur)
    if returned:
        _protect(results, cur)
    return default_result, results


def _join(aux_fns: Sequence[Any], done_events: Sequence[Any], upto: int, cur: int) -> None:
    """The current stream ``cur`` waits on the done event of every launched slot below ``upto``."""
    for i in range(upto):
        if aux_fns[i] is not None:
            _wait(done_events[i], cur)


def maybe_execute_in_parallel(
    fn0: Callable[[], Any],
    fn1: Callable[[], Any],
    event0: EventLike | None,
    event1: EventLike | None,
    aux_stream: StreamLike | None = None,
) -> tuple[Any, Any]:
    """Run ``fn0`` on the current stream and ``fn1`` on ``aux_stream``; return both results.

    With an aux stream: ``event0`` is recorded on the current stream C, then ``fn0`` is enqueued
    on C; ``aux_stream`` waits on ``event0``, runs ``fn1`` (current for CuPy, torch and Triton)
    and records ``event1``; C waits on ``event1``. ``fn1`` is ordered after the work before the
    call, not after ``fn0``. Without one: ``fn0()`` then ``fn1()`` on C, events untouched.
    Exceptions join the aux stream back and restore the current streams, as in
    :func:`execute_in_parallel`.
    """
    if (type(aux_stream) is Stream and type(event0) is Event and type(event1) is Event and callable(fn0)
            and callable(fn1)):  # the common case, checked by type comparisons: runtime calls inline
        e0, e1 = event0.ptr, event1.ptr
        cur = rt.current_handle()
        rt.event_record(e0, cur)
        r0 = fn0()
        prev_torch = rt.torch_get_current(-1)
        prev_cupy = rt.cupy_get_current()
        h = aux_stream.ptr
        forked = False
        try:
            aux_stream._cupy.use()
            rt.torch_set_current(*(aux_stream._torch_key or aux_stream._key()))
            rt.stream_wait_event(h, e0, 0)
            forked = True
            r1 = fn1()
            forked = False
            rt.event_record(e1, h)
        except BaseException:
            rt.torch_set_current(*prev_torch)
            prev_cupy.use()
            if forked:
                rt.event_record(e1, h)
                rt.stream_wait_event(cur, e1, 0)
            raise
        rt.torch_set_current(*prev_torch)
        prev_cupy.use()
        rt.stream_wait_event(cur, e1, 0)
        if r1 is not None:
            _protect(r1, cur)
        return r0, r1
    return _maybe_checked(fn0, fn1, event0, event1, aux_stream)


def _maybe_checked(fn0: Any, fn1: Any, event0: Any, event1: Any, aux_stream: Any) -> tuple[Any, Any]:
    """maybe_execute_in_parallel with every argument checked, for foreign events and streams."""
    if not callable(fn0):
        raise TypeError(f"fn0 must be callable, got {describe(fn0)}")
    if not callable(fn1):
        raise TypeError(f"fn1 must be callable, got {describe(fn1)}")
    if aux_stream is None:
        return fn0(), fn1()
    if event0 is None or event1 is None:
        raise TypeError("event0 and event1 must be events when aux_stream is given, got None")
    for ev in (event0, event1):
        if type(ev) is not Event:
            _ops_for(ev)
    try:
        s = adopt(aux_stream)  # before anything is recorded
    except (TypeError, ValueError):
        adopt_arg(aux_stream, "aux_stream")  # raises again, naming the argument
        raise
    cur = rt.current_handle()
    _rec(event0, cur)
    r0 = fn0()
    prev = rt.save()
    rt.make_current(s)
    forked = False
    try:
        _wait(event0, s.ptr)
        forked = True
        r1 = fn1()
        forked = False
        _rec(event1, s.ptr)
    except BaseException:
        rt.restore(prev)
        if forked:
            _rec(event1, s.ptr)
            _wait(event1, cur)
        raise
    rt.restore(prev)
    _wait(event1, cur)
    _protect(r1, cur)
    return r0, r1


class _Default(int):
    """An int argument's default, told apart from the same value passed explicitly."""

    __slots__ = ()


_ONE_AUX = _Default(1)


class ParallelRunner:
    """Owns ``num_aux`` aux streams and the events for :func:`execute_in_parallel`.

    ``num_aux`` (a positive int, default 1) streams are made with ``priority``; or
    ``streams`` (a non-empty sequence of stream-likes) are adopted as they are: then
    ``num_aux``, if given, must equal ``len(streams)`` and ``priority`` must be None
    (``ValueError``). ``TypeError`` for a ``streams`` that is no sequence of streams,
    naming ``streams`` / ``streams[i]``.

    ``runner(default_fn, aux_fns)`` forks and joins with its own streams and events. Each CUDA
    graph capture gets events of its own, kept as long as the runner (a captured graph bakes
    in the event handles; sharing them between graphs replayed at different shapes would tie
    those graphs together). Not thread-safe: use one runner per thread.
    """

    def __init__(self, num_aux: int = _ONE_AUX, *, priority: int | None = None,
                 streams: Sequence[StreamLike] | None = None) -> None:
        if streams is not None:
            if isinstance(streams, (str, bytes)) or not hasattr(streams, "__iter__"):
                raise TypeError(f"streams must be a sequence of CUDA streams or None, got {describe(streams)}")
            streams = list(streams)
            if not streams:
                raise ValueError("streams must name at least one aux stream")
            if num_aux is not _ONE_AUX and check_int(num_aux, "num_aux", 1) != len(streams):
                raise ValueError(f"num_aux must equal len(streams) = {len(streams)} when both are given, got {num_aux}")
            if priority is not None:
                raise ValueError(f"priority must be None when streams are given (they are adopted as they are), "
                                 f"got {priority!r}")
            self.streams = [adopt_arg(s, f"streams[{i}]") for i, s in enumerate(streams)]
        else:
            num_aux = check_int(num_aux, "num_aux", 1)
            self.streams = [Stream(priority=priority) for _ in range(num_aux)]
        self.num_aux = len(self.streams)
        self._start, self._done = self._new_events()
        self._capture_events: list[tuple[Event, list[Event]]] = []

    def _new_events(self) -> tuple[Event, list[Event]]:
        return Event(), [Event() for _ in range(self.num_aux)]

    @property
    def capture_event_sets(self) -> int:
        """How many event sets were made for graph captures."""
        return len(self._capture_events)

    def __call__(self, default_fn: Callable[[], Any], aux_fns: Sequence[Callable[[], Any] | None], *,
                 enqueue_default_first: bool = False) -> tuple[Any, list[Any]]:
        if enqueue_default_first is not False and enqueue_default_first is not True:
            enqueue_default_first = check_bool(enqueue_default_first, "enqueue_default_first")
        streams = self.streams
        n = len(streams)
        t = type(aux_fns)
        # The common case (a list or tuple of callables, the runner's own lowlevel Streams, no
        # Timeline) is checked by type comparisons and forks inline, as in execute_in_parallel.
        fast = (t is list or t is tuple) and len(aux_fns) == n and callable(default_fn) and rt.tracer is None
        if fast:
            for i in range(n):
                fn = aux_fns[i]
                if fn is not None and not (callable(fn) and type(streams[i]) is Stream):
                    fast = False
                    break
        if not fast:
            _check_fns(default_fn, aux_fns)
            if len(aux_fns) != n:
                raise ValueError(f"this runner has {n} aux streams, got {len(aux_fns)} aux fns")
        start, done = self._start, self._done
        cur = rt.current_handle()
        if rt.is_capturing(cur):
            start, done = self._new_events()
            self._capture_events.append((start, done))
        if not fast:
            return _fork_join(default_fn, aux_fns, start, done, streams, enqueue_default_first, cur)
        if n == 1 and aux_fns[0] is not None:
            return _fork_join_1(default_fn, aux_fns[0], start.ptr, done[0].ptr, streams[0], enqueue_default_first,
                                cur)
        return _fork_join_native(default_fn, aux_fns, start.ptr, done, streams, enqueue_default_first, cur)
