"""Gradient finalisation after backward, before the optimizer step, in three all-reduces:

1. sequence parallel: replicated parameters marked ``sequence_parallel`` (norms) saw only this
   rank's slice of the sequence -> sum their gradients over the tensor-parallel group;
2. tied word embedding: every stage holding it or a copy (first stage, tied last stage, stages
   with tied exits; parallel/state.py) sums its chunks' gradients, then all-reduces them over the
   tied group, so all copies take the identical update;
3. data parallel: average every gradient over the data-parallel group.

Gradients are flattened into one buffer per dtype for each all-reduce (few, large messages).
Works with gloo and NCCL; nothing here is device specific.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, List

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def _all_reduce_coalesced(grads: List[torch.Tensor], group, average: bool = False) -> None:
    if not grads or dist.get_world_size(group) == 1:
        return
    by_dtype = defaultdict(list)
    for g in grads:
        by_dtype[g.dtype].append(g)
    for same in by_dtype.values():
        flat = _flatten_dense_tensors(same)
        dist.all_reduce(flat, group=group)
        if average:
            flat /= dist.get_world_size(group)
        for g, synced in zip(same, _unflatten_dense_tensors(flat, same)):
            g.copy_(synced)


def tied_weights(chunks) -> List[torch.Tensor]:
    return [w for w in (m.tied_weight() for m in chunks) if w is not None]


@torch.no_grad()
def finalize_grads(chunks: Iterable[torch.nn.Module], ctx, grad_attr: str = "grad",
                   data_parallel: bool = True) -> None:
    """The three all-reduces above on each parameter's ``grad_attr`` (``"main_grad"`` for
    megatron-core's DDP buffers, whose own ``finish_grad_sync`` then does the data-parallel part:
    ``data_parallel=False``; the reductions are sums, so their order does not matter)."""
    chunks = list(chunks)

    def grad(p):
        return getattr(p, grad_attr, None)

    params = [p for m in chunks for p in m.parameters() if grad(p) is not None]
    if any(m.config.sequence_parallel for m in chunks):
        _all_reduce_coalesced([grad(p) for p in params if getattr(p, "sequence_parallel", False)],
                              ctx.tp_group)
    tied = [grad(w) for w in tied_weights(chunks) if grad(w) is not None]
    if tied and ctx.tied_group is not None:
        total = torch.stack(tied).sum(0)
        _all_reduce_coalesced([total], ctx.tied_group)
        for g in tied:
            g.copy_(total)
    if data_parallel:
        _all_reduce_coalesced([grad(p) for p in params], ctx.dp_group, average=True)


def grad_norm_params(chunks, ctx) -> List[torch.Tensor]:
    """Parameters whose gradients count once in the global norm: not TP replicas on tp_rank > 0,
    not copies of the tied embedding (the first stage's embedding counts)."""
    out = []
    for m in chunks:
        copy = m.word_embeddings_copy
        for p in m.parameters():
            if p.grad is None or p is copy:
                continue
            if getattr(p, "tensor_model_parallel", False) or ctx.tp_rank == 0:
                out.append(p)
    return out


@torch.no_grad()
def clip_grad_norm(chunks, ctx, max_norm: float) -> float:
    """Global L2 norm of the gradients over TP x PP (DP ranks agree); clip to ``max_norm``."""
    chunks = list(chunks)
    params = grad_norm_params(chunks, ctx)
    device = ctx.device
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        sq += p.grad.double().pow(2).sum()
    if dist.get_world_size(ctx.model_parallel_group) > 1:
        dist.all_reduce(sq, group=ctx.model_parallel_group)
    norm = sq.sqrt().item()
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for m in chunks:
            for p in m.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
    return norm
