"""An independent plain-PyTorch early-exit GPT, for tests.

It reads the *canonical full* state dict (model/sharding.py names, TP-gathered) and computes
every head's loss from scratch with explicit math: no megatron-core module is used. Tests run it
in float64 and compare our model (any TP/PP/DP layout) against it.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F


def _norm(x, sd, prefix, cfg):
    w = sd[prefix + ".weight"]
    if cfg.model.normalization == "RMSNorm":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.model.norm_epsilon) * w
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + cfg.model.norm_epsilon) * w + sd[prefix + ".bias"]


def _linear(x, sd, prefix):
    y = x @ sd[prefix + ".weight"].T
    if prefix + ".bias" in sd:
        y = y + sd[prefix + ".bias"]
    return y


def _rope(x, positions, base):  # x [b, s, n, d]
    d = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = positions.double()[:, None] * inv[None, :]  # [s, d/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[None, :, None, :].to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1)[None, :, None, :].to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _attention(x, sd, prefix, cfg):  # x [b, s, h]
    m = cfg.model
    b, s, _ = x.shape
    nh, ng, hd = m.num_attention_heads, m.num_query_groups, m.head_dim
    per = nh // ng
    qkv = _linear(x, sd, prefix + ".linear_qkv").view(b, s, ng, (per + 2) * hd)
    q = qkv[..., : per * hd].reshape(b, s, nh, hd)
    k = qkv[..., per * hd: (per + 1) * hd]
    v = qkv[..., (per + 1) * hd:]
    if m.position_embedding_type == "rope":
        pos = torch.arange(s)
        q, k = _rope(q, pos, m.rotary_base), _rope(k, pos, m.rotary_base)
    k = k.repeat_interleave(per, dim=2)
    v = v.repeat_interleave(per, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, nh * hd)
    return _linear(out, sd, prefix + ".linear_proj")


def _mlp(x, sd, prefix, cfg):
    y = _linear(x, sd, prefix + ".linear_fc1")
    if cfg.model.swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    else:
        y = F.gelu(y)
    return _linear(y, sd, prefix + ".linear_fc2")


def _layer(h, sd, prefix, cfg):
    h = h + _attention(_norm(h, sd, prefix + ".input_layernorm", cfg), sd, prefix + ".self_attention", cfg)
    return h + _mlp(_norm(h, sd, prefix + ".pre_mlp_layernorm", cfg), sd, prefix + ".mlp", cfg)


def _exit_logits(h, sd, layer, cfg):
    ex, p = cfg.exits, f"exits.{layer}"
    if ex.use_exit_block:
        h = _layer(h, sd, p + ".block", cfg)
    if ex.use_exit_mlp:
        h = h + _mlp(h, sd, p + ".mlp", cfg)
    if ex.use_exit_norm:
        h = _norm(h, sd, p + ".norm", cfg)
    w = sd[p + ".output_layer.weight"] if ex.untie_exit_output_weights else sd["embedding.word_embeddings.weight"]
    return h @ w.T


def reference_logits(sd: Dict[str, torch.Tensor], cfg, input_ids):
    """(exit logits {layer: [b, s, V]}, final logits [b, s, V])."""
    m, ex = cfg.model, cfg.exits
    b, s = input_ids.shape
    h = sd["embedding.word_embeddings.weight"][input_ids]
    if m.position_embedding_type == "learned_absolute":
        h = h + sd["embedding.position_embeddings.weight"][torch.arange(s)][None]
    out = {}
    for i in range(m.num_layers):
        layer = i + 1
        if ex.pre_exit and layer in ex.exit_layer_nums:
            out[layer] = _exit_logits(h, sd, layer, cfg)
        h = _layer(h, sd, f"decoder.layers.{i}", cfg)
        if not ex.pre_exit and layer in ex.exit_layer_nums:
            out[layer] = _exit_logits(h, sd, layer, cfg)
    h = _norm(h, sd, "decoder.final_layernorm", cfg)
    w = sd["output_layer.weight"] if m.untie_embeddings_and_output_weights else sd["embedding.word_embeddings.weight"]
    return out, h @ w.T


def reference_losses(sd, cfg, input_ids, labels, loss_mask: Optional[torch.Tensor] = None,
                     exit_weights=None):
    """(total loss, {exit layer: loss}, final LM loss): the weighted objective of docs/training.md."""
    ex = cfg.exits
    weights = exit_weights if exit_weights is not None else ex.exit_layer_weight
    exit_logits, final_logits = reference_logits(sd, cfg, input_ids)
    mask = torch.ones_like(labels, dtype=torch.float64) if loss_mask is None else loss_mask.double()

    def head_loss(z, temperature, dynamic):
        logp = (z / temperature).log_softmax(-1)
        ce = -logp.gather(-1, labels[..., None]).squeeze(-1)  # [b, s]
        if dynamic:
            ce = ce * logp.max(-1).values.exp().detach()
        return (ce * mask).sum() / mask.sum()

    exit_losses = {}
    total = ex.final_layer_weight * head_loss(final_logits, 1.0, False)
    for k, layer in enumerate(ex.exit_layer_nums):
        exit_losses[layer] = head_loss(exit_logits[layer], ex.exit_layer_temperature[k],
                                       ex.use_dynamic_exit_layer_weight)
        total = total + weights[k] * exit_losses[layer]
    final = head_loss(final_logits, 1.0, False)
    return total, exit_losses, final
