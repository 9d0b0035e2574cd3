"""Pipeline-based early-exit decoding for PP > 1 (DESIGN.md §5).

Every token travels through all pipeline stages, so every stage's KV cache (exit blocks
included) is always complete: no recomputation is ever needed. The token is *decided* at the
first allowed exit whose confidence reaches the threshold (or by the final head); the decision
(token id, exit layer, confidence) rides along with the hidden states to the last stage, which
broadcasts it to every stage for the next step. The tokens are therefore exactly those of the
recomputation mode (inference/early_exit.py) for the same model and threshold — tested on
gloo at PP=2 in tests/distributed/test_pipeline_inference.py.

Scope of this version: one sequence at a time (prompts are decoded one after another), PP > 1
without virtual chunks, TP >= 1. Stage 0 waits for each decision before it embeds the next
token, i.e. the later stages' KV fill is not yet overlapped with stage 0's next token; that
overlap is the remaining speed-up of EE-LLM's pipeline-based inference.

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
            out = GenerationOutput(prompt_len=len(prompt))
            checker = StopChecker(stop, detokenize)
            decision = self._pass(prompt, 0, cache, None, sampling)
            for _ in range(max_new_tokens):
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
                decision = self._pass([token], len(prompt) + len(out.tokens) - 1, cache, mode, sampling)
            return out
        finally:
            for m in self.attention:
                m.kv_hook = None

    def _pass(self, ids: List[int], start: int, cache: _StageCache, mode, sampling) -> torch.Tensor:
        """Tokens ``ids`` at positions start.. through this stage; returns the broadcast decision
        [decided, token, layer, confidence] (float64). ``mode`` None: prefill, no exits fire."""
        model, ctx = self.model, self.ctx
        s = len(ids)
        positions = torch.arange(start, start + s, device=ctx.device)
        decision = torch.zeros(4, dtype=torch.float64, device=ctx.device)
        if model.pre_process:
            x = model.embed(torch.tensor([ids], device=ctx.device), positions[None, :])
        else:
            x, _ = self.p2p.exchange(recv_prev=((s, 1, self.cfg.model.hidden_size), self.dtype))
            decision, _ = self.p2p.exchange(recv_prev=((4,), torch.float64))
        rotary = model.rotary(positions)
        for i, layer in enumerate(model.placement.layers):
            if self.cfg.exits.pre_exit and layer in model.placement.exit_layers:
                self._exit(layer, x, rotary, decision, mode, sampling)
            x = model.run_layer(i, x, rotary)
            if not self.cfg.exits.pre_exit and layer in model.placement.exit_layers:
                self._exit(layer, x, rotary, decision, mode, sampling)
        if model.post_process:
            if decision[0] == 0:
                self._decide(model.final_logits(x[-1:]), self.cfg.model.num_layers, decision, sampling)
        else:
            self.p2p.exchange(send_next=x.contiguous())
            self.p2p.exchange(send_next=decision)
        dist.broadcast(decision, src=self.last_rank, group=ctx.pp_group)
        cache.offset += s
        return decision

    def _exit(self, layer, x, rotary, decision, mode, sampling) -> None:
        logits = self.model.exit_logits(layer, x, rotary)  # always: fills the exit block's KV
        if mode is None or decision[0] != 0 or not isinstance(mode, EarlyExit) or mode.threshold >= 1.0:
            return
        if mode.exit_layers is not None and layer not in mode.exit_layers:
            return
        full = gather_from_tensor_model_parallel_region(logits[-1:]).float()[0]  # [1, V]
        probs = full.softmax(-1)
        if mode.confidence == "margin":
            top2 = probs.topk(2, dim=-1).values
            conf = top2[0, 0] - top2[0, 1]
        else:
            conf = probs.max()
        if conf >= mode.threshold:
            self._decide(logits[-1:], layer, decision, sampling, full=full)

    def _decide(self, logits, layer, decision, sampling, full=None) -> None:
        if full is None:
            full = gather_from_tensor_model_parallel_region(logits).float()[0]  # [1, V]
        token = sample(full, sampling, self.generator)
        probs = full.softmax(-1)
        decision[0], decision[1], decision[2] = 1, float(token[0]), float(layer)
        decision[3] = float(probs.max())  # the head's confidence, as the PP=1 engine reports it
