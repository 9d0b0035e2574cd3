"""Which layers, exits and shared weights live on each pipeline stage (pure, no torch).

Stage (pp rank) r with virtual chunk c holds virtual stage v = c * pp + r, i.e. the layers
``[v * n, (v + 1) * n)`` (1-based numbers ``v * n + 1 .. (v + 1) * n``), n = layers per chunk,
the same order megatron-core uses. An exit at layer k lives on the chunk holding layer k (for
``--pre-exit`` it reads that layer's input, for post-exit its output).

A stage *holds the tied weight* (the word embedding or a copy of it) when it is the first
stage (it owns the embedding), the last stage with a tied final head, or a stage with tied
exits; the gradient of that weight is all-reduced among exactly those stages.

    >>> stage_placement(cfg, pp_rank=1).exit_layers
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple


@dataclass(frozen=True)
class StagePlacement:
    pp_rank: int
    vp_stage: int
    layers: Tuple[int, ...]  # global 1-based layer numbers on this chunk
    exit_layers: Tuple[int, ...]  # exits on this chunk
    pre_process: bool  # holds the embedding
    post_process: bool  # holds the final norm and head
    holds_tied_weight: bool  # needs the word embedding (owns it or a copy)


def stage_placement(cfg, pp_rank: int, vp_stage: int = 0) -> StagePlacement:
    m, p, ex = cfg.model, cfg.parallel, cfg.exits
    pp = p.pipeline_model_parallel_size
    chunks = p.virtual_chunks(m)
    per_chunk = m.num_layers // (pp * chunks)
    virtual = vp_stage * pp + pp_rank
    layers = tuple(range(virtual * per_chunk + 1, (virtual + 1) * per_chunk + 1))
    exit_layers = tuple(k for k in ex.exit_layer_nums if k in layers)
    pre = virtual == 0
    post = virtual == pp * chunks - 1
    tied = pre or (post and not m.untie_embeddings_and_output_weights) or (
        bool(exit_layers) and not ex.untie_exit_output_weights)
    return StagePlacement(pp_rank, vp_stage, layers, exit_layers, pre, post, tied)


def tied_weight_stages(cfg) -> List[int]:
    """Pipeline ranks that hold the word embedding or a copy (on any of their chunks)."""
    pp = cfg.parallel.pipeline_model_parallel_size
    chunks = cfg.parallel.virtual_chunks(cfg.model)
    return [r for r in range(pp)
            if any(stage_placement(cfg, r, c).holds_tied_weight for c in range(chunks))]


def exit_stages(cfg) -> List[int]:
    """Pipeline ranks holding at least one exit."""
    pp = cfg.parallel.pipeline_model_parallel_size
    chunks = cfg.parallel.virtual_chunks(cfg.model)
    return [r for r in range(pp)
            if any(stage_placement(cfg, r, c).exit_layers for c in range(chunks))]
