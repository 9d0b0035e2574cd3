"""Add exit heads to a checkpoint of ours (any TP/PP layout), one process, no model built.

    add_exits("ckpt/base", "ckpt/base_3exits", [8, 15, 22], use_exit_norm=True)
    # or: python tools/checkpoint/add_exits.py --load-dir ... --save-dir ... --exit-layer-nums 8 15 22

New exits start as copies of the final head, so before any tuning exit k computes exactly
``output_layer(final_norm(h_k))`` (h_k: layer k's output, or its input with ``--pre-exit``):

- ``norm`` (``--use-exit-norm``): a copy of the final norm;
- output projection: tied to the word embedding when the backbone's head is tied, else its
  own copy of ``output_layer.weight`` (``untie_exit_output_weights``);
- ``mlp`` (``--use-exit-mlp``, a residual branch h + mlp(h)): fc1 drawn like a fresh layer's,
  fc2 zero, so the branch adds nothing until tuned;
- ``block`` (``--use-exit-block``): a copy of the last backbone layer.

With ``random_init`` every new tensor is drawn as our initialisation draws it (model/init.py:
norms 1, fc2 / proj scaled), seeded by ``seed`` and the tensor's name. Exits already in the
checkpoint are kept; their head structure must match the requested one (one structure for all
exits), and an exit at a layer that already has one is refused. The result keeps the source's
layout and iteration (model weights only, no optimizer or RNG state).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

import torch

from megatron.early_exit.checkpoint import format as fmt
from megatron.early_exit.checkpoint.converted import expected_shapes, save_converted
from megatron.early_exit.checkpoint.load import config_from_dict, open_checkpoint
from megatron.early_exit.model.init import full_init_tensor

STRUCTURE = ("pre_exit", "use_exit_norm", "use_exit_mlp", "use_exit_block",
             "untie_exit_output_weights")
FLAGS = {"pre_exit": "--pre-exit", "use_exit_norm": "--use-exit-norm",
         "use_exit_mlp": "--use-exit-mlp", "use_exit_block": "--use-exit-block",
         "untie_exit_output_weights": "--untie-exit-output-weights"}
PER_EXIT = ("exit_layer_weight", "exit_layer_weight_init", "exit_layer_temperature")


def merged_exit_config(exits: dict, new_layers: List[int], structure: dict, num_layers: int) -> dict:
    """The exits section with ``new_layers`` added (per-exit lists kept for the old exits)."""
    old = list(exits.get("exit_layer_nums") or [])
    for layer in new_layers:
        if layer in old:
            raise fmt.CheckpointError(f"--exit-layer-nums: the checkpoint already has an exit at "
                                      f"layer {layer}")
        if not 1 <= layer <= num_layers:
            raise fmt.CheckpointError(f"--exit-layer-nums: layer {layer} is outside "
                                      f"[1, {num_layers}]")
    if len(set(new_layers)) != len(new_layers):
        raise fmt.CheckpointError(f"--exit-layer-nums repeats a layer: {new_layers}")
    if old:
        for key in STRUCTURE:
            if bool(exits.get(key)) != bool(structure[key]):
                raise fmt.CheckpointError(
                    f"{FLAGS[key]}: the checkpoint's exits have {key}={exits.get(key)}, the new "
                    f"ones would have {structure[key]}; all exits share one head structure")
    out = copy.deepcopy(exits)
    out.update(structure)
    layers = sorted(old + list(new_layers))
    for key in ("exit_layer_weight", "exit_layer_temperature"):
        values = dict(zip(old, exits.get(key) or []))
        out[key] = [values.get(k, 1.0) for k in layers]
    init = dict(zip(old, exits.get("exit_layer_weight_init") or []))
    out["exit_layer_weight_init"] = [init.get(k, w) for k, w in zip(layers, out["exit_layer_weight"])]
    out["exit_layer_nums"] = layers
    return out


def _copied(name: str, sub: str, tensors: dict, cfg, shape, seed: int) -> torch.Tensor:
    """The initial value of new exit tensor ``name`` (``sub``: its name inside the head)."""
    m = cfg.model
    if sub.startswith("norm."):
        return tensors[f"decoder.final_layernorm.{sub[5:]}"].clone()
    if sub == "output_layer.weight":
        src = "output_layer.weight" if m.untie_embeddings_and_output_weights else \
            "embedding.word_embeddings.weight"
        return tensors[src].clone()
    if sub.startswith("block."):
        return tensors[f"decoder.layers.{m.num_layers - 1}.{sub[6:]}"].clone()
    if sub.startswith("mlp.linear_fc2."):
        return torch.zeros(shape)
    return full_init_tensor(name, shape, m.init_method_std, m.num_layers, seed)


def add_exits(load_dir: str, save_dir: str, exit_layer_nums: List[int], use_exit_norm: bool = False,
              use_exit_mlp: bool = False, use_exit_block: bool = False, pre_exit: bool = False,
              untie_exit_output_weights: Optional[bool] = None, random_init: bool = False,
              seed: int = 1234, iteration: Optional[int] = None) -> str:
    """Write ``load_dir``'s checkpoint plus new exits at ``exit_layer_nums`` to ``save_dir``."""
    src_dir, meta, reader = open_checkpoint(load_dir, iteration)
    config = copy.deepcopy(meta["config"])
    m = config["model"]
    if untie_exit_output_weights is None:
        untie_exit_output_weights = bool(m["untie_embeddings_and_output_weights"])
    structure = {"pre_exit": pre_exit, "use_exit_norm": use_exit_norm, "use_exit_mlp": use_exit_mlp,
                 "use_exit_block": use_exit_block,
                 "untie_exit_output_weights": untie_exit_output_weights}
    config["exits"] = merged_exit_config(config.get("exits", {}), list(exit_layer_nums), structure,
                                         m["num_layers"])
    cfg = config_from_dict(config)
    tensors = {name: reader.tensor(name) for name in reader.index}
    dtype = next(iter(tensors.values())).dtype
    for name, shape in expected_shapes(cfg).items():
        if name in tensors:
            continue
        layer, sub = name.split(".", 2)[1:]
        if int(layer) not in exit_layer_nums:
            raise fmt.CheckpointError(f"{load_dir} lacks {name} (not a new exit's tensor)")
        init = (full_init_tensor(name, shape, m["init_method_std"], m["num_layers"], seed)
                if random_init else _copied(name, sub, tensors, cfg, shape, seed))
        tensors[name] = init.to(dtype)
    par = meta["layout"]
    tok = [os.path.join(src_dir, rel) for rel in meta["tokenizer_files"]]
    return _save(save_dir, config, tensors, tok, par, meta, list(exit_layer_nums))


def _copy_tokenizer(tok: List[str], tmp: str) -> Optional[str]:
    """The tokenizer files ``tok`` copied into ``tmp/tokenizer`` (None when there are none)."""
    if not tok:
        return None
    tok_dir = os.path.join(tmp, "tokenizer")
    os.makedirs(tok_dir)
    for path in tok:
        shutil.copyfile(path, os.path.join(tok_dir, os.path.basename(path)))
    return tok_dir


def _save(save_dir, config, tensors, tok, layout, meta, added) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = _copy_tokenizer(tok, tmp)
        source = dict(meta["extra"].get("converted_from") or {}, added_exits=added)
        return save_converted(save_dir, config, tensors, tok_dir,
                              layout["tensor_model_parallel_size"],
                              layout["pipeline_model_parallel_size"], source=source,
                              iteration=meta["iteration"], args=_args(meta["args"], config),
                              what=f"the checkpoint with new exits {added}")


def _args(args: dict, config: dict) -> dict:
    """Saved run arguments with the exit flags of the new exit config (for --use-checkpoint-args)."""
    out = dict(args or {})
    for key in ("exit_layer_nums",) + STRUCTURE + PER_EXIT:
        if key in out:
            out[key] = config["exits"][key]
    return out


def add_classifiers(load_dir: str, save_dir: str, fits: Dict[int, Tuple[torch.Tensor, float]],
                    iteration: Optional[int] = None, report: Optional[dict] = None) -> str:
    """Write ``load_dir``'s checkpoint to ``save_dir`` with a confidence classifier on every exit
    (``fits``: exit layer -> (w [h], b), e.g. from inference/classifier_fit.py); classifiers the
    source already has are replaced. Sets ``exits.use_exit_classifier``."""
    src_dir, meta, reader = open_checkpoint(load_dir, iteration)
    config = copy.deepcopy(meta["config"])
    exits = config.get("exits") or {}
    layers = list(exits.get("exit_layer_nums") or [])
    if sorted(fits) != sorted(layers):
        raise fmt.CheckpointError(f"--load: the checkpoint's exits are {layers}, classifiers were "
                                  f"fitted for {sorted(fits)}")
    h = config["model"]["hidden_size"]
    tensors = {name: reader.tensor(name) for name in reader.index if ".classifier." not in name}
    dtype = tensors["decoder.final_layernorm.weight"].dtype
    for k, (w, b) in fits.items():
        if tuple(w.shape) != (h,):
            raise fmt.CheckpointError(f"classifier of exit {k}: weight shape {tuple(w.shape)}, "
                                      f"expected ({h},)")
        tensors[f"exits.{k}.classifier.weight"] = w.reshape(1, h).to(dtype)
        tensors[f"exits.{k}.classifier.bias"] = torch.tensor([float(b)]).to(dtype)
    exits["use_exit_classifier"] = True
    config["exits"] = exits
    tok = [os.path.join(src_dir, rel) for rel in meta["tokenizer_files"]]
    meta = copy.deepcopy(meta)
    meta["extra"] = dict(meta.get("extra") or {})
    meta["extra"]["converted_from"] = dict(meta["extra"].get("converted_from") or {},
                                           exit_classifiers=report or {})
    args = dict(meta.get("args") or {}, use_exit_classifier=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = _copy_tokenizer(tok, tmp)
        layout = meta["layout"]
        return save_converted(save_dir, config, tensors, tok_dir,
                              layout["tensor_model_parallel_size"],
                              layout["pipeline_model_parallel_size"],
                              source=meta["extra"]["converted_from"], iteration=meta["iteration"],
                              args=args, what="the checkpoint with exit classifiers")
