"""Hugging Face Llama-family tensor names <-> our canonical names (a declarative key map).

Both directions work on *full* tensors (no tensor parallelism here):

    canonical = from_hf(hf_tensors, heads=9, groups=3)     # HF state dict -> our names
    hf = to_hf(canonical, heads=9, groups=3)               # and back, bit for bit

Backbone keys are transformers' ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` names. Exit heads
(which transformers does not know) are stored as extra tensors under ``early_exits.<k>.``,
k the 1-based layer the exit reads, with the same sub-names as a decoder layer::

    early_exits.<k>.block.<layer keys>     --use-exit-block: input_layernorm, self_attn.{q,k,v,o}_proj,
                                           post_attention_layernorm, mlp.{gate,up,down}_proj
    early_exits.<k>.mlp.{gate,up,down}_proj.weight    --use-exit-mlp
    early_exits.<k>.norm.weight                       --use-exit-norm
    early_exits.<k>.lm_head.weight                    --untie-exit-output-weights
    early_exits.<k>.classifier.{weight,bias}          --use-exit-classifier ([1, h], [1])

Two tensors are re-laid out, everything else is renamed only:

- ``linear_qkv`` (megatron-core) holds, per query group g, that group's query heads then its
  key head then its value head: ``[ng * (np/ng + 2) * hn, h]``; HF keeps ``q_proj``
  ``[np * hn, h]``, ``k_proj`` / ``v_proj`` ``[ng * hn, h]`` (same for the Qwen2 biases);
- SwiGLU's ``linear_fc1`` is ``[gate; up]``, HF's ``gate_proj`` and ``up_proj``.

HF rotary embeddings use the rotate-half convention, as ours do, so Q and K rows are not permuted.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Dict, Tuple

import torch

EXIT_PREFIX = "early_exits"
# buffers some old HF checkpoints carry; recomputed by every model, never weights
IGNORED_HF = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")

_TOP = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
        "decoder.final_layernorm.weight": "model.norm.weight",
        "output_layer.weight": "lm_head.weight"}
# layer sub-name (ours) -> HF sub-name, for tensors that are renamed only
_LAYER = {"input_layernorm.weight": "input_layernorm.weight",
          "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
          "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
          "mlp.linear_fc2.weight": "mlp.down_proj.weight"}
_EXIT = {"norm.weight": "norm.weight", "output_layer.weight": "lm_head.weight",
         "mlp.linear_fc2.weight": "mlp.down_proj.weight",
         "classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"}
_QKV = re.compile(r"^self_attention\.linear_qkv\.(weight|bias)$")
_QKV_HF = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")
_FC1 = "mlp.linear_fc1.weight"
_FC1_HF = re.compile(r"^mlp\.(gate|up)_proj\.weight$")


class KeyMapError(KeyError):
    """A tensor name that has no counterpart in the other format."""

    def __str__(self) -> str:
        return str(self.args[0])


# ------------------------------------------------------------------------------ re-layouts
def join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
             groups: int) -> torch.Tensor:
    """HF q [np*hn, ...], k, v [ng*hn, ...] -> megatron-core's grouped [ng*(np/ng+2)*hn, ...]."""
    rest = q.shape[1:]
    hn = q.shape[0] // heads
    q = q.reshape(groups, heads // groups, hn, *rest)
    k = k.reshape(groups, 1, hn, *rest)
    v = v.reshape(groups, 1, hn, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int) -> Tuple[torch.Tensor, ...]:
    """Inverse of ``join_qkv``: (q, k, v)."""
    per = heads // groups
    rest = qkv.shape[1:]
    hn = qkv.shape[0] // (groups * (per + 2))
    grouped = qkv.reshape(groups, per + 2, hn, *rest)
    q, k, v = grouped.split([per, 1, 1], dim=1)
    return (q.reshape(heads * hn, *rest).contiguous(), k.reshape(groups * hn, *rest).contiguous(),
            v.reshape(groups * hn, *rest).contiguous())


# ------------------------------------------------------------------------------ ours -> HF
def _sub_to_hf(prefix: str, sub: str, t: torch.Tensor, heads: int, groups: int,
               simple: Dict[str, str]) -> Dict[str, torch.Tensor]:
    if sub in simple:
        return {prefix + simple[sub]: t}
    m = _QKV.match(sub)
    if m:
        q, k, v = split_qkv(t, heads, groups)
        kind = m.group(1)
        return {f"{prefix}self_attn.q_proj.{kind}": q, f"{prefix}self_attn.k_proj.{kind}": k,
                f"{prefix}self_attn.v_proj.{kind}": v}
    if sub == _FC1:
        gate, up = t.chunk(2, dim=0)
        return {f"{prefix}mlp.gate_proj.weight": gate.contiguous(),
                f"{prefix}mlp.up_proj.weight": up.contiguous()}
    raise KeyMapError(f"parameter {sub!r} has no Hugging Face Llama counterpart")


def to_hf(tensors: Dict[str, torch.Tensor], heads: int, groups: int) -> Dict[str, torch.Tensor]:
    """Canonical name -> tensor  ==>  HF name -> tensor (exits under ``early_exits.<k>.``)."""
    out = {}
    for name, t in tensors.items():
        if name in _TOP:
            out[_TOP[name]] = t
            continue
        layer = re.match(r"^decoder\.layers\.(\d+)\.(.+)$", name)
        exit_ = re.match(r"^exits\.(\d+)\.(.+)$", name)
        if layer:
            out.update(_sub_to_hf(f"model.layers.{layer.group(1)}.", layer.group(2), t, heads,
                                  groups, _LAYER))
        elif exit_ and exit_.group(2).startswith("block."):
            out.update(_sub_to_hf(f"{EXIT_PREFIX}.{exit_.group(1)}.block.", exit_.group(2)[6:], t,
                                  heads, groups, _LAYER))
        elif exit_:
            out.update(_sub_to_hf(f"{EXIT_PREFIX}.{exit_.group(1)}.", exit_.group(2), t, heads,
                                  groups, _EXIT))
        else:
            raise KeyMapError(f"parameter {name!r} has no Hugging Face Llama counterpart")
    return out


# ------------------------------------------------------------------------------ HF -> ours
def _sub_from_hf(prefix: str, sub: str, simple: Dict[str, str]) -> Tuple[str, str]:
    """(canonical name, part) for HF sub-name ``sub``; part is q/k/v, gate/up or ''."""
    inverse = {v: k for k, v in simple.items()}
    if sub in inverse:
        return prefix + inverse[sub], ""
    m = _QKV_HF.match(sub)
    if m:
        return f"{prefix}self_attention.linear_qkv.{m.group(2)}", m.group(1)
    m = _FC1_HF.match(sub)
    if m:
        return prefix + _FC1, m.group(1)
    raise KeyError(sub)


def canonical_of(key: str) -> Tuple[str, str]:
    """(canonical name, part) of HF tensor ``key``; ``KeyMapError`` names an unknown key."""
    top = {v: k for k, v in _TOP.items()}
    try:
        if key in top:
            return top[key], ""
        layer = re.match(r"^model\.layers\.(\d+)\.(.+)$", key)
        if layer:
            return _sub_from_hf(f"decoder.layers.{layer.group(1)}.", layer.group(2), _LAYER)
        block = re.match(rf"^{EXIT_PREFIX}\.(\d+)\.block\.(.+)$", key)
        if block:
            return _sub_from_hf(f"exits.{block.group(1)}.block.", block.group(2), _LAYER)
        exit_ = re.match(rf"^{EXIT_PREFIX}\.(\d+)\.(.+)$", key)
        if exit_:
            return _sub_from_hf(f"exits.{exit_.group(1)}.", exit_.group(2), _EXIT)
    except KeyError:
        pass
    raise KeyMapError(f"checkpoint tensor {key!r} is not part of a Llama-family model "
                      "(no mapping to our parameters)")


def _join(name: str, parts: Dict[str, torch.Tensor], heads: int, groups: int) -> torch.Tensor:
    wanted = {"": ("",), "q": ("q", "k", "v"), "gate": ("gate", "up")}
    kind = "q" if set(parts) & {"q", "k", "v"} else "gate" if set(parts) & {"gate", "up"} else ""
    missing = [p for p in wanted[kind] if p not in parts]
    if missing:
        raise KeyMapError(f"{name}: the checkpoint has {sorted(parts)} but lacks the "
                          f"{'/'.join(missing)} part")
    if kind == "q":
        return join_qkv(parts["q"], parts["k"], parts["v"], heads, groups)
    if kind == "gate":
        return torch.cat([parts["gate"], parts["up"]], dim=0)
    return parts[""]


def from_hf(hf: Dict[str, torch.Tensor], heads: int, groups: int) -> Dict[str, torch.Tensor]:
    """HF name -> tensor  ==>  canonical name -> tensor (inverse of ``to_hf``)."""
    parts: Dict[str, Dict[str, torch.Tensor]] = defaultdict(dict)
    for key, t in hf.items():
        if IGNORED_HF.match(key):
            continue
        name, part = canonical_of(key)
        parts[name][part] = t
    return {name: _join(name, p, heads, groups) for name, p in parts.items()}
