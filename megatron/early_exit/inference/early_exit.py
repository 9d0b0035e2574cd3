"""The eager runner: engine passes through an early-exit model's layers, with exits and KV recompute.

Every pass takes each participating row's *newest* token (its id is known, it has no KV yet)
from the embedding down to the first exit that fires or to the final head. Tokens that exited
in earlier passes have no KV in the layers below their exit; they are *pending*: a row keeps,
for positions ``full .. newest-1``, the *depth* each reached (layers computed, non-increasing
along positions) and the hidden state at that depth (in a small ring buffer, ``store``). A
pending token joins the pass at its own depth, so the pass carries at layer ``j`` exactly the
positions whose KV layer ``j`` lacks: every layer's cache stays a prefix of the row and, after
a pass that reaches the final head, equals a fresh prefill over the same ids
(tests/unit/test_engine_kv_cache.py).

Exit rule (:class:`ExitPoint`): the exit after layer ``k`` (post-exit: depth ``k``;
``--pre-exit``: depth ``k-1``) computes the confidence c of the newest token (max softmax
probability of its logits over the tokenizer's vocabulary, or the top-1 minus top-2 margin;
exit_points.py; or the exit's classifier score, before the projection, which then runs for the
leaving rows only) and the
row leaves the pass when ``c >= threshold``; callers never pass a threshold >= 1, so tau = 1.0
never exits. A row in ``capped`` (too many pending tokens) still takes its token from the first
exit that fires (outputs do not depend on the cap) but stays in the pass to full depth, which
fills the deep KV of all its pending tokens. An exit with ``threshold=None`` only runs its exit
block, whose own KV cache must see every token that reaches that depth.

Rows that exit leave the deeper layers (the pass continues on the remaining rows only).
In-flight tensors are end-aligned (see kv_cache.py): the newest token is always slot -1.

    runner = DepthRunner(model, cfg, cache, store_slots=17)
    res = runner.run(rows, states, token_ids, exits=[ExitPoint(2, 2, 0.8)])
    res.logits, res.confidence, res.exit_layer          # next-token logits per row
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Set

import torch
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron.early_exit.inference.exit_points import (CONFIDENCE_KINDS, ExitPoint, block_only,
                                                       confidence, token_logits)
from megatron.early_exit.inference.kv_cache import KVCache, PassLayout, make_layout
from megatron.early_exit.inference.runner import PassResult, RowState

__all__ = ["DepthRunner"]


class DepthRunner:
    """The eager runner: passes through the layers of one EarlyExitGPTModel stage.

    At PP = 1 the stage holds every layer and ``run`` / ``prefill`` are the whole passes. At
    PP > 1 the pipeline runner calls ``stage_pass`` for this stage's depths only
    (``lo .. hi``), with every row capped (every token crosses every stage)."""

    supports_all_final = True

    def __init__(self, model, cfg, cache: KVCache, store_slots: int, confidence: str = "max_prob"):
        assert confidence in CONFIDENCE_KINDS, confidence
        self.model, self.cfg, self.cache = model, cfg, cache
        self.num_layers = cfg.model.num_layers
        self.lo = model.placement.layers[0] - 1  # depth at which this stage starts
        self.hi = self.lo + len(model.placement.layers)
        self.device = cache.device
        self.confidence_kind = confidence
        self.slots = store_slots
        dtype = next(model.parameters()).dtype
        # Hidden states of pending tokens: slot pos % slots, last slot = scratch.
        self.store = torch.zeros(store_slots + 1, cache.batch, cfg.model.hidden_size,
                                 dtype=dtype, device=self.device)  # [R + 1, B, h]
        self.token_layers = 0  # tokens x layers computed (recompute included), for stats

    # ------------------------------------------------------------------ entry points
    def run(self, rows: Sequence[int], states: Dict[int, RowState], token_ids: torch.Tensor,
            exits: Sequence[ExitPoint] = (), capped: Sequence[int] = (),
            all_final: bool = False) -> PassResult:
        """One decode pass; token_ids [b_u] are the rows' newest tokens."""
        x, lay = self.embed_newest(rows, states, token_ids)
        out, _, _ = self.stage_pass(rows, states, x, lay, exits, set(capped), all_final)
        return self._finish(rows, states, out)

    def prefill(self, rows: Sequence[int], states: Dict[int, RowState],
                prompts: Sequence[Sequence[int]], exits: Sequence[ExitPoint] = ()) -> PassResult:
        """Whole prompts through every layer (exits only keep their block KV)."""
        x, lay = self.embed_prompts(rows, prompts)
        out, _, _ = self.stage_pass(rows, states, x, lay, block_only(exits), set(rows), False)
        return self._finish(rows, states, out)

    def embed_newest(self, rows, states, token_ids):
        """x [1, b_u, h] of the rows' newest tokens and the pass layout."""
        newest = [states[r].newest for r in rows]
        pos = torch.tensor(newest, dtype=torch.int64, device=self.device)
        x = self.model.embed(token_ids.view(-1, 1), pos.view(-1, 1))  # [1, b_u, h]
        return x, self._layout(rows, newest, [n + 1 for n in newest])

    def embed_prompts(self, rows, prompts):
        """x [s, b, h] of whole prompts (left-padded: the last prompt token is slot -1)."""
        lens = [len(p) for p in prompts]
        s = max(lens)
        ids = torch.zeros(len(rows), s, dtype=torch.int64)
        for i, p in enumerate(prompts):
            ids[i, s - len(p):] = torch.tensor(p, dtype=torch.int64)
        ids = ids.to(self.device)  # [b, s]
        offs = torch.tensor([s - n for n in lens], device=self.device)
        pos = (torch.arange(s, device=self.device)[None, :] - offs[:, None]).clamp_min(0)  # [b, s]
        return self.model.embed(ids, pos), self._layout(rows, [0] * len(rows), lens)

    def _finish(self, rows, states, out: "_Collector") -> PassResult:
        for r in rows:
            states[r].advance(out.depth[r], self.num_layers)
        return out.result()

    # ------------------------------------------------------------------ the pass
    def stage_pass(self, rows, states, x, lay, exits, capped: Set[int], all_final: bool,
                   decided: Sequence[int] = ()):
        """This stage's depths ``lo..hi`` -> (collector, x, layout) after the stage (x None when
        every row left). Rows in ``decided`` already have their token (an earlier stage)."""
        out = _Collector(rows, self.num_layers)
        out.decided.update(decided)
        joins = {r: states[r].joins() for r in rows} if states is not None else {}
        by_depth: Dict[int, List[ExitPoint]] = {}
        for e in exits:
            assert e.threshold is None or e.threshold < 1.0, "tau >= 1 must never exit"
            if str(e.layer) in self.model.exits:
                by_depth.setdefault(e.depth, []).append(e)
        for d in range(self.lo, self.hi + 1):
            for ep in by_depth.get(d, ()):
                x, lay = self._exit_point(ep, x, lay, capped, out, d)
                if lay is None:
                    return out, None, None
            if d == self.hi:
                break
            if joins:
                x, lay = self._join(d, x, lay, joins)
            self.cache.layout = lay
            x = self.model.run_layer(d - self.lo, x, self._rotary(lay))  # [s, b_a, h]
            self.token_layers += sum(lay.counts)
        if self.model.post_process:
            self._final_head(x, lay, out, all_final)
        return out, x, lay

    def _final_head(self, x, lay: PassLayout, out: "_Collector", all_final: bool) -> None:
        idx = [i for i, r in enumerate(lay.rows_list) if r not in out.decided]
        if not (idx or all_final):
            return
        src = x if all_final else x[-1:]
        logits = self._gather(self.model.final_logits(src))  # [s or 1, b_a, V]
        if idx:
            last = logits[-1, idx]  # [n, V]
            out.record(lay.rows_list, idx, last, self.confidence(last), self.num_layers, {})
        if all_final:
            out.final_all, out.final_layout = logits, lay

    def _exit_point(self, ep: ExitPoint, x, lay: PassLayout, capped, out: "_Collector", depth: int):
        head = self.model.exits[str(ep.layer)]
        self.cache.layout = lay
        rotary = self._rotary(lay)
        open_idx = [i for i, r in enumerate(lay.rows_list) if r not in out.decided]
        if (ep.threshold is None and not ep.force) or not open_idx:
            if head.block is not None:  # keep the exit block's KV exact
                head.block(x, attention_mask=None, rotary_pos_emb=rotary)
            return x, lay
        src = x if head.block is not None else x[-1:]
        fired, logits, conf = self._decide(ep, head, src, rotary, open_idx)
        if not fired:
            return x, lay
        # A capped row takes the exit's token but goes on to full depth (fills its pending KV).
        go = [i for i in fired if lay.rows_list[i] not in capped]
        out.record(lay.rows_list, fired, logits, conf, ep.layer,
                   {lay.rows_list[i]: depth for i in go})
        if not go:
            return x, lay
        self._save(x, lay, go)
        gone = set(go)
        keep = [i for i in range(len(lay.rows_list)) if i not in gone]
        if not keep:
            return None, None
        new = self._layout([lay.rows_list[i] for i in keep], [lay.starts[i] for i in keep],
                           [lay.ends[i] for i in keep])
        keep_t = torch.tensor(keep, dtype=torch.int64, device=self.device)
        return x[lay.s - new.s:].index_select(1, keep_t), new

    def _decide(self, ep: ExitPoint, head, src, rotary, open_idx: List[int]):
        """(slots that take their token here, their logits [n, V], their confidences [n]) of the
        newest tokens of ``src`` [s, b_a, h] at exit ``ep``. Kind ``classifier`` scores the
        head's hidden state first and projects only the rows that leave."""
        if self.confidence_kind == "classifier" and not ep.force:
            h = head.transform(src, rotary)[-1:]  # [1, b_a, h] (a block head sees every slot)
            score = head.score(h[0])  # [b_a]
            fire = (score >= ep.threshold).tolist()  # the exit decision needs the host
            fired = [i for i in open_idx if fire[i]]
            if not fired:
                return [], None, None
            idx = torch.tensor(fired, dtype=torch.int64, device=self.device)
            logits = self._gather(self.model.exit_project(ep.layer, h.index_select(1, idx)))[0]
            return fired, logits, score.index_select(0, idx)
        logits = self._gather(self.model.exit_logits(ep.layer, src, rotary))[-1]  # [b_a, V]
        conf = self.confidence(logits)  # [b_a]
        if ep.force:
            fired = open_idx
        else:
            fire = (conf >= ep.threshold).tolist()
            fired = [i for i in open_idx if fire[i]]
        return fired, logits[fired], conf[fired]

    def _join(self, d: int, x, lay: PassLayout, joins):
        """Add the pending tokens at depth d (their hidden states come from the store)."""
        starts = [joins[r].get(d, a) for r, a in zip(lay.rows_list, lay.starts)]
        if starts == lay.starts:
            return x, lay
        self._save(x, lay, list(range(len(lay.rows_list))))
        new = self._layout(lay.rows_list, starts, lay.ends)
        return self._load(new), new

    # ------------------------------------------------------------------ helpers
    def _layout(self, rows, starts, ends) -> PassLayout:
        return make_layout(rows, starts, ends, self.cache.max_len, self.device, self.cache.batch)

    def _rotary(self, lay: PassLayout):
        if lay.rotary is None:
            lay.rotary = self.model.rotary(lay.pos)  # [s, b_a, 1, hn] or None
        return lay.rotary

    def _slots(self, lay: PassLayout) -> torch.Tensor:  # [s, b_a] store slot per in-flight slot
        return torch.where(lay.valid, lay.pos % self.slots, torch.full_like(lay.pos, self.slots))

    def _save(self, x, lay: PassLayout, idx: List[int]) -> None:
        i = torch.tensor(idx, dtype=torch.int64, device=self.device)
        slots = self._slots(lay).index_select(1, i)  # [s, n]
        self.store[slots, lay.rows[i][None, :].expand_as(slots)] = x.index_select(1, i)

    def _load(self, lay: PassLayout) -> torch.Tensor:
        slots = self._slots(lay)
        return self.store[slots, lay.rows[None, :].expand_as(slots)]  # [s, b_a, h]

    def _gather(self, logits: torch.Tensor) -> torch.Tensor:  # [.., V/tp] -> [.., V_tokens]
        return token_logits(gather_from_tensor_model_parallel_region(logits), self.cfg)

    def confidence(self, logits: torch.Tensor) -> torch.Tensor:  # [b, V] -> [b]
        return confidence(logits, self.confidence_kind)


class _Collector:
    """Gathers each row's next-token logits as rows leave the pass at different depths."""

    def __init__(self, rows: Sequence[int], num_layers: int):
        self.u = {r: i for i, r in enumerate(rows)}
        self.logits: Optional[torch.Tensor] = None
        self.conf: Optional[torch.Tensor] = None
        self.exit_layer = [num_layers] * len(rows)
        self.depth: Dict[int, int] = {r: num_layers for r in rows}
        self.decided = set()  # rows whose next token is already chosen
        self.final_all = None
        self.final_layout = None

    def record(self, lay_rows, idx, logits, conf, layer: int, depths: Dict[int, int]) -> None:
        """Rows lay_rows[i], i in idx, take their token from ``layer``; ``depths`` holds the
        rows that leave the pass there (the others go on to full depth)."""
        if self.logits is None:
            self.logits = logits.new_empty(len(self.u), logits.shape[-1])  # [b_u, V]
            self.conf = conf.new_empty(len(self.u))
        u = [self.u[lay_rows[i]] for i in idx]
        u_t = torch.tensor(u, dtype=torch.int64, device=logits.device)
        self.logits.index_copy_(0, u_t, logits)
        self.conf.index_copy_(0, u_t, conf)
        for j, i in zip(u, idx):
            self.exit_layer[j] = layer
            self.decided.add(lay_rows[i])
        self.depth.update(depths)

    def result(self) -> PassResult:
        return PassResult(self.logits, self.conf, self.exit_layer, self.final_all,
                          self.final_layout)
