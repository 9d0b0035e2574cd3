"""Fit the exits' confidence classifiers (CALM-style) on teacher-forced text.

An exit's classifier predicts, from the head's hidden state ``h`` (the input of its vocabulary
projection), whether the exit's argmax token equals the full model's: CALM's *consistency*
target. It is a logistic regression, ``p = sigmoid(h . w + b)``, fitted per exit by L-BFGS on the
mean binary cross-entropy plus ``l2 / 2 * |w|^2`` in float64 (the problem is convex, so the fit
does not depend on a learning rate or a seed). Scoring it costs ``hidden`` multiply-adds, where the
exit's projection costs ``hidden x vocab``: with confidence kind ``classifier`` a token that does
not leave never pays for the projection (model/exit_head.py, inference/early_exit.py).

    feats = collect_features(model, cfg, tokenizer, docs, window=128, max_tokens=20000)
    fits = {k: fit_logistic(*split(f, 0.1)[0], l2=1e-3) for k, f in feats.items()}
    report = evaluate(fits[8], *split(feats[8], 0.1)[1])   # accuracy, AUC, positives on held-out

tools/fit_exit_classifier.py runs this and writes the classifiers into a checkpoint
(checkpoint/exits.add_classifiers); tests/unit/test_exit_classifier.py checks the fit and the
decisions against independent computations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from megatron.early_exit.inference.teacher_forced import forward_windows

__all__ = ["Features", "collect_features", "split", "fit_logistic", "evaluate", "auc"]


@dataclass
class Features:
    states: torch.Tensor  # [N, h] float64: the exit head's projection input per position
    agree: torch.Tensor  # [N] bool: the exit's argmax == the final head's argmax


def collect_features(model, cfg, tokenizer, docs, window: int, max_tokens: int) -> Dict[int, Features]:
    """Per exit layer, the head states and consistency labels of every position (in order)."""
    n_tok = cfg.model.num_tokens
    layers = list(cfg.exits.exit_layer_nums)
    states = {k: [] for k in layers}
    agree = {k: [] for k in layers}
    for out, _ in forward_windows(model, tokenizer, docs, window, max_tokens, exit_states=True):
        final = out.final_logits[:, 0, :n_tok].argmax(dim=-1)  # [s]
        for k in layers:
            states[k].append(out.exit_states[k][:, 0].double())  # [s, h]
            agree[k].append(out.exit_logits[k][:, 0, :n_tok].argmax(dim=-1) == final)
    return {k: Features(torch.cat(states[k]), torch.cat(agree[k])) for k in layers}


def split(f: Features, valid_fraction: float) -> Tuple[Tuple[torch.Tensor, torch.Tensor],
                                                       Tuple[torch.Tensor, torch.Tensor]]:
    """((train states, labels), (valid states, labels)): the last ``valid_fraction`` of the
    positions (later documents) are held out."""
    n = f.states.shape[0]
    cut = n - int(round(n * valid_fraction))
    return (f.states[:cut], f.agree[:cut]), (f.states[cut:], f.agree[cut:])


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3,
                 max_iter: int = 200) -> Tuple[torch.Tensor, float]:
    """(w [h], b) minimising mean BCE(sigmoid(x w + b), y) + l2/2 |w|^2; x [N, h], y [N] bool."""
    if x.shape[0] == 0:
        raise ValueError("--max-tokens: no positions to fit the classifier on")
    x = x.double()
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-12)  # standardise: a well-conditioned problem
    z = (x - mean) / scale
    target = y.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                            tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

    def loss_fn():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, target)
        loss = loss + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(loss_fn)
    w_raw = (w.detach() / scale)  # back to the raw states: z w = x (w / scale) - mean (w / scale)
    return w_raw, float(b.detach() - (mean * w_raw).sum())


def auc(score: torch.Tensor, y: torch.Tensor):
    """Area under the ROC curve (the probability that a random positive outranks a random
    negative, ties counted half); None when a class is empty."""
    pos, neg = score[y], score[~y]
    if pos.numel() == 0 or neg.numel() == 0:
        return None
    _, inverse = torch.unique(score, return_inverse=True)  # sorted distinct values
    counts = torch.bincount(inverse).double()
    mean_rank = counts.cumsum(0) - (counts - 1) / 2  # 1-based ranks, ties averaged
    ranks = mean_rank[inverse]
    n_pos, n_neg = pos.numel(), neg.numel()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate(fit: Tuple[torch.Tensor, float], x: torch.Tensor, y: torch.Tensor) -> dict:
    """Accuracy (score >= 0.5), AUC, share of positives and mean score of ``fit`` on (x, y)."""
    w, b = fit
    score = torch.sigmoid(x.double() @ w + b)
    return {"positions": int(y.numel()), "positives": float(y.double().mean()) if y.numel() else 0.0,
            "accuracy": float(((score >= 0.5) == y).double().mean()) if y.numel() else 0.0,
            "auc": auc(score, y), "mean_score": float(score.mean()) if y.numel() else 0.0}
