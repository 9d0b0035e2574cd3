"""Lossless self-speculative decoding (LayerSkip-style) with a trained exit as the drafter.

One cycle per engine step, batched over the live rows:

1. Draft: each row runs its newest token through layers ``1..d_e`` only (``d_e`` = depth of
   the drafting exit ``e``) and takes a draft token from exit ``e``; repeat up to ``k`` times
   (fewer near the token limit, or when a draft's confidence < ``draft_threshold``: that draft
   is still verified, drafting stops after it). Drafted tokens stay *pending* at depth
   ``d_e`` with their hidden states cached there (early_exit.py).
2. Verify: one pass over the last draft from layer 1 while every pending draft joins at layer
   ``d_e + 1`` from its cached hidden state; the final head's logits at the ``m + 1`` positions
   are the target distributions of the ``m`` drafts plus a bonus position.
3. Accept: greedy rows keep the longest prefix equal to the target argmax plus the target's
   token; sampled rows use rejection sampling (``sampling.speculative_accept``), so the output
   has exactly the full model's distribution. Rejected positions are rolled back in every KV
   cache (``KVCache.truncate``), including the drafting exit's block cache.

The verify pass also runs the drafting exit's block (if any) on the last draft, so that block's
KV cache stays exact for the next cycle.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from megatron.early_exit.inference.exit_points import ExitPoint, confidence, exit_depth
from megatron.early_exit.inference.sampling import (processed_probs, speculative_accept,
                                                    speculative_accept_greedy)

__all__ = ["speculative_step"]


def speculative_step(sess, rows: List[int]) -> Dict[int, List[int]]:
    """One draft-verify-accept cycle of ``rows`` (live rows of ``sess``, an engine Session)."""
    mode, cfg = sess.mode, sess.cfg
    rows = list(rows)
    start = [sess.states[r].newest for r in rows]
    drafts = _draft(sess, rows)
    block = sess.engine.model.exits[str(mode.exit_layer)].block is not None
    depth = exit_depth(cfg, mode.exit_layer)
    keep_block = [ExitPoint(depth, mode.exit_layer, None)] if block else []
    res = sess.runner.run(rows, sess.states, sess.token_ids(rows), keep_block, all_final=True)
    sess.stats["passes"] += 1
    target = _per_row_slots(res.final_all, res.final_layout.s, drafts.lengths)  # [b, k+1, V]
    n_acc, nxt = _accept(sess, rows, drafts, target)  # [b], [b]
    picked = target.gather(1, n_acc[:, None, None].expand(-1, 1, target.shape[-1]))[:, 0]  # [b, V]
    fin_conf = confidence(picked, sess.confidence_kind)  # [b]
    n_acc, nxt, fin_conf = n_acc.tolist(), nxt.tolist(), fin_conf.tolist()
    tok_l, conf_l = drafts.tokens.tolist(), drafts.conf.tolist()
    lengths = [p + n + 1 for p, n in zip(start, n_acc)]
    sess.cache.truncate(rows, lengths)
    new, L, e = {}, cfg.model.num_layers, mode.exit_layer
    for i, r in enumerate(rows):
        n = n_acc[i]
        sess.states[r].rollback(lengths[i])
        sess.last[r] = nxt[i]
        sess.stats["drafted"] += drafts.lengths[i]
        sess.stats["accepted"] += n
        new[r] = sess.emit(r, tok_l[i][:n] + [nxt[i]], [e] * n + [L], conf_l[i][:n] + [fin_conf[i]])
    sess.drop_finished()
    return new


class _Drafts:
    """Draft tokens [b, k], their confidences [b, k] and sampled distributions [b, k, V]."""

    def __init__(self, b: int, k: int, device):
        self.tokens = torch.zeros(b, k, dtype=torch.int64, device=device)
        self.conf = torch.zeros(b, k, dtype=torch.float32, device=device)
        self.probs: Optional[torch.Tensor] = None  # allocated on the first sampled draft
        self.lengths = [0] * b

    def add(self, u: List[int], j: int, tok, conf, probs) -> None:
        """Draft j (0-based) of the rows at batch indices u."""
        u_t = torch.tensor(u, dtype=torch.int64, device=tok.device)
        self.tokens[:, j].index_copy_(0, u_t, tok)
        self.conf[:, j].index_copy_(0, u_t, conf.float())
        if probs is not None:
            if self.probs is None:
                b, k = self.tokens.shape
                self.probs = probs.new_zeros(b, k, probs.shape[-1])
            self.probs[:, j].index_copy_(0, u_t, probs)
        for i in u:
            self.lengths[i] += 1


def _draft(sess, rows) -> _Drafts:
    """Draft up to k tokens per row with the drafting exit (rows stop independently)."""
    mode = sess.mode
    ep = [ExitPoint(exit_depth(sess.cfg, mode.exit_layer), mode.exit_layer, None, force=True)]
    limit = [min(mode.num_draft, sess.remaining(r) - 1) for r in rows]
    drafts = _Drafts(len(rows), max(max(limit), 0), sess.engine.device)
    active = [i for i in range(len(rows)) if limit[i] > 0]  # batch indices into rows
    j = 0
    while active:
        act_rows = [rows[i] for i in active]
        res = sess.runner.run(act_rows, sess.states, sess.token_ids(act_rows), ep)
        sess.stats["passes"] += 1
        tok, q = sess.draw(res.logits, act_rows)  # [b_a], [b_a, V] or None
        drafts.add(active, j, tok, res.confidence, q)
        tok_l, conf_l = tok.tolist(), res.confidence.tolist()
        still = []
        for a, i in enumerate(active):
            r = rows[i]
            sess.states[r].newest += 1
            sess.last[r] = tok_l[a]
            if j + 1 < limit[i] and conf_l[a] >= mode.draft_threshold:
                still.append(i)
        active, j = still, j + 1
    return drafts


def _per_row_slots(final_all: torch.Tensor, s: int, m: List[int]) -> torch.Tensor:
    """Final logits [s, b, V] (end-aligned) -> [b, k+1, V]: row i's last m_i + 1 slots first."""
    k = max(m)
    dev = final_all.device
    m_t = torch.tensor(m, dtype=torch.int64, device=dev)
    idx = (s - (m_t[:, None] + 1) + torch.arange(k + 1, device=dev)[None, :]).clamp(max=s - 1)
    cols = torch.arange(len(m), device=dev)[:, None].expand_as(idx)
    return final_all[idx, cols]  # [b, k+1, V]


def _accept(sess, rows, drafts: _Drafts, target: torch.Tensor):
    """-> accepted drafts [b] and the next token [b] per row (each row with its own
    generator, so a row's outcome does not depend on its batch-mates)."""
    b, k1, V = target.shape
    draft_t = drafts.tokens[:, : k1 - 1]  # [b, k]
    lengths = torch.tensor(drafts.lengths, dtype=torch.int64, device=target.device)
    if sess.all_greedy(rows):
        return speculative_accept_greedy(draft_t, target, lengths)
    n_acc, nxt = [], []
    for i, r in enumerate(rows):
        one = slice(i, i + 1)
        if sess.params(r).greedy:
            a, t = speculative_accept_greedy(draft_t[one], target[one], lengths[one])
        else:
            p = processed_probs(target[i], sess.params(r))  # [k+1, V]
            q = (drafts.probs[one, : k1 - 1].to(p.dtype) if drafts.probs is not None
                 else p.new_zeros(1, k1 - 1, V))  # [1, k, V]
            a, t = speculative_accept(draft_t[one], q, p[None], sess.generator(r), lengths[one])
        n_acc.append(a)
        nxt.append(t)
    return torch.cat(n_acc), torch.cat(nxt)
