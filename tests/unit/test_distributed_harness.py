"""Self-test of tests/distributed_harness.py (spawned gloo ranks on CPU).

Run: python -m pytest -q tests/unit/test_distributed_harness.py
One spawn per scenario; megatron.core is imported only by the parallel-state scenario.
"""

import os

import pytest
import torch
import torch.distributed as dist

from tests.distributed_harness import (
    destroy_model_parallel,
    init_model_parallel,
    run_distributed,
)


def _identity_and_allreduce(rank, world_size, offset):
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMP_NUM_THREADS")}
    t = torch.tensor([float(rank + offset)])
    dist.all_reduce(t)
    return {
        "rank": rank,
        "dist_rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "backend": dist.get_backend(),
        "env": env,
        "sum": t.item(),
    }


def test_results_per_rank_and_all_reduce():
    world, offset = 2, 10
    out = run_distributed(_identity_and_allreduce, world, offset, timeout=120)
    expected_sum = float(sum(r + offset for r in range(world)))
    assert [o["rank"] for o in out] == list(range(world))
    for r, o in enumerate(out):
        assert o["dist_rank"] == r and o["world"] == world and o["backend"] == "gloo"
        assert o["env"] == {
            "RANK": str(r),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(r),
            "OMP_NUM_THREADS": "1",
        }
        assert o["sum"] == expected_sum


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        _deep_helper_that_raises(rank)
    return rank


def _deep_helper_that_raises(rank):
    raise ValueError(f"boom from rank {rank}")


def test_exception_on_rank_one_surfaces_with_traceback():
    with pytest.raises(AssertionError) as info:
        run_distributed(_fail_on_rank_one, 2, timeout=120)
    msg = str(info.value)
    assert "----- rank 1 -----" in msg
    assert "----- rank 0 -----" not in msg
    assert "ValueError: boom from rank 1" in msg
    assert "_deep_helper_that_raises" in msg and "Traceback (most recent call last)" in msg


def _parallel_state_scenario(rank, world_size):
    from megatron.core import parallel_state as ps

    init_model_parallel(tp=2, pp=1)
    out = {
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "tp_backend": dist.get_backend(ps.get_tensor_model_parallel_group()),
    }
    t = torch.ones(1)
    dist.all_reduce(t, group=ps.get_tensor_model_parallel_group())
    out["tp_sum"] = t.item()
    destroy_model_parallel()
    init_model_parallel(tp=1, pp=2, vpp=2)
    out["pp_rank"] = ps.get_pipeline_model_parallel_rank()
    out["vpp"] = ps.get_virtual_pipeline_model_parallel_world_size()
    destroy_model_parallel()
    out["destroyed"] = not ps.model_parallel_is_initialized()
    return out


@pytest.mark.slow
def test_megatron_parallel_state_on_gloo():
    out = run_distributed(_parallel_state_scenario, 2, timeout=240)
    assert [o["tp_rank"] for o in out] == [0, 1] and [o["pp_rank"] for o in out] == [0, 1]
    for o in out:
        assert o["tp_backend"] == "gloo" and o["tp_sum"] == 2.0
        assert o["vpp"] == 2 and o["destroyed"]
