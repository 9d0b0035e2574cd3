"""Pure schedule plans: every plan set verifies under blocking p2p semantics, warm-up and
bubble-fill counts follow the documented formulas, and the verifier catches broken plans.

Run: ``python -m pytest -q tests/unit/test_schedule_plan.py`` (a few seconds).
"""

import math
from dataclasses import replace

import pytest

from megatron.early_exit.parallel.schedule_plan import (
    BACKWARD,
    FORWARD,
    RECV_BACKWARD,
    RECV_FORWARD,
    SEND_BACKWARD,
    SEND_FORWARD,
    Action,
    comm_batches,
    fill_depths,
    forward_only_plan,
    interleaved_num_warmup,
    interleaved_plan,
    max_fill_microbatches,
    no_pipelining_plan,
    num_warmup_microbatches,
    one_f_one_b_plan,
    tune_exit_plan,
)
from megatron.early_exit.parallel.schedule_sim import DeadlockError, ScheduleError, verify_plans

PPS = range(1, 9)
MBS = range(1, 17)


def _1f1b(p, m, fill=()):
    return [one_f_one_b_plan(r, p, m, fill) for r in range(p)]


def _forwards_before_first_backward(plan, partial=False):
    n = 0
    for a in plan:
        if a.kind is BACKWARD and not a.partial:
            break
        n += a.kind is FORWARD and a.partial == partial
    return n


def test_no_pipelining_plan():
    plan = no_pipelining_plan(3)
    assert [str(a) for a in plan] == ["F0", "B0", "F1", "B1", "F2", "B2"]
    verify_plans([plan])
    assert one_f_one_b_plan(0, 1, 3) == plan


@pytest.mark.parametrize("p", PPS)
def test_1f1b_verifies_with_documented_warmup(p):
    for m in MBS:
        plans = _1f1b(p, m)
        verify_plans(plans)
        for r, plan in enumerate(plans):
            w = num_warmup_microbatches(r, p, m)
            assert w == min(p - r - 1, m)
            # warm-up forwards plus the first steady-state forward, if there is a steady phase
            assert _forwards_before_first_backward(plan) == w + (m > w)


def test_1f1b_communication_shape():
    plan = one_f_one_b_plan(1, 4, 8)
    text = " ".join(map(str, plan))
    assert text.startswith("RF0 F0 SF0 RF1 F1 SF1 RF2 F2 SF2+ RB0 B0 SB0+ RF3 F3 SF3+ RB1")
    assert text.endswith("B5 SB5 RB6 B6 SB6 RB7 B7 SB7")
    # a fused batch is one executor step holding both directions
    assert (Action(SEND_FORWARD, 2, fused_with_next=True), Action(RECV_BACKWARD, 0)) in \
        comm_batches(plan)
    first, last = one_f_one_b_plan(0, 4, 8), one_f_one_b_plan(3, 4, 8)
    assert not any(a.kind in (RECV_FORWARD, SEND_BACKWARD) for a in first)
    assert not any(a.kind in (SEND_FORWARD, RECV_BACKWARD) for a in last)


@pytest.mark.parametrize("p", range(2, 9))
def test_filled_1f1b_verifies_and_counts(p):
    for m in MBS:
        for ratio, last in [(1.0, p - 1), (2.0, p // 2), (2.0, p - 1), (3.0, 0), (3.0, p - 1)]:
            depths = fill_depths(p, last, ratio)
            plans = _1f1b(p, m, depths)
            verify_plans(plans)
            for s, plan in enumerate(plans):
                n_s = _forwards_before_first_backward(plan, partial=True)
                assert n_s == sum(d >= s for d in depths)
                assert n_s == (max_fill_microbatches(p, s, ratio) if s <= last else 0)
                assert _forwards_before_first_backward(plan) == min(p - s, m)


def test_fill_formulas():
    for p in PPS:
        for ratio in (0.5, 1.0, 2.0, 3.0):
            k0 = math.floor((p - 1) * ratio / (1 + ratio) + 1e-9)
            assert max_fill_microbatches(p, 0, ratio) == k0  # docs/pipeline.md
            for s in range(p):
                assert max_fill_microbatches(p, s, ratio) == max(0, k0 - s)
    assert fill_depths(4, 3, 2.0) == [1, 0]
    assert fill_depths(8, 7, 3.0) == [4, 3, 2, 1, 0]
    assert fill_depths(8, 2, 3.0) == [2, 2, 2, 1, 0]
    assert fill_depths(8, 2, 3.0, first_exit_stage=1) == [2, 2, 2, 1]
    assert fill_depths(8, 7, 3.0, num_fill_microbatches=2) == [4, 3]
    with pytest.raises(ValueError, match="backward-forward-ratio"):
        fill_depths(4, 3, 2.0, num_fill_microbatches=3)
    with pytest.raises(ValueError, match="non-increasing"):
        one_f_one_b_plan(0, 4, 8, [0, 1])


def test_partial_flow_stops_at_its_depth():
    depths = fill_depths(8, 2, 3.0)  # [2, 2, 2, 1, 0]
    for s in range(8):
        plan = one_f_one_b_plan(s, 8, 16, depths)
        for k, d in enumerate(depths):
            kinds = {a.kind for a in plan if a.partial and a.microbatch == k}
            if s > d:
                assert not kinds
                continue
            assert {FORWARD, BACKWARD} <= kinds
            assert (SEND_FORWARD in kinds) == (RECV_BACKWARD in kinds) == (s < d)
            assert (RECV_FORWARD in kinds) == (SEND_BACKWARD in kinds) == (s > 0)


@pytest.mark.parametrize("p", range(2, 9))
def test_interleaved_verifies(p):
    for m in range(p, 17, p):
        for chunks in (1, 2, 3):
            plans = [interleaved_plan(r, p, m, chunks) for r in range(p)]
            verify_plans(plans)
            for r, plan in enumerate(plans):
                w = interleaved_num_warmup(r, p, m, chunks)
                total = m * chunks
                assert w == (total if m == p else min(2 * (p - r - 1) + (chunks - 1) * p, total))
                assert _forwards_before_first_backward(plan) == min(w + 1, total)
                assert {a.chunk for a in plan} == set(range(chunks))


def test_interleaved_constraints():
    with pytest.raises(ValueError, match="num-layers-per-virtual-pipeline-stage"):
        interleaved_plan(0, 4, 6, 2)
    with pytest.raises(ValueError, match="pipeline-model-parallel size"):
        interleaved_plan(0, 1, 4, 2)


@pytest.mark.parametrize("p", PPS)
def test_tune_exit_plan(p):
    for m in (1, 3, 16):
        for last in range(p):
            plans = [tune_exit_plan(r, p, m, last) for r in range(p)]
            verify_plans(plans, tune_exit=True)
            assert all(plans[r] == [] for r in range(last + 1, p))
            for plan in plans:
                assert not any(a.kind in (SEND_BACKWARD, RECV_BACKWARD) for a in plan)
            assert sum(a.kind is BACKWARD for a in plans[last]) == m
            if last > 0:  # without the tune-exit contract the missing gradients are caught
                with pytest.raises(ScheduleError):
                    verify_plans(plans)


# -- the verifier catches broken plans ---------------------------------------------------


def test_verifier_catches_dropped_recv():
    plans = _1f1b(4, 8)
    plans[2] = [a for a in plans[2] if not (a.kind is RECV_FORWARD and a.microbatch == 1)]
    with pytest.raises(ScheduleError, match="before its input arrived"):
        verify_plans(plans)
    plans = _1f1b(4, 8)
    plans[2] = [a for a in plans[2] if not (a.kind is RECV_FORWARD and a.microbatch == 5)]
    with pytest.raises(ScheduleError, match="fused batch"):  # leaves a dangling fused send
        verify_plans(plans)
    plans = _1f1b(4, 8)
    plans[3] = [a for a in plans[3] if a.microbatch != 7]  # stage 2's SEND_FORWARD(7) hangs
    plans[3][-1] = replace(plans[3][-1], fused_with_next=False)
    with pytest.raises(DeadlockError, match=r"stage 2 .* SF7"):
        verify_plans(plans)


def test_verifier_catches_swapped_sends():
    plans = _1f1b(4, 8)
    i, j = [n for n, a in enumerate(plans[0]) if a.kind is SEND_FORWARD][:2]
    plans[0][i], plans[0][j] = plans[0][j], plans[0][i]
    with pytest.raises(ScheduleError):
        verify_plans(plans)
    plans = _1f1b(4, 8, fill_depths(4, 3, 2.0))
    sends = [n for n, a in enumerate(plans[0]) if a.kind is SEND_FORWARD]
    # swap a partial send with the full send after it: the receiver sees the wrong message
    n = next(n for n in sends if plans[0][n].partial)
    plans[0][n] = replace(plans[0][n], partial=False, microbatch=3)
    with pytest.raises(ScheduleError, match="mismatch|before"):
        verify_plans(plans)


def test_verifier_needs_fused_steady_state():
    """Unfusing send_forward_recv_backward makes neighbours both send first: deadlock."""
    plans = [[replace(a, fused_with_next=False) for a in plan] for plan in _1f1b(3, 4)]
    with pytest.raises(DeadlockError):
        verify_plans(plans)


def test_verifier_catches_data_flow_errors():
    plan = no_pipelining_plan(2)
    with pytest.raises(ScheduleError, match="backward before forward"):
        verify_plans([[plan[1], plan[0], *plan[2:]]])
    with pytest.raises(ScheduleError, match="twice"):
        verify_plans([plan + [Action(FORWARD, 1)]])
    with pytest.raises(ScheduleError, match=r"are \[1\], not 0\.\.0"):
        verify_plans([plan[2:]])
    plans = _1f1b(2, 2)
    plans[1] = plans[1][:-1]  # last stage never backwards micro-batch 1
    with pytest.raises(ScheduleError):
        verify_plans(plans)


def test_forward_only_plans_verify_and_the_verifier_catches_broken_ones():
    for p in range(1, 6):
        for chunks in ((1,) if p == 1 else (1, 2, 3)):  # virtual stages need P > 1
            for m in (1, 3, 5):
                plans = [forward_only_plan(r, p, m, chunks) for r in range(p)]
                verify_plans(plans, forward_only=True)
                assert sum(a.kind is FORWARD for plan in plans for a in plan) == p * chunks * m
    plans = [forward_only_plan(r, 2, 2, 2) for r in range(2)]
    with pytest.raises(ScheduleError):  # an evaluation plan must not run backward
        verify_plans([plans[0] + [Action(BACKWARD, 0)], plans[1]], forward_only=True)
    with pytest.raises(ScheduleError):  # the last virtual stage never forwards micro-batch 1
        verify_plans([plans[0], [a for a in plans[1] if a.microbatch == 0]], forward_only=True)
    with pytest.raises(ScheduleError):  # a training plan is not an evaluation plan
        verify_plans(_1f1b(2, 2), forward_only=True)
