"""GPU tier of the kernels: real sizes, every dtype, cap sweep, CuPy inputs, recompilation, partitions."""
import time

import numpy as np
import pytest

import lowlevel
from lowlevel.sm_control import device_sm_count

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
cp = pytest.importorskip("cupy")
K = pytest.importorskip("lowlevel.kernels")

TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}  # tf32 / half operands (METHOD.md)


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device="cuda", dtype=torch.float32).to(dtype)


def _rel(got, ref):
    got, ref = got.double(), ref.double()
    return float((got - ref).norm() / ref.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("mnk", [(1024, 1024, 1024), (1000, 1500, 700), (4096, 512, 2048), (17, 4000, 333)])
def test_matmul_real_sizes(dtype, mnk):
    M, N, Kd = mnk
    a, b = _rand(M, Kd, dtype=dtype), _rand(Kd, N, dtype=dtype)
    out = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
    K.matmul(a, b, out=out)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any()
    assert _rel(out, a.double() @ b.double()) < TOL[dtype]


def test_matmul_cap_sweep_and_no_recompile():
    from lowlevel.kernels.matmul import _launch, _matmul_kernel

    a, b = _rand(2048, 1024, dtype=torch.bfloat16), _rand(1024, 2048, dtype=torch.bfloat16)
    ref = a.double() @ b.double()
    K.matmul(a, b)
    dev = torch.cuda.current_device()
    compiled = len(_matmul_kernel.device_caches[dev][0])
    ours = len(_launch.cache)
    total = device_sm_count()
    for cap in sorted({1, 2, 3, 7, 16, 33, 64, 100, total}):
        out = torch.full((2048, 2048), float("nan"), device="cuda", dtype=torch.bfloat16)
        with lowlevel.sm_limit(cap):
            K.matmul(a, b, out=out)
        torch.cuda.synchronize()
        assert _rel(out, ref) < 1e-2, cap
    assert len(_matmul_kernel.device_caches[dev][0]) == compiled  # Triton compiled nothing new
    assert len(_launch.cache) == ours


def test_kernels_take_cupy_arrays_and_return_cupy():
    a = cp.random.standard_normal((300, 200)).astype(cp.float32)
    b = cp.random.standard_normal((200, 100)).astype(cp.float32)
    c = K.matmul(a, b, precision="ieee")
    assert isinstance(c, cp.ndarray)
    np.testing.assert_allclose(cp.asnumpy(c), cp.asnumpy(a).astype(np.float64) @ cp.asnumpy(b), rtol=1e-4,
                               atol=1e-4)
    x = cp.random.standard_normal((64, 4096)).astype(cp.float16)
    w = cp.random.standard_normal(4096).astype(cp.float16)
    y = K.rms_norm(x, w)
    assert isinstance(y, cp.ndarray)
    xd = cp.asnumpy(x).astype(np.float64)
    ref = xd / np.sqrt((xd * xd).mean(axis=1, keepdims=True) + 1e-6) * cp.asnumpy(w)
    assert np.linalg.norm(cp.asnumpy(y) - ref) / np.linalg.norm(ref) < 2e-3
    src = cp.random.standard_normal(1 << 20).astype(cp.float32)
    dst = cp.full(1 << 20, cp.nan, dtype=cp.float32)
    K.copy(src, dst)
    assert bool((dst == src).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_rms_norm_real_sizes_and_cap_sweep(dtype):
    x, w, r = _rand(4096, 8192, dtype=dtype), _rand(8192, dtype=dtype), _rand(4096, 8192, dtype=dtype)
    s = (x.double() + r.double())
    ref = s / torch.sqrt((s * s).mean(dim=1, keepdim=True) + 1e-6) * w.double()
    for cap in (1, 5, 66, device_sm_count()):
        out = torch.full_like(x, float("nan"))
        with lowlevel.sm_limit(cap):
            y, new_r = K.rms_norm(x, w, residual=r, out=out)
        torch.cuda.synchronize()
        assert y is out and _rel(y, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
        assert _rel(new_r, s) < (1e-7 if dtype == torch.float32 else 5e-3)


def test_copy_cap_sweep_large():
    src = _rand(1 << 26)
    for cap in (1, 3, 32, device_sm_count()):
        dst = torch.full_like(src, float("nan"))
        with lowlevel.sm_limit(cap):
            K.copy(src, dst)
        torch.cuda.synchronize()
        assert torch.equal(dst, src)


def _time_ms(fn, stream=None, reps=5):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def test_green_context_partition_slows_a_full_grid_kernel():
    from lowlevel.testing import spin

    total = device_sm_count()
    part = lowlevel.sm_partition([64])
    try:
        assert part.sm_counts == [64]
        (s,) = part.streams
        # 16 full waves of SM-filling blocks: 16 waves on the whole GPU, 16 * total / 64 on 64 SMs
        # (each the fastest of 5 interleaved trials: another process's kernels on this GPU, e.g.
        # a test suite run beside this one, only ever slow a trial down)
        blocks = 16 * total
        wholes, insides = [], []
        for _ in range(5):
            wholes.append(_time_ms(lambda: spin(200_000, blocks=blocks, whole_sm=True)))
            with lowlevel.use_stream(s):
                insides.append(_time_ms(lambda: spin(200_000, blocks=blocks, whole_sm=True)))
        whole, inside = min(wholes), min(insides)
        ratio = inside / whole
        expected = total / 64
        print(f"whole GPU {whole:.2f} ms, 64-SM partition {inside:.2f} ms, ratio {ratio:.2f} (ideal {expected:.2f})")
        assert 0.85 * expected <= ratio <= 1.2 * expected
        # the partition's stream computes correctly
        with lowlevel.use_stream(s):
            a, b = _rand(512, 256), _rand(256, 128)
            c = K.matmul(a, b, precision="ieee")
        s.synchronize()
        assert _rel(c, a.double() @ b.double()) < 1e-5
    finally:
        torch.cuda.synchronize()
        part.close()
    with lowlevel.sm_partition([32, 32]) as two:
        assert two.sm_counts == [32, 32] and len(two.streams) == 2
    with lowlevel.sm_partition([96, 32]) as uneven:
        assert uneven.sm_counts[0] == 96 and uneven.sm_counts[1] >= 32
    with pytest.raises(ValueError, match="equal"):
        lowlevel.sm_partition([64, 32, 16])
    with pytest.raises(ValueError, match="multiple of"):
        lowlevel.sm_partition([12])
    with pytest.raises(ValueError, match="device has"):
        lowlevel.sm_partition([128, 64])


@pytest.mark.parametrize("kind", ["lowlevel", "torch", "cupy"])
def test_prepared_launch_goes_to_the_current_stream(kind):
    """Behind a 20 ms spin on stream s, s fills src with fresh values, then a prepared copy runs
    inside use_stream(s): only a launch on s itself sees the new values."""
    from lowlevel.testing import spin

    s = {"lowlevel": lambda: lowlevel.Stream(), "torch": lambda: torch.cuda.Stream(),
         "cupy": lambda: cp.cuda.Stream(non_blocking=True)}[kind]()
    src, dst = _rand(1 << 20), torch.full((1 << 20,), float("nan"), device="cuda")
    run = K.prepare_copy(src, dst)
    torch.cuda.synchronize()
    fresh = _rand(1 << 20)
    for cap in (device_sm_count(), 5):
        dst.fill_(float("nan"))
        torch.cuda.synchronize()
        with lowlevel.use_stream(s), lowlevel.sm_limit(cap):
            spin(20_000_000, blocks=1)
            src.copy_(fresh + cap)
            run()
        lowlevel.Stream.from_external(s).synchronize()
        assert torch.equal(dst, fresh + cap)


@pytest.mark.parametrize("kind", ["lowlevel", "torch", "cupy"])
def test_stream_launch_goes_to_its_stream_whatever_is_current(kind):
    """A launch prepared with stream=s goes to s even while another stream is current: behind
    a 20 ms spin on s, s fills src with fresh values; the bound copy (called inside
    use_stream(other)) sees them, and dst is still poisoned before s is waited for."""
    from lowlevel.testing import spin

    s = {"lowlevel": lambda: lowlevel.Stream(), "torch": lambda: torch.cuda.Stream(),
         "cupy": lambda: cp.cuda.Stream(non_blocking=True)}[kind]()
    other = lowlevel.Stream()
    src, dst = _rand(1 << 20), torch.full((1 << 20,), float("nan"), device="cuda")
    run = K.prepare_copy(src, dst, stream=s)
    assert isinstance(run, K.StreamLaunch) and run.stream.ptr == lowlevel.stream_handle(s)
    lowlevel.Stream.from_external(s).synchronize()
    assert torch.equal(dst, src)  # the launch made while preparing went to s too
    fresh = _rand(1 << 20)
    # The check below runs while the gate spins: load its kernels now (lazy module loading took
    # more than the gate once, under load, on the H200 run of 2026-11-30), and gate for 200 ms.
    assert not torch.isnan(dst).all() and torch.equal(dst, src)
    torch.cuda.synchronize()
    for cap in (device_sm_count(), 5):
        dst.fill_(float("nan"))
        torch.cuda.synchronize()
        with lowlevel.use_stream(s):
            spin(200_000_000, blocks=1)
            src.copy_(fresh + cap)
        with lowlevel.use_stream(other), lowlevel.sm_limit(cap):
            run()
        other.synchronize()
        assert torch.isnan(dst).all()  # not on `other`: still behind the spin on s
        lowlevel.Stream.from_external(s).synchronize()
        assert torch.equal(dst, fresh + cap)
    # .launch, the plain-function form: the same stream, the cap read per call, the arrays kept
    fast = run.launch
    for cap in (3, device_sm_count(), 7):
        dst.fill_(float("nan"))
        torch.cuda.synchronize()
        with lowlevel.use_stream(s):
            spin(200_000_000, blocks=1)
            src.copy_(fresh - cap)
        with lowlevel.use_stream(other), lowlevel.sm_limit(cap):
            fast()
        other.synchronize()
        assert torch.isnan(dst).all()
        lowlevel.Stream.from_external(s).synchronize()
        assert torch.equal(dst, fresh - cap)
    del run  # the function keeps the arrays and the stream alive on its own
    dst.fill_(float("nan"))
    torch.cuda.synchronize()
    fast()
    lowlevel.Stream.from_external(s).synchronize()
    assert torch.equal(dst, src)
    # matmul (split-K on its own workspace) and rms_norm bound the same way
    a, b = _rand(64, 4096, dtype=torch.bfloat16), _rand(4096, 4096, dtype=torch.bfloat16)
    out = torch.full((64, 4096), float("nan"), device="cuda", dtype=torch.bfloat16)
    x, w = _rand(33, 1000), _rand(1000)
    y = torch.full_like(x, float("nan"))
    mm = K.prepare_matmul(a, b, out=out, stream=s)
    rn = K.prepare_rms_norm(x, w, out=y, stream=s)
    out.fill_(float("nan"))
    y.fill_(float("nan"))
    torch.cuda.synchronize()
    with lowlevel.use_stream(other):
        mm()
        rn()
    lowlevel.Stream.from_external(s).synchronize()
    assert _rel(out, a.double() @ b.double()) < 1e-2 and _rel(out[-1], (a.double() @ b.double())[-1]) < 1e-2
    xd = x.double()
    assert _rel(y, xd / torch.sqrt((xd * xd).mean(1, keepdim=True) + 1e-6) * w.double()) < 1e-5


# --- 64-bit offsets and the launch cache (faults.md E) -------------------------------------------

def _need_free(gib: float):
    free, _ = torch.cuda.mem_get_info()
    if free < gib * (1 << 30):
        pytest.skip(f"needs {gib:.1f} GiB of free GPU memory for a > 2**31-element case, "
                    f"the device has {free / (1 << 30):.1f} GiB free")


def test_copy_small_then_more_than_2_31_elements():
    """The launch cache keys on Triton's integer width: the i32 kernel of a small call is not reused."""
    _need_free(4.5)
    small = torch.randint(-128, 127, (4096,), device="cuda", dtype=torch.int8)
    out = torch.zeros_like(small)
    K.copy(small, out)
    torch.cuda.synchronize()
    assert torch.equal(out, small)
    n = (1 << 31) + 4096
    src = torch.randint(-128, 127, (n,), device="cuda", dtype=torch.int8)
    dst = torch.full((n,), 7, device="cuda", dtype=torch.int8)
    dst[-4096:] = ~src[-4096:]  # poison the tail with values that differ from src everywhere
    K.copy(src, dst)
    torch.cuda.synchronize()
    assert torch.equal(dst[-(1 << 20):], src[-(1 << 20):]) and torch.equal(dst[:4096], src[:4096])
    assert torch.equal(dst, src)
    del src, dst
    torch.cuda.empty_cache()


def test_rms_norm_past_2_31_elements():
    _need_free(10)
    rows, n = 262400, 8192
    x = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = torch.full_like(x, float("nan"))
    K.rms_norm(x[:64], w, out=y[:64])  # a small call first: its kernel must not serve the large one
    K.rms_norm(x, w, out=y)
    torch.cuda.synchronize()

    def ref(v):
        v = v.double()
        return v / torch.sqrt((v * v).mean(1, keepdim=True) + 1e-6) * w.double()

    for sl in (slice(0, 256), slice(rows // 2, rows // 2 + 256), slice(rows - 512, rows)):
        assert _rel(y[sl], ref(x[sl])) < 1e-2, sl
    assert not torch.isnan(y[-1]).any()
    import importlib

    rn = importlib.import_module("lowlevel.kernels.rms_norm")
    for prefetch in (False, True):  # both loop shapes
        y.fill_(float("nan"))
        rn.plan(x, w, 1e-6, None, y, cfg=rn._config(n)[:3] + (prefetch,)).launch()
        torch.cuda.synchronize()
        assert _rel(y[-512:], ref(x[-512:])) < 1e-2 and not torch.isnan(y[-1]).any(), prefetch
    del x, y
    torch.cuda.empty_cache()


def test_matmul_a_past_2_31_elements():
    _need_free(10)
    M, Kd, N = 524800, 4096, 64
    a = torch.randn(M, Kd, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(Kd, N, device="cuda", dtype=torch.bfloat16)
    K.matmul(a[:1024], b)  # small call first
    c = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
    K.matmul(a, b, out=c)
    torch.cuda.synchronize()
    for sl in (slice(0, 512), slice(M - 1024, M)):
        assert _rel(c[sl], a[sl].double() @ b.double()) < 1e-2, sl
    assert not torch.isnan(c).any()
    del a, c
    torch.cuda.empty_cache()


# --- decode shapes: every configuration path --------------------------------------------------------

def _paths():
    """(M, N, K, Config) covering each M bucket of the table, split and unsplit, flattened loops."""
    from lowlevel.kernels.matmul import TABLE, Config, config_for

    out = {}
    for M in (1, 7, 16, 32, 64, 100, 256, 1000):
        for N, Kd in ((4096, 4096), (14336, 4096), (4096, 14336), (1000, 3000)):
            cfg = config_for(M, N, Kd, 2)
            out.setdefault((cfg, M == 1), (M, N, Kd, cfg))
    for entries in TABLE.values():
        for cfg in entries.values():
            out.setdefault((cfg, False), (48, 2048, 4096, cfg))
    # forced paths: uneven split of a ragged K, flattened loop, split with odd M
    for cfg in (Config(16, 64, 128, 8, 4, 4, 3), Config(64, 128, 64, 8, 4, 3, 1, True), Config(32, 64, 64, 8, 4, 3, 5)):
        out.setdefault((cfg, False), (33, 1000, 3001, cfg))
    return list(out.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_matmul_every_config_path(dtype):
    from lowlevel.kernels.matmul import plan

    for M, N, Kd, cfg in _paths():
        a, b = _rand(M, Kd, dtype=dtype), _rand(Kd, N, dtype=dtype)
        out = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
        plan(a, b, out, "ieee", cfg=cfg).launch()
        torch.cuda.synchronize()
        assert not torch.isnan(out).any(), (M, N, Kd, cfg)
        assert _rel(out, a.double() @ b.double()) < TOL[dtype], (M, N, Kd, cfg)


def test_decode_matmul_split_is_deterministic_and_cap_sweeps_compile_nothing():
    from lowlevel.kernels.matmul import _launch, _matmul_kernel, config_for

    total = device_sm_count()
    dev = torch.cuda.current_device()
    for M, N, Kd in ((1, 4096, 14336), (16, 4096, 4096), (64, 14336, 4096), (256, 4096, 14336)):
        a, b = _rand(M, Kd, dtype=torch.bfloat16), _rand(Kd, N, dtype=torch.bfloat16)
        ref = a.double() @ b.double()
        first = K.matmul(a, b)
        torch.cuda.synchronize()
        compiled = len(_matmul_kernel.device_caches[dev][0])
        ours = len(_launch.cache)
        for cap in (1, 3, 33, 66, total):
            out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
            with lowlevel.sm_limit(cap):
                K.matmul(a, b, out=out)
            torch.cuda.synchronize()
            # same bits at any cap: with split-K, other programs draw the last ticket of a tile
            assert torch.equal(out, first), (M, N, Kd, cap, config_for(M, N, Kd, 2))
        assert _rel(first, ref) < 1e-2 and _rel(first[-1], ref[-1]) < 1e-2
        assert len(_matmul_kernel.device_caches[dev][0]) == compiled
        assert len(_launch.cache) == ours
        # the prepared path, with its own workspace, at two caps
        out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
        run = K.prepare_matmul(a, b, out=out)
        for cap in (5, total):
            out.fill_(float("nan"))
            with lowlevel.sm_limit(cap):
                run()
            torch.cuda.synchronize()
            assert torch.equal(out, first)


def test_launcher_check_passes_on_this_triton():
    """On the Triton the device carries, the fast path is taken (no fallback entries)."""
    from lowlevel.kernels._launch import check_launcher
    from lowlevel.kernels.copy import _launch

    src, dst = _rand(1000), torch.empty(1000, device="cuda")
    K.copy(src, dst)
    assert _launch.cache and not any(e.slow for e in _launch.cache.values())
    ck = next(iter(_copy_kernel_cache().values()))
    assert check_launcher(ck) is None


def _copy_kernel_cache():
    from lowlevel.kernels.copy import _copy_kernel

    return _copy_kernel.device_caches[torch.cuda.current_device()][0]


def test_matmul_forced_64_bit_offsets_small():
    """The WIDE (64-bit offset) variants, split and unsplit, on small random inputs."""
    from lowlevel.kernels.matmul import Config, plan

    for cfg in (Config(16, 64, 128, 8, 4, 4, 3), Config(64, 64, 64, 8, 4, 3)):
        a, b = _rand(40, 1000, dtype=torch.bfloat16), _rand(1000, 300, dtype=torch.bfloat16)
        out = torch.full((40, 300), float("nan"), device="cuda", dtype=torch.bfloat16)
        plan(a, b, out, "ieee", cfg=cfg, wide=True).launch()
        torch.cuda.synchronize()
        assert _rel(out, a.double() @ b.double()) < 1e-2, cfg


@pytest.mark.parametrize("prefetch", [False, True])
def test_rms_norm_prefetch_variants_real_size(prefetch):
    import importlib

    rn = importlib.import_module("lowlevel.kernels.rms_norm")
    x, w, r = _rand(4097, 8192, dtype=torch.bfloat16), _rand(8192, dtype=torch.bfloat16), _rand(4097, 8192,
                                                                                                 dtype=torch.bfloat16)
    s = x.double() + r.double()
    ref = s / torch.sqrt((s * s).mean(dim=1, keepdim=True) + 1e-6) * w.double()
    for cap in (1, 7, device_sm_count()):
        out = torch.full_like(x, float("nan"))
        with lowlevel.sm_limit(cap):
            y, new_r = rn.plan(x, w, 1e-6, r, out, cfg=rn._config(8192)[:3] + (prefetch,)).launch()
        torch.cuda.synchronize()
        assert _rel(y, ref) < 1e-2 and _rel(new_r, s) < 5e-3, cap


@pytest.mark.parametrize("mnk", [(64, 4096, 4096), (1, 4096, 14336), (16, 4096, 4096), (200, 1000, 3000)])
def test_matmul_plan_cache_at_decode_shapes(mnk):
    """matmul()'s cached plan (hits, fresh random inputs, poisoned out, with and without out, at
    two caps) against torch.matmul in float64, bit for bit against the uncached plan path, and a
    TABLE change that makes the next call plan again."""
    import importlib

    mm = importlib.import_module("lowlevel.kernels.matmul")
    mm.clear_plan_cache()
    M, N, Kd = mnk
    total = device_sm_count()
    try:
        for cap in (total, 33):
            with lowlevel.sm_limit(cap):
                for _ in range(3):  # a miss, then hits
                    a, b = _rand(M, Kd, dtype=torch.bfloat16), _rand(Kd, N, dtype=torch.bfloat16)
                    out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
                    assert K.matmul(a, b, out=out) is out
                    new = K.matmul(a, b)
                    ref = mm.plan(a, b, None, "tf32").launch()
                    torch.cuda.synchronize()
                    want = torch.matmul(a.double(), b.double())
                    assert not torch.isnan(out).any()
                    assert _rel(out, want) < 1e-2 and _rel(out[-1], want[-1]) < 1e-2
                    assert torch.equal(out, ref) and torch.equal(new, ref)  # deterministic, the same plan
        assert len(mm._PLANS) == 4  # (out given or not) x 2 caps
        if mnk != (64, 4096, 4096):  # the table check once (it compiles another configuration)
            return
        # a new TABLE entry for this shape: the next call uses it
        tk = mm._table_key(a, b)
        other = mm.Config(16, 64, 64, 8, 4, 3, 4 if mm.config_for(M, N, Kd, 2).split_k == 1 else 1)
        table = dict(mm.TABLE.get(tk[0], {}))
        table[tk[1]] = other
        old_table = mm.TABLE.get(tk[0])
        mm.TABLE[tk[0]] = table
        try:
            out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
            K.matmul(a, b, out=out)
            torch.cuda.synchronize()
            assert _rel(out, torch.matmul(a.double(), b.double())) < 1e-2
            key_entries = [e for e in mm._PLANS.values() if e.tcfg is other]
            assert len(key_entries) == 1 and (key_entries[0].ws_numel > 0) == (other.split_k > 1)
        finally:
            if old_table is None:
                del mm.TABLE[tk[0]]
            else:
                mm.TABLE[tk[0]] = old_table
    finally:
        mm.clear_plan_cache()


def test_matmul_plan_cache_follows_the_current_stream_and_workspace():
    """Hits launch on lowlevel's current stream (a split-K product's workspace is the stream's)."""
    import importlib

    mm = importlib.import_module("lowlevel.kernels.matmul")
    mm.clear_plan_cache()
    a, b = _rand(64, 4096, dtype=torch.bfloat16), _rand(4096, 4096, dtype=torch.bfloat16)
    want = torch.matmul(a.double(), b.double())
    K.matmul(a, b)
    s = lowlevel.Stream()
    outs = []
    with lowlevel.use_stream(s):
        for _ in range(3):
            out = torch.full((64, 4096), float("nan"), device="cuda", dtype=torch.bfloat16)
            torch.cuda.current_stream().wait_stream(torch.cuda.default_stream())
            K.matmul(a, b, out=out)
            outs.append(out)
    s.synchronize()
    for out in outs:
        assert _rel(out, want) < 1e-2
    mm.clear_plan_cache()
