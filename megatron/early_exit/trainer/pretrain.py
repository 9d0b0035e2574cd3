"""The pretraining job behind ``pretrain_early_exit_gpt.py``: flags -> configs -> model,
optimizer, data -> resume -> train -> checkpoint.

Launch with torchrun (any TP x PP x DP; gloo on CPU, NCCL on GPU) or as a plain process:

    torchrun --nproc-per-node 2 pretrain_early_exit_gpt.py --pipeline-model-parallel-size 2 ...
    python pretrain_early_exit_gpt.py --num-layers 4 ... --data-path data/shakespeare_text_document
"""

from __future__ import annotations

import os
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron.early_exit.arguments import Configs, configs_from_args, parse_args

# Flags that define the model; --use-checkpoint-args takes these from the checkpoint.
MODEL_ARGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "seq_length", "max_position_embeddings", "architecture", "normalization", "swiglu",
              "position_embedding_type", "disable_bias_linear", "untie_embeddings_and_output_weights",
              "rotary_base", "norm_epsilon", "exit_layer_nums", "pre_exit", "use_exit_norm", "use_exit_mlp",
              "use_exit_block", "untie_exit_output_weights", "tokenizer_type", "make_vocab_size_divisible_by")


def init_distributed() -> torch.device:
    """Join the torchrun world (or make a world of one) and pick this rank's device."""
    from megatron.early_exit.parallel.state import ensure_process_group

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    ensure_process_group()
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def apply_checkpoint_args(args) -> None:
    """--use-checkpoint-args: model-defining flags come from the checkpoint in --load."""
    from megatron.early_exit.checkpoint.load import read_checkpoint_metadata

    if not args.load:
        raise SystemExit("--use-checkpoint-args needs --load")
    saved = read_checkpoint_metadata(args.load, args.load_iteration).get("args") or {}
    for name in MODEL_ARGS:
        if name in saved:
            setattr(args, name, saved[name])


def build_tokenizer_for(args):
    from megatron.early_exit.data.tokenizers import build_tokenizer

    return build_tokenizer(args.tokenizer_type, vocab_file=args.vocab_file, merge_file=args.merge_file,
                           tokenizer_model=args.tokenizer_model)


def build_setup(configs: Configs, device: torch.device):
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


def build_data(configs: Configs, setup, tokenizer):
    from megatron.early_exit.data.gpt_data import build_gpt_datasets

    t = configs.train
    extra = setup.num_partial_microbatches * t.micro_batch_size * setup.ctx.dp_size
    evals = (t.train_iters // t.eval_interval + 1) if t.eval_interval else 1
    # no test samples: the test split is never read during training
    sizes = (t.train_iters * (t.global_batch_size + extra), evals * t.eval_iters * t.global_batch_size, 0)
    return build_gpt_datasets(configs.run, configs.model.model.seq_length, configs.model.seed, tokenizer, sizes)


def save_truncated_tuning(setup, run, args, extra, tokenizer_dir) -> str:
    """Checkpoint of a --tune-exit-pipeline-parallel-size run: this run's stages go to
    ``<save>/.truncated``, then rank 0 writes the whole model (base backbone from --load, tuned
    exits) to --save at (TP, --pipeline-model-parallel-size); errors fail every rank."""
    from megatron.early_exit.checkpoint.merge import merge_tuned_exits
    from megatron.early_exit.checkpoint.save import save_checkpoint

    staging = os.path.join(run.save, ".truncated")
    save_checkpoint(staging, setup, args=vars(args), extra=extra, tokenizer_files=[tokenizer_dir],
                    save_optimizer=False, save_rng=False)
    outcome = [None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = ("ok", merge_tuned_exits(run.load, staging, run.save,
                                                  tp=args.tensor_model_parallel_size,
                                                  pp=args.pipeline_model_parallel_size,
                                                  base_iteration=run.load_iteration))
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            outcome[0] = ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(outcome, src=0)
    status, detail = outcome[0]
    if status != "ok":
        raise RuntimeError(f"merging the tuned exits into a whole checkpoint failed: {detail} "
                           f"(this run's stages are in {staging})")
    return detail


def main(argv: Optional[List[str]] = None) -> dict:
    from megatron.early_exit.checkpoint.load import checkpoint_exists, load_checkpoint
    from megatron.early_exit.checkpoint.save import save_checkpoint
    from megatron.early_exit.data.tokenizers import pad_vocab_size
    from megatron.early_exit.trainer.loop import evaluate_and_log, train
    from megatron.early_exit.trainer.metrics_log import TrainingLogger

    args = parse_args(argv)
    device = init_distributed()
    if args.use_checkpoint_args:
        apply_checkpoint_args(args)
    tokenizer = build_tokenizer_for(args)
    vocab = pad_vocab_size(tokenizer.vocab_size, args.make_vocab_size_divisible_by,
                           args.tensor_model_parallel_size)
    if args.use_checkpoint_args:  # keep the checkpoint's padded vocabulary, whatever the new TP
        from megatron.early_exit.checkpoint.load import read_checkpoint_metadata

        vocab = read_checkpoint_metadata(args.load, args.load_iteration)["config"]["model"]["vocab_size"]
    configs = configs_from_args(args, dist.get_world_size(), vocab)
    setup = build_setup(configs, device)
    run = configs.run
    if run.load and checkpoint_exists(run.load):
        tuning = configs.schedule.tune_exit
        meta = load_checkpoint(run.load, setup, run.load_iteration, load_optimizer=not tuning,
                               load_rng=not tuning, strict=not tuning)
        if tuning:
            setup.iteration = 0
        if dist.get_rank() == 0:
            print(f"loaded checkpoint {run.load} at iteration {meta['iteration']}", flush=True)
    train_ds, valid_ds, _ = build_data(configs, setup, tokenizer)
    logger = TrainingLogger(run.log_json, run.tensorboard_dir, dist.get_rank(), dist.get_world_size(),
                            peak_tflops=args.peak_tflops)

    tokenizer_dir = None
    if run.save:  # the tokenizer's files and descriptor travel with every checkpoint
        from megatron.early_exit.data.tokenizers import save_tokenizer_files

        tokenizer_dir = os.path.join(run.save, ".tokenizer")
        if dist.get_rank() == 0:
            save_tokenizer_files(tokenizer, tokenizer_dir)
        dist.barrier()

    truncated = configs.model.model.num_layers < args.num_layers  # --tune-exit-pipeline-parallel-size
    if truncated and not (run.load and checkpoint_exists(run.load)):
        raise SystemExit("--tune-exit-pipeline-parallel-size needs --load with the model to tune "
                         "(its later layers are copied into every saved checkpoint)")

    def save(s):
        extra = {"consumed_samples": s.iteration * s.train.global_batch_size}
        if not truncated:
            save_checkpoint(run.save, s, args=vars(args), extra=extra, tokenizer_files=[tokenizer_dir])
            return
        save_truncated_tuning(s, run, args, extra, tokenizer_dir)

    train(setup, train_ds, valid_ds, logger, save_fn=save if run.save else None,
          save_interval=run.save_interval)
    logger.close()
    if run.save and (not run.save_interval or setup.iteration % run.save_interval):
        save(setup)
    t = setup.train
    evaluated = t.eval_interval and setup.iteration % t.eval_interval == 0
    if valid_ds is not None and t.eval_iters and not evaluated:
        return evaluate_and_log(setup, valid_ds, logger)
    return {}
