"""Import an EE-LLM (Megatron-LM legacy model) early-exit checkpoint at any TP/PP as ours.

    path = import_eellm("EE-LLM-1B-dj-refine-150B", "ckpt/eellm_1b", tp=1, pp=1)
    # or: python tools/checkpoint/convert.py --source-format eellm --load-dir DIR --save-dir OUT

EE-LLM saves ``<dir>/latest_checkpointed_iteration.txt`` (an iteration or ``release``) and
``<dir>/iter_XXXXXXX/mp_rank_TT[_PPP]/model_optim_rng.pt`` per tensor rank TT and, with
pipeline parallelism, stage PPP. Each file holds ``args`` (an argparse Namespace: the model
shape and the exit flags) and ``model['language_model']`` with

    embedding.word_embeddings.weight                    first stage, vocab rows split over TP
    encoder.layers.<j>.{input_norm, self_attention.query_key_value, self_attention.dense,
                        post_attention_norm, mlp.dense_h_to_4h, mlp.dense_4h_to_h}.*
    encoder.layers.<j>.exit_norm.*, exit_block.<layer keys>   at an exit layer (local j)
    encoder.final_norm.*, output_layer.weight           last stage
    exit_output_layer.<i>.weight                        the i-th exit of this stage (untied exits)

Local layer j of stage p is global layer p * num_layers / pp + j. Tensor shards follow the same
splits as megatron-core (QKV grouped per query group, SwiGLU's [gate; up] split per half), so
they are put back together with model/sharding.py's ``unshard``. EE-LLM's ``--use-exit-mlp``
is refused: its exit MLP is a second MLP of the exit layer (``mlp.trunk`` / ``mlp.branch``,
both reading the layer's post-attention norm), a different function from our residual exit MLP
on the layer output. Old spellings (``input_layernorm``, ``final_layernorm``) are accepted.
Files are read with ``torch.load(weights_only=True)`` allowing the pickled argparse.Namespace
(read as ``SavedArgs``) and megatron-core's enums; ``trust_pickle`` unpickles anything (only
for files you trust).
"""

from __future__ import annotations

import os
import re
import tempfile
import types
from typing import Dict, Optional, Tuple

import torch

from megatron.early_exit.checkpoint import format as fmt
from megatron.early_exit.checkpoint.converted import param_spec, save_converted
from megatron.early_exit.checkpoint.hf import carry_tokenizer
from megatron.early_exit.model.sharding import unshard

_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
_SUB = {"input_norm": "input_layernorm", "input_layernorm": "input_layernorm",
        "self_attention.query_key_value": "self_attention.linear_qkv",
        "self_attention.dense": "self_attention.linear_proj",
        "post_attention_norm": "pre_mlp_layernorm", "post_attention_layernorm": "pre_mlp_layernorm",
        "mlp.dense_h_to_4h": "mlp.linear_fc1", "mlp.dense_4h_to_h": "mlp.linear_fc2"}
_REFUSED_ARGS = (("use_exit_mlp", False, "EE-LLM's exit MLP (a second MLP of the exit layer) is "
                  "a different function from ours"),
                 ("apply_residual_connection_post_layernorm", False, "pre-norm residuals only"),
                 ("num_experts", None, "mixture-of-experts layers are not implemented"),
                 ("rotary_percent", 1.0, "RoPE covers whole heads here"),
                 ("openai_gelu", False, "GELU is torch's exact GELU here"),
                 ("squared_relu", False, "SwiGLU or GELU only"),
                 ("standalone_embedding_stage", False, "every stage holds layers here"))


def iteration_dir(load_dir: str, iteration: Optional[int] = None) -> str:
    """``load_dir`` itself if it holds mp_rank_* folders, else the iteration folder the tracker
    (or ``iteration``) names."""
    if any(_RANK_DIR.match(n) for n in os.listdir(load_dir)):
        return load_dir
    if iteration is None:
        tracker = os.path.join(load_dir, fmt.TRACKER)
        if not os.path.isfile(tracker):
            raise fmt.CheckpointError(f"{load_dir} has neither mp_rank_* folders nor {fmt.TRACKER}")
        text = open(tracker).read().strip()
        if text == "release":
            return os.path.join(load_dir, "release")
        iteration = int(text)
    path = os.path.join(load_dir, fmt.iteration_name(iteration))
    if not os.path.isdir(path):
        raise fmt.CheckpointError(f"EE-LLM iteration folder {path} does not exist")
    return path


def shard_paths(it_dir: str) -> Dict[Tuple[int, int], str]:
    """(tp rank, pp rank) -> model_optim_rng.pt of every shard in the iteration folder."""
    out = {}
    for name in sorted(os.listdir(it_dir)):
        m = _RANK_DIR.match(name)
        if m:
            path = os.path.join(it_dir, name, "model_optim_rng.pt")
            if not os.path.isfile(path):
                raise fmt.CheckpointError(f"{path} is missing")
            out[(int(m.group(1)), int(m.group(2) or 0))] = path
    if not out:
        raise fmt.CheckpointError(f"{it_dir} holds no mp_rank_* folders")
    tp = 1 + max(t for t, _ in out)
    pp = 1 + max(p for _, p in out)
    missing = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in out]
    if missing:
        raise fmt.CheckpointError(f"{it_dir} lacks the shards (tp, pp) {missing}")
    return out


class SavedArgs(types.SimpleNamespace):
    """What Megatron's pickled ``argparse.Namespace`` of run arguments unpickles to here."""


def load_shard(path: str, trust_pickle: bool = False) -> dict:
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    from megatron.core.enums import ModelType

    try:
        with torch.serialization.safe_globals([(SavedArgs, "argparse.Namespace"), ModelType]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - names the file and the way out
        raise fmt.CheckpointError(f"cannot read {path} with weights_only=True ({e}); if you trust "
                                  "the file, pass --trust-pickle") from e


def config_from_args(args) -> dict:
    """A plain EarlyExitGPTConfig dict for EE-LLM's saved ``args``."""
    a = vars(args)
    for key, ok, why in _REFUSED_ARGS:
        if a.get(key) not in (None, ok):
            raise fmt.CheckpointError(f"EE-LLM args.{key}={a[key]!r} is not supported: {why}")
    heads = a["num_attention_heads"]
    rope = (a.get("position_embedding_type") == "rope"
            or bool(a.get("use_rotary_position_embeddings")))
    model = {"num_layers": a["num_layers"], "hidden_size": a["hidden_size"],
             "num_attention_heads": heads,
             "num_query_groups": a.get("num_query_groups") if a.get("group_query_attention") else heads,
             "ffn_hidden_size": a.get("ffn_hidden_size") or 4 * a["hidden_size"],
             "vocab_size": a["padded_vocab_size"], "seq_length": a.get("seq_length") or 2048,
             "max_position_embeddings": a.get("max_position_embeddings") or a.get("seq_length"),
             "architecture": "llama" if rope else "gpt2",
             "normalization": a.get("normalization", "LayerNorm"), "swiglu": bool(a.get("swiglu")),
             "position_embedding_type": "rope" if rope else "learned_absolute",
             "add_bias_linear": bool(a.get("add_bias_linear", True)),
             "untie_embeddings_and_output_weights": bool(a.get("untie_embeddings_and_output_weights")),
             "rotary_base": float(a.get("rotary_base", 10000.0)),
             "norm_epsilon": float(a.get("norm_epsilon", a.get("layernorm_epsilon", 1e-5))),
             "init_method_std": float(a.get("init_method_std", 0.02))}
    nums = [int(k) for k in a.get("exit_layer_nums") or []]
    exits = {"exit_layer_nums": nums, "pre_exit": bool(a.get("pre_exit")),
             "use_exit_norm": bool(a.get("use_exit_norm")), "use_exit_mlp": False,
             "use_exit_block": bool(a.get("use_exit_block")),
             "untie_exit_output_weights": bool(a.get("untie_exit_output_weights"))}
    for key in ("exit_layer_weight", "exit_layer_temperature"):
        if a.get(key):
            exits[key] = [float(v) for v in a[key]]
    return {"model": model, "exits": exits, "parallel": {}, "params_dtype": "float32"}


def _canonical(key: str, layer0: int, stage_exits: list) -> Optional[str]:
    """Canonical name of ``language_model`` key ``key`` on a stage starting at layer0 (0-based)."""
    if key.startswith("embedding.word_embeddings.") or key.startswith("embedding.position_embeddings."):
        return key
    if key == "output_layer.weight":
        return key
    m = re.match(r"^exit_output_layer\.(\d+)\.weight$", key)
    if m:
        if int(m.group(1)) >= len(stage_exits):
            raise fmt.CheckpointError(f"EE-LLM tensor language_model.{key}: this stage has only "
                                      f"the exits {stage_exits} (args.exit_layer_nums)")
        return f"exits.{stage_exits[int(m.group(1))]}.output_layer.weight"
    m = re.match(r"^encoder\.(final_norm|final_layernorm)\.(weight|bias)$", key)
    if m:
        return f"decoder.final_layernorm.{m.group(2)}"
    m = re.match(r"^encoder\.layers\.(\d+)\.exit_norm\.(weight|bias)$", key)
    if m:
        return f"exits.{layer0 + int(m.group(1)) + 1}.norm.{m.group(2)}"
    m = re.match(r"^encoder\.layers\.(\d+)\.(exit_block\.)?(.*)\.(weight|bias)$", key)
    if not m or m.group(3) not in _SUB:
        raise fmt.CheckpointError(f"EE-LLM tensor language_model.{key} has no counterpart here")
    layer = layer0 + int(m.group(1))
    sub = f"{_SUB[m.group(3)]}.{m.group(4)}"
    return f"exits.{layer + 1}.block.{sub}" if m.group(2) else f"decoder.layers.{layer}.{sub}"


def _flatten(tree: dict, prefix: str = "") -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif torch.is_tensor(value):
            out[prefix + key] = value
    return out


def eellm_tensors(paths: Dict[Tuple[int, int], str], config: dict, trust_pickle: bool = False,
                  progress=None) -> Dict[str, torch.Tensor]:
    """Full canonical tensors from every shard (TP parts unsharded, stages merged)."""
    tp = 1 + max(t for t, _ in paths)
    pp = 1 + max(p for _, p in paths)
    m, nums = config["model"], config["exits"]["exit_layer_nums"]
    per_stage = m["num_layers"] // pp
    parts: Dict[str, Dict[int, torch.Tensor]] = {}
    for (t, p) in (progress(sorted(paths)) if progress else sorted(paths)):
        sd = load_shard(paths[(t, p)], trust_pickle)
        if "model" not in sd:
            raise fmt.CheckpointError(f"{paths[(t, p)]} has no 'model' (virtual pipeline "
                                      f"checkpoints are not supported): keys {sorted(sd)[:6]}")
        stage_exits = [k for k in nums if p * per_stage < k <= (p + 1) * per_stage]
        for key, value in _flatten(sd["model"]["language_model"]).items():
            parts.setdefault(_canonical(key, p * per_stage, stage_exits), {})[t] = value
    out = {}
    for name, by_rank in parts.items():
        spec = param_spec(name, m["swiglu"])
        if spec.dim is None:
            out[name] = by_rank[0]
            continue
        if sorted(by_rank) != list(range(tp)):
            raise fmt.CheckpointError(f"{name}: found tensor ranks {sorted(by_rank)} of {tp}")
        out[name] = unshard([by_rank[t] for t in range(tp)], spec)
    return out


def import_eellm(load_dir: str, save_dir: str, tp: int = 1, pp: int = 1,
                 dtype: Optional[str] = None, iteration: Optional[int] = None,
                 tokenizer_dir: Optional[str] = None, trust_pickle: bool = False,
                 progress=None) -> str:
    """Convert the EE-LLM checkpoint in ``load_dir`` into a checkpoint of ours in ``save_dir``
    (``tokenizer_dir``: HF tokenizer files to carry, EE-LLM does not save its tokenizer)."""
    if not os.path.isdir(load_dir):
        raise fmt.CheckpointError(f"--load-dir {load_dir} does not exist")
    it_dir = iteration_dir(load_dir, iteration)
    paths = shard_paths(it_dir)
    args = load_shard(paths[min(paths)], trust_pickle).get("args")
    if args is None:
        raise fmt.CheckpointError(f"{paths[min(paths)]} holds no 'args' (not a Megatron checkpoint)")
    config = config_from_args(args)
    tensors = eellm_tensors(paths, config, trust_pickle, progress)
    source = {"format": "eellm", "path": os.path.abspath(it_dir)}
    with tempfile.TemporaryDirectory() as tmp:
        tok = None
        if tokenizer_dir:
            tok = carry_tokenizer(tokenizer_dir, os.path.join(tmp, "tokenizer"))
            if tok is None:
                raise fmt.CheckpointError(f"--tokenizer-dir {tokenizer_dir} holds no "
                                          "tokenizer.json or tokenizer.model")
        return save_converted(save_dir, config, tensors, tok, tp, pp, dtype, source=source,
                              what=f"the EE-LLM checkpoint {it_dir}")
