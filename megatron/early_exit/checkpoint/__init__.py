"""Sharded, reshardable checkpoints of early-exit GPT training runs (our own format).

    from megatron.early_exit.checkpoint import save_checkpoint, load_checkpoint

    save_checkpoint(save_dir, chunks, ctx, cfg, iteration, optimizer=opt,
                    tokenizer_files=[vocab, merges])           # collective, every rank
    meta = load_checkpoint(load_dir, chunks, ctx, cfg, optimizer=opt)  # any TP/PP/DP layout
    iteration = meta["iteration"]
    meta = read_checkpoint_metadata(load_dir)                  # --use-checkpoint-args
    config, tensors = load_full_state(load_dir)                # one process, full tensors
    reshard_checkpoint(load_dir, out_dir, tp=1, pp=1)          # tools/checkpoint/reshard.py

Parameters and optimizer state are stored under canonical, layout-independent names
(model/sharding.py) with their tensor-parallel ShardSpec; see format.py for the directory
layout and save.py for the metadata. Problems raise ``CheckpointError``.
"""

from megatron.early_exit.checkpoint.format import CheckpointError
from megatron.early_exit.checkpoint.load import (checkpoint_exists, checkpoint_tokenizer_files,
                                                 config_from_dict, load_checkpoint,
                                                 load_full_optimizer_state, load_full_state,
                                                 read_checkpoint_metadata, train_config_from_dict)
from megatron.early_exit.checkpoint.reshard import reshard_checkpoint
from megatron.early_exit.checkpoint.save import copy_tokenizer_files, save_checkpoint

__all__ = ["CheckpointError", "checkpoint_exists", "checkpoint_tokenizer_files", "config_from_dict",
           "copy_tokenizer_files", "load_checkpoint", "load_full_optimizer_state", "load_full_state",
           "read_checkpoint_metadata", "reshard_checkpoint", "save_checkpoint",
           "train_config_from_dict"]
