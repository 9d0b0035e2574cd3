"""Validation: per-head loss and perplexity on ``--eval-iters`` batches of the validation set.

Forward only, no gradients: the executor runs the forward-only plan (any layout).
Batches are taken from the start of the validation set every time, so numbers are comparable
across evaluations.
"""

from __future__ import annotations

import math
from typing import Dict

import torch

from megatron.early_exit.parallel.schedule_executor import forward_only
from megatron.early_exit.trainer.step import reduce_head_losses


@torch.no_grad()
def evaluate(setup, valid_dataset) -> Dict:
    cfg, t, ctx = setup.cfg, setup.train, setup.ctx
    for model in setup.chunks:
        model.eval()
    sums: Dict = {}
    count = 0
    for it in range(t.eval_iters):
        microbatches, _ = setup.microbatches(valid_dataset, it)
        for key, value in forward_only(setup.chunks, microbatches, cfg, ctx).items():
            sums[key] = sums.get(key, 0) + value
        count += len(microbatches)
    for model in setup.chunks:
        model.train()
    lm_loss, exit_losses = reduce_head_losses(sums, cfg, ctx, max(count, 1))
    return {"iteration": setup.iteration, "lm_loss": lm_loss, "lm_ppl": math.exp(min(lm_loss, 50)),
            "exit_losses": {str(k): v for k, v in exit_losses.items()},
            "exit_ppl": {str(k): math.exp(min(v, 50)) for k, v in exit_losses.items()}}
