"""Lossless self-speculative decoding (LayerSkip-style) with a trained exit as the drafter.

One cycle per engine step, batched over the live rows:

1. Draft: each row runs its newest token through layers ``1..d_e`` only (``d_e`` = depth of
   the drafting exit ``e``) and takes a draft token from exit ``e``; repeat up to ``k`` times
   (fewer when a draft's confidence < ``draft_threshold``, or near the token limit). Drafted
   tokens stay *pending* at depth ``d_e`` with their hidden states cached there (early_exit.py).
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

from typing import Dict, List

import torch

from megatron.early_exit.inference.early_exit import ExitPoint, exit_depth
from megatron.early_exit.inference.sampling import (processed_probs, speculative_accept,
                                                    speculative_accept_greedy)

__all__ = ["speculative_step"]


def speculative_step(sess) -> Dict[int, List[int]]:
    """One draft-verify-accept cycle of every live row of ``sess`` (an engine Session)."""
    mode, cfg = sess.mode, sess.cfg
    rows = list(sess.live)
    start = {r: sess.states[r].newest for r in rows}
    drafts, confs, probs = _draft(sess, rows)
    block = sess.engine.model.exits[str(mode.exit_layer)].block is not None
    keep_block = [ExitPoint(exit_depth(cfg, mode.exit_layer), mode.exit_layer, None)] if block else []
    res = sess.runner.run(rows, sess.states, sess.token_ids(rows), keep_block, all_final=True)
    sess.stats["passes"] += 1
    m = [len(drafts[r]) for r in rows]
    target = _per_row_slots(res.final_all, res.final_layout.s, m)  # [b, k+1, V]
    n_acc, nxt = _accept(sess, rows, drafts, probs, target, m)
    fin_conf = torch.softmax(target.float(), dim=-1).amax(-1)  # [b, k+1]
    fin_conf = fin_conf.gather(1, n_acc[:, None]).squeeze(1)
    n_acc, nxt, fin_conf = n_acc.tolist(), nxt.tolist(), fin_conf.tolist()
    lengths = [start[r] + n + 1 for r, n in zip(rows, n_acc)]
    sess.cache.truncate(rows, lengths)
    new = {}
    L = cfg.model.num_layers
    for i, r in enumerate(rows):
        n = n_acc[i]
        sess.states[r].rollback(lengths[i])
        sess.last[r] = nxt[i]
        sess.stats["drafted"] += m[i]
        sess.stats["accepted"] += n
        new[r] = sess.emit(r, drafts[r][:n] + [nxt[i]], [mode.exit_layer] * n + [L],
                           confs[r][:n] + [fin_conf[i]])
    return new


def _draft(sess, rows):
    """Draft up to k tokens per row; returns per-row tokens, confidences, probs ([V] each)."""
    mode = sess.mode
    ep = [ExitPoint(exit_depth(sess.cfg, mode.exit_layer), mode.exit_layer, None, force=True)]
    limit = {r: min(mode.num_draft, sess.remaining(r) - 1) for r in rows}
    drafts = {r: [] for r in rows}
    confs = {r: [] for r in rows}
    probs = {r: [] for r in rows}
    active = [r for r in rows if limit[r] > 0]
    while active:
        res = sess.runner.run(active, sess.states, sess.token_ids(active), ep)
        sess.stats["passes"] += 1
        tok, q = sess.draw(res.logits, active)  # [b], [b, V] or None
        tok_l, conf_l = tok.tolist(), res.confidence.float().tolist()
        still = []
        for i, r in enumerate(active):
            sess.states[r].newest += 1
            sess.last[r] = tok_l[i]
            drafts[r].append(tok_l[i])
            confs[r].append(conf_l[i])
            if q is not None:
                probs[r].append(q[i])
            if len(drafts[r]) < limit[r] and conf_l[i] >= mode.draft_threshold:
                still.append(r)
        active = still
    return drafts, confs, probs


def _per_row_slots(final_all: torch.Tensor, s: int, m: List[int]) -> torch.Tensor:
    """Final logits [s, b, V] (end-aligned) -> [b, k+1, V]: row i's last m_i + 1 slots first."""
    k = max(m)
    dev = final_all.device
    m_t = torch.tensor(m, dtype=torch.int64, device=dev)
    idx = (s - (m_t[:, None] + 1) + torch.arange(k + 1, device=dev)[None, :]).clamp(max=s - 1)
    cols = torch.arange(len(m), device=dev)[:, None].expand_as(idx)
    return final_all[idx, cols]  # [b, k+1, V]


def _accept(sess, rows, drafts, probs, target, m):
    """-> accepted drafts [b] and the next token [b] per row."""
    b, k1, V = target.shape
    dev = target.device
    draft_t = torch.zeros(b, k1 - 1, dtype=torch.int64, device=dev)
    for i, r in enumerate(rows):
        if drafts[r]:
            draft_t[i, : len(drafts[r])] = torch.tensor(drafts[r], dtype=torch.int64, device=dev)
    lengths = torch.tensor(m, dtype=torch.int64, device=dev)
    if sess.all_greedy(rows):
        return speculative_accept_greedy(draft_t, target, lengths)
    p = processed_probs(target.reshape(b * k1, V), sess.row_params(rows, repeat=k1))
    q = torch.zeros(b, k1 - 1, V, dtype=p.dtype, device=dev)
    for i, r in enumerate(rows):
        if probs[r]:
            q[i, : len(probs[r])] = torch.stack(probs[r]).to(p.dtype)
    return speculative_accept(draft_t, q, p.view(b, k1, V), sess.generator, lengths)
