"""Save a training state as a sharded, reshardable checkpoint (collective over all ranks).

    path = save_checkpoint(save_dir, chunks, ctx, cfg, iteration, optimizer=optimizer,
                           train_config=train_cfg, args=dataclasses.asdict(run_cfg),
                           extra={"consumed_samples": n}, tokenizer_files=["vocab.json", "merges.txt"])

Every rank calls it. Ranks with dp_rank 0 write their (tp, pp) model and optimizer shards,
every rank writes its RNG state, global rank 0 copies the tokenizer files; all of it goes into
``iter_XXXXXXX.tmp-<nonce>/``. Rank 0 then collects every rank's file list (sizes, sha256) and
tensor index, checks that every expected file is there, writes ``metadata.json`` and commits
(checkpoint/format.py: rename into place, then ``latest_checkpointed_iteration.txt``). If any
rank fails, every rank raises ``CheckpointError`` and the latest checkpoint stays as it was.

``metadata.json`` holds: format_version, iteration, config (dataclasses.asdict of
EarlyExitGPTConfig), train_config (of TrainConfig), layout (world/TP/PP/DP sizes, virtual
chunks), args (the run's RunConfig: tokenizer, for --use-checkpoint-args), extra, tensors (canonical name -> pp_rank of its
file, full shape, dtype, ShardSpec dim/chunks), has_optimizer, has_rng, tokenizer_files, files
(the manifest: relative path -> size, sha256) and metadata_sha256 (a seal over the rest).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import traceback
from typing import Dict, Iterable, Optional

import torch
import torch.distributed as dist

from megatron.early_exit.checkpoint import format as fmt
from megatron.early_exit.checkpoint.cleanup import remove_stale_saves
from megatron.early_exit.checkpoint.rng import capture_rng_state
from megatron.early_exit.checkpoint.tensors import (local_params, model_payload, optimizer_payload,
                                                    saved_optimizer_states,
                                                    tensor_index)


# ------------------------------------------------------------------------------ collectives
def dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def global_rank() -> int:
    return dist.get_rank() if dist_ready() else 0


def world_size() -> int:
    return dist.get_world_size() if dist_ready() else 1


def broadcast_object(obj, src: int = 0):
    if not dist_ready():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> Optional[list]:
    if not dist_ready():
        return [obj]
    out = [None] * world_size() if global_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def jsonable(value):
    """``value`` as plain JSON types (paths and other objects become strings)."""
    return json.loads(json.dumps(value, default=str))


# ------------------------------------------------------------------------------ pieces
def layout_dict(ctx, num_chunks: int) -> dict:
    return {"world_size": world_size(), "tensor_model_parallel_size": ctx.tp_size,
            "pipeline_model_parallel_size": ctx.pp_size, "data_parallel_size": ctx.dp_size,
            "virtual_pipeline_chunks": num_chunks}


def copy_tokenizer_files(dir_path: str, paths: Iterable[str]) -> Dict[str, dict]:
    """Copy tokenizer files (or the files of a tokenizer directory) into ``<dir>/tokenizer/``;
    returns manifest entries (relative path -> size, sha256)."""
    files = []
    for path in paths or ():
        path = os.fspath(path)
        if os.path.isdir(path):
            files += [os.path.join(path, n) for n in sorted(os.listdir(path))
                      if os.path.isfile(os.path.join(path, n))]
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise fmt.CheckpointError(f"tokenizer file {path} does not exist")
    entries = {}
    if files:
        os.makedirs(os.path.join(dir_path, fmt.TOKENIZER_DIR), exist_ok=True)
    for src in files:
        rel = f"{fmt.TOKENIZER_DIR}/{os.path.basename(src)}"
        if rel in entries:
            raise fmt.CheckpointError(f"two tokenizer files are named {os.path.basename(src)}")
        dst = os.path.join(dir_path, rel)
        shutil.copyfile(src, dst)
        with open(dst, "rb") as f:
            os.fsync(f.fileno())
        entries[rel] = {"size": os.path.getsize(dst), "sha256": fmt.sha256_file(dst)}
    return entries


def write_shard_files(dir_path: str, params, optimizer, ctx, states=None) -> tuple:
    """Write this (tp, pp) rank's model (and optimizer) shard; returns (manifest, index).
    ``states``: saved_optimizer_states(params, optimizer), if already gathered."""
    files = {}
    name = fmt.model_file(ctx.tp_rank, ctx.pp_rank)
    size, sha = fmt.write_torch_file(os.path.join(dir_path, name), model_payload(params, ctx))
    files[name] = {"size": size, "sha256": sha}
    if optimizer is not None:
        name = fmt.optim_file(ctx.tp_rank, ctx.pp_rank)
        if states is None:
            states = saved_optimizer_states(params, optimizer)
        payload = optimizer_payload(params, optimizer, ctx, states)
        size, sha = fmt.write_torch_file(os.path.join(dir_path, name), payload)
        files[name] = {"size": size, "sha256": sha}
    return files, tensor_index(params, ctx)


def _write_rank(tmp: str, chunks, ctx, cfg, opt, save_rng: bool, tokenizer_files) -> dict:
    """This rank's part of the save; errors are reported, not raised (rank 0 decides)."""
    report = {"rank": global_rank(), "files": {}, "index": {}, "error": None}
    try:
        params = local_params(chunks, cfg.model.swiglu)
        # every DP rank takes part (a sharded optimizer gathers its state), dp_rank 0 writes
        states = saved_optimizer_states(params, opt) if opt is not None else None
        if ctx.dp_rank == 0:
            report["files"], report["index"] = write_shard_files(tmp, params, opt, ctx, states)
        if save_rng:
            name = fmt.rng_file(global_rank())
            state = dict(capture_rng_state(), layout=layout_dict(ctx, len(chunks)))
            size, sha = fmt.write_torch_file(os.path.join(tmp, name), state)
            report["files"][name] = {"size": size, "sha256": sha}
        if global_rank() == 0:
            report["files"].update(copy_tokenizer_files(tmp, tokenizer_files))
    except Exception:  # noqa: BLE001 - sent to rank 0, which fails the save on every rank
        report["error"] = traceback.format_exc()
    return report


def expected_files(layout: dict, has_optimizer: bool, has_rng: bool) -> list:
    tp, pp = layout["tensor_model_parallel_size"], layout["pipeline_model_parallel_size"]
    names = [fmt.model_file(t, p) for t in range(tp) for p in range(pp)]
    if has_optimizer:
        names += [fmt.optim_file(t, p) for t in range(tp) for p in range(pp)]
    if has_rng:
        names += [fmt.rng_file(r) for r in range(layout["world_size"])]
    return names


def build_metadata(iteration: int, config: dict, train_config: Optional[dict], layout: dict,
                   index: dict, files: dict, args=None, extra=None, has_optimizer=True,
                   has_rng=True) -> dict:
    if args is not None and not isinstance(args, dict) and hasattr(args, "__dict__"):
        args = vars(args)  # an argparse.Namespace
    missing = [n for n in expected_files(layout, has_optimizer, has_rng) if n not in files]
    if missing:
        raise fmt.CheckpointError(f"checkpoint is incomplete: no rank wrote {missing}")
    return {
        "format_version": fmt.FORMAT_VERSION, "iteration": int(iteration),
        "config": jsonable(config), "train_config": jsonable(train_config), "layout": layout,
        "args": jsonable(args or {}), "extra": jsonable(extra or {}), "tensors": index,
        "has_optimizer": bool(has_optimizer), "has_rng": bool(has_rng),
        "tokenizer_files": sorted(f for f in files if f.startswith(fmt.TOKENIZER_DIR + "/")),
        "files": files, "saved_at_unix": time.time(), "torch_version": torch.__version__,
    }


def _finish(save_dir: str, tmp: str, iteration: int, cfg, train_config, layout: dict, reports, args,
            extra, save_optimizer, save_rng) -> str:
    errors = [f"rank {r['rank']}:\n{r['error']}" for r in reports if r["error"]]
    if errors:
        raise fmt.CheckpointError("saving failed on " + "\n".join(errors))
    files, index = {}, {}
    for r in reports:
        files.update(r["files"])
        index.update(r["index"])
    meta = build_metadata(iteration, dataclasses.asdict(cfg),
                          dataclasses.asdict(train_config) if train_config is not None else None,
                          layout, index, files, args, extra, save_optimizer, save_rng)
    return fmt.commit(save_dir, tmp, iteration, meta)


def save_checkpoint(save_dir: str, chunks, ctx, cfg, iteration: int, optimizer=None,
                    train_config=None, args: Optional[dict] = None, extra: Optional[dict] = None,
                    tokenizer_files: Iterable[str] = (), save_rng: bool = True) -> str:
    """Save this rank's model ``chunks`` (EarlyExitGPTConfig ``cfg``, ParallelContext ``ctx``),
    the ``optimizer`` state (None: not saved) and the RNG states as the checkpoint of
    ``iteration``; collective over all ranks. ``train_config`` (a TrainConfig) and ``args`` (a
    dict) are recorded in the metadata. Returns the committed ``<save_dir>/iter_XXXXXXX`` path
    on every rank."""
    tmp = None
    if global_rank() == 0:
        tmp = os.path.join(save_dir, f"{fmt.iteration_name(iteration)}.tmp-{fmt.new_nonce()}")
        try:
            os.makedirs(tmp)
        except OSError as e:
            tmp = ("error", f"cannot create {tmp}: {e}")
    tmp = broadcast_object(tmp)
    if isinstance(tmp, tuple):
        raise fmt.CheckpointError(f"checkpoint at iteration {iteration} not saved: {tmp[1]}")
    report = _write_rank(tmp, chunks, ctx, cfg, optimizer, save_rng, tokenizer_files)
    reports = gather_objects(report)
    outcome = None
    if global_rank() == 0:
        try:
            outcome = ("ok", _finish(save_dir, tmp, iteration, cfg, train_config,
                                     layout_dict(ctx, len(chunks)), reports, args, extra,
                                     optimizer is not None, save_rng))
        except Exception as e:  # noqa: BLE001 - every rank must learn of the failure
            shutil.rmtree(tmp, ignore_errors=True)
            outcome = ("error", f"{type(e).__name__}: {e}")
    status, value = broadcast_object(outcome)
    if status != "ok":
        raise fmt.CheckpointError(f"checkpoint at iteration {iteration} not saved: {value}")
    if global_rank() == 0:  # committed: what interrupted saves left behind can go
        remove_stale_saves(save_dir)
    return value
