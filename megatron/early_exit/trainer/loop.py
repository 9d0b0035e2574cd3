"""The training loop: LR schedule, steps, logging, evaluation and checkpoint hooks.

    state = train(setup, train_dataset, valid_dataset, logger=TrainingLogger(...))

``TrainingSetup`` bundles what one rank trains (configs, parallel context, model chunks,
optimizer). Everything that decides what a step does (data, LR, exit weights) is a function of
the iteration number, so a run resumed from a checkpoint at iteration k continues exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from megatron.early_exit.config import EarlyExitGPTConfig, ScheduleConfig, TrainConfig
from megatron.early_exit.parallel.schedule_executor import num_partial_microbatches
from megatron.early_exit.trainer.batches import microbatches_for_iteration
from megatron.early_exit.trainer.schedule import learning_rate
from megatron.early_exit.trainer.step import StepResult, train_step


@dataclass
class TrainingSetup:
    cfg: EarlyExitGPTConfig
    train: TrainConfig
    ctx: object  # ParallelContext
    chunks: List[torch.nn.Module]
    optimizer: torch.optim.Optimizer
    iteration: int = 0  # iterations completed
    schedule: Optional[ScheduleConfig] = None  # pipeline schedule options

    @property
    def num_partial_microbatches(self) -> int:
        return num_partial_microbatches(self.cfg, self.schedule, self.ctx.pp_size)

    def save_checkpoint(self, save_dir: str, save_optimizer: bool = True, **kwargs) -> str:
        """checkpoint/save.py's save_checkpoint of this setup at ``self.iteration``."""
        from megatron.early_exit.checkpoint.save import save_checkpoint

        return save_checkpoint(save_dir, self.chunks, self.ctx, self.cfg, self.iteration,
                               optimizer=self.optimizer if save_optimizer else None,
                               train_config=self.train, **kwargs)

    def load_checkpoint(self, load_dir: str, load_optimizer: bool = True, **kwargs) -> dict:
        """Load a checkpoint into this setup and continue from its iteration; returns its metadata."""
        from megatron.early_exit.checkpoint.load import load_checkpoint

        meta = load_checkpoint(load_dir, self.chunks, self.ctx, self.cfg,
                               optimizer=self.optimizer if load_optimizer else None, **kwargs)
        self.iteration = meta["iteration"]
        return meta

    def microbatches(self, dataset, iteration: int, with_partials: bool = False):
        """This rank's micro-batches of ``iteration``; with bubble filling, also the partial
        micro-batches' data (read after the global batch, so the full batches never change)."""
        t, ctx = self.train, self.ctx
        full = microbatches_for_iteration(dataset, iteration, t.global_batch_size, t.micro_batch_size,
                                          ctx.dp_rank, ctx.dp_size, ctx.device)
        k = self.num_partial_microbatches if with_partials else 0
        if not k:
            return full, []
        extra_per_step = k * t.micro_batch_size * ctx.dp_size
        offset = t.train_iters * t.global_batch_size  # a disjoint stretch of the dataset
        partial = microbatches_for_iteration(dataset, 0, extra_per_step, t.micro_batch_size, ctx.dp_rank,
                                             ctx.dp_size, ctx.device, start=offset + iteration * extra_per_step)
        return full, partial


def set_learning_rate(setup: TrainingSetup, iteration: int) -> float:
    t = setup.train
    lr = learning_rate(iteration, t.lr, t.min_lr, t.lr_warmup_iters, t.lr_decay_iters, t.lr_decay_style)
    for group in setup.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)  # lr_mult: megatron-core's groups
    return lr


def train(setup: TrainingSetup, train_dataset, valid_dataset=None,
          logger=None, save_fn: Optional[Callable[[TrainingSetup], None]] = None,
          save_interval: int = 0) -> List[Dict]:
    """Train from ``setup.iteration`` to ``train_iters``; returns the logged records."""
    t = setup.train
    records = []
    tokens_per_step = t.global_batch_size * setup.cfg.model.seq_length
    while setup.iteration < t.train_iters:
        it = setup.iteration
        lr = set_learning_rate(setup, it)
        start = time.perf_counter()
        full, partial = setup.microbatches(train_dataset, it, with_partials=True)
        result: StepResult = train_step(setup.chunks, setup.optimizer, full, setup.ctx, setup.cfg,
                                        iteration=it, clip_grad=t.clip_grad, bf16=t.bf16,
                                        schedule=setup.schedule, partial_microbatches=partial)
        elapsed = time.perf_counter() - start
        setup.iteration = it + 1
        if logger is not None:
            logger.on_step(setup)
        if setup.iteration % t.log_interval == 0 or setup.iteration == t.train_iters:
            record = {"iteration": setup.iteration, "lm_loss": result.lm_loss,
                      "exit_losses": {str(k): v for k, v in result.exit_losses.items()},
                      "exit_weights": {str(k): w for k, w in zip(setup.cfg.exits.exit_layer_nums,
                                                                   result.exit_weights)},
                      "grad_norm": result.grad_norm, "lr": lr,
                      "tokens_per_sec": tokens_per_step / max(elapsed, 1e-9), "step_time": elapsed}
            records.append(record)
            if logger is not None:
                logger.log_train(record, setup)
        if valid_dataset is not None and t.eval_interval and setup.iteration % t.eval_interval == 0:
            evaluate_and_log(setup, valid_dataset, logger)
        if save_fn is not None and save_interval and setup.iteration % save_interval == 0:
            save_fn(setup)
    return records


def evaluate_and_log(setup: TrainingSetup, valid_dataset, logger=None) -> Dict:
    from megatron.early_exit.trainer.evaluate import evaluate

    result = evaluate(setup, valid_dataset)
    if logger is not None:
        logger.log_eval(result, setup)
    return result
