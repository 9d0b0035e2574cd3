"""Load a checkpoint for inference: model config and tokenizer come from the checkpoint, so
``--load DIR`` alone is enough (any checkpoint of pretrain_early_exit_gpt.py or the tools).

    model, cfg, tokenizer = load_for_inference("ckpt", device=torch.device("cpu"))

The checkpoint's full (canonical) tensors are sliced for this rank's tensor-parallel layout
(the process group must already be initialised for TP or PP > 1; any TP x PP).

    engine, tokenizer = load_engine("ckpt", torch.device("cpu"), pipeline_model_parallel_size=2)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
import torch.distributed as dist

from megatron.early_exit.config import ParallelConfig


@torch.no_grad()
def load_model_weights(model, full_state: dict, tp_rank: int, tp_size: int) -> None:
    from megatron.early_exit.model.sharding import canonical_names, shard, shard_spec

    names = canonical_names(model)
    missing = [n for n in names.values() if n not in full_state]
    if missing:
        raise KeyError(f"checkpoint lacks parameters {missing[:5]}{'...' if len(missing) > 5 else ''}")
    for local, param in model.named_parameters():
        spec = shard_spec(local, param, model.cfg.model.swiglu)
        param.copy_(shard(full_state[names[local]], spec, tp_rank, tp_size).to(param.dtype))


def _repad_for_tp(load_dir, iteration, config, full_state, tp: int) -> None:
    """Pad (or trim the padding of) the vocabulary rows to what TP=``tp`` needs: padded
    columns never enter a softmax, so the model is the same function at every size."""
    from megatron.early_exit.checkpoint.load import read_checkpoint_metadata
    from megatron.early_exit.checkpoint.reshard import repad_vocab, target_vocab_size

    meta = read_checkpoint_metadata(load_dir, iteration)
    if config["model"].get("tokenizer_vocab_size") is None:  # unpadded: every row is a token
        config["model"]["tokenizer_vocab_size"] = config["model"]["vocab_size"]
        meta["config"]["model"]["tokenizer_vocab_size"] = config["model"]["vocab_size"]
    repad_vocab(config, {n: {} for n in full_state}, full_state, None, target_vocab_size(meta, tp))


def load_for_inference(load_dir: str, device: torch.device, iteration: Optional[int] = None,
                       tensor_model_parallel_size: int = 1, dtype: Optional[str] = None,
                       pipeline_model_parallel_size: int = 1, with_context: bool = False):
    """(model, cfg, tokenizer) from a checkpoint directory; model in eval mode on ``device``
    (this rank's stage at PP > 1; ``with_context``: also the parallel context)."""
    from megatron.early_exit.checkpoint.load import (checkpoint_tokenizer_files, config_from_dict,
                                                     load_full_state)
    from megatron.early_exit.data.tokenizers import tokenizer_from_directory
    from megatron.early_exit.parallel.state import build_model, ensure_process_group, initialize_parallel

    ensure_process_group()
    config, full_state = load_full_state(load_dir, iteration)
    if config["model"]["vocab_size"] % tensor_model_parallel_size:
        _repad_for_tp(load_dir, iteration, config, full_state, tensor_model_parallel_size)
    cfg = config_from_dict(config)
    parallel = ParallelConfig(tensor_model_parallel_size=tensor_model_parallel_size,
                              pipeline_model_parallel_size=pipeline_model_parallel_size,
                              world_size=dist.get_world_size())
    cfg = dataclasses.replace(cfg, parallel=parallel, recompute_granularity=None,
                              params_dtype=dtype or cfg.params_dtype)
    ctx = initialize_parallel(cfg, device)
    (model,) = build_model(cfg, ctx)
    load_model_weights(model, full_state, ctx.tp_rank, ctx.tp_size)
    model.eval()
    files = checkpoint_tokenizer_files(load_dir, iteration)
    tokenizer = tokenizer_from_directory(os.path.dirname(files[0])) if files else None
    if with_context:
        return model, cfg, tokenizer, ctx
    return model, cfg, tokenizer


def load_engine(load_dir: str, device: torch.device, tensor_model_parallel_size: int = 1,
                pipeline_model_parallel_size: int = 1, dtype: Optional[str] = None,
                fast_decode: Optional[str] = None, iteration: Optional[int] = None,
                seed: Optional[int] = None):
    """(Engine, tokenizer) for this rank of a TP x PP layout (the checkpoint's full tensors are
    sliced to the layout, whatever layout they were saved in). Ranks of pipeline stage 0 have
    ``engine.drives``; the others call ``engine.serve()``."""
    from megatron.early_exit.inference.engine import Engine

    model, cfg, tokenizer, ctx = load_for_inference(
        load_dir, device, iteration, tensor_model_parallel_size, dtype,
        pipeline_model_parallel_size, with_context=True)
    return Engine(model, cfg, seed=seed, fast_decode=fast_decode, ctx=ctx), tokenizer
