"""CPU tier of the foundation: import, errors without a GPU, CLI."""
import subprocess
import sys

import pytest

import lowlevel

no_gpu = pytest.mark.skipif(lowlevel.cuda_available(), reason="checks the behaviour without a GPU")


def test_public_api_is_exported():
    for name in lowlevel.__all__:
        assert hasattr(lowlevel, name), name
    assert issubclass(lowlevel.CudaUnavailableError, RuntimeError)
    assert issubclass(lowlevel.CaptureError, lowlevel.LowlevelError)


@no_gpu
@pytest.mark.parametrize("make", [lambda: lowlevel.Stream(), lambda: lowlevel.Event(),
                                  lambda: lowlevel.Stream.from_external(7), lambda: lowlevel.current_stream()])
def test_no_gpu_raises_clear_error(make):
    with pytest.raises(lowlevel.CudaUnavailableError, match="no CUDA device"):
        make()


@no_gpu
def test_require_cuda_and_probe_reset():
    assert lowlevel.device_count() == 0
    lowlevel.cuda_available.cache_clear()
    assert lowlevel.cuda_available() is False
    with pytest.raises(lowlevel.CudaUnavailableError):
        lowlevel.require_cuda()


def test_stream_handle_rejects_non_streams():
    with pytest.raises(TypeError, match="stream"):
        lowlevel.stream_handle("not a stream")
    with pytest.raises(TypeError, match="bool"):
        lowlevel.stream_handle(True)


def test_stream_handle_of_protocol_objects():
    class Proto:
        def __cuda_stream__(self):
            return (0, 1234)

    assert lowlevel.stream_handle(Proto()) == 1234
    assert lowlevel.stream_handle(99) == 99


def test_event_helpers_reject_unknown_events():
    with pytest.raises(TypeError, match="CUDA event"):
        lowlevel.record_event(object())
    with pytest.raises(TypeError, match="CUDA event"):
        lowlevel.wait_event(3.5)


def test_interop_rejects_wrong_types():
    with pytest.raises(TypeError, match="as_cupy"):
        lowlevel.as_cupy([1, 2, 3])
    with pytest.raises(TypeError, match="as_torch"):
        lowlevel.as_torch("x")


def test_as_cupy_rejects_cpu_tensor():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="CUDA tensor or a pinned"):
        lowlevel.as_cupy(torch.randn(3))


def test_info_cli_exits_zero():
    r = subprocess.run([sys.executable, "-m", "lowlevel", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "GPU:" in r.stdout and "torch" in r.stdout
    r = subprocess.run([sys.executable, "-m", "lowlevel", "info", "--json"], capture_output=True, text=True,
                       timeout=120)
    import json

    info = json.loads(r.stdout)
    assert set(info["versions"]) >= {"cupy", "torch", "triton"}
    if lowlevel.cuda_available():
        assert info["gpu"]["sm_count"] > 0
    else:
        assert info["gpu"] is None and "no CUDA device" in info["reason"]
