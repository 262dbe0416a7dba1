"""GPU tier of tile overlap: producer and consumer really run side by side (two streams, or two
graph branches), at real shapes and SM splits, under graph replay many times in a row, and the
peer copy on two GPUs. Every consumer polls at most MAX_SPINS times before giving up and
marking the error word (no test can hang the GPU: a broken protocol shows as an error or a
wrong result); the command running this file also carries a wall-clock timeout."""
import numpy as np
import pytest

import lowlevel
from lowlevel.sm_control import device_sm_count

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
TO = pytest.importorskip("lowlevel.kernels.tile_overlap")

MAX_SPINS = 1 << 22  # a few seconds of polling at most
TOL = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _rand(*shape, dtype=torch.bfloat16, device="cuda"):
    return torch.randn(*shape, device=device, dtype=torch.float32).to(dtype)


def _rel(got, ref):
    got, ref = got.double(), ref.double()
    return float((got - ref).norm() / ref.norm())


def _rms_ref(o, w, eps=1e-6):
    o = o.double()
    return o / torch.sqrt((o * o).mean(dim=1, keepdim=True) + eps) * w.double()


def _ov(p, c):
    return TO.tile_overlap(producer_sms=p, consumer_sms=c, max_spins=MAX_SPINS)


def _splits():
    t = device_sm_count()
    return [(t - 4, 4), (t // 2, t - t // 2), (1, t - 1), (5, 3)]


SHAPES = [(1, 4096, 512), (16, 4096, 4096), (100, 1000, 300), (257, 2050, 640), (1024, 4096, 1024)]


@pytest.mark.parametrize("split", _splits(), ids=str)
@pytest.mark.parametrize("mnk", SHAPES, ids=str)
def test_matmul_rms_norm_real_shapes_and_splits(mnk, split):
    M, N, K = mnk
    a, b, w = _rand(M, K), _rand(K, N), _rand(N)
    out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
    y = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
    ov = _ov(*split)
    ov.matmul_rms_norm(a, b, w, out=out, y=y)
    torch.cuda.synchronize()
    ov.check()
    assert not torch.isnan(out).any() and not torch.isnan(y).any()
    assert _rel(out, a.double() @ b.double()) < 1e-2
    assert _rel(y, _rms_ref(out, w)) < 1e-2
    assert _rel(y[-1:], _rms_ref(out[-1:], w)) < 1e-2
    assert ov.launches == 1


def test_long_rows_take_the_two_pass_consumer():
    M, N, K = 90, 20000, 256
    a, b, w = _rand(M, K), _rand(K, N), _rand(N)
    y = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
    ov = _ov(120, 12)
    out, _ = ov.matmul_rms_norm(a, b, w, y=y)
    torch.cuda.synchronize()
    ov.check()
    assert _rel(out, a.double() @ b.double()) < 1e-2
    assert _rel(y, _rms_ref(out, w)) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_other_dtypes(dtype):
    a, b, w = _rand(70, 900, dtype=dtype), _rand(900, 1500, dtype=dtype), _rand(1500, dtype=dtype)
    ov = _ov(100, 20)
    out, y = ov.matmul_rms_norm(a, b, w)
    d = torch.full((70, 1500), float("nan"), device="cuda", dtype=dtype)
    out2, _ = ov.matmul_copy(a, b, dst=d)
    torch.cuda.synchronize()
    ov.check()
    assert _rel(out, a.double() @ b.double()) < TOL[dtype]
    assert _rel(y, _rms_ref(out, w)) < TOL[dtype]
    assert torch.equal(d, out2)


@pytest.mark.parametrize("split", _splits() + [(device_sm_count(), 0), (7, 0)], ids=str)
@pytest.mark.parametrize("mnk", SHAPES[1:4], ids=str)
def test_matmul_copy_real_shapes_and_splits(mnk, split):
    M, N, K = mnk
    a, b = _rand(M, K), _rand(K, N)
    dst = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
    ov = _ov(*split)
    out, _ = ov.matmul_copy(a, b, dst=dst)
    torch.cuda.synchronize()
    ov.check()
    assert torch.equal(dst, out)
    assert _rel(out, a.double() @ b.double()) < 1e-2


def test_slow_producer_many_consumers():
    """One producer SM against many spinning consumers: the consumers certainly run while the
    producer is still computing, so a missing release/acquire would show as NaN (poisoned out)."""
    M, N, K = 512, 4096, 2048
    a, b, w = _rand(M, K), _rand(K, N), _rand(N)
    ov = _ov(2, device_sm_count() - 2)
    for _ in range(3):
        out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
        dst = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
        _, y = ov.matmul_rms_norm(a, b, w, out=out)
        torch.cuda.synchronize()
        assert not torch.isnan(y).any()
        assert _rel(y, _rms_ref(out, w)) < 1e-2
        ov.matmul_copy(a, b, dst=dst)
        torch.cuda.synchronize()
        assert torch.equal(dst, out)
    ov.check()


def test_back_to_back_launches_without_sync_and_changing_shapes():
    ov = _ov(112, 20)
    jobs = []
    for i in range(24):
        M, N, K = [(64, 4096, 1024), (16, 2048, 512), (300, 1000, 256)][i % 3]
        a, b, w = _rand(M, K), _rand(K, N), _rand(N)
        out, y = ov.matmul_rms_norm(a, b, w)
        jobs.append((a, b, w, out, y))
    torch.cuda.synchronize()
    ov.check()
    assert ov.launches == 24
    for a, b, w, out, y in jobs:
        assert _rel(out, a.double() @ b.double()) < 1e-2
        assert _rel(y, _rms_ref(out, w)) < 1e-2


@pytest.mark.parametrize("op", ["rms_norm", "copy", "copy in the epilogue"])
def test_full_graph_replays_are_independent(op):
    """Capture once, replay many times: outputs are poisoned inside the graph before each
    launch and inputs change between replays, so a consumer acting on stale flags from the
    previous replay would read NaN or old data."""
    M, N, K = 200, 4096, 1024
    a, b, w = _rand(M, K), _rand(K, N), _rand(N)
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(out)
    ov = _ov(116, 0 if op == "copy in the epilogue" else 16)

    def step():
        out.fill_(float("nan"))
        y.fill_(float("nan"))
        if op == "rms_norm":
            ov.matmul_rms_norm(a, b, w, out=out, y=y)
        else:
            ov.matmul_copy(a, b, out=out, dst=y)

    step()  # compile and allocate the flags outside the capture
    torch.cuda.synchronize()
    with lowlevel.capture() as g:
        step()
    rng = np.random.default_rng()
    for i in range(25):
        a.copy_(torch.from_numpy(rng.standard_normal((M, K), dtype=np.float32)))
        g.replay()
        torch.cuda.synchronize()
        assert not torch.isnan(y).any(), i
        assert _rel(out, a.double() @ b.double()) < 1e-2, i
        if op == "rms_norm":
            assert _rel(y, _rms_ref(out, w)) < 1e-2, i
        else:
            assert torch.equal(y, out), i
    for _ in range(300):
        g.replay()
    torch.cuda.synchronize()
    ov.check()
    assert ov.launches == 1 + 25 + 300
    assert not torch.isnan(y).any()
    if op == "rms_norm":
        assert _rel(y, _rms_ref(out, w)) < 1e-2
    else:
        assert torch.equal(y, out)


def test_capture_without_warm_up_refuses_clearly():
    ov = _ov(100, 16)
    a, b, w = _rand(32, 64), _rand(64, 128), _rand(128)
    with pytest.raises(lowlevel.CaptureError, match="flag state"), lowlevel.capture():
        ov.matmul_rms_norm(a, b, w)


def test_refusal_on_the_device():
    t = device_sm_count()
    with pytest.raises(ValueError, match=rf"device's {t} SMs"):
        TO.tile_overlap(producer_sms=t - 3, consumer_sms=4)


@pytest.mark.gpu2
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (peer copy over NVLink)")
def test_copy_into_the_peer_gpu():
    import cupy as cp

    if not torch.cuda.can_device_access_peer(0, 1):
        pytest.skip("GPU 0 cannot access GPU 1's memory")
    with cp.cuda.Device(0):
        try:
            cp.cuda.runtime.deviceEnablePeerAccess(1)
        except cp.cuda.runtime.CUDARuntimeError as e:  # already enabled (torch may have done it)
            assert "AlreadyEnabled" in str(e) or "already" in str(e).lower()
    for M, N, K in [(256, 4096, 1024), (200, 2050, 640)]:  # the second: ragged last tiles
        dst = torch.full((M, N), float("nan"), device="cuda:1", dtype=torch.bfloat16)
        for ov in (_ov(116, 16), _ov(device_sm_count(), 0)):  # consumer SMs; the copy in the epilogue
            for _ in range(3):
                a, b = _rand(M, K), _rand(K, N)
                dst.fill_(float("nan"))
                torch.cuda.synchronize(1)
                out, _ = ov.matmul_copy(a, b, dst=dst)
                torch.cuda.synchronize(0)
                assert torch.equal(dst.cpu(), out.cpu()), (M, N, ov)
                assert _rel(out, a.double() @ b.double()) < 1e-2
            ov.check()
            assert ov.launches == 3


def test_producer_takes_the_tuned_tiles_when_one_round_fits():
    from lowlevel.kernels.matmul import config_for

    t = device_sm_count()
    cfg = config_for(16, 4096, 4096, 2)
    tiles = -(-16 // cfg.block_m) * -(-4096 // cfg.block_n)
    if cfg.split_k > 1 or tiles > t - 4:
        pytest.skip(f"this device's tuned tiles for 16 x 4096 x 4096 do not fit one round ({cfg})")
    assert TO.producer_config(16, 4096, 2, tiles, 4096) == (cfg.block_m, cfg.block_n, cfg.block_k,
                                                            cfg.num_warps, cfg.num_stages)
    assert TO.suggest_split(16, 4096, K=4096) == (tiles, t - tiles)
    # one program short of the tile count: two rounds of tuned tiles would be slow, the cost rule decides
    assert TO.producer_config(16, 4096, 2, tiles - 1, 4096) == TO.producer_config(16, 4096, 2, tiles - 1)
    # without K the rule is the cost model's, as before
    assert TO.suggest_split(16, 4096, t) == TO.suggest_split(16, 4096, t, K=None)


@pytest.mark.parametrize("mnk", [(16, 4096, 4096), (64, 14336, 4096), (200, 4096, 4096), (256, 14336, 4096)],
                         ids=str)
def test_tuned_tiles_at_the_suggested_split(mnk):
    """Decode shapes at suggest_split's split (the tuned tiles, one round), 200 rows: a ragged
    last row block; both consumers against float64, poisoned outputs, the last rows checked."""
    M, N, K = mnk
    p, c = TO.suggest_split(M, N, K=K)
    ov = _ov(p, c)
    a, b, w = _rand(M, K), _rand(K, N), _rand(N)
    for _ in range(2):
        out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
        y = torch.full_like(out, float("nan"))
        dst = torch.full_like(out, float("nan"))
        dst0 = torch.full_like(out, float("nan"))
        ov.matmul_rms_norm(a, b, w, out=out, y=y)
        out2, _ = ov.matmul_copy(a, b, dst=dst)
        out3, _ = _ov(p, 0).matmul_copy(a, b, dst=dst0)  # the copy in the producer's epilogue, same tiles
        torch.cuda.synchronize()
        ov.check()
        ref = a.double() @ b.double()
        assert _rel(out, ref) < 1e-2 and _rel(out[-3:], ref[-3:]) < 1e-2
        assert _rel(y, _rms_ref(out, w)) < 1e-2 and _rel(y[-1:], _rms_ref(out[-1:], w)) < 1e-2
        assert torch.equal(dst, out2) and _rel(out2, ref) < 1e-2
        assert torch.equal(dst0, out3) and torch.equal(out3, out2)
        a, b = _rand(M, K), _rand(K, N)  # fresh data for the second launch
    assert ov.launches == 4
