"""Pipeline-based early-exit decoding for PP > 1 (DESIGN.md §5).

Every token travels through all pipeline stages, so every stage's KV cache (exit blocks
included) is always complete: no recomputation is ever needed. The token is *decided* at the
first allowed exit whose confidence reaches the threshold (or by the final head). The tokens are
therefore exactly those of the recomputation mode (inference/early_exit.py) for the same model
and threshold — tested on gloo at PP=2 and PP=4 in tests/distributed/test_pipeline_inference.py.

Overlap (EE-LLM's pipeline-based speed-up): stage 0 needs only the *decision* of token t to embed
token t+1, not the later stages' KV of t. Messages, all point to point and in order:

- stage k -> k+1, per pass: a header ``[kind, decided, token, layer, confidence, s]`` then the
  hidden states ``[s, 1, h]``; ``kind = 1`` (no hidden states) ends the sequence;
- stage k > 0 -> stage 0: one *verdict* ``[decided, token, layer, confidence]`` for every token
  that reached stage k still open, sent as soon as an exit on stage k decides it, else after the
  stage's last layer (the last stage always decides).

Stage 0 decides a token itself when one of its exits fires and goes straight on to the next
token while the hidden states of the previous one travel on (sends are asynchronous; the later
stages fill their KV in the same order); otherwise it reads the verdicts of stages 1, 2, ... in
order up to the deciding one. At the end of a sequence every stage returns stage 0's outputs.

Scope of this version: one sequence at a time (prompts are decoded one after another), PP > 1
without virtual chunks, TP >= 1.

    engine = PipelineEngine(chunks, cfg, ctx)              # on every rank of the pipeline
    outs = engine.generate([[5, 7, 9]], 32, mode=EarlyExit(threshold=0.8))
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron.early_exit.inference.modes import EarlyExit, FullDepth, GenerationOutput
from megatron.early_exit.inference.sampling import SamplingParams, sample
from megatron.early_exit.inference.stopping import StopChecker, StopCriteria
from megatron.early_exit.parallel.p2p import PipelineP2P

HEADER = 6  # floats of a pass header, see PipelineEngine._header


class _StageCache:
    """Static KV cache of every attention module on this stage (all filled to one length)."""

    def __init__(self, max_len: int):
        self.max_len, self.offset, self.buffers = max_len, 0, {}

    def hook(self, module, key, value):  # key/value [s_new, b, ng, hn]
        s_new = key.shape[0]
        end = self.offset + s_new
        if end > self.max_len:
            raise RuntimeError(f"KV cache of {self.max_len} positions is full")
        if module not in self.buffers:
            shape = (self.max_len,) + tuple(key.shape[1:])
            self.buffers[module] = (key.new_empty(shape), value.new_empty(shape))
        k_buf, v_buf = self.buffers[module]
        k_buf[self.offset:end] = key
        v_buf[self.offset:end] = value
        rows = torch.arange(s_new, device=key.device)[:, None] + self.offset
        mask = torch.arange(end, device=key.device)[None, :] <= rows  # [s_new, end]
        return k_buf[:end], v_buf[:end], mask[None, None]


class PipelineEngine:
    """Early-exit generation across pipeline stages; every rank calls ``generate`` together."""

    def __init__(self, chunks, cfg, ctx, seed: Optional[int] = None):
        if len(chunks) != 1:
            raise NotImplementedError("pipeline-based inference does not support virtual pipeline chunks")
        self.model, self.cfg, self.ctx = chunks[0], cfg, ctx
        self.p2p = PipelineP2P(ctx.pp_group, ctx.prev_rank, ctx.next_rank, ctx.device)
        self.last_rank = parallel_state.get_pipeline_model_parallel_last_rank()
        self.generator = torch.Generator(device=ctx.device)
        self.generator.manual_seed(0 if seed is None else seed)
        self.attention = [m for m in self.model.modules() if hasattr(m, "kv_hook")]
        self.dtype = self.model.config.params_dtype
        self.stage_ranks = dist.get_process_group_ranks(ctx.pp_group)  # global rank per stage
        self._pending = []  # (work, tensor) of sends in flight

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingParams = SamplingParams(temperature=0.0),
                 stop: Optional[StopCriteria] = None, mode=FullDepth(), detokenize=None) -> List[GenerationOutput]:
        if not isinstance(mode, (FullDepth, EarlyExit)):
            raise NotImplementedError("pipeline-based inference supports FullDepth and EarlyExit modes")
        self.model.eval()
        if sampling.seed is not None:
            self.generator.manual_seed(sampling.seed)
        return [self._one(list(p), max_new_tokens, sampling, stop or StopCriteria(), mode, detokenize)
                for p in prompts]

    # ------------------------------------------------------------------ one sequence
    def _one(self, prompt, max_new_tokens, sampling, stop, mode, detokenize) -> GenerationOutput:
        cache = _StageCache(len(prompt) + max_new_tokens)
        for m in self.attention:
            m.kv_hook = cache.hook
        try:
            if self.model.pre_process:
                out = self._lead(prompt, max_new_tokens, sampling, stop, mode, detokenize, cache)
            else:
                out = None
                self._follow(cache, mode, sampling)
            for work, _ in self._pending:  # sends still in flight (their buffers are held)
                work.wait()
            self._pending = []
            shared = [out]  # every stage returns the same outputs
            dist.broadcast_object_list(shared, src=self.stage_ranks[0], group=self.ctx.pp_group)
            return shared[0]
        finally:
            for m in self.attention:
                m.kv_hook = None

    def _lead(self, prompt, max_new_tokens, sampling, stop, mode, detokenize, cache) -> GenerationOutput:
        """Stage 0: embeds each token, decides it here if an exit fires, else waits for the
        later stages' verdicts; never waits for their KV fill."""
        out = GenerationOutput(prompt_len=len(prompt))
        checker = StopChecker(stop, detokenize)
        ids, start, pass_mode = prompt, 0, None
        while True:
            header = self._header(kind=0, s=len(ids))
            x = self._stage_pass(ids, start, cache, pass_mode, sampling, header)
            self._send_next(header, x)
            decision = header[1:5] if header[1] != 0 else self._await_verdict()
            token, layer, conf = int(decision[1]), int(decision[2]), float(decision[3])
            result = checker.feed(token)
            out.extend([token], [layer], [conf])
            if result.stopped:
                del out.tokens[result.num_tokens:], out.exit_layers[result.num_tokens:]
                del out.confidences[result.num_tokens:]
                out.finish_reason, out.text_len = result.finish_reason, result.text_len
                break
            if len(out.tokens) == max_new_tokens:
                out.finish_reason = "length"
                break
            ids, start, pass_mode = [token], len(prompt) + len(out.tokens) - 1, mode
        self._send_next(self._header(kind=1, s=0), None)  # end of this sequence
        return out

    def _follow(self, cache, mode, sampling) -> None:
        """Stages > 0: take each token's hidden states in order, fill this stage's KV, decide
        it if it is still open and an exit here fires (or this is the last stage)."""
        while True:
            header, _ = self.p2p.exchange(recv_prev=((HEADER,), torch.float64))
            if header[0] == 1:
                self._send_next(header, None)
                return
            s = int(header[5])
            x, _ = self.p2p.exchange(recv_prev=((s, 1, self.cfg.model.hidden_size), self.dtype))
            start = cache.offset
            x = self._stage_pass(None, start, cache, None if start == 0 else mode, sampling, header, x)
            self._send_next(header, x)

    def _stage_pass(self, ids, start, cache, mode, sampling, header, x=None) -> torch.Tensor:
        """This stage's layers (and exits) for one pass; ``header[1:5]`` is the decision
        [decided, token, layer, confidence], updated in place. A token that arrived open gets
        exactly one verdict sent to stage 0: as soon as an exit here decides it, else after
        this stage's last layer. ``mode`` None: prefill, no exit fires."""
        model, ctx = self.model, self.ctx
        decision = header[1:5]
        arrived_open = is_open = bool(decision[0] == 0)  # one read; exits below report decisions
        if model.pre_process:
            positions = torch.arange(start, start + len(ids), device=ctx.device)
            x = model.embed(torch.tensor([ids], device=ctx.device), positions[None, :])
        positions = torch.arange(start, start + x.shape[0], device=ctx.device)
        rotary = model.rotary(positions)
        pre_exit, exit_layers = self.cfg.exits.pre_exit, model.placement.exit_layers
        for i, layer in enumerate(model.placement.layers):
            if pre_exit and layer in exit_layers:
                is_open &= not self._exit(layer, x, rotary, decision, mode, sampling, is_open)
            x = model.run_layer(i, x, rotary)
            if not pre_exit and layer in exit_layers:
                is_open &= not self._exit(layer, x, rotary, decision, mode, sampling, is_open)
            if arrived_open and not is_open and not model.pre_process:
                self._send_verdict(decision)  # decided on this stage: tell stage 0 at once
                arrived_open = False
        if model.post_process and is_open:
            self._decide(model.final_logits(x[-1:]), self.cfg.model.num_layers, decision, sampling)
        if arrived_open and not model.pre_process:
            self._send_verdict(decision)  # decided by the final head, or still open ("no")
        cache.offset += x.shape[0]
        return x

    # ------------------------------------------------------------------ messages
    def _header(self, kind: int, s: int) -> torch.Tensor:
        """[kind (0 pass, 1 end), decided, token, layer, confidence, tokens in the pass]."""
        header = torch.zeros(HEADER, dtype=torch.float64, device=self.ctx.device)
        header[0], header[5] = kind, s
        return header

    def _send_next(self, header: torch.Tensor, x: Optional[torch.Tensor]) -> None:
        """Header (and hidden states) to the next stage without waiting for delivery."""
        if self.model.post_process:
            return
        for t in (header, x):
            if t is not None:
                t = t.contiguous()
                self._pending.append((dist.isend(t, dst=self.stage_ranks[self.ctx.pp_rank + 1],
                                                 group=self.ctx.pp_group), t))
        self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]

    def _send_verdict(self, decision: torch.Tensor) -> None:
        verdict = decision.clone()
        self._pending.append((dist.isend(verdict, dst=self.stage_ranks[0], group=self.ctx.pp_group),
                              verdict))

    def _await_verdict(self) -> torch.Tensor:
        """Stage 0: the verdicts of stages 1, 2, ... in order, up to the one that decided."""
        verdict = torch.zeros(4, dtype=torch.float64, device=self.ctx.device)
        for rank in self.stage_ranks[1:]:
            dist.recv(verdict, src=rank, group=self.ctx.pp_group)
            if verdict[0] != 0:
                return verdict
        raise RuntimeError("no pipeline stage decided the token (the last stage always does)")

    def _exit(self, layer, x, rotary, decision, mode, sampling, is_open: bool) -> bool:
        """Run exit ``layer`` (its block's KV stays exact); True if it decided the open token."""
        logits = self.model.exit_logits(layer, x, rotary)  # always: fills the exit block's KV
        if mode is None or not is_open or not isinstance(mode, EarlyExit) or mode.threshold >= 1.0:
            return False
        if mode.exit_layers is not None and layer not in mode.exit_layers:
            return False
        full = gather_from_tensor_model_parallel_region(logits[-1:]).float()[0]  # [1, V]
        probs = full.softmax(-1)
        if mode.confidence == "margin":
            top2 = probs.topk(2, dim=-1).values
            conf = top2[0, 0] - top2[0, 1]
        else:
            conf = probs.max()
        if conf >= mode.threshold:
            self._decide(logits[-1:], layer, decision, sampling, full=full)
            return True
        return False

    def _decide(self, logits, layer, decision, sampling, full=None) -> None:
        if full is None:
            full = gather_from_tensor_model_parallel_region(logits).float()[0]  # [1, V]
        token = sample(full, sampling, self.generator)
        probs = full.softmax(-1)
        decision[0], decision[1], decision[2] = 1, float(token[0]), float(layer)
        decision[3] = float(probs.max())  # the head's confidence, as the PP=1 engine reports it
