"""GPU tier of faults.md E, first line: aux outputs inside dataclasses, named tuples, plain
objects and nested containers stay valid on the consumer stream after the caller drops them and
the aux stream allocates again (the allocator reuses the freed block: 16 MiB, as in the fault)."""
import collections
import dataclasses
import time
from typing import Any

import pytest

import lowlevel

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
cp = pytest.importorskip("cupy")

N = 4 << 20  # 4,194,304 float32 elements, 16 MiB: the size the fault was found with


@dataclasses.dataclass
class Out:
    hidden: Any
    step: int = 0


@dataclasses.dataclass(frozen=True)
class Frozen:
    inner: Any


class Plain:
    def __init__(self, v):
        self.v = v


class Slotted:
    __slots__ = ("v",)

    def __init__(self, v):
        self.v = v


NT = collections.namedtuple("NT", "v n")

WRAP = {
    "dataclass": (lambda v: Out(v, 3), lambda r: r.hidden),
    "frozen_dataclass_in_dict": (lambda v: {"o": [Frozen({"x": v})]}, lambda r: r["o"][0].inner["x"]),
    "namedtuple": (lambda v: NT(v, 1), lambda r: r.v),
    "plain_object": (lambda v: Plain(v), lambda r: r.v),
    "slots_object": (lambda v: Slotted(v), lambda r: r.v),
}


def _make(framework, value):
    if framework == "torch":
        return torch.full((N,), value, device="cuda")
    return cp.full((N,), value, dtype=cp.float32)


@pytest.mark.parametrize("api", ["fanout", "pair"])
@pytest.mark.parametrize("framework", ["torch", "cupy"])
@pytest.mark.parametrize("kind", list(WRAP))
def test_container_outputs_survive_reuse(kind, framework, api):
    wrap, unwrap = WRAP[kind]
    aux = lowlevel.Stream()
    start, done = lowlevel.Event(), lowlevel.Event()
    cur = torch.cuda.current_stream().cuda_stream
    cp.full((8,), 1.0, dtype=cp.float32).copy()  # compile CuPy's fill and copy kernels up front
    torch.cuda.synchronize()

    def produce():
        return wrap(_make(framework, 17.0))

    if api == "fanout":
        _, (res,) = lowlevel.execute_in_parallel(lambda: None, [produce], start, [done], [aux], True)
    else:
        _, res = lowlevel.maybe_execute_in_parallel(lambda: None, produce, start, done, aux)
    val = unwrap(res)
    ptr = val.data_ptr() if framework == "torch" else val.data.ptr
    torch.cuda._sleep(400_000_000)  # the consumer stream is busy (~0.2 s) ...
    copied = val.clone() if framework == "torch" else val.copy()  # ... then reads the output
    del res, val
    with lowlevel.use_stream(aux):  # the aux stream allocates the same size again
        repl = _make(framework, 93.0)
    repl_ptr = repl.data_ptr() if framework == "torch" else repl.data.ptr
    consumer_pending = not lowlevel.Stream.from_external(cur).query()
    torch.cuda.synchronize()
    assert consumer_pending  # the race window was open when the aux stream allocated
    assert repl_ptr != ptr  # the block the consumer still read was not handed out
    assert float(copied.min()) == 17.0 and float(copied.max()) == 17.0
    assert float(repl.min()) == 93.0 and float(repl.max()) == 93.0
    assert torch.cuda.current_stream().cuda_stream == cur
    if framework == "cupy":
        from lowlevel.lifetime import default_keep_alive

        def held():
            return any(item[0].data.ptr == ptr for item in list(default_keep_alive._items))

        deadline = time.monotonic() + 5
        while held() and time.monotonic() < deadline:
            default_keep_alive.collect()
        assert not held()  # released once nobody holds it and the reads are done


def test_unprotected_reuse_would_corrupt():
    """Control: the same sequence with the output hidden from the walk (inside a closure) is
    exposed to reuse, so the test above would see the corruption if the walk missed it."""
    aux = lowlevel.Stream()
    start, done = lowlevel.Event(), lowlevel.Event()
    torch.cuda.synchronize()
    box = {}

    def produce():
        v = torch.full((N,), 17.0, device="cuda")
        box["v"] = v
        return lambda: box  # functions are not walked
    _, (res,) = lowlevel.execute_in_parallel(lambda: None, [produce], start, [done], [aux], True)
    val = box.pop("v")
    ptr = val.data_ptr()
    torch.cuda._sleep(400_000_000)
    copied = val.clone()
    del res, val
    with lowlevel.use_stream(aux):
        repl = torch.full((N,), 93.0, device="cuda")
    torch.cuda.synchronize()
    if repl.data_ptr() != ptr:
        pytest.skip("the allocator did not reuse the block this time; nothing to compare")
    assert float(copied.max()) == 93.0  # read after the overwrite: what protection prevents
