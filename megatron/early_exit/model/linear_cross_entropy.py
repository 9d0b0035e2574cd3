"""Output projection fused with the cross entropy, in chunks of tokens: no [s, b, V/tp] logits kept.

A head's loss needs ``logits = h W^T`` ([s, b, V/tp] per TP rank) only to reduce each row to two
numbers: the log-sum-exp over the vocabulary and the label's logit. ``LinearCrossEntropy``
computes them ``chunk_size`` tokens at a time and keeps, for backward, only ``h``, ``W`` and the
per-token log-sum-exp ([N] floats); backward recomputes each chunk's logits and turns them into
the gradient at once,

    dL/dz = g * (softmax(z) - onehot(label)),   dh = (dL/dz / T) W,   dW = (dL/dz / T)^T h,

so the peak extra memory of a head is one chunk's logits instead of all of them (the price is
one more [chunk, h] x [h, V/tp] matmul per chunk in backward). Under tensor parallelism each
rank holds the vocabulary rows [r * V/tp, (r + 1) * V/tp); the row max and the sums (sum of exp,
label logit) are all-reduced over the TP group per chunk, as in megatron-core's
vocab-parallel cross entropy. Padded vocabulary rows (ids >= ``num_tokens``) are left out of
every softmax: each rank uses only its real columns.

    ce, pmax = linear_cross_entropy(h, weight, labels, num_tokens=257, chunk_size=1024,
                                    tp_group=group, with_max_prob=True)   # [b, s] each

Tested against a float64 full-logits cross entropy in tests/unit/test_linear_cross_entropy.py
(one rank) and tests/distributed/test_padded_vocab_layouts.py (TP=2).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel


def real_columns(num_tokens: int, local_vocab: int, tp_rank: int) -> int:
    """How many of this rank's ``local_vocab`` output rows are real tokens (the rest: padding)."""
    return max(0, min(local_vocab, num_tokens - tp_rank * local_vocab))


def _tp(group) -> Tuple[int, int]:
    if group is None or dist.get_world_size(group) == 1:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _float(z: torch.Tensor) -> torch.Tensor:
    """The loss precision: float64 stays float64, anything else is computed in float32."""
    return z if z.dtype == torch.float64 else z.float()


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, temperature: float) -> torch.Tensor:
    """[C, h] x [v, h] -> scaled logits [C, v] in the loss precision."""
    z = _float(h @ w.t())
    return z / temperature if temperature != 1.0 else z


class _LinearCrossEntropy(torch.autograd.Function):
    """(h [N, h], W_real [v, h], local target [N]) -> (ce [N], max probability [N]).

    ``W_real`` is this rank's real vocabulary rows; ``target`` indexes them (-1: the label lives
    on another rank). Max probability is a constant (no gradient).
    """

    @staticmethod
    def forward(ctx, h, w, target, temperature, chunk_size, group):
        n = h.shape[0]
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        lse = torch.empty(n, dtype=acc, device=h.device)  # log sum_j exp(z_j), all ranks' j
        ce = torch.empty(n, dtype=acc, device=h.device)
        pmax = torch.empty(n, dtype=acc, device=h.device)
        for start in range(0, n, chunk_size):
            rows = slice(start, min(n, start + chunk_size))
            z = _chunk_logits(h[rows], w, temperature)  # [C, v]
            zmax = z.max(dim=-1).values if z.shape[1] else z.new_full(z.shape[:1], float("-inf"))
            if group is not None:
                dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
            shifted = z.sub_(zmax[:, None])  # in place: one [C, v] buffer per chunk
            t = target[rows]
            picked = torch.zeros_like(zmax)
            if z.shape[1]:
                picked = shifted.gather(1, t.clamp(min=0)[:, None]).squeeze(1) * (t >= 0)
            sums = torch.stack([shifted.exp_().sum(dim=-1), picked])  # [2, C]
            if group is not None:
                dist.all_reduce(sums, group=group)
            sum_exp, picked = sums
            ce[rows] = sum_exp.log() - picked
            lse[rows] = zmax + sum_exp.log()
            pmax[rows] = 1.0 / sum_exp
        ctx.save_for_backward(h, w, target, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(pmax)
        return ce, pmax

    @staticmethod
    def backward(ctx, grad_ce, _grad_pmax):
        h, w, target, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=lse.dtype, device=w.device) if need_w else None
        scale = grad_ce / ctx.temperature  # [N]: dL/dlogit = scale * (softmax - onehot)
        for start in range(0, h.shape[0], ctx.chunk_size):
            rows = slice(start, min(h.shape[0], start + ctx.chunk_size))
            p = _chunk_logits(h[rows], w, ctx.temperature).sub_(lse[rows, None]).exp_()  # [C, v]
            t = target[rows]
            here = (t >= 0).nonzero().squeeze(1)
            p[here, t[here]] -= 1.0
            g = p.mul_(scale[rows, None]).to(h.dtype)  # [C, v]
            if need_h:
                grad_h[rows] = g @ w
            if need_w:
                grad_w += (g.t() @ h[rows]).to(grad_w.dtype)
        return grad_h, None if grad_w is None else grad_w.to(w.dtype), None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         num_tokens: int, temperature: float = 1.0, chunk_size: int = 4096,
                         tp_group: Optional[dist.ProcessGroup] = None, sequence_parallel: bool = False,
                         with_max_prob: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token cross entropy of ``hidden @ weight^T / temperature`` without keeping the logits.

    hidden ``[s, b, h]`` (``[s/tp, b, h]`` under sequence parallelism: gathered here, as the
    output layer would), weight ``[V/tp, h]`` (this rank's vocabulary rows), labels ``[b, s]``
    (global ids < ``num_tokens``). Returns (ce ``[b, s]``, the detached max softmax probability
    ``[b, s]`` if ``with_max_prob`` else None), replicated over the TP group.
    """
    if chunk_size < 1:
        raise ValueError(f"--cross-entropy-chunk-size must be positive here, got {chunk_size}")
    tp_rank, tp_size = _tp(tp_group)
    group = tp_group if tp_size > 1 else None
    if tp_size > 1 and sequence_parallel:
        hidden = tensor_parallel.gather_from_sequence_parallel_region(
            hidden, tensor_parallel_output_grad=True, group=tp_group)
    elif tp_size > 1:  # dL/dh is a sum over the ranks' vocabulary shards
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    if torch.is_autocast_enabled(hidden.device.type):  # the matmuls run as autocast would run them
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    s, b, width = hidden.shape
    local_vocab = weight.shape[0]
    real = real_columns(num_tokens, local_vocab, tp_rank)
    w_real = weight if real == local_vocab else weight[:real]  # [v, h]
    target = labels.transpose(0, 1).reshape(-1) - tp_rank * local_vocab  # [s*b]
    target = torch.where((target >= 0) & (target < w_real.shape[0]), target, -1)
    with torch.autocast(hidden.device.type, enabled=False):
        ce, pmax = _LinearCrossEntropy.apply(hidden.reshape(s * b, width), w_real, target,
                                             float(temperature), int(chunk_size), group)
    ce = ce.view(s, b).transpose(0, 1)  # [b, s]
    return ce, pmax.view(s, b).transpose(0, 1) if with_max_prob else None
