"""Layout-independent parameter names and tensor-parallel sharding of full tensors.

Every parameter of a stage has a *canonical name* that does not depend on the TP/PP layout
(layer indices are global, copies of the tied word embedding are named after the embedding),
and a ``ShardSpec`` saying how its full tensor is split over the tensor-parallel group. These two
give layout-independent initialisation (model/init.py), gathered gradients for tests, and
checkpoint conversion.

SwiGLU's ``linear_fc1`` holds ``[gate; up]`` stacked; megatron-core splits each half over TP and
stores ``[gate_r; up_r]`` on rank r, hence ``chunks=2``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.distributed as dist

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ShardSpec:
    dim: Optional[int]  # None: replicated over TP
    chunks: int = 1  # >1: the tensor is `chunks` stacked blocks, each split separately


def shard_spec(name: str, param: torch.Tensor, swiglu: bool) -> ShardSpec:
    if not getattr(param, "tensor_model_parallel", False):
        return ShardSpec(None)
    chunks = 2 if swiglu and (name.endswith("linear_fc1.weight") or name.endswith("linear_fc1.bias")) else 1
    return ShardSpec(int(param.partition_dim), chunks)


def canonical_names(model) -> Dict[str, str]:
    """Local parameter name -> layout-independent name, for one EarlyExitGPTModel chunk."""
    numbers = [layer.layer_number for layer in model.decoder.layers]
    names = {}
    for name, _ in model.named_parameters():
        canon = name
        match = _LAYER.match(name)
        if match:
            canon = f"decoder.layers.{numbers[int(match.group(1))] - 1}." + name[match.end():]
        elif name == "word_embeddings_copy":
            canon = "embedding.word_embeddings.weight"
        names[name] = canon
    return names


def full_shape(local: torch.Tensor, spec: ShardSpec, tp_size: int) -> torch.Size:
    shape = list(local.shape)
    if spec.dim is not None:
        shape[spec.dim] *= tp_size
    return torch.Size(shape)


def shard(full: torch.Tensor, spec: ShardSpec, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's slice of ``full``."""
    if spec.dim is None:
        return full
    blocks = full.chunk(spec.chunks, dim=spec.dim)
    return torch.cat([b.chunk(tp_size, dim=spec.dim)[tp_rank] for b in blocks], dim=spec.dim)


def unshard(parts, spec: ShardSpec) -> torch.Tensor:
    """Inverse of ``shard`` given every rank's slice, in rank order."""
    if spec.dim is None:
        return parts[0]
    split = [p.chunk(spec.chunks, dim=spec.dim) for p in parts]
    blocks = [torch.cat([s[c] for s in split], dim=spec.dim) for c in range(spec.chunks)]
    return torch.cat(blocks, dim=spec.dim)


def gather(local: torch.Tensor, spec: ShardSpec, group) -> torch.Tensor:
    """All-gather a TP-sharded tensor into the full tensor (every rank gets it)."""
    size = dist.get_world_size(group)
    if spec.dim is None or size == 1:
        return local.clone()
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return unshard(parts, spec)


def gathered_tensors(chunks, tp_group, swiglu: bool, grads: bool = False) -> Dict[str, torch.Tensor]:
    """Canonical name -> full (TP-gathered) parameter, or its gradient, for this stage's chunks.

    Parameters without a gradient are skipped when ``grads`` is set.
    """
    out = {}
    for model in chunks:
        names = canonical_names(model)
        for local_name, param in model.named_parameters():
            tensor = param.grad if grads else param.detach()
            if tensor is None:
                continue
            out[names[local_name]] = gather(tensor, shard_spec(local_name, param, swiglu), tp_group)
    return out
