"""Pipeline timelines: simulated from plans (forward 1, backward r, free communication) or
read from measured records; bubble fractions and an ASCII rendering.

    from megatron.early_exit.parallel import schedule_timeline as st
    tl = st.simulate_timeline(st.one_f_one_b_plans(4, 8), forward_time=1, backward_time=2)
    print(st.render_ascii(tl))      # one row per stage
    print(tl.makespan, tl.total_bubble_fraction)

The simulation replays the plans with the same blocking-rendezvous semantics as
``verify_plans`` (schedule_sim), so a stage waits exactly where a blocking executor would.
CLI with a PNG: ``python tools/plot_pipeline_schedule.py --pp 4 --microbatches 8``.
Tests: ``python -m pytest -q tests/unit/test_schedule_timeline.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from megatron.early_exit.parallel.schedule_plan import (
    FORWARD,
    Action,
    interleaved_plan,
    one_f_one_b_plan,
)
from megatron.early_exit.parallel.schedule_sim import simulate

FULL_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
PARTIAL_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Span:
    """One compute on one stage. ``kind`` is "F" or "B"."""

    stage: int
    kind: str
    microbatch: int
    start: float
    end: float
    partial: bool = False
    chunk: int = 0

    def to_record(self) -> dict:
        return {"stage": self.stage, "kind": self.kind, "microbatch": self.microbatch,
                "chunk": self.chunk, "partial": self.partial,
                "start": self.start, "end": self.end}


@dataclass
class Timeline:
    spans: list[Span]
    num_stages: int

    @property
    def start(self) -> float:
        return min((s.start for s in self.spans), default=0.0)

    @property
    def makespan(self) -> float:
        return max((s.end for s in self.spans), default=0.0) - self.start

    def busy(self, stage: int, partial: bool | None = None) -> float:
        """Compute time on ``stage``; ``partial`` True/False restricts to those spans."""
        return sum(s.end - s.start for s in self.spans
                   if s.stage == stage and (partial is None or s.partial == partial))

    def bubble_fraction(self, stage: int) -> float:
        return 1.0 - self.busy(stage) / self.makespan if self.makespan else 0.0

    @property
    def total_bubble_fraction(self) -> float:
        if not self.makespan:
            return 0.0
        busy = sum(self.busy(s) for s in range(self.num_stages))
        return 1.0 - busy / (self.num_stages * self.makespan)


def one_f_one_b_plans(
    pp: int, microbatches: int, fill: Sequence[int] = (), chunks: int = 1
) -> list[list[Action]]:
    """All stages' plans: 1F1B (with fill depths) or, for chunks > 1, interleaved."""
    if chunks > 1:
        if fill:
            raise ValueError("bubble filling is only defined for the non-interleaved 1F1B")
        return [interleaved_plan(r, pp, microbatches, chunks) for r in range(pp)]
    return [one_f_one_b_plan(r, pp, microbatches, fill) for r in range(pp)]


def simulate_timeline(
    plans: Sequence[Sequence[Action]],
    forward_time: float = 1.0,
    backward_time: float = 2.0,
    *,
    tune_exit: bool = False,
) -> Timeline:
    """Time every compute of ``plans``: forwards take ``forward_time``, backwards
    ``backward_time`` (partial micro-batches the same), communication is free."""

    def duration(stage: int, action: Action) -> float:
        return forward_time if action.kind is FORWARD else backward_time

    events = simulate(plans, duration, tune_exit=tune_exit)
    spans = [Span(e.stage, e.action.kind.value, e.action.microbatch, e.start, e.end,
                  e.action.partial, e.action.chunk) for e in events]
    return Timeline(spans, len(plans))


def timeline_from_records(records: Iterable[Mapping]) -> Timeline:
    """Measured spans: dicts with stage, kind ("F"/"B"/"forward"/"backward"), microbatch,
    start, end and optionally partial, chunk."""
    spans = []
    for r in records:
        kind = str(r["kind"]).upper()[:1]
        if kind not in ("F", "B"):
            raise ValueError(f"record kind must be forward/backward, got {r['kind']!r}")
        spans.append(Span(int(r["stage"]), kind, int(r["microbatch"]), float(r["start"]),
                          float(r["end"]), bool(r.get("partial", False)),
                          int(r.get("chunk", 0))))
    if not spans:
        raise ValueError("no records")
    return Timeline(spans, max(s.stage for s in spans) + 1)


def span_label(span: Span) -> str:
    digits = PARTIAL_DIGITS if span.partial else FULL_DIGITS
    return digits[span.microbatch % len(digits)]


def _fill_char(span: Span) -> str:
    if span.partial:
        return "~" if span.kind == "F" else "#"
    return "-" if span.kind == "F" else "="


def render_ascii(tl: Timeline, width: int | None = None) -> str:
    """One row per stage; each span starts with its micro-batch label (full 0-9a-z, partial
    A-Z) and continues with - (forward), = (backward), ~ / # (partial F / B); '.' is idle."""
    if width is None:
        width = min(200, max(20, math.ceil(2 * tl.makespan)))
    scale = width / tl.makespan if tl.makespan else 1.0
    t0 = tl.start
    rows = [["."] * width for _ in range(tl.num_stages)]
    for s in sorted(tl.spans, key=lambda s: s.start):
        a, b = round((s.start - t0) * scale), round((s.end - t0) * scale)
        b = max(b, a + 1)
        row = rows[s.stage]
        for i in range(a, min(b, width)):
            row[i] = _fill_char(s)
        if a < width:
            row[a] = span_label(s)
    lines = [f"stage {i:2d} |{''.join(r)}|" for i, r in enumerate(rows)]
    lines.append("legend: label=micro-batch (partial: A-Z)  - forward  = backward  "
                 "~ partial forward  # partial backward  . idle")
    return "\n".join(lines)


def summary(tl: Timeline) -> str:
    lines = [f"makespan {tl.makespan:g}"]
    for s in range(tl.num_stages):
        extra = tl.busy(s, partial=True)
        lines.append(
            f"stage {s:2d}: busy {tl.busy(s):g} (partial {extra:g}), "
            f"bubble {100 * tl.bubble_fraction(s):.1f}%"
        )
    lines.append(f"total bubble {100 * tl.total_bubble_fraction:.1f}%")
    return "\n".join(lines)
