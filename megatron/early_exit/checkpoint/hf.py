"""Import a Hugging Face Llama / Mistral / Qwen2 checkpoint directory as a checkpoint of ours.

    path = import_hf("SmolLM2-135M/", "ckpt/smollm2", tp=1, pp=1, dtype="float32")
    # or: python tools/checkpoint/convert.py --source-format hf --load-dir DIR --save-dir OUT

Reads ``config.json`` and the weights (``model.safetensors``, sharded safetensors listed in
``model.safetensors.index.json``, or ``pytorch_model*.bin``), maps the config onto ours
(``model_config_from_hf``: GQA, tied or untied embeddings, ``rope_theta``, RMSNorm epsilon,
Qwen2's QKV bias) and refuses, naming the config key, what our model does not compute (rope
scaling, an active sliding window, mixture of experts, attention or MLP biases other than
Qwen2's, non-SiLU activations, a head_dim that is not hidden_size / heads). Exit heads that
our HF export wrote (``early_exits.*`` tensors and the ``early_exit`` section of config.json,
see hf_keys.py and export_hf.py) come back too, so ours -> HF -> ours is lossless. The
tokenizer files (``tokenizer.json``, ``tokenizer_config.json`` with its chat template, ...) are
carried into the checkpoint with our tokenizer descriptor, so ``--load`` alone serves it.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import tempfile
from typing import Dict, Optional, Tuple

import torch

from megatron.early_exit.checkpoint import format as fmt
from megatron.early_exit.checkpoint.converted import save_converted
from megatron.early_exit.checkpoint.hf_keys import KeyMapError, from_hf

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
EXIT_SECTION = "early_exit"  # config.json section written by our export
# files of a HF tokenizer carried into our checkpoint when present
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok",
            "moe_intermediate_size")


class UnsupportedConfig(fmt.CheckpointError):
    """A HF config asks for something our model does not compute; names the config key."""


def _refuse(key: str, value, why: str) -> None:
    raise UnsupportedConfig(f"config.json: {key}={value!r} is not supported: {why}")


def _rope(hf: dict) -> float:
    """rope_theta, refusing any rope scaling (transformers 4 and 5 spellings)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    if scaling:
        _refuse("rope_scaling", scaling, "only plain RoPE is implemented")
    kind = params.get("rope_type", "default")
    if kind != "default":
        _refuse("rope_parameters.rope_type", kind, "only plain RoPE ('default') is implemented")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse("partial_rotary_factor", hf["partial_rotary_factor"], "RoPE covers whole heads here")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _check_supported(hf: dict) -> None:
    kind = hf.get("model_type")
    if kind not in SUPPORTED_MODEL_TYPES:
        _refuse("model_type", kind, f"supported: {SUPPORTED_MODEL_TYPES}")
    for key in MOE_KEYS:
        if hf.get(key):
            _refuse(key, hf[key], "mixture-of-experts layers are not implemented")
    if hf.get("hidden_act", "silu") != "silu":
        _refuse("hidden_act", hf["hidden_act"], "SwiGLU with SiLU is the only Llama MLP here")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            _refuse(key, hf[key], "only Qwen2's QKV bias is implemented")
    window = hf.get("sliding_window")
    active = hf.get("use_sliding_window", kind == "mistral")
    if window and active and window < hf.get("max_position_embeddings", 0):
        _refuse("sliding_window", window, "attention here is full causal (no window)")
    kinds = set(hf.get("layer_types") or ["full_attention"])
    if kinds != {"full_attention"}:
        _refuse("layer_types", sorted(kinds), "every layer attends fully here")
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        _refuse("head_dim", hf["head_dim"], "head_dim must be hidden_size / num_attention_heads")


def model_config_from_hf(hf: dict, seq_length: Optional[int] = None) -> dict:
    """A plain EarlyExitGPTConfig dict (model and exits) for HF ``config.json`` contents."""
    _check_supported(hf)
    max_pos = int(hf.get("max_position_embeddings", 2048))
    model = {
        "num_layers": hf["num_hidden_layers"], "hidden_size": hf["hidden_size"],
        "num_attention_heads": hf["num_attention_heads"],
        "num_query_groups": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        "ffn_hidden_size": hf["intermediate_size"], "vocab_size": hf["vocab_size"],
        "seq_length": min(seq_length or max_pos, max_pos), "max_position_embeddings": max_pos,
        "architecture": "llama", "normalization": "RMSNorm", "swiglu": True,
        "position_embedding_type": "rope", "add_bias_linear": False,
        "add_qkv_bias": hf["model_type"] == "qwen2",
        "untie_embeddings_and_output_weights": not hf.get("tie_word_embeddings", False),
        "rotary_base": _rope(hf), "norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "init_method_std": float(hf.get("initializer_range", 0.02)),
    }
    from megatron.early_exit.config import ExitConfig

    fields = {f.name for f in dataclasses.fields(ExitConfig)}
    exits = {k: v for k, v in (hf.get(EXIT_SECTION) or {}).items() if k in fields}
    if hf.get(EXIT_SECTION, {}).get("tokenizer_vocab_size") is not None:
        model["tokenizer_vocab_size"] = hf[EXIT_SECTION]["tokenizer_vocab_size"]
    return {"model": model, "exits": exits, "parallel": {}, "params_dtype": "float32"}


# ------------------------------------------------------------------------------ weights
def _weight_files(load_dir: str) -> Tuple[str, list]:
    index = os.path.join(load_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return "safetensors", [os.path.join(load_dir, n) for n in names]
    single = os.path.join(load_dir, "model.safetensors")
    if os.path.isfile(single):
        return "safetensors", [single]
    bins = sorted(glob.glob(os.path.join(load_dir, "pytorch_model*.bin")))
    if bins:
        return "bin", bins
    raise fmt.CheckpointError(f"{load_dir} holds no model.safetensors, model.safetensors.index.json "
                              "or pytorch_model*.bin")


def read_hf_tensors(load_dir: str, progress=None) -> Dict[str, torch.Tensor]:
    """Every tensor of a HF checkpoint directory, by HF name (``progress``: a tqdm-like
    wrapper over the weight files)."""
    kind, files = _weight_files(load_dir)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise fmt.CheckpointError(f"model.safetensors.index.json names missing files {missing}")
    out = {}
    for path in (progress(files) if progress else files):
        if kind == "safetensors":
            from safetensors.torch import load_file

            out.update(load_file(path))
        else:
            out.update(torch.load(path, map_location="cpu", weights_only=True))
    return out


def hf_to_canonical(hf_tensors: Dict[str, torch.Tensor], config: dict) -> Dict[str, torch.Tensor]:
    """HF tensors -> canonical ones for ``config`` (a tied model's redundant lm_head dropped)."""
    m = config["model"]
    tensors = dict(hf_tensors)
    if not m["untie_embeddings_and_output_weights"]:
        tensors.pop("lm_head.weight", None)
    try:
        return from_hf(tensors, m["num_attention_heads"], m["num_query_groups"])
    except KeyMapError as e:
        raise fmt.CheckpointError(str(e)) from None


# ------------------------------------------------------------------------------ tokenizer
def carry_tokenizer(src_dir: str, out_dir: str) -> Optional[str]:
    """Copy the HF tokenizer files of ``src_dir`` into ``out_dir`` and write our descriptor;
    returns ``out_dir``, or None when ``src_dir`` has no tokenizer."""
    from megatron.early_exit.data.tokenizers import (HuggingFaceTokenizer, SentencePieceTokenizer,
                                                     save_tokenizer_files)

    present = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, n))]
    if "tokenizer.json" in present:
        tok = HuggingFaceTokenizer(os.path.join(src_dir, "tokenizer.json"))
    elif "tokenizer.model" in present:
        tok = SentencePieceTokenizer(os.path.join(src_dir, "tokenizer.model"))
    else:
        return None
    os.makedirs(out_dir, exist_ok=True)
    for name in present:
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, name))
    _inline_chat_template(out_dir)
    save_tokenizer_files(tok, out_dir)
    return out_dir


def _inline_chat_template(directory: str) -> None:
    """transformers 5 saves the chat template as chat_template.jinja; our chat templates (and
    older transformers) read it from tokenizer_config.json, so put it there too."""
    jinja = os.path.join(directory, "chat_template.jinja")
    config_path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(jinja):
        return
    config = {}
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    if not config.get("chat_template"):
        with open(jinja, encoding="utf-8") as f:
            config["chat_template"] = f.read()
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)


def read_hf_config(load_dir: str) -> dict:
    path = os.path.join(load_dir, "config.json")
    if not os.path.isfile(path):
        raise fmt.CheckpointError(f"{load_dir} has no config.json (not a Hugging Face model dir)")
    with open(path) as f:
        return json.load(f)


def import_hf(load_dir: str, save_dir: str, tp: int = 1, pp: int = 1, dtype: Optional[str] = None,
              seq_length: Optional[int] = None, progress=None) -> str:
    """Convert the HF model in ``load_dir`` into a checkpoint of ours in ``save_dir``."""
    hf_config = read_hf_config(load_dir)
    config = model_config_from_hf(hf_config, seq_length)
    tensors = hf_to_canonical(read_hf_tensors(load_dir, progress), config)
    with tempfile.TemporaryDirectory() as tmp:
        tok = carry_tokenizer(load_dir, os.path.join(tmp, "tokenizer"))
        return save_converted(save_dir, config, tensors, tok, tp, pp, dtype,
                              source={"format": "hf", "path": os.path.abspath(load_dir),
                                      "model_type": hf_config.get("model_type")},
                              what=f"the HF checkpoint {load_dir}")
