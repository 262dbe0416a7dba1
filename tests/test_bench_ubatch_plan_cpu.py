"""bench_ubatch_nccl's configuration plan, on CPU: which (H, T) each comm stage runs at, and
which of them are called balanced (named "(balanced)" and given the ">= 1.4x" target).

"Balanced" is the bench's own rule: the comm stage alone within :data:`BAND` of the matmul
alone. Session 10's NVLink launch measured no hidden size at 4096 tokens within it (its
all-to-all alone took 0.78x / 0.69x the matmul at H 1024 / 2048), yet both configurations
were named "(balanced)" with the 1.4x target, because the plan called every all-to-all pick
at 4096 tokens balanced (and the all-reduce's pick too) whether it was inside the band or the
closest outside it."""
import math

import pytest

from bench import bench_ubatch_nccl as B

# stage ratios (comm alone / matmul alone) measured by the session-10 run on two H200s
# (bench/results/ubatch_nccl_2gpu_ranks.json), device time
NVLINK = {1024: {"alltoall": 0.973, "alltoall_nvlink": 0.781}, 2048: {"alltoall": 1.028, "alltoall_nvlink": 0.689},
          2560: {"alltoall": 0.713, "alltoall_nvlink": 0.504}, 3072: {"alltoall": 0.629, "alltoall_nvlink": 0.5},
          4096: {"alltoall": 0.491, "alltoall_nvlink": 0.357}}
NVLINK_LONG = {8192: {1536: {"alltoall": 1.213, "alltoall_nvlink": 0.874},
                      2048: {"alltoall": 0.902, "alltoall_nvlink": 0.667}},
               16384: {1024: {"alltoall": 1.498, "alltoall_nvlink": 1.084},
                       1280: {"alltoall": 1.191, "alltoall_nvlink": 0.894},
                       1536: {"alltoall": 1.02, "alltoall_nvlink": 0.789}},
               32768: {1024: {"alltoall": 1.312, "alltoall_nvlink": 0.991},
                       1280: {"alltoall": 1.079, "alltoall_nvlink": 0.817}}}
NCCL = {1024: {"alltoall": 0.989, "allreduce": 1.416, "alltoall_zero_sm": 1.237},
        2048: {"alltoall": 1.208, "allreduce": 1.493, "alltoall_zero_sm": 1.162},
        2560: {"alltoall": 0.721, "allreduce": 1.066, "alltoall_zero_sm": 0.74},
        3072: {"alltoall": 0.663, "allreduce": 1.05, "alltoall_zero_sm": 0.691},
        4096: {"alltoall": 0.473, "allreduce": 0.768, "alltoall_zero_sm": 0.468}}


def _alone(ratios):
    return {h: {"ratio": dict(r)} for h, r in ratios.items()}


def _long(by_t):
    return {t: _alone(r) for t, r in by_t.items()}


def _by_name(plan):
    return {name: (h, t, comm, balanced) for name, h, t, comm, balanced in plan}


def test_nvlink_picks_outside_the_band_are_not_called_balanced():
    plan = _by_name(B.plan_configs(B.H_MAIN, B.T_MAIN, B.GROUPS["nvlink"], _alone(NVLINK), _long(NVLINK_LONG)))
    # at 4096 tokens: the two closest, neither within BAND
    assert plan["alltoall_nvlink_H1024"] == (1024, 4096, "alltoall_nvlink", False)
    assert plan["alltoall_nvlink_H2048"] == (2048, 4096, "alltoall_nvlink", False)
    # the longer shapes: the closest H of each LONG entry, within BAND
    assert plan["alltoall_nvlink_H1536_T8192"] == (1536, 8192, "alltoall_nvlink", True)
    assert plan["alltoall_nvlink_H1024_T16384"] == (1024, 16384, "alltoall_nvlink", True)
    assert plan["alltoall_nvlink_H1024_T32768"] == (1024, 32768, "alltoall_nvlink", True)
    assert len(plan) == 5


def test_nccl_plan_balanced_only_inside_the_band():
    long = {t: {h: {"alltoall": 1.1, "allreduce": 2.0, "alltoall_zero_sm": 1.4 if t == 32768 else 0.9}
                for h in hs} for t, hs in B.LONG.items()}
    plan = B.plan_configs(B.H_MAIN, B.T_MAIN, B.GROUPS["nccl"], _alone(NCCL), _long(long))
    for name, h, t, comm, balanced in plan:
        ratio = (NCCL[h] if t == B.T_MAIN else long[t][h])[comm]
        assert balanced == (abs(math.log(ratio)) <= math.log(B.BAND)), (name, ratio, balanced)
    names = [p[0] for p in plan]
    assert names[:2] == ["allreduce_H4096", "allreduce_H3072"]  # the main one, then the closest
    assert {"alltoall_H1024", "alltoall_H2048", "alltoall_zero_sm_H2048", "alltoall_zero_sm_H1024"} <= set(names)
    # equal ratios over a LONG entry's sizes: the larger H; 1.4 is outside the band
    assert [p[1:] for p in plan if p[2] == 32768 and p[3] == "alltoall_zero_sm"] == [
        (1280, 32768, "alltoall_zero_sm", False)]


@pytest.mark.parametrize("ratio,inside", [(1.0, True), (B.BAND, True), (1.001 / B.BAND, True), (B.BAND * 1.01, False),
                                          (0.78, False)])
def test_within_band(ratio, inside):
    assert B.within_band({1024: {"ratio": {"x": ratio}}}, 1024, "x") is inside
