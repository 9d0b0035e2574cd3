"""The trainer's optimizer: torch AdamW (any device) or megatron-core's optimizer (GPU).

    optimizer = build_optimizer(chunks, lr=3e-4, weight_decay=0.1)          # torch AdamW
    optimizer = build_trainer_optimizer(chunks, ctx, train_cfg)             # per --optimizer-backend

torch AdamW uses Megatron's no-decay rule (biases, norms, 1-D) and parallel/grads.py for the
all-reduces and clipping; megatron-core's path is trainer/megatron_optimizer.py. Checkpoints
read and write per-parameter state through checkpoint/tensors.py's ``full_param_states`` /
``load_full_param_states``, which hide the difference (whole tensors, whatever the backend or DP
sharding): an optimizer that shards its state offers methods of those names.
"""

from __future__ import annotations

from typing import Iterable, Tuple

import torch


def build_optimizer(chunks: Iterable[torch.nn.Module], lr: float, weight_decay: float = 0.0,
                    betas: Tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for model in chunks:
        for _, p in model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False keeps the update bitwise independent of how parameters are grouped.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)


def build_trainer_optimizer(chunks, ctx, t):
    """torch AdamW or megatron-core's optimizer, as ``t.optimizer_backend`` resolves on this
    device (auto: megatron-core's on CUDA for float32 parameters, torch AdamW otherwise)."""
    chunks = list(chunks)
    backend = t.resolved_optimizer_backend(ctx.device)
    fp32 = all(p.dtype == torch.float32 for m in chunks for p in m.parameters())
    if t.optimizer_backend == "auto" and not fp32:
        backend = "torch"  # --fp64 runs: megatron-core's optimizer takes float32 parameters
    if backend == "torch" and t.use_distributed_optimizer:
        from megatron.early_exit.config import ConfigError

        raise ConfigError("--use-distributed-optimizer is megatron-core's optimizer, which needs CUDA "
                          "and float32 parameters; this run uses torch AdamW "
                          f"({ctx.device.type}, {'float32' if fp32 else 'non-float32'} parameters)")
    if backend == "megatron":
        from megatron.early_exit.trainer.megatron_optimizer import MegatronCoreOptimizer

        return MegatronCoreOptimizer(list(chunks), ctx, t)
    return build_optimizer(chunks, t.lr, t.weight_decay, (t.adam_beta1, t.adam_beta2), t.adam_eps)
