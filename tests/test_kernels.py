"""Kernels on small shapes: under TRITON_INTERPRET=1 on the CPU, compiled on a GPU."""
import threading

import numpy as np
import pytest
import torch

import lowlevel
from lowlevel.sm_control import device_sm_count

K = pytest.importorskip("lowlevel.kernels")
DEV = "cuda" if lowlevel.cuda_available() else "cpu"


def _rand(*shape, dtype=torch.float32):
    return torch.from_numpy(np.random.default_rng().standard_normal(shape)).to(dtype).to(DEV)


def _rel(got, ref):
    got, ref = got.double().cpu(), ref.double().cpu()
    return float((got - ref).norm() / ref.norm())


CAPS = [1, 3, None]


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
@pytest.mark.parametrize("mnk", [(37, 45, 29), (16, 16, 16), (1, 50, 7), (33, 1, 40)])
def test_matmul_against_float64(cap, dtype, tol, mnk):
    M, N, Kd = mnk
    a, b = _rand(M, Kd, dtype=dtype), _rand(Kd, N, dtype=dtype)
    out = torch.full((M, N), float("nan"), device=DEV, dtype=dtype)
    with lowlevel.sm_limit(cap or device_sm_count()):
        K.matmul(a, b, out=out, precision="ieee")
    ref = a.double() @ b.double()
    assert not torch.isnan(out).any()
    assert _rel(out, ref) < tol


def test_matmul_strided_inputs():
    a = _rand(40, 60)[:, ::2]  # (40, 30) with stride 2 along K
    b = _rand(30, 24).t().contiguous().t()  # column-major
    got = K.matmul(a, b, precision="ieee")
    assert _rel(got, a.double() @ b.double()) < 1e-5


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_nested_tensors_are_refused_by_name():
    """A nested tensor reports the strided layout but has no sizes: every kernel raised torch's
    own RuntimeError from its shape checks; now a ValueError naming the argument, nothing run."""
    x, w, b = _rand(6, 40), _rand(40), _rand(40, 24)
    nx = torch.nested.nested_tensor(list(x))
    y = torch.full_like(x, float("nan"))
    with pytest.raises(ValueError, match="^x must be a dense tensor, got a nested tensor"):
        K.rms_norm(nx, w, 1e-6, out=y)
    with pytest.raises(ValueError, match="^out must be a dense tensor, got a nested tensor"):
        K.rms_norm(x, w, 1e-6, out=torch.nested.nested_tensor(list(y)))
    with pytest.raises(ValueError, match="^a must be a dense tensor, got a nested tensor"):
        K.matmul(nx, b)
    with pytest.raises(ValueError, match="^src must be a dense tensor, got a nested tensor"):
        K.copy(nx, y)
    assert torch.isnan(y).all()  # nothing ran


def test_rms_norm_refuses_a_strided_weight():
    """The kernel reads weight[i] at w_ptr + i: a strided or expanded weight gave a wrong y
    (the expanded one read past its storage) before it was refused."""
    x = _rand(6, 40)
    y = torch.full_like(x, float("nan"))
    for w in (_rand(80)[::2], torch.full((1,), 1.5, device=DEV).expand(40)):
        with pytest.raises(ValueError, match="weight must be contiguous"):
            K.rms_norm(x, w, 1e-6, out=y)
        with pytest.raises(ValueError, match="weight must be contiguous"):
            K.prepare_rms_norm(x, w, 1e-6, out=y)
    assert torch.isnan(y).all()  # nothing ran
    w = _rand(40)
    ref = x.double() / torch.sqrt((x.double() ** 2).mean(dim=1, keepdim=True) + 1e-6) * w.double()
    assert _rel(K.rms_norm(x, w, 1e-6, out=y), ref) < 1e-6


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_rms_norm_with_and_without_residual(cap, dtype, tol):
    rows, n = 13, 100
    x, w, r = _rand(rows, n, dtype=dtype), _rand(n, dtype=dtype), _rand(rows, n, dtype=dtype)
    with lowlevel.sm_limit(cap or device_sm_count()):
        y = K.rms_norm(x, w, 1e-6)
        y2, new_r = K.rms_norm(x, w, 1e-6, residual=r)

    def ref(v):
        v = v.double()
        return v / torch.sqrt((v * v).mean(dim=1, keepdim=True) + 1e-6) * w.double()

    assert _rel(y, ref(x)) < tol
    assert _rel(new_r, x.double() + r.double()) < tol
    assert _rel(y2, ref(x.double() + r.double())) < tol


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("n", [1, 127, 1000, 4099])
def test_copy(cap, n):
    src = _rand(n)
    dst = torch.full((n,), float("nan"), device=DEV)
    with lowlevel.sm_limit(cap or device_sm_count()):
        assert K.copy(src, dst) is dst
    assert torch.equal(dst, src)


def test_cap_changes_do_not_add_kernels():
    a, b = _rand(20, 20), _rand(20, 20)
    from lowlevel.kernels.matmul import _launch
    K.matmul(a, b)
    before = len(_launch.cache)
    for cap in (1, 2, 3, 5, 7, device_sm_count()):
        with lowlevel.sm_limit(cap):
            K.matmul(a, b)
    assert len(_launch.cache) == before


def test_validation():
    a = _rand(4, 5)
    with pytest.raises(ValueError, match="inner dimensions"):
        K.matmul(a, _rand(4, 5))
    with pytest.raises(TypeError, match="same dtype"):
        K.matmul(a, _rand(5, 3, dtype=torch.float16))
    with pytest.raises(TypeError, match="supports"):
        K.matmul(a.double(), _rand(5, 3).double())
    with pytest.raises(ValueError, match="2-D"):
        K.matmul(_rand(2, 2, 2), a)
    with pytest.raises(TypeError, match="torch.Tensor or cupy"):
        K.matmul(np.ones((2, 2)), a)
    with pytest.raises(ValueError, match="out must be"):
        K.matmul(a, _rand(5, 3), out=_rand(4, 4))
    with pytest.raises(ValueError, match="weight"):
        K.rms_norm(a, _rand(4))
    with pytest.raises(ValueError, match="contiguous"):
        K.rms_norm(_rand(5, 4).t(), _rand(5))
    with pytest.raises(ValueError, match="must match"):
        K.copy(_rand(3), _rand(4))
    with pytest.raises(ValueError):
        lowlevel.sm_limit(0)
    with pytest.raises(ValueError):
        K.set_num_sms(-2)


def test_sm_limit_nests_per_thread_and_set_num_sms():
    total = device_sm_count()
    assert K.get_num_sms() == total
    K.set_num_sms(2)
    try:
        assert K.get_num_sms() == 2
        with lowlevel.sm_limit(5):
            assert K.get_num_sms() == min(5, total)
            with lowlevel.sm_limit(1):
                assert K.get_num_sms() == 1
                seen = []
                th = threading.Thread(target=lambda: seen.append(K.get_num_sms()))
                th.start()
                th.join()
                assert seen == [2]  # another thread sees the process-wide value
            assert K.get_num_sms() == min(5, total)
        with pytest.raises(KeyError), lowlevel.sm_limit(3):
            raise KeyError
        assert K.get_num_sms() == 2
    finally:
        K.set_num_sms(None)
    assert K.get_num_sms() == total


def test_sm_control_context_manager():
    log = []
    ctl = lowlevel.SMControlContextManager(20, lambda n: log.append(("comm", n)), lambda n: log.append(("comp", n)),
                                           total_sms=132)
    with pytest.raises(RuntimeError), ctl:
        assert log == [("comm", 20), ("comp", 112)]
        raise RuntimeError
    assert log[2:] == [("comm", 132), ("comp", 132)]
    for bad in (132, 200, -1):
        with pytest.raises(ValueError):
            lowlevel.SMControlContextManager(bad, print, print, total_sms=132)
    # with lowlevel's own setters
    with lowlevel.SMControlContextManager(3, lambda n: None, K.set_num_sms, total_sms=8):
        assert K.get_num_sms() == min(5, device_sm_count())
    assert K.get_num_sms() == min(8, device_sm_count())
    K.set_num_sms(None)


def test_prepared_launches_recompute_with_new_data_and_caps():
    a, b = _rand(30, 20), _rand(20, 10)
    out = torch.full((30, 10), float("nan"), device=DEV)
    run = K.prepare_matmul(a, b, out=out, precision="ieee")
    for cap in (1, 3, None):
        a.copy_(_rand(30, 20))
        out.fill_(float("nan"))
        with lowlevel.sm_limit(cap or device_sm_count()):
            run()
        assert _rel(out, a.double() @ b.double()) < 1e-5
    src, dst = _rand(300), torch.full((300,), float("nan"), device=DEV)
    cp_run = K.prepare_copy(src, dst)
    src.copy_(_rand(300))
    cp_run()
    assert torch.equal(src, dst)
    x, w = _rand(7, 33), _rand(33)
    y = torch.full_like(x, float("nan"))
    rn = K.prepare_rms_norm(x, w, out=y)
    x.copy_(_rand(7, 33))
    rn()
    xd = x.double()
    assert _rel(y, xd / torch.sqrt((xd * xd).mean(1, keepdim=True) + 1e-6) * w.double()) < 1e-6
    with pytest.raises(ValueError):
        K.prepare_matmul(a, b, out=None)


def test_prepared_launch_grid_follows_every_cap_source():
    """The prepared path reads the cap inline: its grid is min(get_num_sms(), tiles) under
    set_num_sms, nested sm_limit blocks, and in another thread (its own stack)."""
    import threading

    from lowlevel.sm_control import device_sm_count

    src, dst = _rand(16 * 4096), torch.empty(16 * 4096, device=DEV)
    p = K.prepare_copy(src, dst)
    tiles = p.tiles
    assert tiles > 3

    def grid_now():
        p()
        return p._grid

    def want():
        return min(K.get_num_sms(), tiles)

    assert grid_now() == want() == min(device_sm_count(), tiles)
    try:
        K.set_num_sms(3)
        assert grid_now() == want() == 3
        with lowlevel.sm_limit(2):
            assert grid_now() == want() == 2
            with lowlevel.sm_limit(1000):
                assert grid_now() == want() == min(device_sm_count(), tiles)
            assert grid_now() == 2
        seen = []
        th = threading.Thread(target=lambda: seen.append(grid_now()))
        th.start()
        th.join()
        assert seen == [3]  # the process-wide cap, not this thread's stack
    finally:
        K.set_num_sms(None)
    assert grid_now() == min(device_sm_count(), tiles)
    assert torch.equal(dst, src)


def test_stream_launch_refuses_what_is_no_stream_before_launching():
    src, dst = _rand(300), torch.full((300,), float("nan"), device=DEV)
    for bad in ("s0", 1.5, True, -3):
        with pytest.raises((TypeError, ValueError), match="stream"):
            K.prepare_copy(src, dst, stream=bad)
        with pytest.raises((TypeError, ValueError), match="stream"):
            K.prepare_matmul(_rand(4, 5), _rand(5, 3), out=torch.empty(4, 3, device=DEV), stream=bad)
    assert torch.isnan(dst).all()  # nothing launched

    class CS:  # the __cuda_stream__ protocol, badly kept
        def __init__(self, v):
            self.v = v

        def __cuda_stream__(self):
            return self.v

    for v in ("x", (0,), (0, "7"), (0, 7.9), (0, True), (0, -1), (0, 1 << 64)):
        with pytest.raises((TypeError, ValueError), match="stream"):
            K.prepare_copy(src, dst, stream=CS(v))
    for bad in (1 << 64, 1 << 70):
        with pytest.raises(ValueError, match="stream"):
            K.prepare_copy(src, dst, stream=bad)
    # the stream is checked before the split-K workspace is made
    import importlib

    mm = importlib.import_module("lowlevel.kernels.matmul")  # the module (the package's name is the function)
    made = []
    real = mm._workspace
    mm._workspace = lambda *a, **k: made.append(1) or real(*a, **k)
    try:
        with pytest.raises(TypeError, match="stream"):
            mm.prepare_matmul(_rand(4, 50), _rand(50, 3), out=torch.empty(4, 3, device=DEV), stream="bad")
    finally:
        mm._workspace = real
    assert made == []
    assert torch.isnan(dst).all()


def test_launch_key_is_the_same_on_both_paths():
    """The validated path keys its cache in one pass with the pointers; prepared launches look the
    same entry up with key(): the two must agree, or a prepared launch would miss its kernel."""
    from lowlevel.kernels.copy import _launch

    for n in (16, 17, 1):
        src, dst = _rand(n), _rand(n)
        for args in [(src, dst, n, 3), (src[1:], dst, n, 1)]:
            key, flat = _launch._key_and_ptrs(args, {"BLOCK": 128}, 4, 1)
            assert key == _launch.key(args, {"BLOCK": 128}, 4, 1)
            assert flat[:2] == [args[0].data_ptr(), args[1].data_ptr()] and flat[2:] == list(args[2:])


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("rows,n,rows_per", [(13, 100, 1), (40, 33, 2), (1, 7, 4)])
def test_rms_norm_variants(prefetch, rows, n, rows_per):
    """Both loop shapes (load in the loop, or the next block loaded ahead), ragged row blocks, caps."""
    import importlib

    rn = importlib.import_module("lowlevel.kernels.rms_norm")
    for cap in (1, 3, device_sm_count()):
        x, w, r = _rand(rows, n), _rand(n), _rand(rows, n)
        y = torch.full_like(x, float("nan"))
        with lowlevel.sm_limit(cap):
            rn.plan(x, w, 1e-6, None, y, cfg=(rows_per, 1, 1, prefetch)).launch()
            y2, new_r = rn.plan(x, w, 1e-6, r, None, cfg=(rows_per, 1, 1, prefetch)).launch()
        xd, s = x.double(), x.double() + r.double()
        assert _rel(y, xd / torch.sqrt((xd * xd).mean(1, keepdim=True) + 1e-6) * w.double()) < 1e-6
        assert _rel(y2, s / torch.sqrt((s * s).mean(1, keepdim=True) + 1e-6) * w.double()) < 1e-6
        assert _rel(new_r, s) < 1e-6


@pytest.mark.parametrize("cfg", [(16, 16, 16, 2, 1, 1, 3), (16, 32, 32, 2, 1, 1, 2, True),
                                 (16, 16, 16, 2, 1, 1, 1, True)])
@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("mnk", [(1, 40, 70), (17, 33, 64), (5, 16, 129), (20, 50, 0)])
def test_matmul_split_k_flatten_and_wide_paths(cfg, wide, mnk):
    """Split-K (ragged last slice), the flattened loop and 64-bit offsets, forced on small shapes."""
    from lowlevel.kernels.matmul import Config, plan

    M, N, Kd = mnk
    a, b = _rand(M, Kd), _rand(Kd, N)
    out = torch.full((M, N), float("nan"), device=DEV)
    plan(a, b, out, "ieee", cfg=Config(*cfg), wide=wide).launch()
    if Kd == 0:
        assert torch.equal(out, torch.zeros_like(out))
    else:
        assert _rel(out, a.double() @ b.double()) < 1e-5
    again = torch.full_like(out, float("nan"))
    plan(a, b, again, "ieee", cfg=Config(*cfg), wide=wide).launch()
    assert torch.equal(again, out)  # split-K sums in a fixed order: the same bits each run


@pytest.mark.parametrize("mnk", [(17, 33, 70), (3, 40, 130)])
def test_matmul_split_k_fixup_same_bits_whichever_slice_is_last(mnk):
    """The in-kernel split-K fix-up: under different caps the slices of a tile finish in
    different orders (another program draws the last ticket), yet the sum order is fixed, so
    the bits are equal; every tile counter is back at 0 after each launch."""
    from lowlevel.kernels.matmul import Config, plan

    M, N, Kd = mnk
    a, b = _rand(M, Kd), _rand(Kd, N)
    ref = a.double() @ b.double()
    outs = []
    for cap in (1, 2, 5, 64):
        out = torch.full((M, N), float("nan"), device=DEV)
        with lowlevel.sm_limit(cap):
            p = plan(a, b, out, "ieee", cfg=Config(16, 16, 16, 2, 1, 1, 3), own_ws=True)
            assert p.constexprs["SPLIT_K"] and p.tiles > cap >= 1 or cap == 64
            cnt = p.args[4]
            assert cnt.dtype == torch.int32 and not cnt.any()
            p.launch()
            p.launch()  # a second launch on the same counters
        assert not cnt.any()  # the last slice of each tile put its counter back
        assert _rel(out, ref) < 1e-5 and _rel(out[-1], ref[-1]) < 1e-5
        outs.append(out)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_clear_plan_cache_gives_fresh_split_k_counters(fresh_plans, monkeypatch):
    """A tile counter left off 0 (what a race between two streams sharing a workspace can
    do) breaks later split-K products on that stream; clear_plan_cache() retires the shared
    workspace, so the next product is right again."""
    mm = fresh_plans
    monkeypatch.setattr(mm, "config_for", lambda *a, **k: mm.Config(16, 16, 16, 2, 1, 1, 3))
    mm.clear_plan_cache()  # one shared workspace below: the current stream's
    a, b = _rand(20, 70), _rand(70, 24)
    ref = a.double() @ b.double()
    assert _rel(K.matmul(a, b, precision="ieee"), ref) < 1e-5
    if not mm._WS:  # CPU tensors (the interpreter) get a workspace per call: nothing shared
        pytest.skip("no shared split-K workspace for CPU tensors")
    ((_, cnt),) = mm._WS.values()
    cnt.fill_(5)  # past the last ticket (2): no program of a tile ever sums it
    out = torch.full((20, 24), float("nan"), device=DEV)
    K.matmul(a, b, out=out, precision="ieee")
    assert torch.isnan(out).all()  # the corruption outlives the launch that made it
    mm.clear_plan_cache()
    assert not mm._WS
    K.matmul(a, b, out=out, precision="ieee")
    assert _rel(out, ref) < 1e-5 and _rel(out[-1], ref[-1]) < 1e-5


def test_bf16_products_are_refused_under_the_interpreter_only():
    """triton 3.6's interpreter computes a bf16 tl.dot wrong: refused there, with the reason."""
    from lowlevel.kernels._launch import INTERPRET

    a, b = _rand(17, 48).bfloat16(), _rand(48, 19).bfloat16()
    if INTERPRET:
        out = torch.full((17, 19), float("nan"), device=DEV, dtype=torch.bfloat16)
        with pytest.raises(TypeError, match="interpreter"):
            K.matmul(a, b, out=out)
        assert torch.isnan(out).all()
        with pytest.raises(TypeError, match="interpreter"):
            K.prepare_matmul(a, b, out=out)
        a16, b16 = a.half(), b.half()  # float16 is right there
        assert _rel(K.matmul(a16, b16), a16.double() @ b16.double()) < 1e-2
    else:
        assert _rel(K.matmul(a, b), a.double() @ b.double()) < 1e-2


def test_config_table_and_heuristic():
    from lowlevel.kernels.matmul import TABLE, Config, heuristic_config, m_bucket

    assert [m_bucket(m) for m in (1, 2, 16, 17, 64, 65, 256, 257)] == [1, 16, 16, 32, 64, 128, 256, 0]
    for entries in TABLE.values():
        for (mb, n, k), cfg in entries.items():
            assert isinstance(cfg, Config) and cfg.split_k >= 1 and n % 16 == 0 and k % 16 == 0
    for sms in (8, 66, 132, 170):  # the split follows the SM count, never more tiles x slices than needed
        cfg = heuristic_config(16, 4096, 4096, 2, sms)
        tiles = -(-16 // cfg.block_m) * -(-4096 // cfg.block_n)
        assert cfg.split_k == max(1, min(sms // tiles, 4096 // (4 * cfg.block_k)))
    assert heuristic_config(8192, 8192, 8192, 2, 132).block_m == 128


# --- matmul()'s plan cache ------------------------------------------------------------------------

def _mm():
    import importlib

    return importlib.import_module("lowlevel.kernels.matmul")


@pytest.fixture
def fresh_plans():
    mm = _mm()
    mm.clear_plan_cache()
    yield mm
    mm.clear_plan_cache()
    K.set_num_sms(None)


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("mnk", [(37, 45, 70), (1, 50, 33), (17, 16, 100)])
def test_matmul_plan_cache_hits_give_the_uncached_result(fresh_plans, monkeypatch, split, mnk):
    """Cached plans (hits, fresh random inputs, poisoned out, ragged last tiles, split-K or not)
    against float64 and bit for bit against the uncached plan path."""
    mm = fresh_plans
    if split > 1:
        monkeypatch.setattr(mm, "config_for", lambda *a, **k: mm.Config(16, 16, 16, 2, 1, 1, split))
    M, N, Kd = mnk
    for i in range(3):  # a miss, then hits
        a, b = _rand(M, Kd), _rand(Kd, N)
        out = torch.full((M, N), float("nan"), device=DEV)
        got = K.matmul(a, b, out=out, precision="ieee")
        assert got is out and not torch.isnan(out).any()
        assert _rel(out, a.double() @ b.double()) < 1e-5
        assert _rel(out[-1], (a.double() @ b.double())[-1]) < 1e-5  # the last row (ragged last tile)
        new = K.matmul(a, b, precision="ieee")  # without out: its own cache entry
        ref = mm.plan(a, b, None, "ieee").launch()
        assert torch.equal(new, ref) and torch.equal(out, ref)
        assert len(mm._PLANS) == 2, i
    entry = next(iter(mm._PLANS.values()))
    assert (entry.ws_numel > 0) == (split > 1 and Kd > 16)


def test_matmul_plan_cache_misses_on_what_changes_the_launch(fresh_plans):
    mm = fresh_plans
    a, b = _rand(20, 30), _rand(30, 24)
    out = torch.empty(20, 24, device=DEV)

    def misses(fn):
        before = len(mm._PLANS)
        fn()
        fn()  # the second time hits
        return len(mm._PLANS) - before

    assert misses(lambda: K.matmul(a, b)) == 1
    assert misses(lambda: K.matmul(a, b)) == 0
    assert misses(lambda: K.matmul(a, b, out=out)) == 1  # out given
    assert misses(lambda: K.matmul(a, b, precision="ieee")) == 1  # precision
    for cap in (1, 3):  # the SM cap, per thread and process-wide
        with lowlevel.sm_limit(cap):
            assert misses(lambda: K.matmul(a, b)) == 1
    K.set_num_sms(2)
    assert misses(lambda: K.matmul(a, b)) == 1
    with lowlevel.sm_limit(3):  # the innermost cap: already planned
        assert misses(lambda: K.matmul(a, b)) == 0
    K.set_num_sms(None)
    assert misses(lambda: K.matmul(a, b)) == 0
    assert misses(lambda: K.matmul(a.half(), b.half())) == 1  # dtype
    assert misses(lambda: K.matmul(a.t().contiguous().t(), b)) == 1  # strides
    assert misses(lambda: K.matmul(a[:19], b)) == 1  # shape
    assert misses(lambda: K.matmul(a, b[:, :23])) == 1
    big = _rand(20, 31)
    assert misses(lambda: K.matmul(big[:, 1:], b)) == 1  # a 4-byte-aligned pointer (Triton specialises on 16)
    with lowlevel.sm_limit(2):  # results stay right whatever the cap
        got = K.matmul(a, b, precision="ieee")
    assert _rel(got, a.double() @ b.double()) < 1e-5


def test_matmul_plan_cache_is_bounded(fresh_plans, monkeypatch):
    mm = fresh_plans
    monkeypatch.setattr(mm, "PLAN_CACHE_SIZE", 4)
    b = _rand(8, 8)
    for m in range(1, 8):
        K.matmul(_rand(m, 8), b)
    assert len(mm._PLANS) == 4
    assert [k[0][0] for k in mm._PLANS] == [4, 5, 6, 7]  # the oldest went first


def test_matmul_plan_cache_rechecks_the_table_entry(fresh_plans, monkeypatch):
    """A hit whose TABLE entry changed plans again, with the new entry."""
    mm = fresh_plans
    slot = (("test", 8), (16, 24, 64))
    monkeypatch.setattr(mm, "_table_key", lambda at, bt: slot)
    monkeypatch.setitem(mm.TABLE, slot[0], {slot[1]: mm.Config(16, 16, 16, 2, 1, 1)})
    used = []
    monkeypatch.setattr(mm, "config_for", lambda *a, **k: used.append(1) or mm.TABLE[slot[0]][slot[1]])
    a, b = _rand(16, 64), _rand(64, 24)
    K.matmul(a, b, precision="ieee")
    K.matmul(a, b, precision="ieee")
    assert len(used) == 1 and len(mm._PLANS) == 1  # planned once
    mm.TABLE[slot[0]][slot[1]] = mm.Config(16, 16, 16, 2, 1, 1, 2)  # a new measured entry
    got = K.matmul(a, b, precision="ieee")
    assert len(used) == 2 and len(mm._PLANS) == 1 and next(iter(mm._PLANS.values())).ws_numel > 0
    assert _rel(got, a.double() @ b.double()) < 1e-5
    K.matmul(a, b, precision="ieee")
    assert len(used) == 2
    mm.clear_plan_cache()
    K.matmul(a, b, precision="ieee")
    assert len(used) == 3


def test_matmul_bad_input_on_a_warm_cache_raises_before_launching(fresh_plans):
    mm = fresh_plans
    a, b = _rand(4, 5), _rand(5, 3)
    out = torch.full((4, 3), float("nan"), device=DEV)
    K.matmul(a, b, out=torch.empty(4, 3, device=DEV))
    K.matmul(a, b)
    n = len(mm._PLANS)
    with pytest.raises(ValueError, match="inner dimensions"):
        K.matmul(a, _rand(4, 3), out=out)
    with pytest.raises(TypeError, match="same dtype"):
        K.matmul(a, b.half(), out=out)
    with pytest.raises(TypeError, match="supports"):
        K.matmul(a.double(), b.double())
    with pytest.raises(ValueError, match="2-D"):
        K.matmul(a[None], b)
    with pytest.raises(ValueError, match="out must be"):
        K.matmul(a, b, out=torch.empty(4, 4, device=DEV))
    with pytest.raises(ValueError, match="out must be"):
        K.matmul(a, b, out=out.half())
    with pytest.raises(ValueError, match="precision"):
        K.matmul(a, b, out=out, precision="fp8")
    with pytest.raises(ValueError, match="precision"):
        K.matmul(a, b, out=out, precision=["tf32"])
    with pytest.raises(TypeError, match="torch.Tensor or cupy"):
        K.matmul(a, b, out=np.empty((4, 3), np.float32))
    with pytest.raises(TypeError, match="torch.Tensor or cupy"):
        K.matmul(a.numpy() if DEV == "cpu" else a.cpu().numpy(), b)
    assert torch.isnan(out).all()  # nothing launched into it
    assert len(mm._PLANS) == n  # and nothing was cached


def test_work_units_counts_what_the_launch_runs():
    """work_units() (what the 2-GPU bench and comm_sm_candidates size SM caps by) equals the
    work units of the launch matmul plans, with and without a K split (on the GPU, 64 x 4096 x
    14336 splits K in two on an H200; short K gets fewer slices)."""
    from lowlevel.kernels.matmul import plan, work_units

    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    shapes = [(17, 33, 70), (3, 40, 130), (64, 48, 16)]
    if DEV == "cuda":
        shapes += [(16, 4096, 4096), (64, 4096, 14336), (256, 4096, 14336), (1000, 512, 256), (5, 4096, 40)]
    for M, N, Kd in shapes:
        a, b = _rand(M, Kd, dtype=dt), _rand(Kd, N, dtype=dt)
        p = plan(a, b, None, "ieee")
        assert work_units(M, N, Kd, a.element_size()) == p.tiles, (M, N, Kd)


def test_outputs_overlapping_their_inputs_are_refused():
    """A kernel writing into memory it reads (out aliasing a, a window of x, an expanded out)
    gave silently wrong results; now ValueError names both tensors, before anything runs, on
    the plan cache's hit path too. Exactly in place stays allowed where it is safe (rms_norm
    and copy read each element before writing it)."""
    a, b, c = _rand(8, 8), _rand(8, 8), torch.empty(8, 8, device=DEV)
    K.matmul(a, b, out=c, precision="ieee")  # warms the plan cache for this key
    for out, name in ((a, "a"), (b, "b")):  # same key as the call above: the cache hit path
        before = out.clone()
        with pytest.raises(ValueError, match=f"out overlaps {name} in memory"):
            K.matmul(a, b, out=out, precision="ieee")
        assert torch.equal(out, before)
    buf = _rand(9, 8)
    with pytest.raises(ValueError, match="out overlaps a"):
        K.matmul(buf[:8], b, out=buf[1:], precision="ieee")  # a window one row off
    with pytest.raises(ValueError, match="stride 0"):
        K.matmul(a, b, out=torch.empty(1, 8, device=DEV).expand(8, 8), precision="ieee")
    with pytest.raises(ValueError, match="out overlaps a"):
        K.prepare_matmul(a, b, out=a, precision="ieee")
    ref = a.double() @ b.double()
    assert _rel(K.matmul(a, b, out=c, precision="ieee"), ref) < 1e-6  # a separate out still works

    x, w = _rand(6, 40), _rand(40)
    ref = x.double() / torch.sqrt((x.double() ** 2).mean(dim=1, keepdim=True) + 1e-6) * w.double()
    assert _rel(K.rms_norm(x, w, 1e-6, out=x), ref) < 1e-6  # exactly in place: allowed
    xb = _rand(7, 40)
    for out, name in ((xb[1:], "x"), (w.view(1, 40).expand(6, 40), "stride 0")):
        with pytest.raises(ValueError, match=name):
            K.rms_norm(xb[:6], w, 1e-6, out=out)
    wx = _rand(6, 40)
    with pytest.raises(ValueError, match="out overlaps weight"):
        K.rms_norm(_rand(6, 40), wx[0], 1e-6, out=wx)

    src = _rand(64)
    with pytest.raises(ValueError, match="dst overlaps src"):
        K.copy(src[:32], src[16:48])
    same = src.clone()
    assert torch.equal(K.copy(same, same), src)  # onto itself: a no-op, allowed
