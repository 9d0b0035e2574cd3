"""The pretraining job behind ``pretrain_early_exit_gpt.py``: configs -> model, optimizer,
data -> resume -> train -> checkpoint.

The entry script parses the flags (arguments.py) and calls :func:`pretrain` with the configs;
nothing here sees argparse. Launch with torchrun (any TP x PP x DP; gloo on CPU, NCCL on GPU)
or as a plain process:

    torchrun --nproc-per-node 2 pretrain_early_exit_gpt.py --pipeline-model-parallel-size 2 ...
    python pretrain_early_exit_gpt.py --num-layers 4 ... --data-path data/shakespeare_text_document
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
import torch.distributed as dist

from megatron.early_exit.checkpoint.format import CheckpointError
from megatron.early_exit.config import ConfigError


def init_distributed() -> torch.device:
    """Join the torchrun world (or make a world of one) and pick this rank's device."""
    from megatron.early_exit.parallel.state import ensure_process_group

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    ensure_process_group()
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resume_from(run, rank: int) -> bool:
    """Whether --load holds a checkpoint to resume from. A --load without one is an error
    (a typo must not train from random weights) unless it is also --save: the resume idiom
    ``--save D --load D`` starts from scratch with a notice."""
    from megatron.early_exit.checkpoint.load import checkpoint_exists

    if not run.load or checkpoint_exists(run.load):
        return bool(run.load)
    what = "does not exist" if not os.path.exists(run.load) else "holds no checkpoint"
    # (the entry script refuses a missing --load early; this also covers a directory without one)
    if run.save and os.path.abspath(run.load) == os.path.abspath(run.save):
        if rank == 0:
            print(f"note: --load {run.load} {what} yet; starting from scratch", flush=True)
        return False
    raise ConfigError(f"--load {run.load} {what} (no latest_checkpointed_iteration.txt); "
                      "to start from scratch, drop --load or give it the --save directory")


def build_setup(configs, device: torch.device):
    from megatron.early_exit.parallel.state import build_model, initialize_parallel
    from megatron.early_exit.trainer.loop import TrainingSetup
    from megatron.early_exit.trainer.optimizer import build_trainer_optimizer
    from megatron.early_exit.trainer.tune import check_tunable, freeze_backbone

    ctx = initialize_parallel(configs.model, device)
    torch.manual_seed(configs.model.seed + 100 * ctx.pp_rank + ctx.tp_rank)
    chunks = build_model(configs.model, ctx)
    if configs.schedule.tune_exit:
        check_tunable(configs.model)
        freeze_backbone(chunks)
    t = configs.train
    optimizer = build_trainer_optimizer(chunks, ctx, t)
    return TrainingSetup(configs.model, t, ctx, chunks, optimizer, schedule=configs.schedule)


def build_data(configs, setup, tokenizer):
    from megatron.early_exit.data.gpt_data import build_gpt_datasets

    t = configs.train
    extra = setup.num_partial_microbatches * t.micro_batch_size * setup.ctx.dp_size
    evals = (t.train_iters // t.eval_interval + 1) if t.eval_interval else 1
    # no test samples: the test split is never read during training
    sizes = (t.train_iters * (t.global_batch_size + extra), evals * t.eval_iters * t.global_batch_size, 0)
    return build_gpt_datasets(configs.run, configs.model.model.seq_length, configs.model.seed, tokenizer, sizes)


def save_truncated_tuning(setup, run, extra, tokenizer_dir) -> str:
    """Checkpoint of a --tune-exit-pipeline-parallel-size run: this run's stages go to
    ``<save>/.truncated``, then rank 0 writes the whole model (base backbone from --load, tuned
    exits) to --save at (TP, --pipeline-model-parallel-size); errors fail every rank."""
    from megatron.early_exit.checkpoint.merge import merge_tuned_exits

    staging = os.path.join(run.save, ".truncated")
    setup.save_checkpoint(staging, save_optimizer=False, args=dataclasses.asdict(run), extra=extra,
                          tokenizer_files=[tokenizer_dir], save_rng=False)
    m, par = setup.cfg.model, setup.cfg.parallel
    full_pp = par.pipeline_model_parallel_size * m.init_num_layers // m.num_layers  # K -> P stages
    outcome = [None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = ("ok", merge_tuned_exits(run.load, staging, run.save,
                                                  tp=par.tensor_model_parallel_size, pp=full_pp,
                                                  base_iteration=run.load_iteration))
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            outcome[0] = ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(outcome, src=0)
    status, detail = outcome[0]
    if status != "ok":
        raise RuntimeError(f"merging the tuned exits into a whole checkpoint failed: {detail} "
                           f"(this run's stages are in {staging})")
    return detail


def pretrain(configs, tokenizer, device: torch.device, peak_tflops: Optional[float] = None) -> dict:
    """Train as ``configs`` say (arguments.Configs), resuming from --load, saving to --save;
    returns the last evaluation's record (or {}). Collective: every rank calls it."""
    from megatron.early_exit.trainer.loop import evaluate_and_log, train
    from megatron.early_exit.trainer.metrics_log import TrainingLogger

    setup = build_setup(configs, device)
    run = configs.run
    if resume_from(run, dist.get_rank()):
        tuning = configs.schedule.tune_exit
        try:
            meta = setup.load_checkpoint(run.load, load_optimizer=not tuning, iteration=run.load_iteration,
                                         load_rng=not tuning, strict=not tuning)
        except CheckpointError as e:  # a checkpoint that does not fit is a bad --load
            raise CheckpointError(f"--load {run.load}: {e}") from e
        if tuning:
            setup.iteration = 0
        if dist.get_rank() == 0:
            print(f"loaded checkpoint {run.load} at iteration {meta['iteration']}", flush=True)
    elif configs.model.model.init_num_layers is not None:  # --tune-exit-pipeline-parallel-size
        raise ConfigError("--tune-exit-pipeline-parallel-size needs --load with the model to tune "
                          "(its later layers are copied into every saved checkpoint)")
    train_ds, valid_ds, _ = build_data(configs, setup, tokenizer)
    logger = TrainingLogger(run.log_json, run.tensorboard_dir, dist.get_rank(), dist.get_world_size(),
                            peak_tflops=peak_tflops)
    save = checkpoint_saver(setup, run, tokenizer) if run.save else None
    train(setup, train_ds, valid_ds, logger, save_fn=save, save_interval=run.save_interval)
    logger.close()
    if save and (not run.save_interval or setup.iteration % run.save_interval):
        save(setup)
    t = setup.train
    evaluated = t.eval_interval and setup.iteration % t.eval_interval == 0
    if valid_ds is not None and t.eval_iters and not evaluated:
        return evaluate_and_log(setup, valid_ds, logger)
    return {}


def checkpoint_saver(setup, run, tokenizer):
    """The save function of the loop; the tokenizer's files and descriptor travel with every
    checkpoint (written once to ``<save>/.tokenizer``)."""
    from megatron.early_exit.data.tokenizers import save_tokenizer_files

    tokenizer_dir = os.path.join(run.save, ".tokenizer")
    if dist.get_rank() == 0:
        save_tokenizer_files(tokenizer, tokenizer_dir)
    dist.barrier()
    truncated = setup.cfg.model.init_num_layers is not None

    def save(s):
        extra = {"consumed_samples": s.iteration * s.train.global_batch_size}
        if truncated:
            return save_truncated_tuning(s, run, extra, tokenizer_dir)
        return s.save_checkpoint(run.save, args=dataclasses.asdict(run), extra=extra,
                                 tokenizer_files=[tokenizer_dir])

    return save
