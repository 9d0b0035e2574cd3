"""Write a checkpoint of ours from full tensors produced by a converter (HF, GGUF, EE-LLM, ...).

    path = save_converted(save_dir, config, tensors, tokenizer_dir=tok, tp=2, pp=2,
                          source={"format": "hf", "path": load_dir})

``config`` is a plain EarlyExitGPTConfig dict (its parallel section is replaced by the target
layout and the whole config validated, so a bad layout is refused naming its flag); ``tensors``
maps canonical names (model/sharding.py) to full tensors. Each tensor's tensor-parallel split
is decided from its name (``param_spec``: the same rule megatron-core's layers follow, checked
against a built model by the tests), its pipeline stage by checkpoint/reshard.py's ``stage_of``,
and the result is committed atomically with model weights only (no optimizer, no RNG state),
at iteration 0 unless told otherwise, so training or exit tuning started with ``--load``
begins from it.
``pad_vocab`` pads the vocabulary rows to a multiple of TP and records the real vocabulary in
``tokenizer_vocab_size``.
"""

from __future__ import annotations

import copy
import re
from typing import Dict, Optional

import torch

from megatron.early_exit.checkpoint import format as fmt
from megatron.early_exit.checkpoint.load import config_from_dict
from megatron.early_exit.checkpoint.reshard import stage_of, target_config, write_whole_checkpoint
from megatron.early_exit.model.sharding import ShardSpec

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
_COLUMN = re.compile(r"(^embedding\.word_embeddings\.weight|output_layer\.weight"
                     r"|linear_qkv\.(weight|bias)|linear_fc1\.(weight|bias))$")
_ROW = re.compile(r"(linear_proj|linear_fc2)\.weight$")
VOCAB_ROWS = re.compile(r"^(embedding\.word_embeddings\.weight|output_layer\.weight"
                        r"|exits\.\d+\.output_layer\.weight)$")


def param_spec(name: str, swiglu: bool) -> ShardSpec:
    """How canonical parameter ``name``'s full tensor is split over tensor-parallel ranks:
    column-parallel (embedding, output layers, QKV, fc1: rows), row-parallel (proj, fc2:
    columns), everything else (norms, row-parallel biases) replicated."""
    if _COLUMN.search(name):
        fc1 = name.endswith("linear_fc1.weight") or name.endswith("linear_fc1.bias")
        return ShardSpec(0, 2 if swiglu and fc1 else 1)
    if _ROW.search(name):
        return ShardSpec(1)
    return ShardSpec(None)


def pad_vocab(config: dict, tensors: Dict[str, torch.Tensor], multiple: int) -> None:
    """Pad every vocabulary-sized tensor with zero rows to a multiple of ``multiple`` (in place);
    records the unpadded size as model.tokenizer_vocab_size when it pads."""
    model = config["model"]
    vocab = model["vocab_size"]
    padded = -(-vocab // multiple) * multiple
    if padded == vocab:
        return
    for name in [n for n in tensors if VOCAB_ROWS.match(n)]:
        t = tensors[name]
        tensors[name] = torch.cat([t, t.new_zeros(padded - vocab, *t.shape[1:])])
    model["vocab_size"] = padded
    if model.get("tokenizer_vocab_size") is None:
        model["tokenizer_vocab_size"] = vocab


def _layer_shapes(prefix: str, m) -> Dict[str, tuple]:
    h, hn = m.hidden_size, m.head_dim
    qkv = (m.num_attention_heads + 2 * m.num_query_groups) * hn
    fc1 = m.ffn_hidden_size * (2 if m.swiglu else 1)
    out = {"input_layernorm.weight": (h,), "pre_mlp_layernorm.weight": (h,),
           "self_attention.linear_qkv.weight": (qkv, h),
           "self_attention.linear_proj.weight": (h, m.num_attention_heads * hn),
           "mlp.linear_fc1.weight": (fc1, h), "mlp.linear_fc2.weight": (h, m.ffn_hidden_size)}
    if m.normalization == "LayerNorm":
        out.update({"input_layernorm.bias": (h,), "pre_mlp_layernorm.bias": (h,)})
    if m.add_bias_linear or m.add_qkv_bias:
        out["self_attention.linear_qkv.bias"] = (qkv,)
    if m.add_bias_linear:
        out.update({"self_attention.linear_proj.bias": (h,), "mlp.linear_fc1.bias": (fc1,),
                    "mlp.linear_fc2.bias": (h,)})
    return {prefix + k: v for k, v in out.items()}


def _exit_shapes(prefix: str, m, ex) -> Dict[str, tuple]:
    h, fc1 = m.hidden_size, m.ffn_hidden_size * (2 if m.swiglu else 1)
    out = _layer_shapes(prefix + "block.", m) if ex.use_exit_block else {}
    if ex.use_exit_mlp:
        out.update({prefix + "mlp.linear_fc1.weight": (fc1, h),
                    prefix + "mlp.linear_fc2.weight": (h, m.ffn_hidden_size)})
        if m.add_bias_linear:
            out.update({prefix + "mlp.linear_fc1.bias": (fc1,), prefix + "mlp.linear_fc2.bias": (h,)})
    if ex.use_exit_norm:
        out[prefix + "norm.weight"] = (h,)
        if m.normalization == "LayerNorm":
            out[prefix + "norm.bias"] = (h,)
    if ex.untie_exit_output_weights:
        out[prefix + "output_layer.weight"] = (m.vocab_size, h)
    if ex.use_exit_classifier:
        out.update({prefix + "classifier.weight": (1, h), prefix + "classifier.bias": (1,)})
    return out


def expected_shapes(cfg) -> Dict[str, tuple]:
    """Canonical name -> full shape of every parameter of the model ``cfg`` describes."""
    m, ex = cfg.model, cfg.exits
    out = {"embedding.word_embeddings.weight": (m.vocab_size, m.hidden_size),
           "decoder.final_layernorm.weight": (m.hidden_size,)}
    if m.position_embedding_type == "learned_absolute":
        out["embedding.position_embeddings.weight"] = (m.max_position_embeddings, m.hidden_size)
    if m.normalization == "LayerNorm":
        out["decoder.final_layernorm.bias"] = (m.hidden_size,)
    if m.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = (m.vocab_size, m.hidden_size)
    for i in range(m.num_layers):
        out.update(_layer_shapes(f"decoder.layers.{i}.", m))
    for k in ex.exit_layer_nums:
        out.update(_exit_shapes(f"exits.{k}.", m, ex))
    return out


def check_tensors(cfg, tensors: Dict[str, torch.Tensor], what: str) -> None:
    """Every tensor the model needs is there with its shape, and nothing else (``what`` names
    the source in the error)."""
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing:
        raise fmt.CheckpointError(f"{what} lacks {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if extra:
        raise fmt.CheckpointError(f"{what} holds tensors this model does not have: {extra[:6]}")
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise fmt.CheckpointError(f"{what}: {name} has shape {tuple(tensors[name].shape)}, "
                                      f"the config implies {shape}")


def save_converted(save_dir: str, config: dict, tensors: Dict[str, torch.Tensor],
                   tokenizer_dir: Optional[str] = None, tp: int = 1, pp: int = 1,
                   dtype: Optional[str] = None, source: Optional[dict] = None,
                   what: str = "the source checkpoint", iteration: int = 0,
                   args: Optional[dict] = None) -> str:
    """Commit ``tensors`` as a model-only checkpoint of ours at (tp, pp); returns its directory."""
    config = copy.deepcopy(config)
    if dtype is not None:
        if dtype not in DTYPES:
            raise fmt.CheckpointError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        config["params_dtype"] = dtype
    torch_dtype = DTYPES[config.get("params_dtype", "float32")]
    pad_vocab(config, tensors, tp)
    config = target_config(config, tp, pp)
    cfg = config_from_dict(config)
    check_tensors(cfg, tensors, what)
    swiglu = cfg.model.swiglu
    tensors = {n: t.detach().to(torch_dtype).contiguous() for n, t in tensors.items()}
    index = {}
    for name, t in sorted(tensors.items()):
        spec = param_spec(name, swiglu)
        index[name] = {"dim": spec.dim, "chunks": spec.chunks, "pp_rank": stage_of(name, cfg),
                       "dtype": str(t.dtype), "shape": list(t.shape)}
    meta = {"iteration": iteration, "config": config, "tensors": index, "train_config": None,
            "args": args or {}, "extra": {"converted_from": source or {}}}
    return write_whole_checkpoint(save_dir, meta, tensors, [tokenizer_dir] if tokenizer_dir else [])
