"""Load (and reshard) our checkpoints; read their metadata; read full tensors on one process.

    meta = load_checkpoint(load_dir, chunks, ctx, cfg, optimizer=optimizer)   # every rank
    iteration = meta["iteration"]                         # what was loaded is returned, not set
    meta = read_checkpoint_metadata(load_dir)             # --use-checkpoint-args: meta["config"]
    config, tensors = load_full_state(path)               # one process, no model: tools, export

``load_checkpoint`` picks the iteration (given, else ``latest_checkpointed_iteration.txt``),
checks the sealed metadata and that every manifest file exists with its recorded size, checks
the model config against the checkpoint's (naming the mismatching field), then for each local
parameter assembles the full tensor from the saved TP shards of the stage that saved it and
keeps this rank's slice (read directly when the TP split is unchanged), so TP/PP/DP and
virtual chunks may all differ from the saving run. Every file it reads is sha256-checked
before anything is modified. The AdamW state is resharded the same way; RNG states are
restored only when the layout is identical (else a warning). Any problem raises
``CheckpointError`` on every rank; nothing is modified unless all names and shapes match.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.early_exit.checkpoint import format as fmt
from megatron.early_exit.checkpoint.reader import ShardReader
from megatron.early_exit.checkpoint.rng import restore_rng_state
from megatron.early_exit.checkpoint.save import dist_ready, global_rank, layout_dict
from megatron.early_exit.checkpoint.tensors import (load_model_tensors, load_optimizer_state,
                                                    local_params)
from megatron.early_exit.model.sharding import full_shape

# Fields that decide the parameters' names and shapes (checked on load, named on mismatch).
MODEL_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "ffn_hidden_size", "vocab_size", "normalization", "swiglu",
                "position_embedding_type", "add_bias_linear", "untie_embeddings_and_output_weights")
EXIT_FIELDS = ("exit_layer_nums", "pre_exit", "use_exit_norm", "use_exit_mlp", "use_exit_block",
               "untie_exit_output_weights", "use_exit_classifier")


def open_checkpoint(load_dir: str, iteration: Optional[int] = None) -> Tuple[str, dict, ShardReader]:
    """(iteration directory, verified metadata, reader) of a committed checkpoint."""
    it = fmt.resolve_iteration(load_dir, iteration)
    dir_path = fmt.locate_iteration_dir(load_dir, it)
    meta = fmt.read_metadata(dir_path)
    if meta["iteration"] != it:
        raise fmt.CheckpointError(f"{dir_path}/{fmt.METADATA} is for iteration {meta['iteration']}")
    fmt.check_manifest(dir_path, meta["files"])
    return dir_path, meta, ShardReader(dir_path, meta)


def read_checkpoint_metadata(load_dir: str, iteration: Optional[int] = None) -> dict:
    """The metadata dict (config, train_config, args, extra, ...) of a checkpoint."""
    return open_checkpoint(load_dir, iteration)[1]


def checkpoint_exists(load_dir: Optional[str]) -> bool:
    """Whether ``load_dir`` has a latest-iteration pointer (a committed checkpoint)."""
    return bool(load_dir) and fmt.read_tracker(load_dir) is not None


def checkpoint_tokenizer_files(load_dir: str, iteration: Optional[int] = None) -> list:
    """Absolute paths of the tokenizer files saved with a checkpoint (sha256-checked)."""
    dir_path, meta, _ = open_checkpoint(load_dir, iteration)
    return [fmt.check_file(dir_path, rel, meta["files"], hash_it=True)
            for rel in meta["tokenizer_files"]]


def load_full_state(load_dir: str, iteration: Optional[int] = None) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(config dict, canonical name -> full tensor) of a checkpoint, on one process."""
    _, meta, reader = open_checkpoint(load_dir, iteration)
    return meta["config"], {name: reader.tensor(name) for name in sorted(reader.index)}


def load_full_optimizer_state(load_dir: str, iteration: Optional[int] = None) -> Dict[str, dict]:
    """Canonical name -> full AdamW state (``step``, ``exp_avg``, ``exp_avg_sq``)."""
    _, meta, reader = open_checkpoint(load_dir, iteration)
    if not meta["has_optimizer"]:
        raise fmt.CheckpointError(f"checkpoint in {load_dir} holds no optimizer state")
    return {name: reader.state(name) for name in sorted(reader.index) if reader.has_state(name)}


# ------------------------------------------------------------------------------ checks
def check_config(saved: dict, cfg, strict: bool = True) -> None:
    """Raise naming the first structural field where ``cfg`` differs from the saved config
    (not strict: exits may differ, and a truncated tuning model, whose ``init_num_layers`` is
    the saved depth, may keep only the first layers)."""
    pairs = [("model", f) for f in MODEL_FIELDS]
    if cfg.model.position_embedding_type == "learned_absolute":
        pairs.append(("model", "max_position_embeddings"))
    if strict:
        pairs += [("exits", f) for f in EXIT_FIELDS]
    for section, name in pairs:
        theirs = saved.get(section, {}).get(name)
        ours = getattr(getattr(cfg, section), name)
        if name == "use_exit_classifier":
            theirs = bool(theirs)  # checkpoints written before the field existed have none
        if not strict and name == "num_layers" and cfg.model.init_num_layers == theirs:
            continue  # the first layers of this model (--tune-exit-pipeline-parallel-size)
        if theirs != ours:
            raise fmt.CheckpointError(f"the checkpoint does not fit this model: {section}.{name} is "
                                      f"{theirs!r} in the checkpoint but {ours!r} here")


def _check_params(params, reader: ShardReader, ctx, strict: bool) -> None:
    missing = [p.canon for p in params if not reader.has(p.canon)]
    if missing and strict:
        raise fmt.CheckpointError(f"the checkpoint has no {missing[:8]}"
                                  f"{' ...' if len(missing) > 8 else ''} (strict=False keeps them)")
    if missing:
        warnings.warn(f"not in the checkpoint, left as initialised: {missing}")
    for p in params:
        if reader.has(p.canon):
            have = tuple(reader.index[p.canon]["shape"])
            want = tuple(full_shape(p.param, p.spec, ctx.tp_size))
            if have != want:
                raise fmt.CheckpointError(f"parameter {p.canon}: the checkpoint holds shape {have}, "
                                          f"this model needs {want}")


def _read_rng(dir_path: str, meta: dict, layout: dict) -> Optional[dict]:
    """This rank's saved RNG state, or None (with a warning) if it cannot apply here."""
    if not meta["has_rng"]:
        warnings.warn(f"{dir_path} holds no RNG states (resharded?): RNG not restored")
        return None
    if meta["layout"] != layout:
        warnings.warn(f"checkpoint layout {meta['layout']} differs from this run's "
                      f"{layout}: RNG states not restored")
        return None
    path = fmt.check_file(dir_path, fmt.rng_file(global_rank()), meta["files"], hash_it=True)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise fmt.CheckpointError(f"cannot read checkpoint file {path}: {e}") from e


def _load_here(load_dir, chunks, ctx, cfg, optimizer, iteration, load_rng, strict) -> dict:
    dir_path, meta, reader = open_checkpoint(load_dir, iteration)
    check_config(meta["config"], cfg, strict)
    if optimizer is not None and not meta["has_optimizer"]:
        raise fmt.CheckpointError(f"{dir_path} holds no optimizer state; load it without the "
                                  "optimizer (optimizer=None)")
    params = local_params(chunks, cfg.model.swiglu)
    _check_params(params, reader, ctx, strict)
    reader.prefetch([(p.canon, p.spec) for p in params], optimizer is not None, ctx)
    rng = _read_rng(dir_path, meta, layout_dict(ctx, len(chunks))) if load_rng else None
    load_model_tensors(params, reader, ctx)
    if optimizer is not None:
        load_optimizer_state(params, optimizer, reader, ctx)
    if rng is not None:
        restore_rng_state(rng)
    return meta


def load_checkpoint(load_dir: str, chunks, ctx, cfg, optimizer=None, iteration: Optional[int] = None,
                    load_rng: bool = True, strict: bool = True) -> dict:
    """Load a checkpoint into this rank's model ``chunks`` (EarlyExitGPTConfig ``cfg``,
    ParallelContext ``ctx``), the ``optimizer`` state (None: not loaded) and the RNG states,
    resharding as needed. Returns the checkpoint's metadata; ``meta["iteration"]`` is the
    iteration it holds (the caller continues from there).

    Collective: every rank calls it. A failing rank raises its own error (``CheckpointError``
    for a missing, corrupt or mismatching checkpoint); the others raise ``CheckpointError``
    naming that rank, so no rank is left waiting in a later collective.
    ``strict=False`` tolerates parameters absent from the checkpoint (e.g. newly added exits)
    and skips the exit-structure check.
    """
    meta, error = None, None
    try:
        meta = _load_here(load_dir, chunks, ctx, cfg, optimizer, iteration, load_rng, strict)
    except Exception as e:  # noqa: BLE001 - the other ranks must hear of it, not hang
        error = e
    message = None if error is None else f"{type(error).__name__}: {error}"
    messages = [message]
    if dist_ready() and dist.get_world_size() > 1:
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        raise fmt.CheckpointError(f"loading failed on rank {failed[0][0]}: {failed[0][1]}")
    return meta


# ------------------------------------------------------------------------------ configs
def _known(cls, values: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    dropped = sorted(set(values) - names)
    if dropped:
        warnings.warn(f"checkpoint config fields unknown to {cls.__name__} ignored: {dropped}")
    return {k: v for k, v in values.items() if k in names}


def config_from_dict(d: dict):
    """EarlyExitGPTConfig from metadata['config'] (validated; unknown fields dropped)."""
    from megatron.early_exit.config import (EarlyExitGPTConfig, ExitConfig, ModelConfig,
                                            ParallelConfig)

    rest = _known(EarlyExitGPTConfig, {k: v for k, v in d.items()
                                       if k not in ("model", "exits", "parallel")})
    return EarlyExitGPTConfig(model=ModelConfig(**_known(ModelConfig, d["model"])),
                              exits=ExitConfig(**_known(ExitConfig, d.get("exits", {}))),
                              parallel=ParallelConfig(**_known(ParallelConfig, d.get("parallel", {}))),
                              **rest)


def train_config_from_dict(d: dict):
    from megatron.early_exit.config import TrainConfig

    return TrainConfig(**_known(TrainConfig, d))
