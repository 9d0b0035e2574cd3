"""One training step: forward/backward over micro-batches, gradient finalisation, clip, update.

The micro-batches run through parallel/schedule_executor.py's ``forward_backward`` whatever the
layout (no pipelining, 1F1B, interleaved, exit tuning). Each micro-batch's objective is divided
by the number of micro-batches, and parallel/grads.py averages over data-parallel ranks, so a
step equals one step on the combined global batch.

    result = train_step(chunks, optimizer, microbatches, ctx, cfg, iteration=0, clip_grad=1.0)
    result.lm_loss, result.exit_losses, result.grad_norm
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.distributed as dist

from megatron.early_exit.parallel.grads import clip_grad_norm, finalize_grads
from megatron.early_exit.parallel.schedule_executor import forward_backward


@dataclass
class StepResult:
    lm_loss: float  # final head's LM loss, mean over micro-batches and DP ranks
    exit_losses: Dict[int, float]  # exit layer -> loss
    exit_weights: List[float]  # w_i(t) used this step
    grad_norm: float = 0.0
    extra: Dict[str, float] = field(default_factory=dict)


def reduce_head_losses(sums, cfg, ctx, num_microbatches: int):
    """Mean head losses over micro-batches and DP ranks, gathered from every pipeline stage."""
    keys = ["final"] + list(cfg.exits.exit_layer_nums)
    vec = torch.zeros(len(keys), dtype=torch.float64, device=ctx.device)
    for i, key in enumerate(keys):
        if key in sums:
            vec[i] = sums[key]
    if ctx.pp_size > 1:
        dist.all_reduce(vec, group=ctx.pp_group)
    if ctx.dp_size > 1:
        dist.all_reduce(vec, group=ctx.dp_group)
    vec /= num_microbatches * ctx.dp_size
    values = vec.tolist()
    return values[0], dict(zip(keys[1:], values[1:]))


def train_step(chunks, optimizer, microbatches, ctx, cfg, iteration: int, clip_grad: float = 1.0,
               bf16: bool = False, **schedule_kwargs) -> StepResult:
    """One optimizer step. ``optimizer`` is torch AdamW (grads finalised and clipped here) or
    trainer/megatron_optimizer.py's MegatronCoreOptimizer (which clips with ``--clip-grad``)."""
    megatron_core = hasattr(optimizer, "finalize_and_step")
    for model in chunks:
        model.train()
        model.zero_grad(set_to_none=True)
    if megatron_core:
        optimizer.zero_grad()  # the DDP main_grad buffers
    weights = cfg.exits.weights_at(iteration)
    sums = forward_backward(chunks, microbatches, cfg, ctx, weights, bf16=bf16, **schedule_kwargs)
    if megatron_core:
        norm = optimizer.finalize_and_step(chunks, ctx)
    else:
        finalize_grads(chunks, ctx)
        norm = clip_grad_norm(chunks, ctx, clip_grad)
        optimizer.step()
    lm_loss, exit_losses = reduce_head_losses(sums, cfg, ctx, len(microbatches))
    return StepResult(lm_loss=lm_loss, exit_losses=exit_losses, exit_weights=weights, grad_norm=norm)
