"""Export a checkpoint of ours as a Hugging Face model directory (Llama or Qwen2).

    export_hf("ckpt/run1", "hf/run1", dtype="bfloat16")
    # or: python tools/checkpoint/convert.py --source-format ee --target-format hf ...

Writes ``config.json``, ``model.safetensors`` (or shards of at most ``max_shard_bytes`` plus
``model.safetensors.index.json``) and the checkpoint's tokenizer files. transformers loads the
directory as a plain ``LlamaForCausalLM`` (``Qwen2ForCausalLM`` when the model has a QKV bias)
and computes the backbone exactly; it reports the exit tensors as unexpected keys and ignores
them. The exits are kept as extra tensors under ``early_exits.<k>.`` (see hf_keys.py) and
their configuration in the ``early_exit`` section of config.json (our ExitConfig fields:
exit_layer_nums, pre_exit, use_exit_norm / mlp / block, untie_exit_output_weights, loss
temperatures and weights; plus the tokenizer's vocabulary when the output layers are padded),
which our HF import reads back:
ours -> HF -> ours gives the same tensors bit for bit. Models that are not Llama-shaped
(LayerNorm, GELU, learned positions, linear biases) are refused, naming the field.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from megatron.early_exit.checkpoint import format as fmt
from megatron.early_exit.checkpoint.converted import DTYPES
from megatron.early_exit.checkpoint.hf import EXIT_SECTION, TOKENIZER_FILES
from megatron.early_exit.checkpoint.hf_keys import to_hf
from megatron.early_exit.checkpoint.load import load_full_state, read_checkpoint_metadata

_REQUIRED = (("normalization", "RMSNorm"), ("swiglu", True), ("position_embedding_type", "rope"),
             ("add_bias_linear", False))


def hf_config(config: dict, dtype: str) -> dict:
    """transformers config.json contents for our config dict (refusing non-Llama models)."""
    m, ex = config["model"], config.get("exits", {})
    for key, want in _REQUIRED:
        if m.get(key) != want:
            raise fmt.CheckpointError(f"cannot export to a HF Llama: model.{key} is "
                                      f"{m.get(key)!r}, a Llama needs {want!r}")
    qwen = bool(m.get("add_qkv_bias"))
    out = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "vocab_size": m["vocab_size"], "hidden_size": m["hidden_size"],
        "intermediate_size": m["ffn_hidden_size"], "num_hidden_layers": m["num_layers"],
        "num_attention_heads": m["num_attention_heads"],
        "num_key_value_heads": m["num_query_groups"],
        "head_dim": m["hidden_size"] // m["num_attention_heads"], "hidden_act": "silu",
        "max_position_embeddings": m["max_position_embeddings"],
        "rms_norm_eps": m["norm_epsilon"], "rope_theta": m["rotary_base"],
        "rope_parameters": {"rope_type": "default", "rope_theta": m["rotary_base"]},
        "tie_word_embeddings": not m["untie_embeddings_and_output_weights"],
        "initializer_range": m["init_method_std"], "attention_dropout": 0.0,
        "torch_dtype": dtype, "dtype": dtype,
    }
    if qwen:
        out["use_sliding_window"] = False
    else:
        out.update(attention_bias=False, mlp_bias=False)
    section = dict(ex)
    if m.get("tokenizer_vocab_size") is not None:
        section["tokenizer_vocab_size"] = m["tokenizer_vocab_size"]
    if section.get("exit_layer_nums") or "tokenizer_vocab_size" in section:
        out[EXIT_SECTION] = section
    return out


def _shards(tensors: dict, max_bytes: int) -> list:
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    return shards + [current] if current else shards


def write_safetensors(save_dir: str, tensors: dict, max_shard_bytes: int) -> list:
    """Write ``tensors`` as one model.safetensors or as shards with their index; file names."""
    from safetensors.torch import save_file

    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(save_dir, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(save_dir, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        names.append(name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(save_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return names + ["model.safetensors.index.json"]


def export_hf(load_dir: str, save_dir: str, dtype: Optional[str] = None,
              iteration: Optional[int] = None, max_shard_bytes: int = 5 << 30) -> str:
    """Write the checkpoint in ``load_dir`` as a HF model directory ``save_dir``; returns it."""
    meta = read_checkpoint_metadata(load_dir, iteration)
    config, tensors = load_full_state(load_dir, iteration)
    dtype = dtype or config.get("params_dtype", "float32")
    if dtype not in DTYPES:
        raise fmt.CheckpointError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out_config = hf_config(config, dtype)
    m = config["model"]
    hf = to_hf({n: t.to(DTYPES[dtype]).contiguous() for n, t in tensors.items()},
               m["num_attention_heads"], m["num_query_groups"])
    os.makedirs(save_dir, exist_ok=True)
    write_safetensors(save_dir, hf, max_shard_bytes)
    with open(os.path.join(save_dir, "config.json"), "w") as f:
        json.dump(out_config, f, indent=1, sort_keys=True)
    it_dir = fmt.locate_iteration_dir(load_dir, meta["iteration"])
    for rel in meta["tokenizer_files"]:
        if os.path.basename(rel) in TOKENIZER_FILES:
            shutil.copyfile(os.path.join(it_dir, rel), os.path.join(save_dir, os.path.basename(rel)))
    return save_dir
