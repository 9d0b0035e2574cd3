"""Deterministic, layout-independent initialisation.

Each parameter's full tensor is drawn from a generator seeded by (``--seed``, canonical name),
then this rank's TP slice is kept. The same seed therefore gives the same full model (backbone
and exits) for every TP/PP/DP layout, so runs with different layouts compare number for number.

Rules: norm weights 1, biases 0, ``linear_proj``/``linear_fc2`` weights N(0, std/sqrt(2L))
(Megatron's scaled init), every other weight N(0, std).
"""

from __future__ import annotations

import math
import zlib

import torch

from megatron.early_exit.model.sharding import canonical_names, full_shape, shard, shard_spec


def name_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def full_init_tensor(name: str, shape, std: float, num_layers: int, seed: int) -> torch.Tensor:
    """The full (unsharded) initial value of parameter ``name`` in float32."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias") or name.endswith("norm.bias"):
        return torch.zeros(shape)
    if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
        std = std / math.sqrt(2.0 * num_layers)
    gen = torch.Generator().manual_seed(name_seed(seed, name))
    return torch.randn(shape, generator=gen) * std


@torch.no_grad()
def initialize_model(model, seed: int, tp_rank: int, tp_size: int) -> None:
    """Initialise every parameter of one EarlyExitGPTModel chunk in place."""
    m = model.cfg.model
    names = canonical_names(model)
    for local_name, param in model.named_parameters():
        canon = names[local_name]
        spec = shard_spec(local_name, param, m.swiglu)
        full = full_init_tensor(canon, full_shape(param, spec, tp_size), m.init_method_std,
                                m.init_num_layers or m.num_layers, seed)
        param.copy_(shard(full, spec, tp_rank, tp_size).to(param.dtype))
