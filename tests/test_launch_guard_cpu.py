"""The launch cache's key follows Triton's integer specialisation, and the fast launch path
checks Triton's launcher shape once and falls back to ``kernel[grid](...)`` when it differs."""
import warnings

import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from lowlevel import cuda_available
from lowlevel.kernels import _launch as L

# --- the key ------------------------------------------------------------------------------------

def _triton_spec(v, specialize=True):
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    return native_specialize_impl(BaseBackend, v, False, specialize, True)


INTS = [0, 1, 2, 15, 16, 17, 4096, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 4096, 2**31 + 4097, 2**32, 2**63 - 16,
        2**63 - 1, 2**63, 2**63 + 16, 2**64 - 1, -1, -16, -(2**31), -(2**31) - 1, -(2**31) - 16, -(2**63)]


@pytest.mark.parametrize("v", INTS)
def test_int_key_matches_triton(v):
    """Same width (i32 / i64 / u64) as Triton, and the flags Triton specialises on (== 1, % 16)."""
    ty, flag = _triton_spec(v)
    width, ours = L.spec_key(v)
    if ty == "constexpr":  # Triton makes a 1 a constant
        assert v == 1 and ours == 1 and width == "i32"
    else:
        assert width == ty
        assert (ours == 16) == (flag == "D"), (v, ty, flag)
    assert L.spec_key(v, specialize=False) == _triton_spec(v, False)[0]


def test_int_key_matches_triton_on_random_values():
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies

    @hyp.settings(max_examples=300, deadline=None)
    @hyp.given(st.one_of(st.integers(-(2**63), 2**64 - 1), st.integers(-(2**40), 2**40).map(lambda x: x * 16)))
    def check(v):
        ty, flag = _triton_spec(v)
        if ty != "constexpr":
            assert L.spec_key(v) == (ty, 16 if flag == "D" else 0)

    check()


def test_small_and_large_calls_get_different_keys():
    """faults.md E: copy of 4096 elements, then of 2**31 + 4096: the second must not reuse the first's kernel."""
    from lowlevel.kernels.copy import _launch

    src, dst = torch.empty(16, dtype=torch.int8), torch.empty(16, dtype=torch.int8)
    small = _launch.key((src, dst, 4096, 8), {"BLOCK": 128}, 4, 1)
    large = _launch.key((src, dst, 2**31 + 4096, 8), {"BLOCK": 128}, 4, 1)
    huge = _launch.key((src, dst, 2**63 + 4096, 8), {"BLOCK": 128}, 4, 1)
    assert len({small, large, huge}) == 3
    # the program count is not specialised on: any value of one width shares the key
    assert _launch.key((src, dst, 4096, 8), {"BLOCK": 128}, 4, 1) == _launch.key((src, dst, 4096, 131),
                                                                                   {"BLOCK": 128}, 4, 1)
    k1, _ = _launch._key_and_ptrs((src, dst, 2**31 + 4096, 3), {"BLOCK": 128}, 4, 1)
    assert k1 == large


def test_prepared_launch_uses_the_same_key():
    from lowlevel.kernels.matmul import _launch

    a = torch.empty(4, 4)
    args = (a, a, a, 3, 2**31 + 16, 1, 1, 4, 1, 4, 1, 0, 4, 1, 0)
    k, _ = _launch._key_and_ptrs(args, {"X": 1}, 4, 3)
    assert k == _launch.key(args, {"X": 1}, 4, 3)
    assert k[0][4] == ("i64", 16) and k[0][3] == ("i32", 0) and k[0][5] == ("i32", 1)


# --- the launcher check -------------------------------------------------------------------------

class GoodLauncher:
    """Triton 3.6's CudaLauncher, in the parts the check reads."""

    def __init__(self):
        self.calls = []
        self.launch = lambda *a: self.calls.append(a)
        self.launch_cooperative_grid = 0
        self.launch_pdl = 0
        self.global_scratch_size = 0
        self.profile_scratch_size = 0

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        global_scratch = profile_scratch = None
        self.launch(gridX, gridY, gridZ, stream, function, self.launch_cooperative_grid, self.launch_pdl,
                    global_scratch, profile_scratch, *args)


class NewArgLauncher(GoodLauncher):
    """A launcher that grew an argument."""

    def __call__(self, gridX, gridY, gridZ, stream, function, cluster, *args):
        self.launch(gridX, gridY, gridZ, stream, function, cluster, *args)


class ReorderedLauncher(GoodLauncher):
    """Same signature, but forwards in another order."""

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        self.launch(gridX, gridY, gridZ, stream, function, self.launch_pdl, self.launch_cooperative_grid,
                    None, None, *args)


class FakeCompiled:
    def __init__(self, run, **drop):
        self.run = run
        self.function = 1234
        self.packed_metadata = (4, 1, 0)
        for name in drop:
            delattr(self, name)


RUN_SRC = ("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata,\n"
           "           knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound_args.values())")


@pytest.fixture(autouse=True)
def _fresh_check_cache():
    L._checked.clear()
    L._warned.clear()
    yield
    L._checked.clear()
    L._warned.clear()


def test_check_accepts_the_known_shape():
    assert L.check_launcher(FakeCompiled(GoodLauncher()), lambda: RUN_SRC) is None


def test_check_accepts_the_installed_triton():
    """The Triton installed here has the checked shape: its launcher class and JITFunction.run."""
    from triton.backends.nvidia.driver import CudaLauncher

    fake = FakeCompiled(GoodLauncher())
    L._checked.clear()
    assert L._RUN_CALL in L._squash(L._jit_run_source())
    assert L._LAUNCHER_CALL in L._squash(__import__("inspect").getsource(CudaLauncher.__call__))
    assert L.check_launcher(fake) is None


@pytest.mark.parametrize("launcher,why", [(NewArgLauncher, "takes"), (ReorderedLauncher, "no longer calls")])
def test_check_refuses_a_changed_launcher(launcher, why):
    assert why in L.check_launcher(FakeCompiled(launcher()), lambda: RUN_SRC)


def test_check_refuses_changed_run_and_missing_attributes():
    assert "JITFunction.run" in L.check_launcher(FakeCompiled(GoodLauncher()), lambda: "kernel.run(grid, stream)")
    assert "packed_metadata" in L.check_launcher(FakeCompiled(GoodLauncher(), packed_metadata=1), lambda: RUN_SRC)
    bare = GoodLauncher()
    del bare.launch_pdl
    assert "launch_pdl" in L.check_launcher(FakeCompiled(bare), lambda: RUN_SRC)


# --- the fallback -------------------------------------------------------------------------------

class FakeJit:
    """A @triton.jit function's surface: arg_names and kernel[grid](*args, **options)."""

    arg_names = ("x_ptr", "n", "num_progs")

    def __init__(self, launcher_cls):
        self.launcher_cls = launcher_cls
        self.calls = []
        self.compiled = None

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.calls.append((grid, args, kw))
            if self.compiled is None:
                self.compiled = FakeCompiled(self.launcher_cls())
            return self.compiled
        return launch


@pytest.fixture
def fake_gpu(monkeypatch):
    from lowlevel import _runtime as rt

    monkeypatch.setattr(L, "_on_current_stream", lambda: __import__("contextlib").nullcontext())
    monkeypatch.setattr(L, "device_sm_count", lambda dev=None: 8)
    monkeypatch.setattr(L, "_capped", lambda total: total)
    monkeypatch.setattr(rt, "current_handle", lambda: 77)
    monkeypatch.setattr(rt, "torch_get_raw", lambda dev: 77)


def _launcher(cls):
    fn = FakeJit(cls)
    fl = L.FastLauncher(fn, ("num_progs",))
    fl.interpret = False
    fl.check = lambda ck: L.check_launcher(ck, lambda: RUN_SRC)
    return fn, fl


def test_fast_path_calls_the_c_entry_with_the_triton_3_6_prefix(fake_gpu):
    fn, fl = _launcher(GoodLauncher)
    x = torch.empty(64)
    fl(4, (x, 100, 4), {"BLOCK": 16}, 4, 1)  # compiles through kernel[grid]
    assert len(fn.calls) == 1
    fl(3, (x, 100, 3), {"BLOCK": 16}, 4, 1)  # straight into the C entry
    assert len(fn.calls) == 1
    run = fn.compiled.run
    assert run.calls == [(3, 1, 1, 77, 1234, 0, 0, None, None, (4, 1, 0), None, None, None,
                          x.data_ptr(), 100, 3, 16)]
    p = L.PreparedLaunch(fl, 5, (x, 100, 0), 2, {"BLOCK": 16}, 4, 1)
    run.calls.clear()
    p()
    assert len(fn.calls) == 1 and run.calls[-1][:4] == (5, 1, 1, 77) and run.calls[-1][-3:] == (100, 5, 16)


@pytest.mark.parametrize("cls", [NewArgLauncher, ReorderedLauncher])
def test_changed_launcher_falls_back_to_kernel_grid_with_one_warning(fake_gpu, cls):
    fn, fl = _launcher(cls)
    x = torch.empty(64)
    with pytest.warns(L.LauncherFallbackWarning, match="kernel\\[grid\\]"):
        fl(4, (x, 100, 4), {"BLOCK": 16}, 4, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning only
        fl(2, (x, 100, 2), {"BLOCK": 16}, 4, 1)
        p = L.PreparedLaunch(fl, 5, (x, 100, 0), 2, {"BLOCK": 16}, 4, 1)
        p()
        _fn2, fl2 = _launcher(cls)  # another kernel with the same launcher class: no second warning
        fl2(1, (x, 7, 1), {"BLOCK": 16}, 4, 1)
    # every launch went through kernel[grid](...), with the arguments as given
    assert [c[0] for c in fn.calls] == [(4,), (2,), (5,), (5,)]
    assert fn.calls[1][1] == (x, 100, 2) and fn.calls[1][2] == {"num_warps": 4, "num_stages": 1, "BLOCK": 16}
    assert fn.compiled.run.calls == []  # the C entry was never used


class FakeStream:
    ptr = 99


@pytest.fixture
def bound_streams(monkeypatch):
    """StreamLaunch without a GPU: its stream adopted as a fake with handle 99, use_stream a no-op
    that records the stream it was given."""
    import contextlib

    from lowlevel import stream as st

    used = []
    monkeypatch.setattr(st, "adopt_arg", lambda obj, name: FakeStream())
    monkeypatch.setattr(st, "use_stream", lambda s: used.append(s.ptr) or contextlib.nullcontext())
    return used


def test_stream_launch_calls_the_c_entry_on_its_stream_and_follows_the_cap(fake_gpu, bound_streams, monkeypatch):
    fn, fl = _launcher(GoodLauncher)
    x = torch.empty(64)
    fl(4, (x, 100, 4), {"BLOCK": 16}, 4, 1)  # compiles
    p = L.StreamLaunch(fl, 5, (x, 100, 0), 2, {"BLOCK": 16}, 4, 1, "any")
    assert bound_streams == [99]  # the launch made while preparing went to the bound stream
    run = fn.compiled.run
    run.calls.clear()
    p()
    p.launch()
    assert [c[:4] for c in run.calls] == [(5, 1, 1, 99)] * 2 and run.calls[0][-3:] == (100, 5, 16)
    caps = []
    monkeypatch.setattr(L._caps, "stack", [3], raising=False)
    p.launch()
    caps.append(run.calls[-1][:4])
    monkeypatch.setattr(L._caps, "stack", [], raising=False)
    p()
    caps.append(run.calls[-1][:4])
    assert caps == [(3, 1, 1, 99), (5, 1, 1, 99)] and run.calls[-1][-3:] == (100, 5, 16)
    assert run.calls[-2][-3:] == (100, 3, 16)  # the program count argument follows the grid


def test_stream_launch_without_a_c_entry_goes_through_kernel_grid_on_its_stream(fake_gpu, bound_streams):
    fn, fl = _launcher(NewArgLauncher)
    x = torch.empty(64)
    with pytest.warns(L.LauncherFallbackWarning):
        fl(4, (x, 100, 4), {"BLOCK": 16}, 4, 1)
    p = L.StreamLaunch(fl, 5, (x, 100, 0), 2, {"BLOCK": 16}, 4, 1, "any")
    p()
    p.launch()
    assert bound_streams == [99, 99, 99]
    assert [c[0] for c in fn.calls] == [(4,), (5,), (5,), (5,)] and fn.calls[-1][1] == (x, 100, 5)
    assert fn.compiled.run.calls == []


# --- matmul()'s plan cache on the C entry ---------------------------------------------------------

@pytest.mark.parametrize("split", [1, 3])
def test_matmul_plan_cache_hit_calls_the_c_entry_as_the_uncached_path_does(fake_gpu, monkeypatch, split):
    """A hit goes straight into the C entry with the arguments the uncached path gives it (same
    pointers, ints, program count, constexprs), split-K (workspace and counters) or not."""
    if cuda_available():
        pytest.skip("fakes the C entry with CPU tensors; on a GPU, test_kernels_gpu checks real hits bit for bit")
    import importlib

    mm = importlib.import_module("lowlevel.kernels.matmul")
    launchers = {}
    for name in ("_launch",):
        fl = getattr(mm, name)
        run = GoodLauncher()
        monkeypatch.setattr(fl, "interpret", False)
        monkeypatch.setattr(fl, "cache", {})
        monkeypatch.setattr(fl, "check", lambda ck: L.check_launcher(ck, lambda: RUN_SRC))
        monkeypatch.setattr(fl, "_slow", lambda *a, run=run, **k: FakeCompiled(run))
        launchers[name] = run
    monkeypatch.setattr(mm, "config_for", lambda *a, **k: mm.Config(16, 16, 16, 2, 1, 1, split))
    ws, cnt = torch.empty(1 << 16), torch.zeros(64, dtype=torch.int32)  # one for both paths (a CPU one is new per call)
    monkeypatch.setattr(mm, "_workspace", lambda dev, n, tiles, own: (ws[:n], cnt[:tiles]))
    mm.clear_plan_cache()
    a, b, c = torch.randn(37, 70), torch.randn(70, 45), torch.empty(37, 45)
    mm.matmul(a, b, out=c)  # miss: through kernel[grid] (fake compile), no C entry call
    assert launchers["_launch"].calls == []
    mm.plan(a, b, c, "tf32").launch()  # the uncached path, now on the C entry
    want = {k: list(v.calls) for k, v in launchers.items()}
    for v in launchers.values():
        v.calls.clear()
    mm.matmul(a, b, out=c)  # hit
    got = {k: list(v.calls) for k, v in launchers.items()}
    assert got == want and len(got["_launch"]) == 1
    assert got["_launch"][0][:4] == (min(8, 3 * 3 * split), 1, 1, 77)
    mm.clear_plan_cache()
