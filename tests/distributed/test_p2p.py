"""PipelineP2P on 3 gloo CPU ranks: chains, combined send/recv pairs, full rings, a 2-rank
ring (prev == next), subgroups, for float32, bfloat16 and int64.

Run: ``python -m pytest -q tests/distributed/test_p2p.py`` (one spawn of 3 ranks).
"""

import torch
import torch.distributed as dist

from tests.distributed_harness import run_distributed

DTYPES = (torch.float32, torch.bfloat16, torch.int64)
SHAPE = (2, 3)


def _value(tag: int, dtype: torch.dtype) -> torch.Tensor:
    """A small tensor that is exact in every tested dtype and distinct per tag."""
    return (torch.arange(6).reshape(SHAPE) + 8 * tag).to(dtype)


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    # exact comparison; torch.testing would cost seconds of imports per rank
    assert got.dtype == want.dtype and torch.equal(got, want), f"got {got}, want {want}"


def _chain(p2p_cls, group, members, rank, dtype) -> None:
    """Forward then backward along a chain of stages, each stage adding 1."""
    stage = members.index(rank)
    last = len(members) - 1
    prev = members[stage - 1] if stage > 0 else None
    nxt = members[stage + 1] if stage < last else None
    p2p = p2p_cls(group, prev, nxt, "cpu")
    x = _value(1, dtype) if stage == 0 else p2p.recv_forward(SHAPE, dtype)
    assert x.dtype == dtype and x.shape == SHAPE
    _same(x, _value(1, dtype) + stage)
    if stage < last:
        p2p.send_forward(x + 1)
    g = _value(5, dtype) if stage == last else p2p.recv_backward(SHAPE, dtype)
    _same(g, _value(5, dtype) + (last - stage))
    if stage > 0:
        p2p.send_backward(g + 1)
    # steady-state pairs: stage s does send_forward_recv_backward while stage s+1 does
    # send_backward_recv_forward, one neighbour pair after the other
    for left in range(last):
        if stage == left:
            got = p2p.send_forward_recv_backward(_value(10 + stage, dtype), SHAPE, dtype)
            _same(got, _value(20 + stage + 1, dtype))
        elif stage == left + 1:
            got = p2p.send_backward_recv_forward(_value(20 + stage, dtype), SHAPE, dtype)
            _same(got, _value(10 + stage - 1, dtype))
    if stage == 0:
        try:
            p2p.recv_forward(SHAPE, dtype)
        except RuntimeError as e:
            assert "no prev stage" in str(e)
        else:
            raise AssertionError("recv_forward on the first stage should raise")


def _ring(p2p_cls, group, members, rank, dtype) -> None:
    """Every member posts all four ops at once around a ring (a cycle must not deadlock)."""
    n, i = len(members), members.index(rank)
    p2p = p2p_cls(group, members[(i - 1) % n], members[(i + 1) % n], "cpu")
    from_prev, from_next = p2p.exchange(
        send_next=_value(30 + i, dtype), send_prev=_value(40 + i, dtype),
        recv_prev=(SHAPE, dtype), recv_next=(SHAPE, dtype),
    )
    _same(from_prev, _value(30 + (i - 1) % n, dtype))
    _same(from_next, _value(40 + (i + 1) % n, dtype))


def _scenario(rank: int, world_size: int) -> int:
    from megatron.early_exit.parallel.p2p import PipelineP2P

    chain = [2, 0, 1]  # stage order != global rank order: peers must be global ranks
    chain_group = dist.new_group(sorted(chain))
    pair = [1, 2]  # a 2-rank ring (prev == next) on a subgroup that leaves rank 0 out
    pair_group = dist.new_group(pair)
    done = 0
    for dtype in DTYPES:
        _chain(PipelineP2P, chain_group, chain, rank, dtype)
        _ring(PipelineP2P, dist.group.WORLD, list(range(world_size)), rank, dtype)
        if rank in pair:
            _ring(PipelineP2P, pair_group, pair, rank, dtype)
        done += 1
    dist.barrier()
    return done


def test_p2p_chain_pairs_and_rings_gloo():
    assert run_distributed(_scenario, 3, timeout=120) == [len(DTYPES)] * 3
