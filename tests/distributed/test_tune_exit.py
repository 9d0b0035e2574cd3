"""Exit tuning under PP=2: backbone parameters stay bit-identical over optimizer steps, the last
stage (no exits) does not run, and the exit gradients equal the reference exit-only objective."""

import torch

from tests.distributed.pipeline_scenarios import gather_grads, make_cfg, microbatch, rel
from tests.distributed_harness import run_distributed
from tests.reference_model import reference_losses

M = 2


def _tune(rank, world):
    from megatron.early_exit.config import ScheduleConfig
    from megatron.early_exit.parallel.grads import finalize_grads
    from megatron.early_exit.parallel.state import build_model, destroy_parallel, initialize_parallel
    from megatron.early_exit.trainer.optimizer import build_optimizer
    from megatron.early_exit.parallel.schedule_executor import forward_backward
    from megatron.early_exit.trainer.step import train_step
    from megatron.early_exit.trainer.tune import freeze_backbone

    # exits after layers 1 and 3: both on stage 0 of 2, so stage 1 has nothing to do
    cfg = make_cfg(pp=2, world=world, exits=(1, 3), use_exit_mlp=True, untie_exit_output_weights=True)
    schedule = ScheduleConfig(tune_exit=True)
    ctx = initialize_parallel(cfg, torch.device("cpu"))
    chunks = build_model(cfg, ctx)
    freeze_backbone(chunks)
    before = gather_grads(chunks, ctx, cfg.model.swiglu, grads=False)
    mbs = [microbatch(i) for i in range(M)]
    forward_backward(chunks, mbs, cfg, ctx, cfg.exits.exit_layer_weight, schedule=schedule)
    finalize_grads(chunks, ctx)
    grads = gather_grads(chunks, ctx, cfg.model.swiglu)
    opt = build_optimizer(chunks, lr=1e-2, weight_decay=0.1)
    for it in range(2):
        train_step(chunks, opt, mbs, ctx, cfg, iteration=it, schedule=schedule)
    after = gather_grads(chunks, ctx, cfg.model.swiglu, grads=False)
    destroy_parallel()
    if rank != 0:
        return None
    sd = {k: v.clone().requires_grad_(k.startswith("exits.")) for k, v in before.items()}
    total = 0.0
    for mb in mbs:
        _, exits, _ = reference_losses(sd, cfg, mb["tokens"], mb["labels"], mb["loss_mask"])
        total = total + sum(w * exits[e] for w, e in zip(cfg.exits.exit_layer_weight, cfg.exits.exit_layer_nums)) / M
    total.backward()
    backbone = [k for k in before if not k.startswith("exits.")]
    changed = [k for k in backbone if not torch.equal(before[k], after[k])]
    exit_params = [k for k in before if k.startswith("exits.")]
    moved = [k for k in exit_params if not torch.equal(before[k], after[k])]
    errs = {k: rel(grads[k], sd[k].grad) for k in exit_params}
    return {"changed_backbone": changed, "moved_exits": len(moved), "n_exit_params": len(exit_params),
            "grads_only_exits": sorted(grads) == sorted(exit_params), "worst": max(errs.values())}


def test_tune_exit_freezes_backbone_and_matches_reference():
    res = run_distributed(_tune, 2)[0]
    assert res["changed_backbone"] == [], res["changed_backbone"]
    assert res["moved_exits"] == res["n_exit_params"] > 0
    assert res["grads_only_exits"]
    assert res["worst"] < 1e-5
