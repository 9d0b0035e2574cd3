"""Learning-rate schedule: linear warm-up, then constant / linear / cosine decay to ``--min-lr``.

A pure function of the iteration, so a resumed run needs no scheduler state to continue exactly.

    lr = learning_rate(iteration, lr=3e-4, min_lr=3e-5, warmup=100, decay_iters=1000, style="cosine")
"""

from __future__ import annotations

import math

DECAY_STYLES = ("constant", "linear", "cosine")


def learning_rate(iteration: int, lr: float, min_lr: float, warmup: int, decay_iters: int,
                  style: str) -> float:
    """LR for 0-based ``iteration``: warm-up over ``warmup`` iterations, decay until ``decay_iters``."""
    if style not in DECAY_STYLES:
        raise ValueError(f"--lr-decay-style must be one of {DECAY_STYLES}, got {style!r}")
    if warmup > 0 and iteration < warmup:
        return lr * (iteration + 1) / warmup
    if style == "constant" or decay_iters <= warmup:
        return lr
    progress = min((iteration - warmup) / (decay_iters - warmup), 1.0)
    if style == "linear":
        coeff = 1.0 - progress
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr + (lr - min_lr) * coeff
