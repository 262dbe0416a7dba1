"""GPU tier of DP sync: the NCCL path (device tensors, dedicated stream) in a 1-rank group."""
import os
import socket

import numpy as np
import pytest

import lowlevel

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def groups():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    gloo = dist.new_group(backend="gloo")
    yield dist.group.WORLD, gloo
    dist.destroy_process_group()


def test_nccl_path_equals_gloo_path(groups):
    nccl, gloo = groups
    rng = np.random.default_rng()
    # dp_size 2 over a 1-rank group: the peer's column stays zero, as if it had sent zeros
    c_dev = lowlevel.DPConfig(2, 0, nccl, enable_microbatching=True, use_device_collective=True, timeout_s=30)
    c_cpu = lowlevel.DPConfig(2, 0, gloo, enable_microbatching=True, timeout_s=30)
    for _ in range(50):
        unp = int(rng.integers(1, 3000))
        kw = dict(num_tokens_unpadded=unp, allow_microbatching=bool(rng.random() < 0.7),
                  allow_dp_padding=bool(rng.random() < 0.7), num_tokens_padded=unp + int(rng.integers(0, 64)),
                  uniform_decode=bool(rng.random() < 0.5), cudagraph_mode=int(rng.integers(0, 3)))
        a = lowlevel.coordinate_batch_across_dp(config=c_dev, **kw)
        b = lowlevel.coordinate_batch_across_dp(config=c_cpu, **kw)
        assert a[0] == b[0] and a[2] == b[2] == 0  # the zero column has mode NONE
        assert torch.equal(a[1], b[1]) and a[1].dtype == torch.int32 and a[1].device.type == "cpu"
        assert a[1].is_pinned()
        assert a[1].tolist() == [kw["num_tokens_padded"], 0]  # mode NONE: nobody is padded
        view = lowlevel.as_cupy(a[1])  # a device view of the pinned result
        assert view.tolist() == a[1].tolist() and a[1].numpy().tolist() == a[1].tolist()
    assert c_dev.step == 50 and c_dev._bufs["device"].device.type == "cuda"
    dev_ptr = c_dev._bufs["device"].data_ptr()
    lowlevel.coordinate_batch_across_dp(5, False, True, c_dev)
    assert c_dev._bufs["device"].data_ptr() == dev_ptr  # buffers reused, not reallocated
