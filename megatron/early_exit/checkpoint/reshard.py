"""Rewrite a checkpoint for another TP/PP layout on one process, without building a model.

Reads every full tensor (and, if wanted, the full AdamW state), decides from the canonical
names which pipeline stage of the target layout holds each one (model/placement.py), cuts the
TP shards with ``model/sharding.shard`` and writes the per-(tp, pp) files in the same format
as ``save_checkpoint``, committed atomically. RNG states are not carried (the layout changes).
Used by ``tools/checkpoint/reshard.py``.

The vocabulary-sized tensors (word embedding, output layers) have padded rows beyond the
tokenizer's ids (``--make-vocab-size-divisible-by`` x TP). When the target layout pads
differently (``target_vocab_size``), ``repad_vocab`` adds zero rows or drops padded ones; a real
row is never cut. The padded rows never enter a softmax, so the model's function is unchanged.

    path = reshard_checkpoint("ckpt/tp2pp2", "ckpt/tp1pp1", tp=1, pp=1)
"""

from __future__ import annotations

import copy
import os
import re
import shutil
from typing import Dict, Optional

import torch

from megatron.early_exit.checkpoint import format as fmt
from megatron.early_exit.checkpoint.load import config_from_dict, open_checkpoint
from megatron.early_exit.checkpoint.save import build_metadata, copy_tokenizer_files
from megatron.early_exit.model.placement import stage_placement
from megatron.early_exit.model.sharding import ShardSpec, shard

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXIT = re.compile(r"^exits\.(\d+)\.")
# tensors with one row per vocabulary id (row 0 of the full tensor is id 0)
_VOCAB_ROWS = re.compile(r"^(embedding\.word_embeddings|output_layer|exits\.\d+\.output_layer)\.weight$")


def target_config(config: dict, tp: int, pp: int) -> dict:
    """The saved config dict with the parallel layout replaced (validated)."""
    new = copy.deepcopy(config)
    par = new.setdefault("parallel", {})
    par.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, world_size=tp * pp,
               num_layers_per_virtual_pipeline_stage=None)
    if tp == 1:
        par["sequence_parallel"] = False
    config_from_dict(new)  # raises ConfigError naming the flag if the layout does not fit
    return new


def target_vocab_size(meta: dict, tp: int) -> int:
    """The padded vocabulary at TP=``tp``: the tokenizer's ids padded to a multiple of the saving
    run's ``--make-vocab-size-divisible-by`` x ``tp`` (as pretraining would pad them), or, when
    the checkpoint does not record the divisor, the saved size if ``tp`` divides it. A checkpoint
    without ``tokenizer_vocab_size`` keeps its size (all its rows may be tokens)."""
    model = meta["config"]["model"]
    vocab, tokens = model["vocab_size"], model.get("tokenizer_vocab_size")
    if tokens is None:
        return vocab
    divisor = (meta.get("args") or {}).get("make_vocab_size_divisible_by")
    if divisor is None and vocab % tp == 0:
        return vocab
    multiple = (divisor or 1) * tp
    return -(-tokens // multiple) * multiple


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[0] >= n:
        return t[:n].clone()
    return torch.cat([t, t.new_zeros((n - t.shape[0],) + tuple(t.shape[1:]))])


def repad_vocab(config: dict, index: dict, tensors: Dict[str, torch.Tensor], optim: Optional[dict],
                vocab_size: int) -> None:
    """Give every vocabulary-sized tensor (and its optimizer state) ``vocab_size`` rows, in
    place: zero rows are added, or padded rows dropped; ``config`` and ``index`` follow."""
    model = config["model"]
    tokens = model.get("tokenizer_vocab_size") or model["vocab_size"]
    if vocab_size < tokens:
        raise fmt.CheckpointError(f"a padded vocabulary of {vocab_size} rows would cut real token "
                                  f"rows: the tokenizer has {tokens} ids")
    if vocab_size == model["vocab_size"]:
        return
    for name in [n for n in tensors if _VOCAB_ROWS.match(n)]:
        tensors[name] = _rows(tensors[name], vocab_size)
        index[name] = dict(index[name], shape=list(tensors[name].shape))
        if optim is not None and name in optim:
            optim[name] = {k: _rows(v, vocab_size) if torch.is_tensor(v) and v.dim() else v
                           for k, v in optim[name].items()}
    model["vocab_size"] = vocab_size


def stage_of(name: str, cfg) -> int:
    """Pipeline rank that holds canonical parameter ``name`` under ``cfg``'s layout."""
    places = [stage_placement(cfg, r) for r in range(cfg.parallel.pipeline_model_parallel_size)]
    layer, exit_ = _LAYER.match(name), _EXIT.match(name)
    for pl in places:
        if ((name.startswith("embedding.") and pl.pre_process)
                or ((name.startswith("decoder.final_layernorm.") or name.startswith("output_layer."))
                    and pl.post_process)
                or (layer and int(layer.group(1)) + 1 in pl.layers)
                or (exit_ and int(exit_.group(1)) in pl.exit_layers)):
            return pl.pp_rank
    raise fmt.CheckpointError(f"cannot tell which pipeline stage holds parameter {name}")


def _spec(entry: dict) -> ShardSpec:
    return ShardSpec(entry["dim"], entry["chunks"])


def _shard_state(state: dict, spec: ShardSpec, t: int, tp: int) -> dict:
    return {k: shard(v, spec, t, tp).clone() if torch.is_tensor(v) and v.dim() else v
            for k, v in state.items()}


def _write_stage(tmp: str, t: int, p: int, tp: int, pp: int, names, index, tensors,
                 optim: Optional[dict], groups) -> Dict[str, dict]:
    header = {"tp_rank": t, "tp_size": tp, "pp_rank": p, "pp_size": pp}
    specs = {n: {"dim": index[n]["dim"], "chunks": index[n]["chunks"]} for n in names}
    payload = dict(header, specs=specs,
                   tensors={n: shard(tensors[n], _spec(index[n]), t, tp).clone() for n in names})
    files = {}
    size, sha = fmt.write_torch_file(os.path.join(tmp, fmt.model_file(t, p)), payload)
    files[fmt.model_file(t, p)] = {"size": size, "sha256": sha}
    if optim is not None:
        state = {n: _shard_state(optim[n], _spec(index[n]), t, tp) for n in names if n in optim}
        payload = dict(header, specs=specs, state=state, param_groups=groups)
        size, sha = fmt.write_torch_file(os.path.join(tmp, fmt.optim_file(t, p)), payload)
        files[fmt.optim_file(t, p)] = {"size": size, "sha256": sha}
    return files


def reshard_checkpoint(load_dir: str, save_dir: str, tp: int, pp: int,
                       iteration: Optional[int] = None, with_optimizer: bool = True,
                       vocab_size: Optional[int] = None) -> str:
    """Write the checkpoint in ``load_dir`` to ``save_dir`` at TP=``tp``, PP=``pp``; returns
    the committed iteration directory. ``with_optimizer`` needs optimizer state in the source.
    ``vocab_size``: the padded vocabulary to write (default ``target_vocab_size``)."""
    src_dir, meta, reader = open_checkpoint(load_dir, iteration)
    with_optimizer = with_optimizer and meta["has_optimizer"]
    index = {n: dict(e) for n, e in meta["tensors"].items()}
    tensors = {n: reader.tensor(n) for n in index}
    optim, groups = None, None
    if with_optimizer:
        optim = {n: reader.state(n) for n in index if reader.has_state(n)}
        groups = reader.open(fmt.optim_file(0, 0))["param_groups"]
    config = copy.deepcopy(meta["config"])
    repad_vocab(config, index, tensors, optim, vocab_size or target_vocab_size(meta, tp))
    config = target_config(config, tp, pp)
    cfg = config_from_dict(config)
    for name, entry in index.items():
        entry["pp_rank"] = stage_of(name, cfg)
    tok = [os.path.join(src_dir, rel) for rel in meta["tokenizer_files"]]
    return write_whole_checkpoint(save_dir, dict(meta, config=config, tensors=index), tensors,
                                  tok, optim, groups)


def write_whole_checkpoint(save_dir: str, meta: dict, tensors: Dict[str, torch.Tensor],
                           tokenizer_paths, optim: Optional[dict] = None, groups=None) -> str:
    """Commit a checkpoint from full tensors: ``meta`` holds iteration, config (its parallel
    section is the target layout), tensors (the index, with each name's target pp_rank),
    train_config, args and extra. No RNG states; optimizer state only if ``optim``."""
    par = meta["config"]["parallel"]
    tp, pp = par["tensor_model_parallel_size"], par["pipeline_model_parallel_size"]
    index = meta["tensors"]
    os.makedirs(save_dir, exist_ok=True)
    tmp = os.path.join(save_dir, f"{fmt.iteration_name(meta['iteration'])}.tmp-{fmt.new_nonce()}")
    os.makedirs(tmp)
    try:
        files = {}
        for p in range(pp):
            names = sorted(n for n, e in index.items() if e["pp_rank"] == p)
            for t in range(tp):
                files.update(_write_stage(tmp, t, p, tp, pp, names, index, tensors, optim, groups))
        files.update(copy_tokenizer_files(tmp, tokenizer_paths))
        layout = {"world_size": tp * pp, "tensor_model_parallel_size": tp,
                  "pipeline_model_parallel_size": pp, "data_parallel_size": 1,
                  "virtual_pipeline_chunks": 1}
        args = dict(meta["args"] or {})
        for key, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)):
            if key in args:
                args[key] = value
        new_meta = build_metadata(meta["iteration"], meta["config"], meta["train_config"], layout,
                                  index, files, args, meta["extra"], optim is not None, False)
        return fmt.commit(save_dir, tmp, meta["iteration"], new_meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
