"""Output projection fused with the cross entropy, in chunks of tokens: no [s, b, V/tp] logits kept.

A head's loss needs ``logits = h W^T`` ([s, b, V/tp] per TP rank) only to reduce each row to two
numbers, the log-sum-exp over the vocabulary and the label's logit, and its gradient needs only
the softmax of that row. ``linear_cross_entropy`` takes ``chunk_size`` tokens at a time: it makes
the chunk's logits, reduces them to the chunk's loss, turns the same buffer into the gradient
of the loss with respect to the logits,

    dL/dz_t = c_t (softmax(z_t) - onehot(label_t)) / T,    c_t = mask_t / sum(mask) (x max p_t)

and at once into dh (= dL/dz W) and dW (+= dL/dz^T h), then drops it. Backward only scales the
kept dh [N, h] and dW [V/tp, h] by the incoming gradient (the loss is linear in them), so the
FLOPs are those of materialised logits (three matmuls) and the extra memory of a head is one
chunk's logits plus one weight-sized gradient. ``--use-dynamic-exit-layer-weight``'s max
probability is the constant 1 / sum_j exp(z_j - max z) of the same chunk.

Under tensor parallelism each rank holds the vocabulary rows [r * V/tp, (r + 1) * V/tp); the
row max and the sums (sum of exp, label logit) are all-reduced over the TP group per chunk, as
in megatron-core's vocab-parallel cross entropy. Padded vocabulary rows (ids >= ``num_tokens``)
are left out of every softmax: each rank uses only its real rows (none of them get a gradient).

    loss = linear_cross_entropy(h, weight, labels, loss_mask, num_tokens=257, chunk_size=1024,
                                tp_group=group)   # h [s, b, h], weight [V/tp, h], labels [b, s]

Tested against a float64 full-logits cross entropy in tests/unit/test_linear_cross_entropy.py
(one rank) and tests/distributed/test_padded_vocab_layouts.py (TP=4, TP=2 in training).
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
    """(h [N, h], W_real [v, h], local target [N], coef [N]) -> sum_t c_t * ce_t.

    ``W_real`` is this rank's real vocabulary rows; ``target`` indexes them (-1: the label lives
    on another rank). c_t = coef_t, times the token's (constant) max probability if ``dynamic``.
    The gradients are made in forward, one chunk of logits at a time, and kept for backward.
    """

    @staticmethod
    def forward(ctx, h, w, target, coef, temperature, chunk_size, group, dynamic, want_h, want_w):
        loss = torch.zeros((), dtype=coef.dtype, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(w.shape, dtype=coef.dtype, device=w.device) if want_w else None
        for start in range(0, h.shape[0], chunk_size):
            rows = slice(start, min(h.shape[0], start + chunk_size))
            z = _chunk_logits(h[rows], w, temperature)  # [C, v], one buffer reused in place
            zmax = z.max(dim=-1).values if z.shape[1] else z.new_full(z.shape[:1], float("-inf"))
            if group is not None:
                dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
            t = target[rows]
            shifted = z.sub_(zmax[:, None])
            picked = torch.zeros_like(zmax)
            if z.shape[1]:
                picked = shifted.gather(1, t.clamp(min=0)[:, None]).squeeze(1) * (t >= 0)
            e = shifted.exp_()  # exp(z - max z)
            sums = torch.stack([e.sum(dim=-1), picked])  # [2, C]
            if group is not None:
                dist.all_reduce(sums, group=group)
            sum_exp, picked = sums
            c = coef[rows] / sum_exp if dynamic else coef[rows]  # max p = 1 / sum_exp
            loss += (c * (sum_exp.log() - picked)).sum()
            if want_h or want_w:  # dL/dz = c (softmax - onehot) / T
                g = e.mul_((c / (sum_exp * temperature))[:, None])
                if g.shape[1]:  # minus the label's c / T, where the label is on this rank
                    onehot = (t >= 0).to(c.dtype) * c / temperature
                    g.scatter_add_(1, t.clamp(min=0)[:, None], -onehot[:, None])
                g = g.to(h.dtype)
                if want_h:
                    grad_h[rows] = g @ w
                if want_w:
                    grad_w += (g.t() @ h[rows]).to(grad_w.dtype)
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(w.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_loss.to(grad_h.dtype if grad_h is not None else grad_w.dtype)
        return (None if grad_h is None else grad_h * scale, None if grad_w is None else grad_w * scale,
                None, None, None, None, None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         loss_mask: Optional[torch.Tensor] = None, *, num_tokens: int,
                         temperature: float = 1.0, dynamic: bool = False, chunk_size: int = 4096,
                         tp_group: Optional[dist.ProcessGroup] = None,
                         sequence_parallel: bool = False) -> torch.Tensor:
    """Masked mean over tokens of the cross entropy of ``hidden @ weight^T / temperature``
    (each token's CE times its detached max probability if ``dynamic``), no logits kept.

    hidden ``[s, b, h]`` (``[s/tp, b, h]`` under sequence parallelism: gathered here, as the
    output layer would), weight ``[V/tp, h]`` (this rank's vocabulary rows), labels and
    loss_mask ``[b, s]`` (labels: global ids < ``num_tokens``). The scalar is replicated over
    the TP group.
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
    target = torch.where((target >= 0) & (target < real), target, -1)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    mask = torch.ones(b, s, dtype=acc, device=hidden.device) if loss_mask is None else loss_mask.to(acc)
    coef = (mask / mask.sum().clamp(min=1.0)).transpose(0, 1).reshape(-1)  # [s*b]: masked mean
    grad = torch.is_grad_enabled()
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden.reshape(s * b, width), w_real, target, coef,
                                         float(temperature), int(chunk_size), group, bool(dynamic),
                                         grad and hidden.requires_grad, grad and w_real.requires_grad)
