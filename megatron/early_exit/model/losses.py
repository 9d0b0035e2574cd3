"""Exit and final LM losses on vocab-parallel logits.

The training objective (DESIGN.md §3) for one micro-batch is

    L = w_final * CE_final + sum_i w_i(t) * CE_i

where each CE is a masked mean over tokens of the per-token cross entropy of that head's logits
divided by its temperature. With ``--use-dynamic-exit-layer-weight`` each token's exit CE is
multiplied by the (detached) max softmax probability of that exit at that token.
Logits are ``[s, b, V/tp]`` (vocab split over the tensor-parallel group), labels ``[b, s]``.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel


def per_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                            temperature: float = 1.0) -> torch.Tensor:
    """Cross entropy per token. logits ``[s, b, V/tp]``, labels ``[b, s]`` -> ``[b, s]``.

    Computed in the logits' precision (float64 stays float64; megatron-core's CE casts to
    float32) with differentiable ops: log sum_j exp(z_j) - z_label, the sums all-reduced over TP
    with megatron's reduce region (all-reduce forward, identity backward: the loss is replicated).
    """
    z = logits if logits.dtype == torch.float64 else logits.float()
    if temperature != 1.0:
        z = z / temperature
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    local_vocab = z.shape[-1]
    target = labels.transpose(0, 1) - tp_rank * local_vocab  # [s, b] index into this shard
    in_shard = (target >= 0) & (target < local_vocab)
    with torch.no_grad():
        zmax = z.max(dim=-1).values  # [s, b]
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(zmax, op=torch.distributed.ReduceOp.MAX,
                                         group=parallel_state.get_tensor_model_parallel_group())
    shifted = z - zmax.unsqueeze(-1)
    sum_exp = tensor_parallel.reduce_from_tensor_model_parallel_region(shifted.exp().sum(dim=-1))
    picked = shifted.gather(-1, target.clamp(0, local_vocab - 1).unsqueeze(-1)).squeeze(-1)
    picked = tensor_parallel.reduce_from_tensor_model_parallel_region(picked * in_shard)
    return (sum_exp.log() - picked).transpose(0, 1)  # [b, s]


@torch.no_grad()
def max_probability(logits: torch.Tensor, temperature: float = 1.0,
                    group: Optional[torch.distributed.ProcessGroup] = None) -> torch.Tensor:
    """Max softmax probability per token over the whole (vocab-parallel) vocabulary.

    logits ``[s, b, V/tp]`` -> ``[b, s]``. Uses max p = 1 / sum_j exp(z_j - max z).
    """
    z = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32) / temperature
    group = group if group is not None else parallel_state.get_tensor_model_parallel_group()
    zmax = z.max(dim=-1).values  # [s, b]
    if torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(zmax, op=torch.distributed.ReduceOp.MAX, group=group)
    denom = torch.exp(z - zmax.unsqueeze(-1)).sum(dim=-1)  # [s, b]
    if torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(denom, group=group)
    return (1.0 / denom).transpose(0, 1)


def masked_mean(per_token: torch.Tensor, loss_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``per_token`` ([b, s]) over tokens where ``loss_mask`` is 1."""
    if loss_mask is None:
        return per_token.mean()
    mask = loss_mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def exit_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: Optional[torch.Tensor],
              temperature: float, dynamic: bool) -> torch.Tensor:
    """One exit's (or the final head's) scalar loss on a micro-batch."""
    per_token = per_token_cross_entropy(logits, labels, temperature)
    if dynamic:
        per_token = per_token * max_probability(logits, temperature).to(per_token.dtype)
    return masked_mean(per_token, loss_mask)
