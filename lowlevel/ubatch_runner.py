"""UBatchRunner: split a batch into microbatches, run them overlapped, concatenate the outputs;
eagerly, or as one CUDA graph of the whole overlapped run."""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
import statistics
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from . import _runtime as rt
from . import ubatch_ring as ring
from .errors import check_bool, check_choice, check_int, check_ints, check_timeout, describe
from .graphs import Graph, GraphPool, capture, capture_stream
from .stream import Stream, StreamLike, adopt_arg, current_stream, use_stream
from .ubatch_generators import run_generators
from .ubatch_slices import UBatchSlice

__all__ = ["UBatchRunner", "comm_sm_candidates", "find_sm_split"]

UBatchMode = Literal["threads", "generators"]


def _concat(outs: list[Any]) -> Any:
    first = outs[0]
    if type(first).__module__.startswith("cupy"):
        import cupy

        return cupy.concatenate(outs, axis=0)
    import torch

    return torch.cat(outs, dim=0)


class UBatchRunner:
    """vLLM's UBatchWrapper without its forward context.

    ``fn(ubatch_id, *inputs)`` computes one microbatch from its slices of the inputs (rows
    ``slice.token_slice`` of each input, as views) and returns an array; with
    ``mode="threads"`` it switches streams through the ``dbo_*`` helpers, with
    ``mode="generators"`` it is a generator function that yields ``TO_COMM`` / ``TO_COMPUTE`` /
    ``YIELD`` and returns its output. ``runner(inputs, slices)`` returns the microbatch outputs
    concatenated in order along dim 0, on the caller's current stream (the compute stream).

    ``graph=True`` captures the whole overlapped run into one FULL graph keyed by *all* slice
    sizes (on first use, after an eager warm-up) and replays it afterwards with no threads;
    the inputs must then be the same buffers at every call with those sizes, and the returned
    output is the graph's static buffer. ``sm_control`` (e.g. a
    :class:`~lowlevel.SMControlContextManager`) is entered around each eager run and capture.
    ``timeout_s`` bounds every wait of a microbatch thread, so nothing hangs.

    Threads mode keeps ``num_ubatches`` daemon threads parked between runs; :meth:`close`, or
    the runner being garbage-collected, ends them. Calls from several threads are serialised; a
    microbatch must not call its own runner.
    """

    def __init__(self, fn: Callable[..., Any], *, comm_stream: StreamLike | None = None,
                 sm_control: Any = None, num_ubatches: int = 2, mode: UBatchMode = "threads", stage_offset: int = 1,
                 timeout_s: float = 60.0) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {describe(fn)}")
        self.mode = check_choice(mode, "mode", UBatchMode)
        self.num_ubatches = check_int(num_ubatches, "num_ubatches", 2)
        self.stage_offset = check_int(stage_offset, "stage_offset", 0)
        self.timeout_s: float = check_timeout(timeout_s, "timeout_s", allow_none=False)  # type: ignore[assignment]
        if sm_control is not None and (isinstance(sm_control, type) or not (hasattr(sm_control, "__enter__")
                                                                            and hasattr(sm_control, "__exit__"))):
            raise TypeError(f"sm_control must be a context manager (e.g. SMControlContextManager) or None, "
                            f"got {describe(sm_control)}")
        self.fn = fn
        self.sm_control = sm_control
        self.comm_stream = Stream() if comm_stream is None else adopt_arg(comm_stream, "comm_stream")
        self.graphs: dict[tuple[int, ...], tuple[Graph, Any]] = {}
        self.pool: GraphPool | None = None
        self._workers: _Workers | None = None
        self._lock = threading.Lock()

    def __call__(self, inputs: Sequence[Any], slices: Sequence[UBatchSlice], *, graph: bool = False) -> Any:
        """Run the microbatches of ``inputs`` (arrays of at least ``slices[-1].token_slice.stop``
        rows) and return their outputs concatenated along dim 0.

        Raises ``TypeError`` / ``ValueError`` (before anything runs) when ``inputs`` is not a
        sequence of arrays, ``slices`` has not ``num_ubatches`` :class:`UBatchSlice` objects, or
        a slice is empty, has a step, or reaches rows outside some input, or the slices do not
        tile rows ``0 .. slices[-1].token_slice.stop`` in order (``slices[0]`` starts at row 0,
        each next slice where the previous one stops)."""
        if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence):
            raise TypeError(f"inputs must be a sequence of arrays, got {describe(inputs)}")
        if isinstance(slices, (str, bytes)) or not isinstance(slices, Sequence):
            raise TypeError(f"slices must be a sequence of UBatchSlice, got {describe(slices)}")
        if graph is not True and graph is not False:
            graph = check_bool(graph, "graph")
        if len(slices) != self.num_ubatches:
            raise ValueError(f"expected {self.num_ubatches} slices, got {len(slices)}")
        rows = []
        for j, x in enumerate(inputs):
            shape = getattr(x, "shape", None)
            if shape is None or len(shape) == 0:
                raise TypeError(f"inputs[{j}] must be an array with a row dimension, got {describe(x)}")
            rows.append(int(shape[0]))
        for i, s in enumerate(slices):
            if not isinstance(s, UBatchSlice):
                raise TypeError(f"slices[{i}] must be a UBatchSlice, got {describe(s)}")
            t = s.token_slice
            if t.step not in (None, 1):
                raise ValueError(f"slices[{i}].token_slice must have no step, got {t}")
            if s.num_tokens <= 0:
                raise ValueError(f"empty microbatch slices[{i}] = {s}: abort microbatching for this step instead")
            if not i and t.start != 0:
                raise ValueError(f"slices must tile the batch in order from row 0: slices[0] starts at row "
                                 f"{t.start}")
            if i and t.start != slices[i - 1].token_slice.stop:
                raise ValueError(f"slices must tile the batch in order: slices[{i}] starts at row {t.start}, "
                                 f"slices[{i - 1}] ends at row {slices[i - 1].token_slice.stop}")
            for j, n in enumerate(rows):
                if t.start < 0 or t.stop > n:
                    raise ValueError(f"slices[{i}] covers rows {t.start}..{t.stop} but inputs[{j}] has {n} rows")
        per_ub = [tuple(x[s.token_slice] for x in inputs) for s in slices]
        if not graph:
            with self.sm_control if self.sm_control is not None else contextlib.nullcontext():
                return _concat(self._run(per_ub))
        key = tuple(s.num_tokens for s in slices)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(key, per_ub)
        entry[0].replay()
        return entry[1]

    def _capture(self, key: tuple[int, ...], per_ub: list[tuple[Any, ...]]) -> tuple[Graph, Any]:
        if self.pool is None:
            self.pool = GraphPool()
        s = capture_stream()  # warm-up and capture on one stream (per-stream state), none made per size
        with self.sm_control if self.sm_control is not None else contextlib.nullcontext():
            rt.order(rt.current_handle(), s.ptr)
            with use_stream(s):
                self._run(per_ub)  # warm-up: compilation and lazy allocations outside the capture
            with capture(stream=s, pool=self.pool) as g:
                out = _concat(self._run(per_ub, pool=self.pool))
        # The replay goes to the caller's stream: it must follow the warm-up, which may still be
        # running on the capture stream (its comm work joined in). Without this the first replay
        # overlapped the warm-up on the device: two runs of every stage at once, racing on the
        # same buffers, and two launches of a collective on one communicator (or one set of
        # cross-GPU epochs) at once, which hung the NVLink all-to-all on two H200s.
        rt.order(s.ptr, rt.current_handle())
        g.keep(per_ub, out)
        self.graphs[key] = (g, out)
        return g, out

    def _run(self, per_ub: list[tuple[Any, ...]], pool: GraphPool | None = None) -> list[Any]:
        compute = current_stream()
        if self.mode == "generators":
            gens = [self.fn(i, *args) for i, args in enumerate(per_ub)]
            return run_generators(gens, compute, self.comm_stream, stage_offset=self.stage_offset)
        return self._run_threads(per_ub, compute, pool)

    def _run_threads(self, per_ub: list[tuple[Any, ...]], compute: Stream, pool: GraphPool | None) -> list[Any]:
        n = self.num_ubatches
        ctxs = ring.make_ubatch_contexts(n, compute, self.comm_stream, None, timeout_s=self.timeout_s)
        results: list[Any] = [None] * n
        errors: list[BaseException | None] = [None] * n

        dev = compute.device_id

        def job(i: int) -> None:
            try:
                rt.use_device(dev)  # a parked thread starts on device 0; work goes to the caller's
                with pool.cupy_active() if pool is not None else contextlib.nullcontext(), ctxs[i]:
                    results[i] = self.fn(i, *per_ub[i])
            except BaseException as exc:  # reported by the launching thread
                errors[i] = exc

        with self._lock:  # one run at a time on this runner's threads
            if self._workers is None:
                self._workers = _Workers(n)
                weakref.finalize(self, self._workers.close)  # a dropped runner ends its threads
            workers = self._workers
            workers.submit([functools.partial(job, i) for i in range(n)])
            ring.start_ubatches(ctxs)
            hung = workers.wait(self.timeout_s)
            if hung:  # those threads are lost to this runner; the next run starts new ones
                self._workers = None
                workers.close()
        if hung or any(e is not None for e in errors):  # normal exits joined comm into compute themselves
            try:
                rt.order(self.comm_stream.ptr, compute.ptr)
            except Exception:  # the microbatch's own error (raised below) is the one to report
                pass
        if hung:
            ring.abort_ubatches(ctxs)
            raise ring.UBatchAbort(f"microbatch threads {hung} did not finish within {self.timeout_s} s")
        err = (ring.first_ubatch_error(ctxs)
               or next((e for e in errors if e is not None and not isinstance(e, ring.UBatchAbort)), None)
               or next((e for e in errors if e is not None), None))
        if err is not None:
            raise err
        return results

    def clear(self) -> None:
        """Forget every captured graph: free their instantiations and drop their outputs and
        kept inputs (the pool keeps its memory for re-captures; the next ``graph=True`` call of
        a size captures again). Call it before tearing down what the graphs captured, such as
        the NCCL communicators of a comm stage. Idempotent."""
        graphs, self.graphs = self.graphs, {}
        for g, _ in graphs.values():
            g.close()

    def close(self) -> None:
        """End the parked microbatch threads (threads mode); a later run starts new ones.
        Captured graphs stay (:meth:`clear` frees them)."""
        with self._lock:
            if self._workers is not None:
                self._workers.close()
                self._workers = None


class _Workers:
    """``n`` daemon threads parked between runs, each running one microbatch per run.

    Starting threads, and the per-thread state that CUDA, torch and CuPy build on a thread's
    first use, cost more host time per run than the microbatch switches themselves; parked
    threads pay them once."""

    POLL_S = 0.05

    def __init__(self, n: int) -> None:
        self.jobs: list[Callable[[], None] | None] = [None] * n
        self.go = [ring.Baton() for _ in range(n)]
        self.done = [ring.Baton() for _ in range(n)]
        self.closed = False
        self.threads = [threading.Thread(target=self._loop, args=(i,), name=f"ubatch-{i}", daemon=True)
                        for i in range(n)]
        for t in self.threads:
            t.start()

    def _loop(self, i: int) -> None:
        go, done = self.go[i], self.done[i]
        while True:
            while not go.take(self.POLL_S):
                if self.closed:
                    return
            if self.closed:
                return
            job, self.jobs[i] = self.jobs[i], None
            try:
                if job is not None:
                    job()
            finally:
                job = None  # the job holds its runner: a parked thread must not keep it alive
                done.set()

    def submit(self, jobs: list[Callable[[], None]]) -> None:
        for i, job in enumerate(jobs):
            self.jobs[i] = job
            self.go[i].set()

    def wait(self, timeout_s: float) -> list[str]:
        """Wait until every thread finished its job; the names of those that did not in time."""
        deadline = time.monotonic() + timeout_s
        hung = []
        for i, done in enumerate(self.done):
            if not done.take(max(0.0, deadline - time.monotonic())):
                hung.append(self.threads[i].name)
        return hung

    def close(self) -> None:
        self.closed = True
        for go in self.go:
            go.set()


def find_sm_split(run: Callable[[int], float], candidates: Iterable[int], *, reps: int = 5,
                  warmup: int = 1) -> tuple[int, dict[int, float]]:
    """The comm SM share ``k`` among ``candidates`` whose overlapped run is fastest.

    ``run(k)`` performs one overlapped run with ``k`` SMs (or NCCL CTAs) left to communication
    and the rest to compute (``k == 0``: no split, every stage on every SM), typically through
    an :class:`~lowlevel.SMControlContextManager` of ``comm_sms=k``, and returns its time in
    milliseconds (a finite real number >= 0). Each candidate, in the order given, is run
    ``warmup`` times (results checked, then discarded: compilation, lazy communicator setup)
    and then ``reps`` times; its figure is the median of those ``reps`` times.

    Returns ``(best_k, {k: median_ms})``, the dict in the order of ``candidates``; ``best_k``
    has the smallest median, ties going to the smallest ``k`` (the fewest SMs taken from
    compute). Calls ``run`` exactly ``len(candidates) * (warmup + reps)`` times, on the calling
    thread. In a multi-process run every rank must call ``run`` in the same sequence (this
    function does), and ``run`` should return a time all ranks agree on (e.g. the slowest
    rank's, all-reduced with MAX) so that every rank picks the same ``k``.

    Raises ``TypeError`` when ``run`` is not callable, ``candidates`` is not an iterable of
    ints, or ``reps`` / ``warmup`` is not an int; ``ValueError`` (before any run) when
    ``candidates`` is empty, holds a negative or repeated ``k``, ``reps < 1`` or
    ``warmup < 0``; ``TypeError`` / ``ValueError`` naming ``k`` when ``run(k)`` returns
    something other than a finite, non-negative number of milliseconds."""
    if not callable(run):
        raise TypeError(f"run must be callable (k -> ms), got {describe(run)}")
    ks = check_ints(candidates, "candidates", 0)
    if not ks:
        raise ValueError("candidates must hold at least one comm SM count k >= 0, got none")
    if len(set(ks)) != len(ks):
        raise ValueError(f"candidates must not repeat a k, got {ks}")
    reps = check_int(reps, "reps", 1)
    warmup = check_int(warmup, "warmup", 0)
    times: dict[int, float] = {}
    for k in ks:
        for _ in range(warmup):
            _check_ms(run(k), k)
        times[k] = statistics.median(_check_ms(run(k), k) for _ in range(reps))
    best = min(ks, key=lambda k: (times[k], k))
    return best, times


def comm_sm_candidates(units: int, total_sms: int, *, max_comm: int | None = None,
                       extra_waves: int = 2) -> list[int]:
    """Comm SM shares ``k`` that cost the compute stage no more waves than needed: for a
    persistent kernel of ``units`` work units (e.g. :attr:`lowlevel.kernels.PreparedLaunch.tiles`)
    on a device of ``total_sms`` SMs, for each wave count ``w`` from the all-SM one
    (``ceil(units / total_sms)``) to ``extra_waves`` more, the largest share that keeps the
    compute stage at ``w`` waves: ``k = total_sms - ceil(units / w)``, or ``max_comm`` where
    that is larger (and then no further ``w``: a larger share is not allowed). A cap just below
    a wave boundary costs a whole extra wave (256 tiles: 2 waves on 128 SMs but 3 on 108), so
    these are the splits worth measuring with :func:`find_sm_split`, beside any fixed grid.

    Returns the distinct ``k`` with ``0 < k <= max_comm`` (default ``total_sms // 2``), fewest
    comm SMs (and waves) first; empty only when ``max_comm`` is 0 or no share leaves compute a
    whole SM. Raises ``TypeError`` for non-int arguments and ``ValueError`` for ``units < 1``,
    ``total_sms < 1``, ``max_comm < 0`` or ``extra_waves < 0``."""
    units = check_int(units, "units", 1)
    total_sms = check_int(total_sms, "total_sms", 1)
    max_comm = total_sms // 2 if max_comm is None else check_int(max_comm, "max_comm", 0)
    extra_waves = check_int(extra_waves, "extra_waves", 0)
    first = -(-units // total_sms)
    out: list[int] = []
    max_comm = min(max_comm, total_sms - 1)  # compute keeps at least one SM
    w, programs = first, -(-units // first)  # the fewest programs that run units in w waves
    while w <= first + extra_waves:
        k = total_sms - programs
        if k > max_comm:  # the largest allowed share: it still runs in w waves
            if max_comm > 0 and (not out or out[-1] != max_comm):
                out.append(max_comm)
            break
        if k > 0:
            out.append(k)
        if programs == 1:  # one unit a program: more waves need no fewer SMs
            break
        w = -(-units // (programs - 1))  # the next wave count that needs fewer programs
        programs = -(-units // w)
    return out


def _check_ms(value: Any, k: int) -> float:
    """``value`` (what ``run(k)`` returned) as a float of milliseconds: finite and >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"run({k}) must return a time in ms (a real number), got {describe(value)}")
    ms = float(value)
    if not (math.isfinite(ms) and ms >= 0.0):
        raise ValueError(f"run({k}) must return a finite time in ms >= 0, got {value!r}")
    return ms
