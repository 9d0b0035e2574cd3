"""Exit and final LM losses on vocab-parallel heads.

The training objective (docs/training.md) for one micro-batch is

    L = w_final * CE_final + sum_i w_i(t) * CE_i

where each CE is a masked mean over tokens of the per-token cross entropy of that head's logits
divided by its temperature. With ``--use-dynamic-exit-layer-weight`` each token's exit CE is
multiplied by the (detached) max softmax probability of that exit at that token.
Logits are ``[s, b, V/tp]`` (vocab split over the tensor-parallel group), labels ``[b, s]``.

Only the first ``num_tokens`` vocabulary ids are tokens; the padded ids above them (the output
layer is padded to a multiple of ``--make-vocab-size-divisible-by`` x TP) never enter a softmax,
so a head is the same function at every TP size. ``head_loss`` is what the model calls: by
default it fuses the output projection with the cross entropy in chunks of tokens
(model/linear_cross_entropy.py, ``--cross-entropy-chunk-size``); with chunk size 0 it uses
materialised logits (``exit_loss``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron.early_exit.model.linear_cross_entropy import linear_cross_entropy, real_columns


def _tp_group():
    return parallel_state.get_tensor_model_parallel_group()


def _mask_padding(z: torch.Tensor, num_tokens: Optional[int], group) -> torch.Tensor:
    """``z`` [s, b, V/tp] with this rank's padded vocabulary columns set to -inf."""
    local_vocab = z.shape[-1]
    if num_tokens is None:
        return z
    real = real_columns(num_tokens, local_vocab, dist.get_rank(group))
    if real == local_vocab:
        return z
    padded = torch.arange(local_vocab, device=z.device) >= real
    return z.masked_fill(padded, float("-inf"))


def per_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                            num_tokens: Optional[int] = None) -> torch.Tensor:
    """Cross entropy per token. logits ``[s, b, V/tp]``, labels ``[b, s]`` -> ``[b, s]``.

    Computed in the logits' precision (float64 stays float64; megatron-core's CE casts to
    float32) with differentiable ops: log sum_j exp(z_j) - z_label over the real ids
    j < ``num_tokens`` (None: all), the sums all-reduced over TP with megatron's reduce region
    (all-reduce forward, identity backward: the loss is replicated).
    """
    group = _tp_group()
    z = logits if logits.dtype == torch.float64 else logits.float()
    if temperature != 1.0:
        z = z / temperature
    z = _mask_padding(z, num_tokens, group)
    local_vocab = z.shape[-1]
    target = labels.transpose(0, 1) - dist.get_rank(group) * local_vocab  # [s, b] into this shard
    in_shard = (target >= 0) & (target < local_vocab)
    with torch.no_grad():
        zmax = z.max(dim=-1).values  # [s, b]
        if dist.get_world_size(group) > 1:
            dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
    shifted = z - zmax.unsqueeze(-1)
    sum_exp = tensor_parallel.reduce_from_tensor_model_parallel_region(shifted.exp().sum(dim=-1), group)
    picked = shifted.gather(-1, target.clamp(0, local_vocab - 1).unsqueeze(-1)).squeeze(-1)
    picked = torch.where(in_shard, picked, torch.zeros_like(picked))  # (a padded column is -inf)
    picked = tensor_parallel.reduce_from_tensor_model_parallel_region(picked, group)
    return (sum_exp.log() - picked).transpose(0, 1)  # [b, s]


@torch.no_grad()
def max_probability(logits: torch.Tensor, temperature: float = 1.0,
                    group: Optional[dist.ProcessGroup] = None,
                    num_tokens: Optional[int] = None) -> torch.Tensor:
    """Max softmax probability per token over the real ids of the (vocab-parallel) vocabulary.

    logits ``[s, b, V/tp]`` -> ``[b, s]``. Uses max p = 1 / sum_j exp(z_j - max z).
    """
    group = group if group is not None else _tp_group()
    z = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32) / temperature
    z = _mask_padding(z, num_tokens, group)
    zmax = z.max(dim=-1).values  # [s, b]
    if dist.get_world_size(group) > 1:
        dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
    denom = torch.exp(z - zmax.unsqueeze(-1)).sum(dim=-1)  # [s, b]
    if dist.get_world_size(group) > 1:
        dist.all_reduce(denom, group=group)
    return (1.0 / denom).transpose(0, 1)


def masked_mean(per_token: torch.Tensor, loss_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``per_token`` ([b, s]) over tokens where ``loss_mask`` is 1."""
    if loss_mask is None:
        return per_token.mean()
    mask = loss_mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def exit_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: Optional[torch.Tensor],
              temperature: float, dynamic: bool, num_tokens: Optional[int] = None) -> torch.Tensor:
    """One head's scalar loss on a micro-batch from materialised logits ``[s, b, V/tp]``."""
    per_token = per_token_cross_entropy(logits, labels, temperature, num_tokens)
    if dynamic:
        p = max_probability(logits, temperature, num_tokens=num_tokens)
        per_token = per_token * p.to(per_token.dtype)
    return masked_mean(per_token, loss_mask)


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
              loss_mask: Optional[torch.Tensor], temperature: float, dynamic: bool,
              num_tokens: int, chunk_size: int, sequence_parallel: bool) -> torch.Tensor:
    """One head's scalar loss from its projection input ``hidden`` [s, b, h] (sequence-split
    under SP) and output weight [V/tp, h], in chunks of ``chunk_size`` tokens (no logits kept)."""
    return linear_cross_entropy(hidden, weight, labels, loss_mask, num_tokens=num_tokens,
                                temperature=temperature, dynamic=dynamic, chunk_size=chunk_size,
                                tp_group=_tp_group(), sequence_parallel=sequence_parallel)
