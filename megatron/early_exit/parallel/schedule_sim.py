"""Discrete-event replay of pipeline plans with blocking point-to-point semantics.

Used by :func:`verify_plans` (correctness) and ``schedule_timeline`` (timing).
Pure Python, no torch. Tests: ``python -m pytest -q tests/unit/test_schedule_plan.py``.

Model
  * Each stage runs its plan in order. A compute action (FORWARD/BACKWARD) takes
    ``duration(stage, action)`` time (0 when no duration function is given).
  * A communication batch (consecutive comm actions joined by ``fused_with_next``) is posted
    at once; each op in it is a rendezvous: a send completes only when the peer has posted
    the matching receive, and vice versa (no buffering). The stage continues when every op
    of its batch has matched. Communication itself takes no time.
  * Messages between a (source rank, destination rank) pair are matched in posting order,
    as NCCL does; a head send whose head receive expects another message is an error.
  * No stage can move and some have not finished: deadlock.

Checks made by :func:`verify_plans` (on top of the replay)
  forward needs its input received (virtual stage > 0); a send needs the computed value; a
  backward follows its forward and, unless ``tune_exit``, the gradient for whatever was sent
  forward; each (micro-batch, chunk) is forwarded, backwarded, sent, received at most once;
  every full micro-batch 0..M-1 is forwarded and backwarded exactly once on every virtual
  stage (``tune_exit``: on every stage with a non-empty plan, which must be 0..L, and there
  must be no backward communication); every partial micro-batch is backwarded on each stage
  it was forwarded on and its gradient returns along every hop its activation took.
  ``forward_only`` (evaluation): every virtual stage forwards 0..M-1 once and sends each on
  (but the last), and nothing runs or sends a backward.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from megatron.early_exit.parallel.schedule_plan import (
    FORWARD,
    RECV_BACKWARD,
    RECV_FORWARD,
    SEND_BACKWARD,
    SEND_FORWARD,
    Action,
    comm_batches,
)


class ScheduleError(RuntimeError):
    """A plan set is inconsistent (unmatched or mismatched message, bad data flow)."""


class DeadlockError(ScheduleError):
    """No stage can make progress."""


@dataclass
class Event:
    stage: int
    action: Action
    start: float
    end: float


@dataclass
class _Op:
    stage: int
    action: Action
    peer: int
    message: tuple  # (direction, partial, microbatch, sender virtual stage)
    posted: float
    matched: float | None = None


@dataclass
class _Stage:
    steps: list
    pos: int = 0
    clock: float = 0.0
    batch: list[_Op] | None = None
    state: dict = field(default_factory=lambda: defaultdict(set))  # what -> {(p, mb, chunk)}


class _Replay:
    def __init__(self, plans, duration, tune_exit):
        self.p = len(plans)
        chunks = [a.chunk for plan in plans for a in plan]
        self.chunks = max(chunks, default=0) + 1
        self.num_virtual = self.p * self.chunks
        self.duration = duration or (lambda stage, action: 0.0)
        self.tune_exit = tune_exit
        try:
            self.stages = [_Stage(comm_batches(plan)) for plan in plans]
        except ValueError as e:
            raise ScheduleError(str(e)) from e
        self.sends: dict[tuple[int, int], deque[_Op]] = defaultdict(deque)
        self.recvs: dict[tuple[int, int], deque[_Op]] = defaultdict(deque)
        self.events: list[Event] = []

    # -- message addressing -------------------------------------------------------------
    def _op(self, stage: int, a: Action, posted: float) -> _Op:
        if a.chunk < 0 or a.chunk >= self.chunks:
            raise ScheduleError(f"stage {stage}: bad chunk in {a}")
        v = a.chunk * self.p + stage
        forward = a.kind in (SEND_FORWARD, RECV_FORWARD)
        if a.kind.is_send:
            other_v = v + 1 if forward else v - 1
            sender_v = v
        else:
            other_v = v - 1 if forward else v + 1
            sender_v = other_v
        if not 0 <= other_v < self.num_virtual:
            raise ScheduleError(f"stage {stage}: {a} at virtual stage {v} has no peer")
        msg = ("activation" if forward else "gradient", a.partial, a.microbatch, sender_v)
        return _Op(stage, a, other_v % self.p, msg, posted)

    # -- execution ----------------------------------------------------------------------
    def _compute(self, s: int, a: Action) -> None:
        st = self.stages[s]
        key = (a.partial, a.microbatch, a.chunk)
        v = a.chunk * self.p + s
        if a.kind is FORWARD:
            self._need(s, a, key not in st.state["fwd"], "forwarded twice")
            self._need(s, a, v == 0 or key in st.state["in"], "forward before its input arrived")
            st.state["fwd"].add(key)
        else:
            self._need(s, a, key in st.state["fwd"], "backward before forward")
            self._need(s, a, key not in st.state["bwd"], "backwarded twice")
            if key in st.state["sent_f"] and not self.tune_exit:
                self._need(s, a, key in st.state["grad"], "backward before its gradient arrived")
            st.state["bwd"].add(key)
        end = st.clock + float(self.duration(s, a))
        self.events.append(Event(s, a, st.clock, end))
        st.clock = end

    def _need(self, s: int, a: Action, ok: bool, why: str) -> None:
        if not ok:
            raise ScheduleError(f"stage {s}: {a}: {why}")

    def _post(self, s: int, batch: tuple[Action, ...]) -> None:
        st = self.stages[s]
        st.batch = []
        for a in batch:
            key = (a.partial, a.microbatch, a.chunk)
            if a.kind is SEND_FORWARD:
                self._need(s, a, key in st.state["fwd"], "sent before it was computed")
            if a.kind is SEND_BACKWARD:
                self._need(s, a, key in st.state["bwd"], "sent before it was computed")
            if a.kind is RECV_BACKWARD:
                self._need(s, a, key in st.state["sent_f"], "gradient for an unsent activation")
            op = self._op(s, a, st.clock)
            channel = (s, op.peer) if a.kind.is_send else (op.peer, s)
            (self.sends if a.kind.is_send else self.recvs)[channel].append(op)
            st.batch.append(op)

    def _advance(self, s: int) -> list[tuple[int, int]]:
        """Run computes up to the next batch and post it; return the channels it touches."""
        st = self.stages[s]
        while st.batch is None and st.pos < len(st.steps):
            step = st.steps[st.pos]
            if isinstance(step, Action):
                self._compute(s, step)
                st.pos += 1
            else:
                self._post(s, step)
                return [(s, op.peer) if op.action.kind.is_send else (op.peer, s)
                        for op in st.batch]
        return []

    def _match(self, channel: tuple[int, int]) -> set[int]:
        """Pair posted sends and receives on one channel in order; return stages touched."""
        sends, recvs, touched = self.sends[channel], self.recvs[channel], set()
        while sends and recvs:
            snd, rcv = sends.popleft(), recvs.popleft()
            if snd.message != rcv.message:
                raise ScheduleError(
                    f"message mismatch on {channel[0]}->{channel[1]}: stage {snd.stage} "
                    f"sends {snd.action} {snd.message} but stage {rcv.stage} expects "
                    f"{rcv.action} {rcv.message}"
                )
            snd.matched = rcv.matched = max(snd.posted, rcv.posted)
            touched |= {snd.stage, rcv.stage}
        return touched

    def _complete(self, s: int) -> bool:
        st = self.stages[s]
        if st.batch is None or any(op.matched is None for op in st.batch):
            return False
        for op in st.batch:
            a = op.action
            what = {SEND_FORWARD: "sent_f", SEND_BACKWARD: "sent_b",
                    RECV_FORWARD: "in", RECV_BACKWARD: "grad"}[a.kind]
            key = (a.partial, a.microbatch, a.chunk)
            self._need(s, a, key not in st.state[what], "communicated twice")
            st.state[what].add(key)
        st.clock = max([st.clock] + [op.matched for op in st.batch])
        st.batch = None
        st.pos += 1
        return True

    def run(self) -> list[Event]:
        work = deque(range(self.p))
        while work:
            s = work.popleft()
            touched = {s}
            for channel in self._advance(s):
                touched |= self._match(channel)
            work.extend(t for t in sorted(touched) if self._complete(t))
        blocked = [s for s, st in enumerate(self.stages) if st.pos < len(st.steps)]
        if blocked:
            raise DeadlockError("deadlock:\n" + "\n".join(self._describe(s) for s in blocked))
        return self.events

    def _describe(self, s: int) -> str:
        st = self.stages[s]
        waiting = [
            f"{op.action} ({'to' if op.action.kind.is_send else 'from'} stage {op.peer})"
            for op in st.batch or [] if op.matched is None
        ]
        return f"  stage {s} blocked at step {st.pos}, waiting on {', '.join(waiting)}"


def simulate(
    plans: Sequence[Sequence[Action]],
    duration: Callable[[int, Action], float] | None = None,
    *,
    tune_exit: bool = False,
) -> list[Event]:
    """Replay ``plans`` (index = pipeline rank); return compute events with start/end times."""
    replay = _Replay(plans, duration, tune_exit)
    replay.run()
    return replay.events


def verify_plans(plans: Sequence[Sequence[Action]], *, tune_exit: bool = False,
                 forward_only: bool = False) -> None:
    """Replay all stages' plans (index = pipeline rank) with blocking semantics and check
    completeness; raises ScheduleError / DeadlockError (see the module docstring).
    ``forward_only``: evaluation plans (every virtual stage forwards each micro-batch once,
    sends it on unless it is the last, and nothing runs backward)."""
    replay = _Replay(plans, None, tune_exit)
    replay.run()
    if forward_only:
        _check_forward_only(replay)
    else:
        _check_complete(replay)


def _check_forward_only(r: _Replay) -> None:
    m = None
    for s, st in enumerate(r.stages):
        for c in range(r.chunks):
            v = c * r.p + s
            keys = {what: {mb for pt, mb, ch in got if ch == c and not pt} for what, got in st.state.items()}
            m = len(keys.get("fwd", ())) if m is None else m
            if keys.get("fwd", set()) != set(range(m)) or any(k[0] for k in st.state.get("fwd", ())):
                raise ScheduleError(f"forward-only: virtual stage {v} forwards {sorted(keys.get('fwd', ()))}")
            if keys.get("bwd") or keys.get("grad") or keys.get("sent_b"):
                raise ScheduleError(f"forward-only: virtual stage {v} runs or sends a backward")
            sent = set(range(m)) if v < r.num_virtual - 1 else set()
            if keys.get("sent_f", set()) != sent:
                raise ScheduleError(f"forward-only: virtual stage {v} sends {sorted(keys.get('sent_f', ()))}")


def _check_complete(r: _Replay) -> None:
    per_v: dict[int, dict[str, set]] = {}
    for s, st in enumerate(r.stages):
        for c in range(r.chunks):
            per_v[c * r.p + s] = {
                what: {(pt, mb) for pt, mb, ch in keys if ch == c}
                for what, keys in st.state.items()
            }
    full0 = {mb for pt, mb in per_v[0].get("fwd", ()) if not pt}
    m = len(full0)
    if full0 != set(range(m)):
        raise ScheduleError(f"full micro-batches at stage 0 are {sorted(full0)}, not 0..{m - 1}")
    depth = r.num_virtual
    if r.tune_exit:
        depth = sum(1 for st in r.stages if st.steps)
        if any(not st.steps for st in r.stages[:depth]):
            raise ScheduleError("tune-exit: stages with work must be a prefix 0..L")
    for v in range(r.num_virtual):
        st = per_v[v]
        full = {k for k in st.get("fwd", ()) if not k[0]}
        want = {(False, mb) for mb in range(m)} if v < depth else set()
        if full != want or {k for k in st.get("bwd", ()) if not k[0]} != want:
            raise ScheduleError(f"virtual stage {v}: full micro-batches not each run once")
        if st.get("fwd", set()) != st.get("bwd", set()):
            raise ScheduleError(f"virtual stage {v}: forwarded {sorted(st.get('fwd', ()))} "
                                f"but backwarded {sorted(st.get('bwd', ()))}")
        if r.tune_exit:
            if st.get("grad") or st.get("sent_b"):
                raise ScheduleError(f"tune-exit: virtual stage {v} communicates gradients")
            continue
        if st.get("sent_f", set()) != st.get("grad", set()):
            raise ScheduleError(f"virtual stage {v}: gradients missing for sent activations")
        if v > 0 and st.get("sent_b", set()) != st.get("bwd", set()):
            raise ScheduleError(f"virtual stage {v}: input gradients not all sent back")
