"""The runner contract: every way of running the layers implements ``prefill`` and ``run``.

A *runner* computes passes over rows of one static KV cache (kv_cache.py); everything above it
(sampling, stops, self-speculative cycles, seeds) lives in ``engine.Session`` and works with any
runner. Implementations:

| runner | module | layout | what it supports |
|---|---|---|---|
| ``DepthRunner`` | early_exit.py | PP = 1, any TP | everything: batches, per-row exits with KV recompute, pending caps, exit blocks, drafts and verification (``all_final``) |
| ``StaticFullDepthRunner`` | static_decode.py | PP = 1 | full-depth decode steps on static shapes, optionally one CUDA graph (or torch.compile + graph); the session must own every cache row |
| ``StaticRunner`` | static_early_exit.py | PP = 1, batch 1 | early exit and self-speculative passes on static layer segments (CUDA graph per segment); no exit blocks |
| ``PipelineRunner`` | pipeline_runner.py | PP > 1, any TP | batches with per-row exits (every token crosses every stage, so no recompute), margin or max-prob confidence; no self-speculative decoding |

Contract (``rows`` are cache rows; ``states`` their host-side depth bookkeeping, see RowState):

    res = runner.prefill(rows, states, prompts, exits)       # whole prompts, first token's logits
    res = runner.run(rows, states, token_ids, exits, capped=(), all_final=False)
    res.logits [b, V_tokens], res.confidence [b], res.exit_layer (per row: exit layer or L)

A runner advances ``states`` (depths reached, pending tokens) itself; the session advances
``newest`` when it appends a token. Logits never include padded vocabulary columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Protocol, Sequence

import torch

from megatron.early_exit.inference.exit_points import ExitPoint
from megatron.early_exit.inference.kv_cache import PassLayout

__all__ = ["PassResult", "RowState", "Runner"]


@dataclass
class RowState:
    """Host-side depth bookkeeping of one row."""

    newest: int  # position of the newest token
    full: int = 0  # positions [0, full) have KV in every layer
    pend: List[int] = field(default_factory=list)  # depths of positions full..newest-1

    def joins(self) -> Dict[int, int]:
        """depth -> first pending position at that depth (where it joins a pass)."""
        out: Dict[int, int] = {}
        for i, d in enumerate(self.pend):
            out.setdefault(d, self.full + i)
        return out

    def advance(self, depth: int, num_layers: int) -> None:
        """The pass took the newest token (and every pending one below it) to ``depth``."""
        if depth >= num_layers:
            self.full, self.pend = self.newest + 1, []
        else:
            self.pend = [max(p, depth) for p in self.pend] + [depth]

    def rollback(self, length: int) -> None:
        """Keep positions [0, length) (all at full depth); ``length`` becomes the newest."""
        assert not self.pend and self.full >= length
        self.full, self.newest = length, length


@dataclass
class PassResult:
    logits: torch.Tensor  # [b_u, V] next-token logits of the head each row left by
    confidence: torch.Tensor  # [b_u] confidence of that head
    exit_layer: List[int]  # per row: exit layer number, or num_layers for the final head
    final_all: Optional[torch.Tensor] = None  # [s, b_f, V] final logits of every slot
    final_layout: Optional[PassLayout] = None  # layout of final_all (rows reaching the end)


class Runner(Protocol):
    """What ``Session`` needs from a way of running the layers."""

    confidence_kind: str
    supports_all_final: bool  # can return every slot's final logits (self-speculative verify)

    def prefill(self, rows: Sequence[int], states: Dict[int, RowState],
                prompts: Sequence[Sequence[int]], exits: Sequence[ExitPoint] = ()) -> PassResult:
        ...

    def run(self, rows: Sequence[int], states: Dict[int, RowState], token_ids: torch.Tensor,
            exits: Sequence[ExitPoint] = (), capped: Sequence[int] = (),
            all_final: bool = False) -> PassResult:
        ...
