"""Fused full-depth decode step: every decoder layer as a few direct torch ops (TP=1, inference).

``StaticDecodeStep`` (static_decode.py) runs each megatron-core ``TransformerLayer`` for one
token per KV-cache row. On CPU at batch 1 much of that step is not the matrix products but the
per-op overhead of megatron-core's layer wrappers (autograd-function linears, region copies,
viewless-tensor wrapping). ``FusedDecoder`` computes the same function on the megatron-core
modules' own weight tensors (held by reference, not copied: in-place updates such as
``load_state_dict`` are seen; a module given a new Parameter object needs a new decoder), per layer:

    h = norm(x)                                       F.rms_norm / F.layer_norm
    qkv = F.linear(h, W_qkv, b_qkv)                   [B, ng, q_per_group + 2, hn] (megatron's layout)
    q, k = RoPE(q, k)                                 one addcmul over the q and k of every group
    K[pos], V[pos] = k, v                             index_copy_ into the KVCache buffers
    a = SDPA(q, K, V, mask)                           a group's q heads are the queries of its KV head
    x = x + a @ W_proj^T (+ b)                        addmm: the residual add is fused
    x = x + act(F.linear(norm(x), W_fc1)) @ W_fc2^T   SwiGLU on [gate; up], or GELU (+ biases)

It writes the same cache slots and fill lengths as the KV hook of kv_cache.py, so the engine's
other passes (prefill, early exit, speculative drafts) share the cache with it. What it covers is
what the model offers at TP=1, PP=1: the llama and gpt2 presets and their mixtures (RMSNorm or
LayerNorm, SwiGLU or GELU, RoPE or learned positions, biases, GQA, tied or untied output).
Anything else (TP>1, sequence parallelism, pipeline stages, a different core attention, options
megatron-core has and our model never sets) is refused by ``check_supported`` with an error
naming it, so a caller can fall back to the megatron-core layers.

The same layer step also serves ``R`` in-flight tokens of ONE cache row (``RowSlots``: each slot
with its own position, cache write index, ``cache.max_len`` = the scratch slot for padding, and
causal mask row), which is how batch-1 early exit and self-speculative decoding run their layer
segments (``StaticRunner(..., fused=True)``, static_early_exit.py): the row's ``R`` slots times
``per`` query heads of a KV group are that group's queries, ``q [R, ng, per, hn] ->
[1, ng, R * per, hn]`` against the row's keys, the mask repeated per query head.

    fused = FusedDecoder(model, cfg, cache)
    logits = fused.logits(tokens, pos, mask)   # tokens [B], pos [B], mask [B, 1, 1, max_len] -> [B, V]
    x = fused.run_slots(lo, hi, x, RowSlots(row, pos, write_idx, mask, start, end))  # [R, h]

Used by ``StaticDecodeStep(..., fused=True)`` and ``StaticRunner(..., fused=True)``. Tests:
tests/unit/test_fused_decode.py, tests/unit/test_fused_early_exit.py; benchmarks against
transformers' ``generate``: benchmarks/cpu_decode_peer.py, benchmarks/ee_tuning_bench.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.identity_op import IdentityOp

from megatron.early_exit.inference.kv_cache import KVCache
from megatron.early_exit.model.layers import Norm, SDPAttention, rotary_freqs

__all__ = ["FusedDecoder", "RowSlots", "check_supported"]


def check_supported(model, cfg) -> None:
    """Raise NotImplementedError naming the first feature the fused step does not cover."""
    p = cfg.parallel
    if p.tensor_model_parallel_size != 1:
        raise NotImplementedError(
            f"fused decode runs at TP=1 only (tensor_model_parallel_size="
            f"{p.tensor_model_parallel_size}); use the megatron-core layers (fused=False)")
    if p.sequence_parallel:
        raise NotImplementedError("fused decode: sequence_parallel is not supported")
    if not (model.pre_process and model.post_process):
        raise NotImplementedError("fused decode needs the whole model on one stage (PP=1)")
    tc = model.config
    unsupported = {
        "apply_residual_connection_post_layernorm": tc.apply_residual_connection_post_layernorm,
        "fp32_residual_connection": tc.fp32_residual_connection,
        "qk_layernorm": getattr(tc, "qk_layernorm", False),
        "attention_output_gate": getattr(tc, "attention_output_gate", False),
        "rotary_interleaved": getattr(tc, "rotary_interleaved", False),
        "num_moe_experts": getattr(tc, "num_moe_experts", None),
        "activation_func_clamp_value": getattr(tc, "activation_func_clamp_value", None),
        "glu_linear_offset": getattr(tc, "glu_linear_offset", 0.0),
    }
    for name, value in unsupported.items():
        if value:
            raise NotImplementedError(f"fused decode: TransformerConfig.{name}={value!r} is not "
                                      "supported")
    if tc.activation_func not in (F.silu, F.gelu) or tc.gated_linear_unit != (tc.activation_func is F.silu):
        raise NotImplementedError("fused decode supports SwiGLU (gated silu) or plain GELU MLPs, "
                                  f"got activation {tc.activation_func} gated={tc.gated_linear_unit}")
    for i, layer in enumerate(model.decoder.layers):
        att = layer.self_attention
        parts = (("input_layernorm", layer.input_layernorm, Norm),
                 ("pre_mlp_layernorm", layer.pre_mlp_layernorm, Norm),
                 ("self_attention.core_attention", att.core_attention, SDPAttention))
        for name, module, cls in parts:
            if not isinstance(module, cls):
                raise NotImplementedError(f"fused decode: layer {i} {name} is "
                                          f"{type(module).__name__}, expected {cls.__name__}")
        for name in ("q_layernorm", "k_layernorm"):
            if not isinstance(getattr(att, name, None), (IdentityOp, type(None))):
                raise NotImplementedError(f"fused decode: layer {i} has a {name}")
    if not isinstance(model.decoder.final_layernorm, Norm):
        raise NotImplementedError("fused decode: the final layernorm is "
                                  f"{type(model.decoder.final_layernorm).__name__}, expected Norm")


def _norm_fn(norm: Norm) -> Callable[[torch.Tensor], torch.Tensor]:
    """The norm module as one torch call on [B, h]."""
    shape = (norm.weight.shape[0],)
    if norm.rms:
        return lambda x: F.rms_norm(x, shape, norm.weight, norm.eps)
    return lambda x: F.layer_norm(x, shape, norm.weight, norm.bias, norm.eps)


@dataclass
class _Layer:
    """One decoder layer's weights and its views of the cache buffers."""

    norm1: Callable
    qkv_w: torch.Tensor  # [ng * (per + 2) * hn, h]
    qkv_b: Optional[torch.Tensor]
    proj_wt: torch.Tensor  # [np * hn, h]: W_proj^T (a view, for addmm)
    proj_b: Optional[torch.Tensor]
    norm2: Callable
    fc1_w: torch.Tensor  # [2 f, h] ([gate; up]) or [f, h]
    fc1_b: Optional[torch.Tensor]
    fc2_wt: torch.Tensor  # [f, h]: W_fc2^T
    fc2_b: Optional[torch.Tensor]
    k_flat: torch.Tensor  # [(max_len + 1) * B, ng, hn] view of the cache keys (write side)
    v_flat: torch.Tensor
    k_read: torch.Tensor  # [B, ng, max_len, hn] view of the cache keys (read side)
    v_read: torch.Tensor
    scale: Optional[float]


@dataclass
class RowSlots:
    """``R`` in-flight slots of one cache row through some layers (a KVCache.PassLayout of one
    row, as StaticRunner builds it)."""

    row: int  # the cache row
    pos: torch.Tensor  # [R] int64 position of each slot (RoPE angles; padding: any position)
    write_idx: torch.Tensor  # [R] int64 cache slot written: the position, or cache.max_len (scratch)
    mask: torch.Tensor  # [R, max_len] bool, True = attend (every row attends to something)
    start: torch.Tensor  # [1] first in-flight position (cache.check: every layer holds exactly that)
    end: torch.Tensor  # [1] one past the newest position: the layers' new fill length


class FusedDecoder:
    """One token per cache row through every layer, on the cache's buffers (no KV hook)."""

    def __init__(self, model, cfg, cache: KVCache):
        check_supported(model, cfg)
        m = cfg.model
        self.model, self.cache = model, cache
        self.dtype = next(model.parameters()).dtype
        if cache.k.dtype != self.dtype:
            raise ValueError(f"fused decode: cache dtype {cache.k.dtype} != model dtype {self.dtype}")
        self.ng, self.hn = m.num_query_groups, m.head_dim
        self.per = m.num_attention_heads // m.num_query_groups  # query heads per KV group
        self.swiglu = m.swiglu
        emb = model.embedding
        self.word = emb.word_embeddings.weight  # [V, h]
        self.pos_emb = emb.position_embeddings.weight if emb.add_position_embedding else None
        self.out_w = (model.output_layer.weight if m.untie_embeddings_and_output_weights
                      else model.tied_weight())  # [V, h]
        self.final_norm = _norm_fn(model.decoder.final_layernorm)
        self.rows = torch.arange(cache.batch, device=cache.device)  # [B]
        self.layers: List[_Layer] = []
        idx = []
        for layer in model.decoder.layers:
            core = layer.self_attention.core_attention
            if id(core) not in cache.index:
                raise ValueError("fused decode: the cache does not hold this model's layers")
            idx.append(cache.index[id(core)])
            self.layers.append(self._layer(layer, idx[-1]))
        self.module_idx = torch.tensor(idx, dtype=torch.int64, device=cache.device)  # [L]
        self.rope_table = None  # [max_len, 2, hn]: cos and signed sin per position
        if m.position_embedding_type == "rope":
            self.rope_table = self._rope_table(m, cache.max_len)

    def _layer(self, layer, i: int) -> _Layer:
        att, mlp, cache = layer.self_attention, layer.mlp, self.cache
        k, v = cache.k[i], cache.v[i]  # [max_len + 1, B, ng, hn]
        S = cache.max_len
        return _Layer(
            norm1=_norm_fn(layer.input_layernorm), qkv_w=att.linear_qkv.weight,
            qkv_b=att.linear_qkv.bias, proj_wt=att.linear_proj.weight.t(),
            proj_b=att.linear_proj.bias, norm2=_norm_fn(layer.pre_mlp_layernorm),
            fc1_w=mlp.linear_fc1.weight, fc1_b=mlp.linear_fc1.bias,
            fc2_wt=mlp.linear_fc2.weight.t(), fc2_b=mlp.linear_fc2.bias,
            k_flat=k.view(-1, self.ng, self.hn), v_flat=v.view(-1, self.ng, self.hn),
            k_read=k[:S].permute(1, 2, 0, 3), v_read=v[:S].permute(1, 2, 0, 3),
            scale=att.core_attention.softmax_scale)

    def _rope_table(self, m, max_len: int) -> torch.Tensor:
        """cos and sin of every position's angles, computed as megatron-core does (angles in
        float32, or float64 for a float64 model, cast to the model dtype); the sin half that
        multiplies the first (negated) half of rotate_half carries the minus sign."""
        rdtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        pos = torch.arange(max_len, device=self.cache.device)
        freqs = rotary_freqs(pos, m.head_dim, m.rotary_base, rdtype)[:, 0, 0]  # [S, hn]
        sign = torch.ones(m.head_dim, dtype=rdtype, device=pos.device)
        sign[: m.head_dim // 2] = -1.0
        cos = torch.cos(freqs).to(self.dtype)
        sin = (torch.sin(freqs).to(self.dtype) * sign.to(self.dtype))
        return torch.stack([cos, sin], dim=1)  # [S, 2, hn]

    # ------------------------------------------------------------------ the step
    def logits(self, tokens: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens [B], pos [B] (one token per cache row at its position), mask [B, 1, 1, S]
        (True = attend) -> next-token logits [B, V]; writes K/V of ``pos`` in every layer."""
        B = tokens.shape[0]
        x = F.embedding(tokens, self.word)  # [B, h]
        if self.pos_emb is not None:
            x = x + F.embedding(pos, self.pos_emb)
        rope = None
        if self.rope_table is not None:
            cs = self.rope_table.index_select(0, pos)  # [B, 2, hn]
            rope = cs[:, 0, None, None, :], cs[:, 1, None, None, :]  # [B, 1, 1, hn] each
        slot = pos * B + self.rows  # [B] flat index of (pos, row) in [max_len + 1, B]
        self._check_lengths(pos)
        for layer in self.layers:
            x = self._layer_step(layer, x, rope, slot, mask)
        end = (pos + 1).expand(len(self.layers), B)  # [L, B]
        self.cache.lengths.index_copy_(0, self.module_idx, end)
        return F.linear(self.final_norm(x), self.out_w)  # [B, V]

    def run_slots(self, lo: int, hi: int, x: torch.Tensor, slots: RowSlots) -> torch.Tensor:
        """Layers ``[lo, hi)`` on the in-flight slots ``x [R, h]`` of one cache row -> [R, h].
        Writes each slot's K/V at ``slots.write_idx`` (padding: the scratch slot) in those
        layers and sets their fill length of the row to ``slots.end``, as the KV hook does."""
        rope = None
        if self.rope_table is not None:
            cs = self.rope_table.index_select(0, slots.pos)  # [R, 2, hn]
            rope = cs[:, 0, None, None, :], cs[:, 1, None, None, :]  # [R, 1, 1, hn] each
        slot = slots.write_idx * self.cache.batch + slots.row  # [R] flat index of (slot, row)
        mask = slots.mask.repeat_interleave(self.per, dim=0)  # [R * per, S]: query i * per + j
        mods = self.module_idx[lo:hi]  # [n]
        self._check_row(mods, slots)
        for layer in self.layers[lo:hi]:
            x = self._layer_step(layer, x, rope, slot, mask, slots.row)
        rows = torch.full_like(mods, slots.row)
        self.cache.lengths.index_put_((mods, rows), slots.end.expand(mods.shape[0]))
        return x

    def _layer_step(self, w: _Layer, x, rope, slot, mask, row: Optional[int] = None) -> torch.Tensor:
        """One layer for x [N, h]: one token per cache row (``row`` None, N = B), or N
        in-flight slots of cache row ``row`` (``mask [N * per, S]``)."""
        B, ng, per, hn = x.shape[0], self.ng, self.per, self.hn
        qkv = F.linear(w.norm1(x), w.qkv_w, w.qkv_b).view(B, ng, per + 2, hn)
        qk = qkv[:, :, : per + 1]  # [B, ng, per + 1, hn]: the group's q heads, then its k
        if rope is not None:
            qk = self._rope(qk, *rope)
        self._write_kv(w, slot, qk[:, :, per], qkv[:, :, per + 1])
        if row is None:
            a = F.scaled_dot_product_attention(qk[:, :, :per], w.k_read, w.v_read, attn_mask=mask,
                                               scale=w.scale)  # [B, ng, per, hn]
        else:
            a = self._attend_row(w, qk[:, :, :per], row, mask)  # [N, ng, per, hn]
        x = torch.addmm(x if w.proj_b is None else x + w.proj_b, a.reshape(B, ng * per * hn),
                        w.proj_wt)  # [B, h]
        y = F.linear(w.norm2(x), w.fc1_w, w.fc1_b)  # [B, 2f] or [B, f]
        if self.swiglu:
            f = y.shape[-1] // 2
            y = F.silu(y[:, :f]) * y[:, f:]  # [B, f]
        else:
            y = F.gelu(y)
        return torch.addmm(x if w.fc2_b is None else x + w.fc2_b, y, w.fc2_wt)  # [B, h]

    @staticmethod
    def _attend_row(w: _Layer, q: torch.Tensor, row: int, mask: torch.Tensor) -> torch.Tensor:
        """q [N, ng, per, hn] of N slots of one row against that row's keys: a group's N * per
        query heads are the queries of its KV head (mask [N * per, S]) -> [N, ng, per, hn]."""
        N, ng, per, hn = q.shape
        qr = q.transpose(0, 1).reshape(1, ng, N * per, hn)  # query (slot i, head j) = i * per + j
        a = F.scaled_dot_product_attention(qr, w.k_read[row:row + 1], w.v_read[row:row + 1],
                                           attn_mask=mask, scale=w.scale)  # [1, ng, N * per, hn]
        return a.view(ng, N, per, hn).transpose(0, 1)

    @staticmethod
    def _rope(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1]: the halves swapped
        (flip of a [2, hn/2] view) times the signed sin. qk [B, ng, n, hn] -> new tensor."""
        *lead, hn = qk.shape
        swapped = qk.unflatten(-1, (2, hn // 2)).flip(-2).flatten(-2)  # [x2, x1]
        return torch.addcmul(qk * cos, swapped, sin)

    @staticmethod
    def _write_kv(w: _Layer, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [N, ng, hn] into the flat cache slots ``slot [N]`` (index pos * B + row)."""
        w.k_flat.index_copy_(0, slot, k)
        w.v_flat.index_copy_(0, slot, v)

    def _check_lengths(self, pos: torch.Tensor) -> None:
        """With ``cache.check`` on, the same assertion as the KV hook: every layer holds exactly
        the positions before ``pos`` (a static step's finished rows rewrite their last slot and
        would fail it, as they do on the hook path)."""
        if not self.cache.check:
            return
        have = self.cache.lengths.index_select(0, self.module_idx)  # [L, B]
        assert torch.equal(have, pos.expand_as(have)), (
            f"fused decode: cache rows hold {have.tolist()} positions, the step writes {pos.tolist()}")

    def _check_row(self, mods: torch.Tensor, slots: RowSlots) -> None:
        """With ``cache.check`` on, the KV hook's assertion for one row: layers ``mods`` hold
        exactly the positions before the first in-flight one."""
        if not self.cache.check:
            return
        have = self.cache.lengths[:, slots.row].index_select(0, mods)  # [n]
        assert torch.equal(have, slots.start.expand_as(have)), (
            f"fused decode: row {slots.row} holds {have.tolist()} positions in layers "
            f"{mods.tolist()}, the pass starts at {slots.start.tolist()}")
