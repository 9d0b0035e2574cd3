"""Batch-1 early exit and self-speculative decoding on static shapes: a CUDA graph per segment,
or (on CPU) the fused layer step of fused_decode.py.

The general pass (early_exit.DepthRunner) re-plans its shapes at every exit and every join of
pending tokens, so on a GPU it runs eagerly, launch-bound. With one row the plan is simple enough
to fix the shapes instead. The exits' depths cut the layers into *segments*; a decode step runs
segment after segment until an exit fires:

- every segment works on ``R`` end-aligned slots ``[R, 1, h]`` (R = the most tokens a pass can
  carry: max pending tokens, or drafts, plus the newest): slot ``R-1`` is
  the newest token (position ``n``), slot ``i`` position ``n - R + 1 + i``. A slot is *valid* when
  its position is in flight: the newest token, plus the pending tokens (exited earlier, no deep KV)
  that joined at a segment start equal to their depth, their hidden states read from the runner's
  store. Invalid slots carry position ``n`` (finite attention) and write their keys/values to the
  cache's scratch slot, so the cache sees exactly the general pass's writes;
- the segment computes its layers, then each exit at its end: the newest slot's exit logits and
  confidence into static buffers (the last segment: the final head's logits of every slot). The
  host reads the confidence (one sync per exit, as in the general pass) and either stops (the
  in-flight hidden states go to the store, the row's depth bookkeeping advances) or joins the
  pending tokens of the next depth and runs the next segment. A capped row (``max_pending``
  reached) keeps the first fired exit's token but runs to full depth, which fills every pending
  token's KV. A forced exit (self-speculative drafting) always fires; an exit without a threshold
  never does (the verify pass, which returns the final logits of every slot).

``StaticRunner`` keeps DepthRunner's contract (``run``, ``prefill`` delegated to the general
pass, ``confidence``, ``store``), so the engine's EarlyExit steps and speculative.py's draft and
verify passes use it unchanged.

Each segment is the same computation at every step, so with ``cuda_graph=True`` it is captured once
(after eager warm-up runs that rewrite the same cache slots with the same values) and replayed.
The embedding of the new token and the joins are a few eager kernels between replays.

With ``fused=True`` (eager, TP = 1, PP = 1; fast_decode="fused") a segment's layers are not
megatron-core's ``TransformerLayer`` calls but ``FusedDecoder.run_slots``: a few direct torch ops
per layer on the same weights and cache buffers. It runs only the *valid* slots, which are always
a suffix of the ``R`` slots (pending depths do not increase along positions, so the tokens in
flight at a segment are the newest ones): a pass with no pending token computes one token per
layer, as the fused full-depth step does, instead of ``R``. The exit heads and the final head
are evaluated the same way on either path (``_heads``); the final head covers the computed slots
(``final_all``'s padding slots are then stale; no caller reads them).
Exits with their own attention block (``--use-exit-block``) are not supported here (the engine
keeps the general pass for them), nor batches > 1. ``KVCache.check`` works in eager mode only
(its assertion reads the device).

    runner = StaticRunner(depth_runner, cfg, cache, exits, in_flight=17, cuda_graph=True)
    result = runner.run([0], states, token_ids, exits, capped=[])   # as DepthRunner.run

Tests: tests/unit/test_static_decode.py (CPU, eager, against the general pass),
tests/unit/test_fused_early_exit.py (fused, against no-cache references),
tests/gpu/test_gpu_decode.py (graphs).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron.early_exit.inference.early_exit import DepthRunner
from megatron.early_exit.inference.exit_points import ExitPoint, token_logits
from megatron.early_exit.inference.fused_decode import FusedDecoder, RowSlots
from megatron.early_exit.inference.runner import PassResult, RowState
from megatron.early_exit.inference.kv_cache import KVCache, PassLayout
from megatron.early_exit.inference.static_decode import capture_graph

__all__ = ["StaticRunner", "supports"]


def supports(model, exits: Sequence[ExitPoint], batch: int) -> bool:
    """Whether the static runner can serve a session with these exit points at this batch (any
    confidence kind)."""
    return batch == 1 and all(model.exits[str(e.layer)].block is None for e in exits)


class _Segment:
    def __init__(self, lo: int, hi: int, exits: List[int], first_head: int):
        self.lo, self.hi = lo, hi  # layers [lo, hi)
        self.exits = exits  # layer numbers of the exits read at depth hi
        self.first_head = first_head  # index of exits[0] in the runner's head buffers
        self.graph = None


class StaticRunner:
    """DepthRunner's decode passes for one row over fixed ``[R, 1, h]`` segment buffers."""

    def __init__(self, runner: DepthRunner, cfg, cache: KVCache, exits: Sequence[ExitPoint],
                 in_flight: int, cuda_graph: bool = False, fused: bool = False):
        """``fused``: run the segments' layers with fused_decode.FusedDecoder (eager only; raises
        NotImplementedError naming what it does not cover, e.g. TP > 1)."""
        if cuda_graph and fused:
            raise ValueError("StaticRunner: fused=True runs eagerly; it cannot be a CUDA graph")
        if cuda_graph and cache.device.type != "cuda":
            raise ValueError("a CUDA-graph early-exit step needs a CUDA device")
        self.runner, self.model, self.cfg, self.cache = runner, runner.model, cfg, cache
        self.L = cfg.model.num_layers
        self.cuda_graph = cuda_graph
        self.fused = None
        if fused:
            self.fused = FusedDecoder(runner.model, cfg, cache)
        depths = sorted({e.depth for e in exits} | {self.L})
        self.segments, lo, n_heads = [], 0, 0
        for d in depths:
            layers = sorted({e.layer for e in exits if e.depth == d})
            self.segments.append(_Segment(lo, d, layers, n_heads))
            lo, n_heads = d, n_heads + len(layers)
        R, dev = in_flight, cache.device
        self.R = R
        self.x = torch.zeros(R, 1, cfg.model.hidden_size, dtype=runner.store.dtype, device=dev)
        self.true_pos = torch.zeros(R, dtype=torch.int64, device=dev)  # [R] slot positions
        self.pos = torch.zeros(R, dtype=torch.int64, device=dev)  # [R] (padding: newest)
        self.valid = torch.zeros(R, dtype=torch.bool, device=dev)  # [R]
        self.end = torch.zeros(1, dtype=torch.int64, device=dev)
        self.start = torch.zeros(1, dtype=torch.int64, device=dev)  # first in-flight position
        self.key_pos = torch.arange(cache.max_len, device=dev)
        self.mask = torch.zeros(1, 1, R, cache.max_len, dtype=torch.bool, device=dev)
        self.write_idx = torch.zeros(R, 1, dtype=torch.int64, device=dev)
        self.layout = PassLayout(
            rows=torch.zeros(1, dtype=torch.int64, device=dev), rows_list=[0], starts=[0], ends=[1],
            s=R, pos=self.pos.view(R, 1), valid=self.valid.view(R, 1), write_idx=self.write_idx,
            mask=self.mask, start_t=self.start, end_t=self.end, full_batch=True)
        self.valid_slots: List[int] = []  # host copy of the valid slots (no device reads)
        self.logits = None  # [n_heads, V] static outputs of the exit heads, in segment order
        self.final_all = None  # [R, 1, V] final-head logits of every slot
        conf_dtype = torch.promote_types(runner.store.dtype, torch.float32)  # as runner.confidence
        self.conf = torch.zeros(n_heads + 1, dtype=conf_dtype, device=dev)  # last: final head
        # confidence "classifier": the heads' projection inputs; only a firing exit projects
        self.classify = runner.confidence_kind == "classifier"
        self.states = torch.zeros(n_heads, cfg.model.hidden_size, dtype=runner.store.dtype, device=dev)
        self.all_final = True  # the pass wants every slot's final logits (the fused path reads it)

    # ------------------------------------------------------------------ the segments
    def _run_segment(self, j: int) -> None:
        """Layers of segment j on the static slots, then its heads (what a graph captures)."""
        seg, model = self.segments[j], self.model
        self.cache.layout = self.layout
        torch.where(self.valid.view(-1, 1), self.pos.view(-1, 1),
                    torch.full_like(self.write_idx, self.cache.max_len), out=self.write_idx)
        torch.le(self.key_pos.view(1, 1, 1, -1), self.pos.view(1, 1, -1, 1), out=self.mask)
        if self.fused is not None:
            self._heads(seg, self._fused_layers(seg), None)  # no exit blocks: heads need no RoPE
            return
        rotary = model.rotary(self.pos.view(-1, 1))  # [R, 1, 1, hn] or None
        x = self.x
        for d in range(seg.lo, seg.hi):
            x = model.run_layer(d, x, rotary)
        self.x.copy_(x)
        self._heads(seg, x, rotary)

    def _fused_layers(self, seg: _Segment) -> torch.Tensor:
        """The segment's layers through the fused step on the valid slots (a suffix) only ->
        their hidden states [n, 1, h] (a view of ``self.x``, updated in place)."""
        first = self.valid_slots[0]
        if self.valid_slots != list(range(first, self.R)):
            raise AssertionError(f"in-flight slots {self.valid_slots} are not a suffix of {self.R}")
        slots = RowSlots(row=0, pos=self.pos[first:], write_idx=self.write_idx[first:, 0],
                         mask=self.mask[0, 0, first:], start=self.start, end=self.end)
        x = self.x[first:]  # [n, 1, h]
        x.copy_(self.fused.run_slots(seg.lo, seg.hi, x[:, 0], slots).unsqueeze(1))
        return x

    def _heads(self, seg: _Segment, x: torch.Tensor, rotary) -> None:
        """The exit heads at the end of ``seg`` on the newest slot of ``x [n, 1, h]`` (the last
        n slots) -> ``self.logits`` / ``self.conf``; the last segment also the final head of
        every slot of ``x`` -> ``self.final_all[-n:]`` and the newest slot's confidence."""
        model, first = self.model, seg.first_head
        for i, layer in enumerate(seg.exits):
            if self.classify:  # score the state; the projection waits for the decision
                head = model.exits[str(layer)]
                h = head.transform(x[-1:], rotary)[0]  # [1, h]
                self.states[first + i].copy_(h[0])
                self.conf[first + i].copy_(head.score(h)[0])
                continue
            logits = token_logits(gather_from_tensor_model_parallel_region(
                model.exit_logits(layer, x[-1:], rotary)), self.cfg)[-1]  # [1, V]
            if self.logits is None:
                self.logits = logits.new_zeros(self.conf.numel() - 1, logits.shape[-1])
            self.logits[first + i].copy_(logits[0])
            self.conf[first + i].copy_(self.runner.confidence(logits)[0])
        if seg.hi == self.L:
            if self.fused is not None and not self.all_final:
                x = x[-1:]  # eager: only the newest slot's logits are read
            final = token_logits(gather_from_tensor_model_parallel_region(
                model.final_logits(x)), self.cfg)  # [n, 1, V]
            if self.final_all is None:
                self.final_all = final.new_zeros(self.R, *final.shape[1:])  # [R, 1, V]
            self.final_all[self.R - final.shape[0]:].copy_(final)
            self.conf[-1].copy_(self.runner.confidence(final[-1])[0])

    def _replay(self, j: int) -> None:
        seg = self.segments[j]
        if not self.cuda_graph:
            self._run_segment(j)
            return
        if seg.graph is None:
            saved = self.x.clone()  # the segment overwrites its input slots
            seg.graph = capture_graph(lambda: self._run_segment(j), self.cache.device, warmups=2,
                                      reset=lambda: self.x.copy_(saved))
        self.cache.layout = self.layout
        seg.graph.replay()

    # ------------------------------------------------------------------ one step
    def _join(self, state: RowState, depth: int, n: int) -> None:
        """Pending positions at ``depth`` enter the slots with their stored hidden states."""
        first = state.joins().get(depth)
        if first is None:
            return
        last = state.full + len(state.pend)  # pending positions are full .. newest-1
        ps = [p for p in range(first, last) if state.pend[p - state.full] == depth]
        slots = [p - (n - self.R + 1) for p in ps]
        slots_t = torch.tensor(slots, device=self.x.device)
        store_rows = torch.tensor([p % self.runner.slots for p in ps], device=self.x.device)
        self.x.index_copy_(0, slots_t, self.runner.store[store_rows, 0].unsqueeze(1))
        self.valid.index_fill_(0, slots_t, True)
        self.valid_slots = sorted(self.valid_slots + slots)

    # ------------------------------------------------------------------ DepthRunner's contract
    supports_all_final = True

    @property
    def confidence_kind(self) -> str:
        return self.runner.confidence_kind

    def prefill(self, *args, **kwargs) -> PassResult:
        return self.runner.prefill(*args, **kwargs)  # prompts: the general pass

    def confidence(self, logits: torch.Tensor) -> torch.Tensor:
        return self.runner.confidence(logits)

    @property
    def store(self) -> torch.Tensor:
        return self.runner.store

    @property
    def slots(self) -> int:
        return self.runner.slots

    @torch.no_grad()
    def run(self, rows: Sequence[int], states: Dict[int, RowState], token_ids: torch.Tensor,
            exits: Sequence[ExitPoint] = (), capped: Sequence[int] = (),
            all_final: bool = False) -> PassResult:
        """One decode pass of the single row (as DepthRunner.run): its newest token
        ``token_ids [1]`` from the embedding down to the first exit of ``exits`` that fires
        (``force``: always; threshold None: never) or to the final head; with ``all_final``
        also the final logits of every slot (the verify pass of self-speculative decoding)."""
        (r,) = rows
        state, capped = states[r], r in capped
        self.all_final = all_final
        n, dev = state.newest, self.x.device
        torch.arange(n - self.R + 1, n + 1, device=dev, out=self.true_pos).clamp_(min=0)
        self.valid.zero_()
        self.valid[-1] = True
        self.valid_slots = [self.R - 1]
        self.end.fill_(n + 1)
        self.x[-1:].copy_(self.model.embed(token_ids.view(1, 1), self.true_pos[-1:].view(1, 1)))
        self._join(state, 0, n)
        firing = {e.layer: e for e in exits}
        decided = None  # (head index, exit layer)
        for j, seg in enumerate(self.segments):
            if seg.lo > 0:
                self._join(state, seg.lo, n)
            self._invalid_slots_at_newest(n)
            self._replay(j)
            self.runner.token_layers += len(self.valid_slots) * (seg.hi - seg.lo)
            first = seg.first_head
            for i, layer in enumerate(seg.exits):
                e = firing.get(layer)
                if decided is not None or e is None or not (
                        e.force or (e.threshold is not None and float(self.conf[first + i]) >= e.threshold)):
                    continue
                decided = (first + i, layer)
                if not capped:
                    self._save(n)
                    state.advance(seg.hi, self.L)
                    return self._result(decided, False)
        state.advance(self.L, self.L)
        return self._result(decided or (-1, self.L), all_final)

    def _invalid_slots_at_newest(self, n: int) -> None:
        """Padding slots take the newest position (finite attention; writes go to scratch)."""
        torch.where(self.valid, self.true_pos, self.true_pos[-1:].expand(self.R), out=self.pos)
        self.start.fill_(n - self.R + 1 + self.valid_slots[0])  # first in flight, for KVCache.check

    def _save(self, n: int) -> None:
        """In-flight hidden states to the runner's store (slot = position % store slots)."""
        first = n - self.R + 1
        idx = torch.tensor(self.valid_slots, device=self.x.device)
        rows = torch.tensor([(first + i) % self.runner.slots for i in self.valid_slots],
                            device=self.x.device)
        self.runner.store[rows, 0] = self.x.index_select(0, idx)[:, 0]

    def _result(self, decided, all_final: bool) -> PassResult:
        i, layer = decided
        if i == -1:
            logits = self.final_all[-1]  # [1, V]
        elif self.classify:  # the firing exit's projection, outside any graph
            logits = token_logits(gather_from_tensor_model_parallel_region(
                self.model.exit_project(layer, self.states[i].view(1, 1, -1))), self.cfg)[0]
        else:
            logits = self.logits[i:i + 1]
        conf = self.conf[i:] if i == -1 else self.conf[i:i + 1]
        if not all_final:
            return PassResult(logits.clone(), conf.clone(), [layer])
        return PassResult(logits.clone(), conf.clone(), [layer], self.final_all.clone(), self.layout)
