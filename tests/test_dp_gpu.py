"""GPU tier of DP sync on one GPU: the NCCL path's deadline (an event polled against
``timeout_s``) and a 1-rank NCCL group. The 2-GPU runs are in test_dp_2gpu.py."""
import os
import socket
import time

import pytest

import lowlevel
from lowlevel import dp

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def nccl_world():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
        os.environ.setdefault(k, v)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_poll_deadline_holds_while_the_device_is_busy():
    cfg = lowlevel.DPConfig(2, 0, use_device_collective=True, timeout_s=0.05)
    s = torch.cuda.Stream()
    ev = torch.cuda.Event()
    with torch.cuda.stream(s):
        torch.cuda._sleep(2_000_000_000)  # ~1 s of spinning on the device
        ev.record(s)
    t0 = time.perf_counter()
    with pytest.raises(dp.DPSyncError, match="timed out after 0.05"):
        dp._poll(ev, cfg)
    assert time.perf_counter() - t0 < 0.5
    s.synchronize()
    dp._poll(ev, cfg)  # a completed event returns at once


def test_one_rank_nccl_group(nccl_world):
    cfg = lowlevel.DPConfig(1, 0, nccl_world, use_device_collective=True, timeout_s=5)
    assert lowlevel.coordinate_batch_across_dp(9, False, True, cfg, cudagraph_mode=lowlevel.CUDAGraphMode.FULL) \
        == (False, None, 2)
    assert not cfg._state.bufs  # dp_size 1: no buffers, no collective


def test_dp_size_two_in_a_one_rank_group_raises_value_error(nccl_world):
    cfg = lowlevel.DPConfig(2, 0, nccl_world, use_device_collective=True, timeout_s=5)
    with pytest.raises(ValueError, match="dp_size must equal the group's size"):
        lowlevel.coordinate_batch_across_dp(9, False, True, cfg)
    assert cfg.step == 0
    one = lowlevel.DPConfig(1, 0, nccl_world, use_device_collective=True, timeout_s=5)
    lowlevel.coordinate_batch_across_dp(9, False, True, one)  # the group still works
