"""GPU tier of the foundation: streams, events and interop on a real device."""
import threading

import numpy as np
import pytest

import lowlevel
import lowlevel.testing
from lowlevel.testing import spin, spin_triton

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
cp = pytest.importorskip("cupy")

LONG_NS = 200_000_000  # 200 ms: long enough that the query below runs while it is busy


def _busy_with(framework, stream_a):
    """Launch long work through ``framework`` inside use_stream(stream_a) (compiled beforehand, so
    that no compilation delays the query past the kernel's end)."""
    lowlevel.testing._spin_kernel().compile()
    spin_triton(torch.empty(4, device="cuda"), 1)
    torch.cuda.synchronize()
    with lowlevel.use_stream(stream_a):
        if framework == "torch":
            torch.cuda._sleep(int(LONG_NS * 2))  # cycles; ~1.5-2 GHz makes it >= 200 ms
        elif framework == "cupy":
            # a RawKernel launched with no stream argument goes to CuPy's current stream
            lowlevel.testing._spin_kernel()((1,), (1,), (cp.uint64(LONG_NS),))
        else:
            out = torch.empty(64, device="cuda")
            spin_triton(out, 4_000_000)


@pytest.mark.parametrize("framework", ["torch", "cupy", "triton"])
def test_use_stream_routes_work_of_every_framework(framework):
    a, b = lowlevel.Stream(), lowlevel.Stream()
    torch.cuda.synchronize()
    _busy_with(framework, a)
    assert not a.query(), f"{framework} work did not land on stream A"
    assert b.query(), "stream B should be idle"
    a.synchronize()
    assert a.query()


def test_use_stream_sets_both_and_restores_and_nests():
    a, b = lowlevel.Stream(), lowlevel.Stream()
    t0 = torch.cuda.current_stream().cuda_stream
    c0 = cp.cuda.get_current_stream().ptr
    with lowlevel.use_stream(a) as s:
        assert s is a
        assert torch.cuda.current_stream().cuda_stream == a.ptr
        assert cp.cuda.get_current_stream().ptr == a.ptr
        assert lowlevel.current_stream().ptr == a.ptr
        with lowlevel.use_stream(b.torch):
            assert torch.cuda.current_stream().cuda_stream == b.ptr
            assert cp.cuda.get_current_stream().ptr == b.ptr
        assert torch.cuda.current_stream().cuda_stream == a.ptr
        assert cp.cuda.get_current_stream().ptr == a.ptr
    assert torch.cuda.current_stream().cuda_stream == t0
    assert cp.cuda.get_current_stream().ptr == c0


def test_use_stream_restores_on_exception():
    a, b = lowlevel.Stream(), lowlevel.Stream()
    t0 = torch.cuda.current_stream().cuda_stream
    c0 = cp.cuda.get_current_stream().ptr
    with pytest.raises(KeyError), lowlevel.use_stream(a), lowlevel.use_stream(b):
        raise KeyError("boom")
    assert torch.cuda.current_stream().cuda_stream == t0
    assert cp.cuda.get_current_stream().ptr == c0


def test_use_stream_is_per_thread():
    a = lowlevel.Stream()
    seen = {}
    entered, release = threading.Event(), threading.Event()

    def other():
        entered.wait(5)
        seen["torch"] = torch.cuda.current_stream().cuda_stream
        seen["cupy"] = cp.cuda.get_current_stream().ptr
        release.set()

    th = threading.Thread(target=other)
    th.start()
    with lowlevel.use_stream(a):
        entered.set()
        release.wait(5)
    th.join()
    assert seen["torch"] != a.ptr and seen["cupy"] != a.ptr


def test_from_external_accepts_every_kind():
    ts = torch.cuda.Stream()
    cs = cp.cuda.Stream(non_blocking=True)
    own = lowlevel.Stream(priority=-1)
    for obj, ptr in [(ts, ts.cuda_stream), (cs, cs.ptr), (own, own.ptr), (cs.ptr, cs.ptr), (own.cupy, own.ptr)]:
        s = lowlevel.Stream.from_external(obj)
        assert s.ptr == ptr
        assert s.__cuda_stream__() == (0, ptr)
        assert s.torch.cuda_stream == ptr
        assert s.cupy.ptr == ptr
    assert lowlevel.Stream.from_external(own) is own
    assert lowlevel.Stream.from_external(ts).torch is ts
    with pytest.raises(TypeError):
        lowlevel.Stream.from_external("stream")


def test_current_stream_follows_either_framework():
    a = lowlevel.Stream()
    with torch.cuda.stream(a.torch):
        assert lowlevel.current_stream().ptr == a.ptr
    with a.cupy:
        assert lowlevel.current_stream().ptr == a.ptr
    ts = torch.cuda.Stream()
    with torch.cuda.stream(ts):
        cur = lowlevel.current_stream()
        assert cur.ptr == ts.cuda_stream and cur.torch.cuda_stream == ts.cuda_stream


def _race(use_event, event_kind="lowlevel"):
    n = 1 << 24  # 64 MiB of float32
    a, b = lowlevel.Stream(), lowlevel.Stream()
    src = torch.randn(n, device="cuda")
    x = torch.full((n,), -1.0, device="cuda")
    torch.cuda.synchronize()
    ev = {"lowlevel": lambda: lowlevel.Event(), "cupy": lambda: cp.cuda.Event(),
          "torch": lambda: torch.cuda.Event()}[event_kind]()
    with lowlevel.use_stream(a):
        spin(50_000_000)
        x.copy_(src)
        if use_event:
            lowlevel.record_event(ev)
    with lowlevel.use_stream(b):
        if use_event:
            lowlevel.wait_event(ev)
        y = x.clone()
    torch.cuda.synchronize()
    return torch.equal(y, src), bool((y == -1).all())


@pytest.mark.parametrize("kind", ["lowlevel", "cupy", "torch"])
def test_event_removes_a_real_race(kind):
    ok, stale = _race(use_event=False)
    assert not ok and stale, "without the event B should read the stale buffer"
    ok, stale = _race(use_event=True, event_kind=kind)
    assert ok and not stale


def test_event_methods():
    a = lowlevel.Stream()
    e0, e1 = lowlevel.Event(timing=True), lowlevel.Event(timing=True)
    assert e0.query()  # never recorded
    e0.record(a)
    spin(20_000_000, stream=a)
    e1.record(a)
    assert not e1.query()
    e1.synchronize()
    assert e1.query()
    ms = e0.elapsed_ms(e1)
    assert 15.0 < ms < 500.0
    with pytest.raises(ValueError, match="timing"):
        lowlevel.Event().elapsed_ms(e1)
    b = lowlevel.Stream()
    ev = lowlevel.Event()
    spin(20_000_000, stream=a)
    ev.record(a)
    b.wait(ev)
    marker = lowlevel.Event().record(b)
    assert not marker.query()
    a.synchronize()
    b.synchronize()
    assert marker.query()


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.uint8]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dlpack_round_trip(dtype):
    g = torch.Generator(device="cuda").manual_seed(int(np.random.randint(1 << 30)))
    if dtype.is_floating_point:
        t = torch.randn(37, 129, device="cuda", generator=g).to(dtype)
    else:
        t = torch.randint(0, 120, (37, 129), device="cuda", generator=g, dtype=dtype)
    t = t[:, 3:100:2]  # non-contiguous view with an offset
    c = lowlevel.as_cupy(t)
    assert c.data.ptr == t.data_ptr()
    assert c.shape == tuple(t.shape)
    assert c.strides == tuple(s * t.element_size() for s in t.stride())
    back = lowlevel.as_torch(c)
    assert back.data_ptr() == t.data_ptr() and back.dtype == t.dtype
    assert back.shape == t.shape and back.stride() == t.stride()
    assert torch.equal(back, t)
    if dtype is not torch.bfloat16:
        np.testing.assert_array_equal(cp.asnumpy(c), t.cpu().numpy())
    # writes through one view are seen by the other
    c[...] = 7 if not dtype.is_floating_point else 1.5
    assert bool((t == (7 if not dtype.is_floating_point else 1.5)).all())
    assert lowlevel.as_torch(back) is back and lowlevel.as_cupy(c) is c


def test_dlpack_from_cupy_side():
    x = cp.random.standard_normal((65, 33)).astype(cp.float32)
    t = lowlevel.as_torch(x)
    assert t.data_ptr() == x.data.ptr
    np.testing.assert_array_equal(t.cpu().numpy(), cp.asnumpy(x))


def test_dlpack_orders_consumer_after_producer():
    n = 1 << 24
    a, b = lowlevel.Stream(), lowlevel.Stream()
    src = torch.randn(n, device="cuda")
    x = torch.full((n,), -1.0, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(a.torch):  # producer: torch on A
        torch.cuda._sleep(100_000_000)
        x.copy_(src)
        c = lowlevel.as_cupy(x, stream=b)  # consumer stream B must wait for A
    with b.cupy:
        y = c.copy()
    b.synchronize()
    assert torch.equal(lowlevel.as_torch(y), src)


def test_stream_wait_and_record_are_public_and_order_work():
    """Stream.wait(other_stream) orders after the work so far on the other stream;
    Stream.record() returns a new lowlevel Event; record(event) records the given one."""
    a, b = lowlevel.Stream(), lowlevel.Stream()
    x = torch.full((1 << 20,), -1.0, device="cuda")
    torch.cuda.synchronize()
    with lowlevel.use_stream(a):
        torch.cuda._sleep(50_000_000)
        x.fill_(float(np.random.default_rng().integers(1, 100)))
    expected = None
    ev = a.record()
    assert isinstance(ev, lowlevel.Event) and not ev.query()
    b.wait(a)  # stream form
    with lowlevel.use_stream(b):
        y = x.clone()
    b.synchronize()
    expected = x[0].item()
    assert expected != -1.0 and torch.equal(y, torch.full_like(x, expected))
    tev = torch.cuda.Event()
    assert a.record(tev) is tev
    b.wait(tev)  # a torch event
    b.wait(lowlevel.Event().record(a))  # a lowlevel event
    b.wait(cp.cuda.Stream(non_blocking=True))  # a CuPy stream
    b.synchronize()
    with pytest.raises(TypeError):
        b.wait("not an event")


def test_use_stream_same_object_reentered_restores_the_outer_streams():
    s = lowlevel.Stream()
    before_t, before_c = torch.cuda.current_stream(), cp.cuda.get_current_stream()
    u = lowlevel.use_stream(s)
    with u:
        with u:
            assert torch.cuda.current_stream().cuda_stream == s.ptr
        assert torch.cuda.current_stream().cuda_stream == s.ptr == cp.cuda.get_current_stream().ptr
    assert torch.cuda.current_stream() == before_t and cp.cuda.get_current_stream() == before_c


def test_timeline_pushes_and_pops_nvtx_ranges_in_pairs(monkeypatch):
    """Each live span pushes one NVTX range (the nvtx package's or torch's, both real calls
    here) and pops it at its end, nested spans included, exceptions included."""
    from lowlevel import timeline as tlm

    push, pop = tlm._nvtx_calls()
    assert push.__module__.split(".")[0] in ("nvtx", "torch")
    calls = []

    def counted_push(name):
        calls.append(("push", name))
        return push(name)

    def counted_pop():
        calls.append(("pop",))
        return pop()

    monkeypatch.setattr(tlm, "_nvtx", (counted_push, counted_pop))
    tl = lowlevel.Timeline()
    for i in range(2):
        with tl.span(f"s{i}"), tl.span(f"inner{i}"):
            spin(100_000)
    with pytest.raises(KeyError), tl.span("raises"):
        raise KeyError("x")
    assert calls == [("push", "s0"), ("push", "inner0"), ("pop",), ("pop",),
                     ("push", "s1"), ("push", "inner1"), ("pop",), ("pop",), ("push", "raises"), ("pop",)]
    assert len(tl.resolve()) == 5
