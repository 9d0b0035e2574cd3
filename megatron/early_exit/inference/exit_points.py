"""Where a token may leave the network and how confident a head is: the one module every runner
(eager, static / CUDA graph, pipeline stages) asks.

- ``exit_depth(cfg, k)``: layers computed before exit ``k`` reads the hidden state (post-exit:
  ``k``; ``--pre-exit``: ``k - 1``). A pass walks depths ``0..L``: at depth ``d`` it first runs the
  exits of depth ``d`` (so a pre-exit of layer ``d+1`` and a post-exit of layer ``d`` both read
  the output of layer ``d``), then layer ``d + 1``.
- ``exit_points(cfg, mode)``: the :class:`ExitPoint` list of a decoding mode (sorted by depth),
  and the extra cache positions a self-speculative cycle may use. ``threshold >= 1`` never exits,
  so tau = 1.0 is exactly full depth; the list is then empty.
- ``token_logits(logits, cfg)``: drop the padded vocabulary columns (ids >= the tokenizer's
  vocabulary); no softmax, confidence or sample ever sees them.
- ``confidence(logits, kind)``: max softmax probability (``max_prob``) or top-1 minus top-2
  probability (``margin``), at temperature 1, in float64 for float64 models, else float32.
  Kind ``classifier`` scores an exit's hidden state with its fitted classifier instead (the
  runners call ``ExitHead.score`` before projecting); logits of a classifier session (the final
  head's, a forced draft's) get the max softmax probability.

    exits, draft = exit_points(cfg, EarlyExit(threshold=0.8))
    conf = confidence(token_logits(logits, cfg), "max_prob")       # [b]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from megatron.early_exit.inference.modes import EarlyExit, SelfSpeculative

__all__ = ["ExitPoint", "exit_depth", "exit_points", "token_logits", "confidence",
           "CONFIDENCE_KINDS"]

CONFIDENCE_KINDS = ("max_prob", "margin", "classifier")


def exit_depth(cfg, layer: int) -> int:
    """Layers computed before the exit at ``layer`` reads the hidden state."""
    return layer - 1 if cfg.exits.pre_exit else layer


@dataclass(frozen=True)
class ExitPoint:
    depth: int  # see exit_depth
    layer: int  # the exit's layer number
    threshold: Optional[float]  # exit when confidence >= threshold (< 1); None: block KV only
    force: bool = False  # every non-capped row exits here (self-speculative drafting)


def exit_points(cfg, mode) -> Tuple[List[ExitPoint], int]:
    """(exit points of every decode pass of ``mode``, extra cache positions a cycle may use).
    Raises ValueError naming the mode field for an exit the model does not have."""
    layers = list(cfg.exits.exit_layer_nums)
    if isinstance(mode, SelfSpeculative):
        if mode.exit_layer not in layers:
            raise ValueError(f"exit_layer {mode.exit_layer} is not an exit ({layers})")
        depth = exit_depth(cfg, mode.exit_layer)
        if depth >= cfg.model.num_layers:
            raise ValueError(f"exit_layer {mode.exit_layer} reads the last layer's output: "
                             "nothing would be left to verify the drafts with")
        return [ExitPoint(depth, mode.exit_layer, None)], mode.num_draft
    if not isinstance(mode, EarlyExit) or mode.threshold >= 1.0:
        return [], 0  # tau = 1.0 never exits: exactly the full-depth computation
    if mode.confidence == "classifier" and not cfg.exits.use_exit_classifier:
        raise ValueError("confidence 'classifier' needs exit classifiers, which this checkpoint "
                         "lacks (fit them with tools/fit_exit_classifier.py)")
    allowed = layers if mode.exit_layers is None else list(mode.exit_layers)
    bad = [x for x in allowed if x not in layers]
    if bad:
        raise ValueError(f"exit_layers {bad} are not exits of this model ({layers})")
    points = [ExitPoint(exit_depth(cfg, k), k, mode.threshold) for k in sorted(allowed)]
    return sorted(points, key=lambda e: (e.depth, e.layer)), 0


def block_only(exits: List[ExitPoint]) -> List[ExitPoint]:
    """The same exits with no decision (their exit blocks still see every token: prefill)."""
    return [ExitPoint(e.depth, e.layer, None) for e in exits]


def token_logits(logits: torch.Tensor, cfg) -> torch.Tensor:  # [.., V_padded] -> [.., V_tokens]
    n = cfg.model.num_tokens
    return logits if logits.shape[-1] == n else logits[..., :n]


def confidence(logits: torch.Tensor, kind: str = "max_prob") -> torch.Tensor:  # [b, V] -> [b]
    dtype = torch.promote_types(logits.dtype, torch.float32)
    probs = torch.softmax(logits.to(dtype), dim=-1)
    if kind == "margin":
        top = probs.topk(2, dim=-1).values
        return top[:, 0] - top[:, 1]
    if kind not in ("max_prob", "classifier"):
        raise ValueError(f"confidence must be one of {CONFIDENCE_KINDS}, got {kind!r}")
    return probs.amax(dim=-1)
