"""Pure pipeline-schedule plans: which compute and p2p actions one stage runs, in order.

No torch and no torch.distributed here: a plan is a list of :class:`Action` values that an
executor (``parallel/schedule_executor.py``) walks, and that ``schedule_sim.verify_plans``
replays for all stages at once to prove every send meets its receive and nothing deadlocks::

    from megatron.early_exit.parallel.schedule_plan import one_f_one_b_plan
    from megatron.early_exit.parallel.schedule_sim import verify_plans
    plans = [one_f_one_b_plan(r, 4, 8) for r in range(4)]
    verify_plans(plans)
    print(" ".join(map(str, plans[1])))

Tests: ``python -m pytest -q tests/unit/test_schedule_plan.py``.

Micro-batch and stage conventions
  * Full micro-batches are numbered 0..M-1; partial (bubble-filling) micro-batches have their
    own numbering 0..K-1 and ``partial=True``.
  * Virtual pipeline: rank r's model chunk c is virtual stage v = c*P + r; activations go from
    v to v+1, gradients from v to v-1. Without virtual pipeline c == 0 and v == r.

Communication: blocking rendezvous plus explicit batches
  Every SEND_*/RECV_* action is one ``P2POp``. Consecutive communication actions linked by
  ``fused_with_next=True`` form ONE batch: the executor posts them together with a single
  ``torch.distributed.batch_isend_irecv`` (ops in plan order) and waits for all of them before
  it runs the next action (see :func:`comm_batches`). An unfused communication action is a
  batch of one. This is what makes the steady 1F1B state deadlock-free: stage s posts
  {SEND_FORWARD(i), RECV_BACKWARD(j)} while stage s+1 posts {SEND_BACKWARD(j), RECV_FORWARD(i)}
  (megatron's send_forward_recv_backward / send_backward_recv_forward pairs). ``verify_plans``
  treats a send as complete only when the peer has posted the matching receive (no buffering),
  and matches messages per (source, destination) pair in posting order (NCCL semantics), so a
  plan it accepts is safe on NCCL and gloo. A fused batch never holds two actions of the same
  kind, so it maps onto one ``PipelineP2P.exchange`` call (SEND_FORWARD -> send_next,
  RECV_FORWARD -> recv_prev, SEND_BACKWARD -> send_prev, RECV_BACKWARD -> recv_next; for
  the interleaved plan the neighbours are ring neighbours, rank P-1's next being rank 0).

Bubble filling (``--fill-explicit-bubbles``), what is actually idle
  With forward time 1 and backward time r, 1F1B stage s is idle s before its first forward,
  s*r after its last backward, (P-1-s)*r between its first steady-state forward and its first
  backward (the warm-up gap, it waits for micro-batch 0's gradient), and P-1-s single unit
  gaps in cool-down. A partial micro-batch starts at stage 0 and must be backpropagated
  through stage 0 for its gradient to be exact, but stage 0 is busy before its first forward
  and after its last backward, and its cool-down gaps only fit a forward. So the only idle
  time usable for exact extra work is each stage's warm-up gap, and partial micro-batches go
  there: on stage s, right after the first steady forward (after the last forward when the
  stage has no steady phase) and before the first full RECV_BACKWARD. Cool-down filling would
  need a truncated backward (no gradient into stage 0), which is not the gradient of any
  objective, so it is not offered.

  Partial micro-batch k has a depth d_k (its deepest stage, d_0 >= d_1 >= ...). Stage s runs
  the partials with d_k >= s: forwards in order k = 0, 1, ... (RECV_FORWARD from s-1 when
  s > 0, SEND_FORWARD to s+1 when d_k > s), then backwards in reverse order (RECV_BACKWARD
  from s+1 when d_k > s, SEND_BACKWARD to s-1 when s > 0). So a partial's activation goes
  from s to s+1 only while s+1 <= d_k, and its gradient comes back along the same hops. Its
  backward on stage s carries exactly the gradient of its weighted exit losses on stages
  s..d_k (it never reaches the final loss). How those losses are scaled in the iteration's
  objective is the executor's choice; the plan fixes which stages see which partial. The
  output of the stage's first steady forward is held back and sent after the partials, fused
  with the first RECV_BACKWARD as without filling (sending it first would deadlock: stage
  s+1 receives it only after its own partials and its first backward).

  Count rule. K0 = floor((P-1)*r/(1+r)) (docs/pipeline.md) is how many partials stage 0 can do in
  its warm-up gap: stage 0 finishes them at time P + K0*(1+r) <= P + (P-1)*r. On stage s the
  gap is (P-1-s)*r but partials arrive s forward-times late and stage s's backwards wait on
  stage s+1, so stage s can take n_s = max(0, K0 - s) (:func:`max_fill_microbatches`). The
  greedy assignment d_k = min(L, K0 - 1 - k) (L = last exit stage; :func:`fill_depths`) gives
  exactly n_s partials to every stage s <= L, every partial goes as deep as the limit allows,
  and with costs F=1, B=r the schedule's makespan stays (M+P-1)(1+r) (tested in
  tests/unit/test_schedule_timeline.py; with M < P there is more slack, not used). Partials
  whose depth would fall below the first stage that has an exit are dropped (no loss).

Exit tuning (``--tune-exit``): stages s <= L forward every micro-batch and send the
activation on while s < L, then run a LOCAL backward of their own exit losses; no gradient
crosses a stage boundary; stages after L have empty plans.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Iterable, Sequence


class Kind(enum.Enum):
    FORWARD = "F"
    BACKWARD = "B"
    SEND_FORWARD = "SF"
    RECV_FORWARD = "RF"
    SEND_BACKWARD = "SB"
    RECV_BACKWARD = "RB"

    @property
    def is_compute(self) -> bool:
        return self in (Kind.FORWARD, Kind.BACKWARD)

    @property
    def is_send(self) -> bool:
        return self in (Kind.SEND_FORWARD, Kind.SEND_BACKWARD)


FORWARD, BACKWARD = Kind.FORWARD, Kind.BACKWARD
SEND_FORWARD, RECV_FORWARD = Kind.SEND_FORWARD, Kind.RECV_FORWARD
SEND_BACKWARD, RECV_BACKWARD = Kind.SEND_BACKWARD, Kind.RECV_BACKWARD


@dataclass(frozen=True)
class Action:
    """One step of a stage's plan.

    ``fused_with_next``: this communication action is posted in the same batch as the next
    action (which must also be communication); see the module docstring.
    """

    kind: Kind
    microbatch: int
    chunk: int = 0
    partial: bool = False
    fused_with_next: bool = False

    def __str__(self) -> str:
        mb = f"p{self.microbatch}" if self.partial else str(self.microbatch)
        chunk = f"c{self.chunk}" if self.chunk else ""
        return f"{self.kind.value}{mb}{chunk}{'+' if self.fused_with_next else ''}"


def comm_batches(plan: Sequence[Action]) -> list[Action | tuple[Action, ...]]:
    """Group a plan into executor steps: a compute Action, or a tuple of comm Actions that
    must be posted as one ``batch_isend_irecv`` and waited on together."""
    steps: list[Action | tuple[Action, ...]] = []
    batch: list[Action] = []
    for action in plan:
        if action.kind.is_compute:
            if batch:
                raise ValueError(f"fused batch {batch} is followed by compute {action}")
            steps.append(action)
            continue
        batch.append(action)
        if not action.fused_with_next:
            steps.append(tuple(batch))
            batch = []
    if batch:
        raise ValueError(f"plan ends inside a fused batch {batch}")
    return steps


def _check_stage(pp_rank: int, pp_size: int, num_microbatches: int) -> None:
    if pp_size < 1 or not 0 <= pp_rank < pp_size:
        raise ValueError(f"pipeline rank {pp_rank} is not in [0, {pp_size})")
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")


def no_pipelining_plan(num_microbatches: int) -> list[Action]:
    """pp = 1 gradient accumulation: F0 B0 F1 B1 ..."""
    _check_stage(0, 1, num_microbatches)
    plan: list[Action] = []
    for i in range(num_microbatches):
        plan += [Action(FORWARD, i), Action(BACKWARD, i)]
    return plan


def num_warmup_microbatches(pp_rank: int, pp_size: int, num_microbatches: int) -> int:
    """1F1B warm-up forwards on a stage: min(P - rank - 1, M)."""
    return min(pp_size - pp_rank - 1, num_microbatches)


class _Builder:
    """Appends actions for one rank, deriving communication from virtual stages."""

    def __init__(self, pp_rank: int, pp_size: int, num_chunks: int = 1):
        self.rank, self.size, self.num_virtual = pp_rank, pp_size, pp_size * num_chunks
        self.plan: list[Action] = []

    def vstage(self, chunk: int) -> int:
        return chunk * self.size + self.rank

    def recv_input(self, kind: Kind, mb: int, chunk: int = 0, partial: bool = False) -> None:
        """RECV_FORWARD before a forward / RECV_BACKWARD before a backward, when one exists."""
        v = self.vstage(chunk)
        if kind is FORWARD and v > 0:
            self.add(RECV_FORWARD, mb, chunk, partial)
        if kind is BACKWARD and v < self.num_virtual - 1:
            self.add(RECV_BACKWARD, mb, chunk, partial)

    def send_output(self, kind: Kind, mb: int, chunk: int = 0, partial: bool = False) -> None:
        v = self.vstage(chunk)
        if kind is FORWARD and v < self.num_virtual - 1:
            self.add(SEND_FORWARD, mb, chunk, partial)
        if kind is BACKWARD and v > 0:
            self.add(SEND_BACKWARD, mb, chunk, partial)

    def add(self, kind: Kind, mb: int, chunk: int = 0, partial: bool = False) -> None:
        self.plan.append(Action(kind, mb, chunk, partial))

    def fuse_last(self, count: int) -> None:
        """Fuse the trailing ``count`` comm actions (those actually emitted) into one batch."""
        tail = []
        for a in reversed(self.plan):
            if a.kind.is_compute or len(tail) == count:
                break
            tail.append(a)
        for i in range(len(self.plan) - len(tail), len(self.plan) - 1):
            a = self.plan[i]
            self.plan[i] = Action(a.kind, a.microbatch, a.chunk, a.partial, True)

    def emit_fused(self, emitters) -> None:
        """Run emitter callables; fuse whatever comm actions they appended."""
        before = len(self.plan)
        for emit in emitters:
            emit()
        self.fuse_last(len(self.plan) - before)


def max_fill_microbatches(pp_size: int, pp_rank: int, backward_forward_ratio: float) -> int:
    """Partial micro-batches stage ``pp_rank`` can run in its 1F1B warm-up gap at no cost:
    max(0, floor((P-1)*r/(1+r)) - rank)."""
    if backward_forward_ratio <= 0:
        raise ValueError(f"--backward-forward-ratio must be > 0, got {backward_forward_ratio}")
    k0 = math.floor((pp_size - 1) * backward_forward_ratio / (1 + backward_forward_ratio) + 1e-9)
    return max(0, k0 - pp_rank)


def fill_depths(
    pp_size: int,
    last_exit_stage: int,
    backward_forward_ratio: float,
    num_fill_microbatches: int | None = None,
    first_exit_stage: int = 0,
) -> list[int]:
    """Depth (deepest stage) of each partial micro-batch: d_k = min(L, K0 - 1 - k).

    ``num_fill_microbatches`` None takes every useful partial; asking for more than fit
    raises. Partials shallower than ``first_exit_stage`` would carry no loss and are dropped.
    """
    if not 0 <= first_exit_stage <= last_exit_stage < pp_size:
        raise ValueError(
            f"need 0 <= first exit stage ({first_exit_stage}) <= last exit stage "
            f"({last_exit_stage}) < pipeline size ({pp_size})"
        )
    k0 = max_fill_microbatches(pp_size, 0, backward_forward_ratio)
    depths = [min(last_exit_stage, k0 - 1 - k) for k in range(k0)]
    depths = [d for d in depths if d >= first_exit_stage]
    if num_fill_microbatches is None:
        return depths
    if num_fill_microbatches > len(depths):
        raise ValueError(
            f"{num_fill_microbatches} fill micro-batches requested but only {len(depths)} fit "
            f"the warm-up bubbles at pipeline size {pp_size}, --backward-forward-ratio "
            f"{backward_forward_ratio}, exits on stages {first_exit_stage}..{last_exit_stage}"
        )
    return depths[:num_fill_microbatches]


def _validate_depths(depths: Sequence[int], pp_size: int) -> None:
    for a, b in zip(depths, depths[1:]):
        if b > a:
            raise ValueError(f"fill depths must be non-increasing, got {list(depths)}")
    if depths and not 0 <= depths[-1] <= depths[0] < pp_size:
        raise ValueError(f"fill depths {list(depths)} must lie in [0, {pp_size})")


def _partial_block(b: _Builder, depths: Sequence[int]) -> None:
    """Forwards of the partials reaching this stage, then their backwards in reverse."""
    mine = [k for k, d in enumerate(depths) if d >= b.rank]
    for k in mine:
        b.recv_input(FORWARD, k, partial=True)
        b.add(FORWARD, k, partial=True)
        if depths[k] > b.rank:
            b.add(SEND_FORWARD, k, partial=True)
    for k in reversed(mine):
        if depths[k] > b.rank:
            b.add(RECV_BACKWARD, k, partial=True)
        b.add(BACKWARD, k, partial=True)
        b.send_output(BACKWARD, k, partial=True)


def one_f_one_b_plan(
    pp_rank: int, pp_size: int, num_microbatches: int, fill: Sequence[int] = ()
) -> list[Action]:
    """1F1B (PipeDream-flush) plan for one stage, optionally with bubble-filling partials.

    Warm-up: w = min(P - rank - 1, M) forwards (recv, F, send). Steady: F(i) then
    {SEND_FORWARD(i), RECV_BACKWARD(j)} fused, B(j) then {SEND_BACKWARD(j), RECV_FORWARD(i+1)}
    fused. Cool-down: recv, B, send. ``fill`` = depths of the partial micro-batches
    (:func:`fill_depths`); they run in the warm-up gap as described in the module docstring.
    """
    _check_stage(pp_rank, pp_size, num_microbatches)
    _validate_depths(fill, pp_size)
    b, m = _Builder(pp_rank, pp_size), num_microbatches
    warmup = num_warmup_microbatches(pp_rank, pp_size, m)
    steady = m - warmup
    for i in range(warmup):
        b.recv_input(FORWARD, i)
        b.add(FORWARD, i)
        b.send_output(FORWARD, i)
    if steady == 0:
        _partial_block(b, fill)
    else:
        b.recv_input(FORWARD, warmup)
    for j in range(steady):
        i = warmup + j
        b.add(FORWARD, i)
        if j == 0:
            _partial_block(b, fill)
        b.emit_fused([lambda: b.send_output(FORWARD, i), lambda: b.recv_input(BACKWARD, j)])
        b.add(BACKWARD, j)
        if j == steady - 1:
            b.send_output(BACKWARD, j)
        else:
            b.emit_fused([lambda: b.send_output(BACKWARD, j),
                          lambda: b.recv_input(FORWARD, i + 1)])
    for j in range(steady, m):
        b.recv_input(BACKWARD, j)
        b.add(BACKWARD, j)
        b.send_output(BACKWARD, j)
    return b.plan


def interleaved_num_warmup(pp_rank: int, pp_size: int, num_microbatches: int, chunks: int) -> int:
    """Interleaved warm-up forwards: min(2*(P - rank - 1) + (C - 1)*P, M*C), all of them when
    M == P (then there is no steady phase)."""
    total = num_microbatches * chunks
    if num_microbatches == pp_size:
        return total
    return min(2 * (pp_size - pp_rank - 1) + (chunks - 1) * pp_size, total)


def _virtual_step(k: int, pp_size: int, chunks: int, backward: bool) -> tuple[int, int]:
    """(microbatch, chunk) of a rank's k-th forward (or backward) in the interleaved order:
    groups of P micro-batches go through chunk 0, 1, ... (backward: C-1, ..., 0)."""
    group, within = divmod(k, pp_size * chunks)
    chunk = within // pp_size
    if backward:
        chunk = chunks - 1 - chunk
    return group * pp_size + within % pp_size, chunk


def interleaved_plan(
    pp_rank: int, pp_size: int, num_microbatches: int, num_model_chunks: int
) -> list[Action]:
    """Interleaved 1F1B (virtual pipeline) plan; chunk c on rank r is virtual stage c*P + r.

    Constraints: P >= 2 when C > 1, and M % P == 0 (micro-batches go through each chunk in
    groups of P). The computes form lock-step slots: warm-up slots [F], steady slots [F, B],
    cool-down slots [B]. After each slot the rank posts ONE fused batch: the sends of the
    slot's outputs, then the receives of the next slot's inputs (megatron's
    send_forward_backward_recv_forward_backward); the first slot's inputs are received alone.
    """
    _check_stage(pp_rank, pp_size, num_microbatches)
    if num_model_chunks < 1:
        raise ValueError(f"num_model_chunks must be >= 1, got {num_model_chunks}")
    if num_model_chunks > 1 and pp_size < 2:
        raise ValueError("virtual pipeline (--num-layers-per-virtual-pipeline-stage) needs "
                         "pipeline-model-parallel size >= 2")
    if num_microbatches % pp_size:
        raise ValueError(
            f"interleaved schedule (--num-layers-per-virtual-pipeline-stage) needs the number "
            f"of micro-batches ({num_microbatches}) to be a multiple of the pipeline size "
            f"({pp_size}); change the global/micro batch size or drop virtual pipelining"
        )
    total = num_microbatches * num_model_chunks
    warmup = interleaved_num_warmup(pp_rank, pp_size, num_microbatches, num_model_chunks)

    def fwd(k):
        return (FORWARD, *_virtual_step(k, pp_size, num_model_chunks, False))

    def bwd(k):
        return (BACKWARD, *_virtual_step(k, pp_size, num_model_chunks, True))

    slots = [[fwd(k)] for k in range(warmup)]
    slots += [[fwd(warmup + j), bwd(j)] for j in range(total - warmup)]
    slots += [[bwd(j)] for j in range(total - warmup, total)]
    b = _Builder(pp_rank, pp_size, num_model_chunks)
    b.emit_fused([lambda s=s: b.recv_input(*s) for s in slots[0]])
    for n, slot in enumerate(slots):
        for step in slot:
            b.add(*step)
        nxt = slots[n + 1] if n + 1 < len(slots) else []
        b.emit_fused([lambda s=s: b.send_output(*s) for s in slot]
                     + [lambda s=s: b.recv_input(*s) for s in nxt])
    return b.plan


def tune_exit_plan(
    pp_rank: int, pp_size: int, num_microbatches: int, last_exit_stage: int
) -> list[Action]:
    """Exit tuning (frozen backbone): stages <= L forward and run a local exit-loss backward;
    activations flow forward only (up to L); stages after L do nothing."""
    _check_stage(pp_rank, pp_size, num_microbatches)
    if not 0 <= last_exit_stage < pp_size:
        raise ValueError(f"last exit stage {last_exit_stage} not in [0, {pp_size})")
    if pp_rank > last_exit_stage:
        return []
    plan: list[Action] = []
    for i in range(num_microbatches):
        if pp_rank > 0:
            plan.append(Action(RECV_FORWARD, i))
        plan.append(Action(FORWARD, i))
        if pp_rank < last_exit_stage:
            plan.append(Action(SEND_FORWARD, i))
        plan.append(Action(BACKWARD, i))
    return plan


def forward_only_plan(pp_rank: int, pp_size: int, num_microbatches: int, chunks: int = 1) -> list[Action]:
    """Evaluation: each micro-batch goes forward through every virtual stage in turn, no
    backward; rank r's chunk c (virtual stage c*P + r) receives from v-1 and sends to v+1."""
    _check_stage(pp_rank, pp_size, num_microbatches)
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    last = chunks * pp_size - 1
    plan: list[Action] = []
    for i in range(num_microbatches):
        for c in range(chunks):
            v = c * pp_size + pp_rank
            if v > 0:
                plan.append(Action(RECV_FORWARD, i, c))
            plan.append(Action(FORWARD, i, c))
            if v < last:
                plan.append(Action(SEND_FORWARD, i, c))
    return plan


def format_plan(plan: Iterable[Action]) -> str:
    return " ".join(map(str, plan))
