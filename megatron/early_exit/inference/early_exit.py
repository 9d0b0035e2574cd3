"""One engine pass through a single-stage (PP=1) early-exit model, with exits and KV recompute.

Every pass takes each participating row's *newest* token (its id is known, it has no KV yet)
from the embedding down to the first exit that fires or to the final head. Tokens that exited
in earlier passes have no KV in the layers below their exit; they are *pending*: a row keeps,
for positions ``full .. newest-1``, the *depth* each reached (layers computed, non-increasing
along positions) and the hidden state at that depth (in a small ring buffer, ``store``). A
pending token joins the pass at its own depth, so the pass carries at layer ``j`` exactly the
positions whose KV layer ``j`` lacks: every layer's cache stays a prefix of the row and, after
a pass that reaches the final head, equals a fresh prefill over the same ids (DESIGN §5).

Exit rule (:class:`ExitPoint`): the exit after layer ``k`` (post-exit: depth ``k``;
``--pre-exit``: depth ``k-1``) computes the confidence c of the newest token (max softmax
probability of its logits over the full vocabulary, or the top-1 minus top-2 margin) and the
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

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron.early_exit.inference.kv_cache import KVCache, PassLayout, make_layout

__all__ = ["ExitPoint", "RowState", "PassResult", "DepthRunner", "exit_depth"]


def exit_depth(cfg, layer: int) -> int:
    """Layers computed before the exit at ``layer`` reads the hidden state."""
    return layer - 1 if cfg.exits.pre_exit else layer


@dataclass(frozen=True)
class ExitPoint:
    depth: int  # see exit_depth
    layer: int  # the exit's layer number
    threshold: Optional[float]  # exit when confidence >= threshold (< 1); None: block KV only
    force: bool = False  # every non-capped row exits here (self-speculative drafting)


@dataclass
class RowState:
    """Host-side depth bookkeeping of one row."""

    newest: int  # position of the newest token
    full: int = 0  # positions [0, full) have KV in every layer
    pend: List[int] = field(default_factory=list)  # depths of positions full..newest-1

    def joins(self) -> Dict[int, int]:
        """depth -> first pending position at that depth (where it joins a pass)."""
        out: Dict[int, int] = {}
        for i, d in enumerate(self.pend):
            out.setdefault(d, self.full + i)
        return out

    def advance(self, depth: int, num_layers: int) -> None:
        """The pass took the newest token (and every pending one below it) to ``depth``."""
        if depth >= num_layers:
            self.full, self.pend = self.newest + 1, []
        else:
            self.pend = [max(p, depth) for p in self.pend] + [depth]

    def rollback(self, length: int) -> None:
        """Keep positions [0, length) (all at full depth); ``length`` becomes the newest."""
        assert not self.pend and self.full >= length
        self.full, self.newest = length, length


@dataclass
class PassResult:
    logits: torch.Tensor  # [b_u, V] next-token logits of the head each row left by
    confidence: torch.Tensor  # [b_u] confidence of that head
    exit_layer: List[int]  # per row: exit layer number, or num_layers for the final head
    final_all: Optional[torch.Tensor] = None  # [s, b_f, V] final logits of every slot
    final_layout: Optional[PassLayout] = None  # layout of final_all (rows reaching the end)


class DepthRunner:
    """Runs passes of one EarlyExitGPTModel stage holding every layer (PP=1)."""

    def __init__(self, model, cfg, cache: KVCache, store_slots: int, confidence: str = "max_prob"):
        assert confidence in ("max_prob", "margin"), confidence
        self.model, self.cfg, self.cache = model, cfg, cache
        self.num_layers = cfg.model.num_layers
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
        newest = [states[r].newest for r in rows]
        pos = torch.tensor(newest, dtype=torch.int64, device=self.device)
        x = self.model.embed(token_ids.view(-1, 1), pos.view(-1, 1))  # [1, b_u, h]
        lay = self._layout(rows, newest, [n + 1 for n in newest])
        return self._descend(rows, states, x, lay, exits, set(capped), all_final)

    def prefill(self, rows: Sequence[int], states: Dict[int, RowState],
                prompts: Sequence[Sequence[int]], exits: Sequence[ExitPoint] = ()) -> PassResult:
        """Whole prompts through every layer (exits only keep their block KV)."""
        lens = [len(p) for p in prompts]
        s = max(lens)
        ids = torch.zeros(len(rows), s, dtype=torch.int64)
        for i, p in enumerate(prompts):  # left padding: the last prompt token is slot -1
            ids[i, s - len(p):] = torch.tensor(p, dtype=torch.int64)
        ids = ids.to(self.device)  # [b, s]
        offs = torch.tensor([s - n for n in lens], device=self.device)
        pos = (torch.arange(s, device=self.device)[None, :] - offs[:, None]).clamp_min(0)  # [b, s]
        x = self.model.embed(ids, pos)  # [s, b, h]
        lay = self._layout(rows, [0] * len(rows), lens)
        block_only = [ExitPoint(e.depth, e.layer, None) for e in exits]
        return self._descend(rows, states, x, lay, block_only, set(rows), False)

    # ------------------------------------------------------------------ the pass
    def _descend(self, rows, states, x, lay, exits, capped, all_final) -> PassResult:
        L = self.num_layers
        out = _Collector(rows, L)
        joins = {r: states[r].joins() for r in rows}
        by_depth: Dict[int, List[ExitPoint]] = {}
        for e in exits:
            assert e.threshold is None or e.threshold < 1.0, "tau >= 1 must never exit"
            by_depth.setdefault(e.depth, []).append(e)
        for d in range(L + 1):
            for ep in by_depth.get(d, ()):
                x, lay = self._exit_point(ep, x, lay, capped, out, d)
                if lay is None:
                    break
            if lay is None or d == L:
                break
            x, lay = self._join(d, x, lay, joins)
            self.cache.layout = lay
            x = self.model.run_layer(d, x, self._rotary(lay))  # [s, b_a, h]
            self.token_layers += sum(lay.counts)
        rows_left = [] if lay is None else lay.rows_list
        idx = [i for i, r in enumerate(rows_left) if r not in out.decided]
        if idx or (all_final and rows_left):
            src = x if all_final else x[-1:]
            logits = self._gather(self.model.final_logits(src))  # [s or 1, b_a, V]
            if idx:
                last = logits[-1, idx]  # [n, V]
                out.record(lay.rows_list, idx, last, self.confidence(last), L, {})
            if all_final:
                out.final_all, out.final_layout = logits, lay
        for r in rows:
            states[r].advance(out.depth[r], L)
        return out.result()

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
        logits = self._gather(self.model.exit_logits(ep.layer, src, rotary))[-1]  # [b_a, V]
        conf = self.confidence(logits)  # [b_a]
        if ep.force:
            fired = open_idx
        else:
            fire = (conf >= ep.threshold).tolist()  # the exit decision needs the host
            fired = [i for i in open_idx if fire[i]]
        if not fired:
            return x, lay
        # A capped row takes the exit's token but goes on to full depth (fills its pending KV).
        go = [i for i in fired if lay.rows_list[i] not in capped]
        out.record(lay.rows_list, fired, logits[fired], conf[fired], ep.layer,
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

    def _gather(self, logits: torch.Tensor) -> torch.Tensor:  # [.., V/tp] -> [.., V]
        return gather_from_tensor_model_parallel_region(logits)

    def confidence(self, logits: torch.Tensor) -> torch.Tensor:  # [b, V] -> [b]
        dtype = torch.promote_types(logits.dtype, torch.float32)
        probs = torch.softmax(logits.to(dtype), dim=-1)
        if self.confidence_kind == "margin":
            top = probs.topk(2, dim=-1).values
            return top[:, 0] - top[:, 1]
        return probs.amax(dim=-1)


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
