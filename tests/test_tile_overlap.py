"""Tile overlap on small shapes: the flag protocol under TRITON_INTERPRET=1 on the CPU (compiled
on a GPU, where the GPU tier in test_tile_overlap_gpu.py adds concurrency and graphs).

Said plainly: Triton's interpreter runs the programs of a launch one after another, and the
consumer launch after the producer launch, so here every consumer finds its flags already
published. What these tests check is the arithmetic of the protocol (counters reach their
targets, tile flags, the last-ticket reset and the launch count, the give-up guard) and the
results; that consumers really wait for producers running beside them is the GPU tier's job.
"""
import numpy as np
import pytest
import torch

import lowlevel
from lowlevel.sm_control import device_sm_count

TO = pytest.importorskip("lowlevel.kernels.tile_overlap")
DEV = "cuda" if lowlevel.cuda_available() else "cpu"


def _rand(*shape, dtype=torch.float32):
    return torch.from_numpy(np.random.default_rng().standard_normal(shape)).to(dtype).to(DEV)


def _rel(got, ref):
    got, ref = got.double().cpu(), ref.double().cpu()
    return float((got - ref).norm() / ref.norm())


def _rms_ref(o, w, eps=1e-6):
    o = o.double()
    return o / torch.sqrt((o * o).mean(dim=1, keepdim=True) + eps) * w.double()


def _flags_clear(ov):
    assert int(ov._flags.abs().sum()) == 0, "a launch left flags behind"
    assert int(ov._ctrl[0]) == 0, "a launch left its ticket count behind"
    assert int(ov._ctrl[2]) == 0, "a consumer gave up waiting"
    assert int(ov._ctrl[3]) == 0, "a launch left its work queue behind"


CAPS = [(1, 1), (3, 2), (5, 3), (1, 7)]
SHAPES = [(37, 45, 29), (16, 16, 16), (1, 50, 7), (33, 1, 40), (70, 33, 18), (21, 100, 9)]
# ragged last tiles included; N > 64 (more than 4 tiles of 16 columns) makes the norm read its partial sums
# in several passes under the interpreter


@pytest.mark.parametrize("caps", CAPS, ids=str)
@pytest.mark.parametrize("mnk", SHAPES, ids=str)
def test_matmul_rms_norm_against_float64(caps, mnk):
    M, N, K = mnk
    a, b, w = _rand(M, K), _rand(K, N), _rand(N)
    out = torch.full((M, N), float("nan"), device=DEV)
    y = torch.full((M, N), float("nan"), device=DEV)
    with TO.tile_overlap(producer_sms=caps[0], consumer_sms=caps[1]) as ov:
        got_out, got_y = ov.matmul_rms_norm(a, b, w, 1e-5, out=out, y=y, precision="ieee")
    assert got_out is out and got_y is y
    assert not torch.isnan(out).any() and not torch.isnan(y).any()
    assert _rel(out, a.double() @ b.double()) < 1e-5
    assert _rel(y, _rms_ref(out, w, 1e-5)) < 1e-5
    assert _rel(y[-1:], _rms_ref(out[-1:], w, 1e-5)) < 1e-5  # the last (ragged) row block
    assert ov.launches == 1
    _flags_clear(ov)


@pytest.mark.parametrize("caps", CAPS + [(1, 0), (3, 0)], ids=str)
@pytest.mark.parametrize("mnk", SHAPES, ids=str)
def test_matmul_copy_against_float64(caps, mnk):
    M, N, K = mnk
    a, b = _rand(M, K), _rand(K, N)
    dst = torch.full((N, M), float("nan"), device=DEV).t()  # any strides
    ov = TO.tile_overlap(producer_sms=caps[0], consumer_sms=caps[1])
    out, d = ov.matmul_copy(a, b, dst=dst, precision="ieee")
    assert d is dst
    assert torch.equal(dst, out)
    assert _rel(out, a.double() @ b.double()) < 1e-5
    assert _rel(dst[-1:], a[-1:].double() @ b.double()) < 1e-5  # the last (ragged) row
    assert ov.launches == 1
    _flags_clear(ov)


def test_copy_in_the_epilogue_forks_nothing_and_counts_launches():
    """consumer_sms=0: the producer's programs store every tile into dst themselves, on the
    caller's stream; no stream is made, no flag is touched, and each launch is counted."""
    ov = TO.tile_overlap(producer_sms=3, consumer_sms=0)
    assert ov.consumer_sms == 0 and "consumer_sms=0" in repr(ov)
    for i, (M, N, K) in enumerate([(40, 50, 20), (17, 80, 9), (5, 5, 5), (40, 50, 20)]):
        a, b = _rand(M, K), _rand(K, N)
        out = torch.full((M, N), float("nan"), device=DEV)
        dst = torch.full((M, N), float("nan"), device=DEV)
        got, d = ov.matmul_copy(a, b, dst=dst, out=out, precision="ieee")
        assert got is out and d is dst
        assert torch.equal(dst, out) and not torch.isnan(dst).any()
        assert _rel(out, a.double() @ b.double()) < 1e-5
        assert ov.launches == i + 1
        _flags_clear(ov)
    assert ov.streams is None
    # dst may be out itself (a second store of the same values)
    a, b = _rand(9, 7), _rand(7, 12)
    out = torch.full((9, 12), float("nan"), device=DEV)
    ov.matmul_copy(a, b, dst=out, out=out, precision="ieee")
    assert _rel(out, a.double() @ b.double()) < 1e-5
    TO.tile_overlap(producer_sms=device_sm_count(), consumer_sms=0)  # every SM to the producer is fine


def _poisoned_view(M, N, layout, dtype):
    """(an (M, N) view full of NaN, the whole buffer behind it): contiguous, transposed, or
    every other column of rows 2.. (an offset, a row stride past N, a column stride of 2)."""
    if layout == "contiguous":
        base = torch.full((M, N), float("nan"), dtype=dtype, device=DEV)
        return base, base
    if layout == "transposed":
        base = torch.full((N, M), float("nan"), dtype=dtype, device=DEV)
        return base.t(), base
    base = torch.full((M + 2, 2 * N + 3), float("nan"), dtype=dtype, device=DEV)
    return base[2:, 1::2][:, :N], base


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layouts", [("transposed", "strided"), ("strided", "transposed"),
                                     ("contiguous", "strided")], ids=str)
def test_copy_in_the_epilogue_into_strided_views(layouts, dtype):
    """consumer_sms=0 stores each tile into dst with dst's own strides, from the producer's
    epilogue: transposed and strided (offset) views of out and dst, ragged last tiles, one row
    and one column; nothing outside either view is written; NumPy integer budgets."""
    ov = TO.tile_overlap(producer_sms=np.int64(3), consumer_sms=np.int32(0))
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    for i, (M, N, K) in enumerate([(37, 45, 29), (1, 50, 7), (33, 1, 40)]):
        a, b = _rand(M, K, dtype=dtype), _rand(K, N, dtype=dtype)
        out, out_base = _poisoned_view(M, N, layouts[0], dtype)
        dst, dst_base = _poisoned_view(M, N, layouts[1], dtype)
        got, d = ov.matmul_copy(a, b, dst=dst, out=out, precision="ieee")
        assert got is out and d is dst
        ref = a.double() @ b.double()
        assert torch.equal(dst, out) and _rel(out, ref) < tol
        assert _rel(dst[-1:], ref[-1:]) < tol and _rel(dst[:, -1:], ref[:, -1:]) < tol  # last row, last column
        for base in (out_base, dst_base):  # the poison around each view is untouched
            assert int((~torch.isnan(base)).sum()) == M * N
        assert ov.launches == i + 1 and ov.streams is None
        ov.check()
        _flags_clear(ov)


def test_copy_in_the_epilogue_refuses_bad_input_before_anything_changes():
    ov = TO.tile_overlap(producer_sms=2, consumer_sms=0)
    M, N, K = 9, 11, 5
    a, b = _rand(M, K), _rand(K, N)
    ov.matmul_copy(a, b, dst=torch.empty(M, N, device=DEV))
    buf = _rand(M * K + M * N)
    spare = torch.empty(M + 1, N, device=DEV)
    cases = [(lambda: ov.matmul_copy(a, b, dst=torch.empty(N, M, device=DEV)), ValueError, r"^dst must be \(9, 11\)"),
             (lambda: ov.matmul_copy(a, b, dst=torch.empty(M, N, dtype=torch.float16, device=DEV)), ValueError,
              r"^dst must be"),
             (lambda: ov.matmul_copy(a, b, dst=np.empty((M, N), np.float32)), TypeError, r"^dst must be a torch"),
             (lambda: ov.matmul_copy(a, b, dst=torch.nested.nested_tensor([torch.ones(2, 3)])), ValueError,
              r"^dst must be a dense tensor"),
             (lambda: ov.matmul_copy(a, b, dst=torch.empty(1, N, device=DEV).expand(M, N)), ValueError, "stride 0"),
             (lambda: ov.matmul_copy(buf[:M * K].view(M, K), b, dst=buf[M * K - 3:M * K - 3 + M * N].view(M, N)),
              ValueError, "dst overlaps a"),
             (lambda: ov.matmul_copy(a, b, out=spare[:M], dst=spare[1:]), ValueError, "dst overlaps out")]
    for call, exc, match in cases:
        snap = _state_snapshot(ov)
        with pytest.raises(exc, match=match):
            call()
        assert _same_state(ov, snap) and ov.launches == 1 and ov.streams is None


@pytest.mark.gpu
@pytest.mark.parametrize("consumer_sms", [0, 4])
def test_launches_waits_for_a_launch_on_another_stream(consumer_sms):
    """``launches`` says it synchronizes: a launch enqueued inside ``use_stream(s)`` (a
    non-blocking stream, which torch's default stream does not wait for) behind a long sleep
    must be counted, and its dst written, when ``launches`` is read outside the block; a
    ``.item()`` on the current stream alone returned the count from before the launch."""
    total = device_sm_count()
    ov = TO.tile_overlap(producer_sms=total - consumer_sms, consumer_sms=consumer_sms)
    a, b = _rand(64, 256), _rand(256, 512)
    dst = torch.full((64, 512), float("nan"), device=DEV)
    ov.matmul_copy(a, b, dst=dst)  # compile and allocate
    torch.cuda.synchronize()
    assert ov.launches == 1
    s = lowlevel.Stream()
    with lowlevel.use_stream(s):
        torch.cuda._sleep(500_000_000)  # cycles: a few hundred ms on s
        dst.fill_(float("nan"))
        out, _ = ov.matmul_copy(a, b, dst=dst)
    assert ov.launches == 2  # read on the default stream
    assert torch.equal(dst, out) and _rel(out, a.double() @ b.double()) < 2e-3
    ov.check()


def test_norm_refuses_the_epilogue_placement_before_anything_changes():
    ov = TO.tile_overlap(producer_sms=2, consumer_sms=0)
    a, b, w = _rand(8, 6), _rand(6, 10), _rand(10)
    out = torch.full((8, 10), float("nan"), device=DEV)
    with pytest.raises(ValueError, match=r"^matmul_rms_norm needs consumer_sms >= 1, got 0"):
        ov.matmul_rms_norm(a, b, w, out=out)
    assert torch.isnan(out).all() and ov.launches == 0 and ov._flags is None
    with pytest.raises(ValueError, match="consumer_sms"):
        TO.matmul_then_rms_norm(a, b, w, producer_sms=2, consumer_sms=0)
    with pytest.raises(ValueError, match="consumer_sms"):
        TO.tile_overlap(producer_sms=2, consumer_sms=-1)
    with pytest.raises(ValueError, match=r"producer_sms \+ consumer_sms must be at most"):
        TO.tile_overlap(producer_sms=device_sm_count() + 1, consumer_sms=0)


def test_many_launches_in_a_row_fresh_data_and_changing_shapes():
    """Each launch starts from zeroed flags (the last consumer resets them), whatever the
    previous launch's shape: stale flags would let a consumer read a poisoned output."""
    ov = TO.tile_overlap(producer_sms=2, consumer_sms=3)
    shapes = [(40, 50, 20), (40, 50, 20), (17, 80, 9), (64, 16, 33), (40, 50, 20), (5, 5, 5)] * 2
    for i, (M, N, K) in enumerate(shapes):
        a, b, w = _rand(M, K), _rand(K, N), _rand(N)
        out = torch.full((M, N), float("nan"), device=DEV)
        if i % 2:
            dst = torch.full((M, N), float("nan"), device=DEV)
            ov.matmul_copy(a, b, dst=dst, out=out, precision="ieee")
            assert torch.equal(dst, out)
        else:
            _, y = ov.matmul_rms_norm(a, b, w, out=out, precision="ieee")
            assert _rel(y, _rms_ref(out, w)) < 1e-5
        assert _rel(out, a.double() @ b.double()) < 1e-5
        assert ov.launches == i + 1
        _flags_clear(ov)


def test_half_precision_and_function_form():
    a, b, w = _rand(24, 40, dtype=torch.float16), _rand(40, 36, dtype=torch.float16), _rand(36, dtype=torch.float16)
    out, y = TO.matmul_then_rms_norm(a, b, w, producer_sms=2, consumer_sms=2)
    assert out.dtype == y.dtype == torch.float16
    assert _rel(out, a.double() @ b.double()) < 5e-3
    assert _rel(y, _rms_ref(out, w)) < 5e-3
    c = TO.producer_matmul(a, b, programs=3)
    assert _rel(c, a.double() @ b.double()) < 5e-3


def test_refuses_more_sms_than_the_device_has():
    total = device_sm_count()
    with pytest.raises(ValueError, match=r"producer_sms \+ consumer_sms must be at most"):
        TO.tile_overlap(producer_sms=total, consumer_sms=1)
    with pytest.raises(ValueError, match="producer_sms"):
        TO.tile_overlap(producer_sms=0, consumer_sms=1)
    with pytest.raises(TypeError, match="consumer_sms"):
        TO.tile_overlap(producer_sms=1, consumer_sms=1.5)
    with pytest.raises(ValueError, match=r"producer_sms \+ consumer_sms"):
        TO.matmul_then_rms_norm(_rand(2, 2), _rand(2, 2), _rand(2), producer_sms=total - 1, consumer_sms=2)
    TO.tile_overlap(producer_sms=total - 1, consumer_sms=1)  # exactly the SM count is fine


def test_bad_arguments_raise_before_anything_runs():
    ov = TO.tile_overlap(producer_sms=2, consumer_sms=2)
    a, b, w = _rand(8, 6), _rand(6, 10), _rand(10)
    with pytest.raises(ValueError, match="inner dimensions"):
        ov.matmul_rms_norm(a, _rand(5, 10), w)
    with pytest.raises(ValueError, match="weight must be"):
        ov.matmul_rms_norm(a, b, _rand(9))
    with pytest.raises(TypeError, match="same dtype"):
        ov.matmul_rms_norm(a, b.half(), w)
    with pytest.raises(ValueError, match="eps"):
        ov.matmul_rms_norm(a, b, w, 0.0)
    with pytest.raises(ValueError, match="out must be"):
        ov.matmul_rms_norm(a, b, w, out=_rand(8, 9))
    with pytest.raises(ValueError, match="rows of y must be contiguous"):
        ov.matmul_rms_norm(a, b, w, y=_rand(10, 8).t())
    with pytest.raises(ValueError, match="precision"):
        ov.matmul_rms_norm(a, b, w, precision="fp8")
    with pytest.raises(ValueError, match="dst must be"):
        ov.matmul_copy(a, b, dst=_rand(8, 11))
    with pytest.raises(TypeError, match="torch.Tensor or cupy"):
        ov.matmul_copy(np.ones((8, 6)), b, dst=_rand(8, 10))
    assert ov._flags is None and ov.launches == 0  # nothing was allocated or launched


def test_consumer_without_producer_gives_up_and_reports():
    """The guard against a hang: a consumer whose producer never publishes stops after
    max_spins polls, marks the error word, and still leaves the state clean."""
    ov = TO.tile_overlap(producer_sms=2, consumer_sms=3, max_spins=5)
    M, N = 20, 24
    flags, ctrl, part = ov._state(8, torch.device(DEV), 2 * M)
    c, w, y = _rand(M, N), _rand(N), torch.empty(M, N, device=DEV)
    grid = 3
    TO._rms(grid, (c, w, y, flags, part, ctrl, M, N, N, N, 1e-6, 2, 2, 5, grid),
            {"BLOCK_M": 16, "BLOCK_C": 16, "PART_T": 4, "RESET_BLOCK": TO._RESET}, 1, 1)
    with pytest.raises(lowlevel.LowlevelError, match="gave up"):
        ov.check()
    assert int(ctrl[0]) == 0 and int(ctrl[3]) == 0 and ov.launches == 1  # ticket and work queue back at 0


def test_suggest_split_and_config_rule():
    # 4096 columns in 32-wide tiles are 128 tiles: one round on 132 SMs, so 128 producers
    assert TO.suggest_split(16, 4096, 132) == (128, 4)
    # 14336 columns in 128-wide tiles are 112 tiles: 20 SMs the matmul cannot use anyway
    assert TO.suggest_split(16, 14336, 132) == (112, 20)
    for M, N in [(16, 4096), (64, 14336), (256, 4096), (1024, 14336), (1, 7)]:
        p, c = TO.suggest_split(M, N, 132)
        assert p + c == 132 and c >= 4 and p >= 1
        # the producer budget loses nothing against all SMs in the cost model
        assert min(TO._cost(M, N, bn, p)[0] for bn in TO._BN) == min(TO._cost(M, N, bn, 132)[0] for bn in TO._BN)
    with pytest.raises(ValueError, match="sms"):
        TO.suggest_split(16, 16, 1)


_BAD_INTS = [(True, TypeError), (np.bool_(False), TypeError), (16.0, TypeError), ("16", TypeError),
             ([16], TypeError), (0, ValueError), (-4, ValueError)]
_PC = {"M": 16, "N": 4096, "itemsize": 2, "programs": 128, "K": 4096}
_SS = {"M": 16, "N": 4096, "sms": 132, "min_consumer_sms": 4, "K": 4096, "itemsize": 2}


def _bad_cases(valid):
    for arg in valid:
        for value, exc in _BAD_INTS:
            if arg == "K" and value == 0:
                continue  # an empty inner dimension is a valid K
            yield arg, value, exc
        if arg != "K":
            yield arg, None, TypeError


@pytest.mark.parametrize("arg,value,exc", list(_bad_cases(_PC)), ids=str)
def test_producer_config_refuses_bad_arguments(arg, value, exc):
    with pytest.raises(exc, match=rf"^{arg} must be"):
        TO.producer_config(**{**_PC, arg: value})


@pytest.mark.parametrize("arg,value,exc", list(_bad_cases(_SS)), ids=str)
def test_suggest_split_refuses_bad_arguments(arg, value, exc):
    if arg == "sms" and value is None:
        return  # None: the device's SM count
    with pytest.raises(exc, match=rf"^{arg} must be"):
        TO.suggest_split(**{**_SS, arg: value})


def test_config_arguments_itemsize_and_budget():
    for f in (lambda s: TO.producer_config(16, 4096, s, 128), lambda s: TO.suggest_split(16, 4096, 132, itemsize=s)):
        for size in (1, 3, 8):
            with pytest.raises(ValueError, match="itemsize must be 2 .* or 4"):
                f(size)
    # the consumer's minimum must leave the producer an SM: no split that breaks min_consumer_sms
    with pytest.raises(ValueError, match=r"sms must be at least min_consumer_sms \+ 1 = 9"):
        TO.suggest_split(16, 4096, 8, min_consumer_sms=8)
    assert TO.suggest_split(16, 4096, 8, min_consumer_sms=7) == (1, 7)
    # valid input: NumPy integers are integers, results are plain ints, K=0 and None agree
    got = TO.suggest_split(np.int64(16), np.int32(4096), np.int64(132), min_consumer_sms=np.int64(4),
                           K=np.int64(4096), itemsize=np.int64(2))
    assert got == TO.suggest_split(16, 4096, 132, K=4096) and all(type(v) is int for v in got)
    assert TO.suggest_split(16, 4096, 132, K=0) == TO.suggest_split(16, 4096, 132)
    cfg = TO.producer_config(np.int64(16), 4096, 4, np.int32(100), K=np.int64(0))
    assert cfg == TO.producer_config(16, 4096, 4, 100) and all(type(v) is int for v in cfg)


def test_function_form_validates_budgets_before_its_cache():
    """True == 1 and 1.0 == 1 as dict keys: a cached TileOverlap must not let them through."""
    a, b, w = _rand(8, 6), _rand(6, 10), _rand(10)
    TO.matmul_then_rms_norm(a, b, w, producer_sms=1, consumer_sms=1)
    for bad in (True, 1.0):
        with pytest.raises(TypeError, match="producer_sms must be a positive int"):
            TO.matmul_then_rms_norm(a, b, w, producer_sms=bad, consumer_sms=1)
        with pytest.raises(TypeError, match="consumer_sms must be a positive int"):
            TO.matmul_then_rms_norm(a, b, w, producer_sms=1, consumer_sms=bad)
    with pytest.raises(TypeError, match="producer_sms must be a positive int"):
        TO.matmul_then_rms_norm(a, b, w, producer_sms=[1], consumer_sms=1)
    out, y = TO.matmul_then_rms_norm(a, b, w, producer_sms=np.int64(1), consumer_sms=np.int32(1), precision="ieee")
    assert _rel(out, a.double() @ b.double()) < 1e-5 and _rel(y, _rms_ref(out, w)) < 1e-5


def test_operands_past_32_bit_offsets_are_refused(monkeypatch):
    """The kernels compute 32-bit offsets: an operand spanning 2**31 elements or more is
    refused by name before anything is allocated or launched (the limit lowered here, so that
    small tensors cross it; a strided view spans more than it holds)."""
    ov = TO.tile_overlap(producer_sms=2, consumer_sms=2)
    a, b, w = _rand(8, 6), _rand(6, 10), _rand(10)
    monkeypatch.setattr(TO, "OFFSET_LIMIT", 60)
    with pytest.raises(ValueError, match=r"^b spans 60 elements.*32-bit"):
        ov.matmul_rms_norm(_rand(8, 6)[:, :6], _rand(6, 10), w)  # a spans 48, b 60
    monkeypatch.setattr(TO, "OFFSET_LIMIT", 200)
    wide = _rand(8, 40)[:, :10]  # 10 columns a row, rows 40 apart: spans 7 * 40 + 10 = 290
    with pytest.raises(ValueError, match=r"^dst spans 290 elements"):
        ov.matmul_copy(a, b, dst=wide)
    with pytest.raises(ValueError, match=r"^out spans 290 elements"):
        TO.producer_matmul(a, b, out=wide)
    with pytest.raises(ValueError, match=r"^y spans"):
        ov.matmul_rms_norm(a, b, w, y=torch.empty(8, 30, device=DEV)[:, :10])  # 7 * 30 + 10 = 220
    assert ov._flags is None and ov.launches == 0
    monkeypatch.setattr(TO, "OFFSET_LIMIT", 1 << 31)
    out, y = ov.matmul_rms_norm(a, b, w)  # the same operands below the real limit run
    torch.testing.assert_close(out.double(), a.double() @ b.double(), rtol=1e-2, atol=1e-2)


def _state_snapshot(ov):
    return [None if t is None else t.clone() for t in (ov._flags, ov._ctrl, ov._part)]


def _same_state(ov, snap):
    now = _state_snapshot(ov)
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in zip(now, snap))


def test_strided_weight_is_refused_not_read_as_contiguous():
    """The norm reads ``weight[col]`` at ``w + col``: a strided or expanded weight was read as if
    contiguous (y off by 100 %, the expanded one read past its storage). Refused by name, state
    untouched; its contiguous copy gives the float64 result."""
    ov = TO.tile_overlap(producer_sms=2, consumer_sms=3)
    M, N, K = 20, 40, 10
    a, b = _rand(M, K), _rand(K, N)
    ov.matmul_rms_norm(a, b, _rand(N), precision="ieee")
    for i, w in enumerate((_rand(2 * N)[::2], torch.full((1,), 1.5, device=DEV).expand(N))):
        snap = _state_snapshot(ov)
        with pytest.raises(ValueError, match=r"^weight must be contiguous"):
            ov.matmul_rms_norm(a, b, w, precision="ieee")
        with pytest.raises(ValueError, match=r"^weight must be contiguous"):
            TO.matmul_then_rms_norm(a, b, w, producer_sms=2, consumer_sms=3, precision="ieee")
        assert _same_state(ov, snap) and ov.launches == 1 + i
        out, y = ov.matmul_rms_norm(a, b, w.contiguous(), precision="ieee")
        assert _rel(y, _rms_ref(out, w)) < 1e-5
    one = _rand(2)[::2]  # one column: the stride means nothing
    out, y = ov.matmul_rms_norm(_rand(M, K), _rand(K, 1), one, precision="ieee")
    assert _rel(y, _rms_ref(out, one)) < 1e-5


def test_max_spins_fits_the_kernels_32_bit_poll_count():
    """The kernels count polls in an int32: a limit of 2**31 or more lets the count wrap before
    it is reached (the guard against a hang never fires), and past 2**64 Triton refuses the
    launch after the flag state exists. Refused at construction, by name."""
    assert TO.MAX_SPINS_LIMIT == 2**31 - 1
    for bad in (2**31, 2**40, 2**64, np.int64(2**31)):
        with pytest.raises(ValueError, match=r"^max_spins must be an int in \[1, 2147483647\]"):
            TO.tile_overlap(producer_sms=1, consumer_sms=1, max_spins=bad)
    ov = TO.tile_overlap(producer_sms=1, consumer_sms=1, max_spins=TO.MAX_SPINS_LIMIT)
    a, b, w = _rand(9, 5), _rand(5, 7), _rand(7)
    out, y = ov.matmul_rms_norm(a, b, w, precision="ieee")
    assert _rel(y, _rms_ref(a.double() @ b.double(), w)) < 1e-5 and ov.launches == 1
    ov.check()


def test_bad_input_allocates_nothing(monkeypatch):
    """Every argument is checked before an output is allocated: a bad ``y`` or ``dst`` after a
    missing ``out``, a bad ``programs``, or an output that would span 2**31 elements (with
    the limit lowered here) allocated ``out`` first (an 8 GiB one for a real M*N past the
    limit) and then raised."""
    ov = TO.tile_overlap(producer_sms=2, consumer_sms=2)
    a, b, w = _rand(8, 6), _rand(6, 10), _rand(10)
    ov.matmul_rms_norm(a, b, w, precision="ieee")
    snap = _state_snapshot(ov)
    made = []
    real_empty = torch.empty

    def spy(*args, **kwargs):
        made.append(args)
        return real_empty(*args, **kwargs)

    bad_y, bad_dst, cols = _rand(8, 11), _rand(8, 11), _rand(10, 8).t()
    cases = [(lambda: ov.matmul_rms_norm(a, b, w, y=bad_y), ValueError, r"^y must be"),
             (lambda: ov.matmul_rms_norm(a, b, w, y=cols), ValueError, "rows of y must be contiguous"),
             (lambda: ov.matmul_copy(a, b, dst=bad_dst), ValueError, r"^dst must be"),
             (lambda: ov.matmul_copy(a, b, dst=None), TypeError, r"^dst must be"),
             (lambda: TO.producer_matmul(a, b, programs=0), ValueError, r"^programs must be"),
             (lambda: TO.producer_matmul(a, b, programs=True), TypeError, r"^programs must be"),
             (lambda: TO.matmul_then_rms_norm(a, b, w, y=bad_y, producer_sms=2, consumer_sms=2), ValueError,
              r"^y must be")]
    monkeypatch.setattr(torch, "empty", spy)
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
    monkeypatch.setattr(TO, "OFFSET_LIMIT", 70)  # a spans 48, b 60, a new out would span 80
    for call in (lambda: ov.matmul_rms_norm(a, b, w), lambda: ov.matmul_copy(a, b, dst=_rand(8, 10)),
                 lambda: TO.producer_matmul(a, b)):
        with pytest.raises(ValueError, match=r"^out spans 80 elements"):
            call()
    assert made == []
    monkeypatch.undo()
    assert _same_state(ov, snap) and ov.launches == 1


def test_outputs_overlapping_operands_are_refused_before_anything_runs():
    """out, y or dst sharing memory with an operand raised nothing and gave wrong results;
    y may be out itself (each item reads its part of out, then writes it) and dst may be out."""
    M, N, K = 12, 12, 12
    a, b, w = _rand(M, K), _rand(K, N), _rand(N)
    ov = TO.tile_overlap(producer_sms=2, consumer_sms=2)
    cases = [(lambda: ov.matmul_rms_norm(a, b, w, out=a), "out overlaps a"),
             (lambda: ov.matmul_rms_norm(a, b, w, y=b), "y overlaps b"),
             (lambda: ov.matmul_rms_norm(a, b, w, out=torch.empty(1, N, device=DEV).expand(M, N)), "stride 0"),
             (lambda: ov.matmul_copy(a, b, dst=a), "dst overlaps a"),
             (lambda: ov.matmul_copy(a, b, out=b, dst=_rand(M, N)), "out overlaps b"),
             (lambda: TO.producer_matmul(a, b, out=a), "out overlaps a")]
    wy = _rand(M, N)
    cases.append((lambda: ov.matmul_rms_norm(a, b, wy[-1], y=wy), "y overlaps weight"))
    for call, msg in cases:
        before = (a.clone(), b.clone())
        with pytest.raises(ValueError, match=msg):
            call()
        assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    assert ov._flags is None and ov._part is None and ov.launches == 0  # nothing allocated or launched
    out = torch.full((M, N), float("nan"), device=DEV)
    got_out, got_y = ov.matmul_rms_norm(a, b, w, out=out, y=out, precision="ieee")  # y is out: allowed
    ref = a.double() @ b.double()
    assert got_y is out and _rel(out, _rms_ref(ref, w)) < 1e-5
    out2 = torch.full((M, N), float("nan"), device=DEV)
    ov.matmul_copy(a, b, out=out2, dst=out2, precision="ieee")  # dst is out: allowed
    assert _rel(out2, ref) < 1e-5 and ov.launches == 2
    _flags_clear(ov)
