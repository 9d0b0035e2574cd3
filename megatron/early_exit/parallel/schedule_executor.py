"""Executor for the pure plans of parallel/schedule_plan.py: the one way a micro-batch is run.

It walks one stage's plan: compute actions run a model chunk forward or backward, and each
communication batch (``comm_batches``) is one ``PipelineP2P.exchange``. Every layout goes
through it: PP = 1 training runs the no-pipelining plan (gradient accumulation), PP > 1 the
1F1B or interleaved plan, ``--tune-exit`` the exit-tuning plan, and evaluation the forward-only
plan. For every micro-batch a stage backpropagates (docs/pipeline.md)

    J_s = (1/M) * sum_{e on this stage} w_e * l_e  +  <y, g>         (g received, detached)

so exit losses on any stage reach every earlier stage through the single activation gradient
that crosses each boundary. Partial (bubble-filling) micro-batches are weighted like full ones
(1/M) and carry exit losses only; docs/pipeline.md states the exact objective. Under
``--tune-exit`` the backbone runs without grad and each exit stage backpropagates its own exit
losses locally.

    sums = forward_backward(chunks, microbatches, cfg, ctx, exit_weights)   # training
    sums = forward_only(chunks, microbatches, cfg, ctx)                     # evaluation

``sums`` maps "final" and each exit layer to this stage's summed (unscaled) head losses.
"""

from __future__ import annotations

import contextlib
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron.early_exit.model.placement import exit_stages
from megatron.early_exit.parallel.p2p import PipelineP2P
from megatron.early_exit.parallel.schedule_plan import (BACKWARD, FORWARD, RECV_BACKWARD, RECV_FORWARD,
                                                        SEND_BACKWARD, SEND_FORWARD, Action, comm_batches,
                                                        fill_depths, forward_only_plan, interleaved_plan,
                                                        no_pipelining_plan, one_f_one_b_plan, tune_exit_plan)

Key = Tuple[int, int, bool]  # (micro-batch, chunk, partial)


def autocast_context(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA with ``--bf16``; nothing otherwise (CPU runs stay float32)."""
    if bf16 and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def accumulate_head_losses(sums: Dict, out) -> None:
    """Add a forward's head losses (float64) to ``sums`` ("final", exit layer -> sum)."""
    if out.final_loss is not None:
        sums["final"] = sums.get("final", 0) + out.final_loss.double()
    for layer, loss in out.exit_losses.items():
        sums[layer] = sums.get(layer, 0) + loss.double()


def fill_plan_depths(cfg, schedule, pp_size: int) -> List[int]:
    """Depths of the partial micro-batches for ``--fill-explicit-bubbles`` (empty if off)."""
    if schedule is None or not schedule.fill_explicit_bubbles:
        return []
    if cfg.parallel.virtual_chunks(cfg.model) > 1:
        raise ValueError("--fill-explicit-bubbles works with 1F1B only, not with "
                         "--num-layers-per-virtual-pipeline-stage")
    stages = exit_stages(cfg)
    if not stages:
        raise ValueError("--fill-explicit-bubbles needs --exit-layer-nums")
    if schedule.num_fill_cooldown_microbatches:
        raise ValueError("--num-fill-cooldown-microbatches: cool-down filling is not offered "
                         "(its partial backward cannot reach stage 0, so it is not the gradient of "
                         "any objective; see docs/pipeline.md); use warm-up filling")
    return fill_depths(pp_size, stages[-1], schedule.backward_forward_ratio,
                       schedule.num_fill_warmup_microbatches, stages[0])


def build_plan(cfg, ctx, num_microbatches: int, num_chunks: int, schedule=None,
               forward_only: bool = False) -> List[Action]:
    """This stage's plan: forward-only (evaluation), exit tuning, no pipelining (PP = 1),
    interleaved (virtual chunks) or 1F1B with optional bubble filling."""
    if forward_only:
        return forward_only_plan(ctx.pp_rank, ctx.pp_size, num_microbatches, num_chunks)
    if schedule is not None and schedule.tune_exit:
        stages = exit_stages(cfg)
        if not stages:
            raise ValueError("--tune-exit needs --exit-layer-nums")
        return tune_exit_plan(ctx.pp_rank, ctx.pp_size, num_microbatches, stages[-1])
    if ctx.pp_size == 1:
        return no_pipelining_plan(num_microbatches)
    if num_chunks > 1:
        return interleaved_plan(ctx.pp_rank, ctx.pp_size, num_microbatches, num_chunks)
    depths = fill_plan_depths(cfg, schedule, ctx.pp_size)
    return one_f_one_b_plan(ctx.pp_rank, ctx.pp_size, num_microbatches, fill=depths)


class _StageRunner:
    """Holds the in-flight tensors of one stage while its plan executes."""

    def __init__(self, chunks, microbatches, partials, cfg, ctx, exit_weights, bf16, tune_exit,
                 forward_only=False):
        self.chunks, self.cfg, self.ctx = chunks, cfg, ctx
        self.microbatches, self.partials = microbatches, partials
        self.exit_weights, self.bf16, self.tune_exit = exit_weights, bf16, tune_exit
        self.forward_only = forward_only  # evaluation: no graph kept, outputs dropped once sent
        self.num_microbatches = len(microbatches)
        self.p2p = PipelineP2P(ctx.pp_group, ctx.prev_rank, ctx.next_rank, ctx.device)
        self.inputs: Dict[Key, Optional[torch.Tensor]] = {}
        self.outputs: Dict[Key, Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = {}
        self.received_fwd: Dict[Key, torch.Tensor] = {}
        self.received_bwd: Dict[Key, torch.Tensor] = {}
        self.input_grads: Dict[Key, torch.Tensor] = {}
        self.sums: Dict = {}
        model = chunks[0]
        sp = ctx.tp_size if model.config.sequence_parallel else 1
        mbs = microbatches[0]["tokens"].shape[0]
        self.shape = (cfg.model.seq_length // sp, mbs, cfg.model.hidden_size)  # [s, b, h]
        self.dtype = torch.bfloat16 if (bf16 and ctx.device.type == "cuda") else model.config.params_dtype

    def forward(self, a: Action) -> None:
        key = (a.microbatch, a.chunk, a.partial)
        model = self.chunks[a.chunk]
        data = (self.partials if a.partial else self.microbatches)[a.microbatch]
        x = None
        if not model.pre_process:
            x = self.received_fwd.pop(key)  # [s, b, h]
            if not (self.tune_exit or self.forward_only):
                x.requires_grad_(True)
        with autocast_context(self.ctx.device, self.bf16):
            out = model(input_ids=data["tokens"] if model.pre_process else None, hidden_states=x,
                        labels=data["labels"], loss_mask=data["loss_mask"],
                        exit_weights=self.exit_weights, skip_final_head=a.partial or self.tune_exit,
                        frozen_backbone=self.tune_exit)
        if not a.partial:
            accumulate_head_losses(self.sums, out)
        if self.forward_only:
            if not model.post_process:
                self.outputs[key] = (out.hidden, None)  # until it is sent
            return
        loss = None if out.loss is None else out.loss / self.num_microbatches
        self.inputs[key] = x
        self.outputs[key] = (out.hidden, loss)

    def backward(self, a: Action) -> None:
        key = (a.microbatch, a.chunk, a.partial)
        y, loss = self.outputs.pop(key)
        x = self.inputs.pop(key)
        tensors, grads = [], []
        if loss is not None:
            tensors.append(loss)
            grads.append(torch.ones_like(loss))
        g = self.received_bwd.pop(key, None)
        if g is not None and not self.tune_exit:
            tensors.append(y)
            grads.append(g.to(y.dtype))
        if tensors:
            torch.autograd.backward(tensors, grads)
        if x is not None and not self.tune_exit:
            self.input_grads[key] = x.grad if x.grad is not None else torch.zeros_like(x)

    def communicate(self, batch: Sequence[Action]) -> None:
        kwargs, recv_keys = {}, {}
        for a in batch:
            key = (a.microbatch, a.chunk, a.partial)
            if a.kind is SEND_FORWARD:
                y = self.outputs.pop(key)[0] if self.forward_only else self.outputs[key][0]
                kwargs["send_next"] = y.detach().to(self.dtype)
            elif a.kind is SEND_BACKWARD:
                kwargs["send_prev"] = self.input_grads.pop(key).to(self.dtype)
            elif a.kind is RECV_FORWARD:
                kwargs["recv_prev"] = (self.shape, self.dtype)
                recv_keys["prev"] = key
            elif a.kind is RECV_BACKWARD:
                kwargs["recv_next"] = (self.shape, self.dtype)
                recv_keys["next"] = key
        from_prev, from_next = self.p2p.exchange(**kwargs)
        if "prev" in recv_keys:
            self.received_fwd[recv_keys["prev"]] = from_prev
        if "next" in recv_keys:
            self.received_bwd[recv_keys["next"]] = from_next

    def run(self, plan: Sequence[Action], timeline: Optional[list] = None) -> Dict:
        for step in comm_batches(plan):
            start = time.perf_counter()
            if isinstance(step, tuple):
                self.communicate(step)
            elif step.kind is FORWARD:
                self.forward(step)
            elif step.kind is BACKWARD:
                self.backward(step)
            if timeline is not None and not isinstance(step, tuple):
                timeline.append({"stage": self.ctx.pp_rank, "kind": step.kind.value, "microbatch": step.microbatch,
                                 "chunk": step.chunk, "partial": step.partial, "start": start,
                                 "end": time.perf_counter()})
        assert not self.outputs and not self.received_fwd and not self.received_bwd, "plan left work"
        return self.sums


def forward_backward(chunks, microbatches, cfg, ctx, exit_weights, bf16: bool = False,
                     schedule=None, partial_microbatches: Sequence = (),
                     timeline: Optional[list] = None) -> Dict:
    """Run one step's forward and backward over ``microbatches`` on this pipeline stage.

    Each micro-batch's objective is divided by the number of micro-batches. Returns this
    stage's summed (unscaled) head losses of the full micro-batches. ``partial_microbatches``
    supplies the data of the bubble-filling micro-batches. A list passed as ``timeline``
    receives one record per compute action (stage, kind, microbatch, chunk, partial, start,
    end in ``time.perf_counter`` seconds), the input of ``tools/plot_pipeline_schedule.py
    --measured``.
    """
    if ctx.pp_size == 1 and len(partial_microbatches):
        raise ValueError("partial micro-batches need --pipeline-model-parallel-size > 1")
    plan = build_plan(cfg, ctx, len(microbatches), len(chunks), schedule)
    needed = sum(1 for a in plan if a.partial and a.kind is FORWARD)
    if needed and len(partial_microbatches) < max(a.microbatch for a in plan if a.partial) + 1:
        raise ValueError(f"the plan needs partial micro-batches but {len(partial_microbatches)} were given")
    tune = schedule is not None and schedule.tune_exit
    runner = _StageRunner(chunks, microbatches, partial_microbatches, cfg, ctx, exit_weights, bf16, tune)
    return runner.run(plan, timeline)


def num_partial_microbatches(cfg, schedule, pp_size: int) -> int:
    """How many partial micro-batches a step with these settings consumes."""
    return len(fill_plan_depths(cfg, schedule, pp_size)) if pp_size > 1 else 0


@torch.no_grad()
def forward_only(chunks, microbatches, cfg, ctx) -> Dict:
    """Forward every micro-batch through the pipeline (evaluation); returns this stage's
    summed head losses."""
    plan = build_plan(cfg, ctx, len(microbatches), len(chunks), forward_only=True)
    runner = _StageRunner(chunks, microbatches, (), cfg, ctx, None, False, tune_exit=False,
                          forward_only=True)
    return runner.run(plan)
