"""AdamW over this rank's model chunks, with Megatron's no-decay rule (biases, norms, 1-D).

    optimizer = build_optimizer(chunks, lr=3e-4, weight_decay=0.1)
"""

from __future__ import annotations

from typing import Iterable, Tuple

import torch


def build_optimizer(chunks: Iterable[torch.nn.Module], lr: float, weight_decay: float = 0.0,
                    betas: Tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for model in chunks:
        for _, p in model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False keeps the update bitwise independent of how parameters are grouped.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)
