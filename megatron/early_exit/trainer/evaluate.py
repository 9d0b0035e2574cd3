"""Validation: per-head loss and perplexity on ``--eval-iters`` batches of the validation set.

Forward only, no gradients; with pipeline parallelism the executor runs a forward-only schedule.
Batches are taken from the start of the validation set every time, so numbers are comparable
across evaluations.
"""

from __future__ import annotations

import math
from typing import Dict

import torch

from megatron.early_exit.trainer.step import accumulate_head_losses, reduce_head_losses


@torch.no_grad()
def evaluate(setup, valid_dataset) -> Dict:
    cfg, t, ctx = setup.cfg, setup.train, setup.ctx
    for model in setup.chunks:
        model.eval()
    sums: Dict = {}
    count = 0
    for it in range(t.eval_iters):
        microbatches, _ = setup.microbatches(valid_dataset, it)
        if ctx.pp_size == 1:
            (model,) = setup.chunks
            for mb in microbatches:
                out = model(input_ids=mb["tokens"], labels=mb["labels"], loss_mask=mb["loss_mask"])
                accumulate_head_losses(sums, out)
        else:
            from megatron.early_exit.parallel.schedule_executor import forward_only_pipelining

            part = forward_only_pipelining(setup.chunks, microbatches, cfg, ctx)
            for key, value in part.items():
                sums[key] = sums.get(key, 0) + value
        count += len(microbatches)
    for model in setup.chunks:
        model.train()
    lm_loss, exit_losses = reduce_head_losses(sums, cfg, ctx, max(count, 1))
    return {"iteration": setup.iteration, "lm_loss": lm_loss, "lm_ppl": math.exp(min(lm_loss, 50)),
            "exit_losses": {str(k): v for k, v in exit_losses.items()},
            "exit_ppl": {str(k): math.exp(min(v, 50)) for k, v in exit_losses.items()}}
