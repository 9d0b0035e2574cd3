"""TP=2 (with and without sequence parallel) and DP=2 against the single-process reference.

One 2-rank gloo spawn per layout runs every model variant: float64 tiny models with exits of
every structure, tied and untied. For each, the losses and the TP-gathered gradients must equal
tests/reference_model.py on the same (layout-independent) weights within 1e-6 relative; for DP=2
the parameters after one clipped AdamW step must equal a plain-PyTorch AdamW step on the
reference gradients of the combined batch.
"""

import pytest
import torch

from tests.distributed_harness import run_distributed

VARIANTS = [
    ("llama", dict(exit_layer_nums=[1, 2])),
    ("llama", dict(exit_layer_nums=[1, 3], use_exit_norm=True, use_exit_mlp=True,
                   use_exit_block=True, untie_exit_output_weights=True)),
    ("gpt2", dict(exit_layer_nums=[2, 4], pre_exit=True, use_exit_norm=True, use_exit_block=True,
                  exit_layer_temperature=[2.0, 0.5], use_dynamic_exit_layer_weight=True)),
    ("gpt2", dict(exit_layer_nums=[3], use_exit_mlp=True, untie_exit_output_weights=True)),
]


def make_cfg(arch, exits, tp=1, sp=False, world=1):
    from megatron.early_exit.config import EarlyExitGPTConfig, ExitConfig, ModelConfig, ParallelConfig

    model = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=48, vocab_size=48, seq_length=8, architecture=arch)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp, world_size=world)
    return EarlyExitGPTConfig(model=model, exits=ExitConfig(**exits), parallel=parallel,
                              params_dtype="float64", seed=11)


def batch(seed, b=4, s=8, vocab=48):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=gen)
    labels = torch.randint(0, vocab, (b, s), generator=gen)
    mask = (torch.rand(b, s, generator=gen) > 0.25).double()
    return ids, labels, mask


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _tp_scenario(rank, world, sp):
    from megatron.early_exit.model.sharding import gathered_tensors
    from megatron.early_exit.parallel.state import build_model, destroy_parallel, initialize_parallel
    from tests.reference_model import reference_losses

    worst = {}
    for i, (arch, exits) in enumerate(VARIANTS):
        cfg = make_cfg(arch, exits, tp=2, sp=sp, world=world)
        ctx = initialize_parallel(cfg, torch.device("cpu"))
        (model,) = build_model(cfg, ctx)
        ids, labels, mask = batch(i)
        weights = [0.5 + 0.25 * k for k in range(len(cfg.exits.exit_layer_nums))]
        out = model(input_ids=ids, labels=labels, loss_mask=mask, exit_weights=weights)
        out.loss.backward()
        from megatron.early_exit.parallel.grads import finalize_grads

        finalize_grads([model], ctx)
        sd = {k: v.clone().requires_grad_(True)
              for k, v in gathered_tensors([model], ctx.tp_group, cfg.model.swiglu).items()}
        total, exit_losses, final = reference_losses(sd, cfg, ids, labels, mask, weights)
        total.backward()
        errs = {"total": _rel(out.loss.detach(), total.detach()),
                "final": _rel(out.final_loss, final.detach())}
        errs.update({f"exit{k}": _rel(v, exit_losses[k].detach()) for k, v in out.exit_losses.items()})
        grads = gathered_tensors([model], ctx.tp_group, cfg.model.swiglu, grads=True)
        assert set(grads) == set(sd)
        errs.update({k: _rel(grads[k], sd[k].grad) for k in sd})
        worst[f"{arch}{i}"] = max(errs.items(), key=lambda kv: kv[1])
        destroy_parallel()
    return worst


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_tensor_parallel_matches_reference(sp):
    for rank_result in run_distributed(_tp_scenario, 2, sp):
        for variant, (key, err) in rank_result.items():
            assert err < 1e-6, f"{variant}: {key} differs from the reference by {err:.2e}"


def _dp_scenario(rank, world):
    from megatron.early_exit.model.sharding import gathered_tensors
    from megatron.early_exit.parallel.state import build_model, destroy_parallel, initialize_parallel
    from megatron.early_exit.trainer.optimizer import build_optimizer
    from megatron.early_exit.trainer.step import train_step
    from tests.reference_model import reference_losses

    worst = {}
    for i, (arch, exits) in enumerate(VARIANTS[:2]):
        cfg = make_cfg(arch, exits, world=world)
        ctx = initialize_parallel(cfg, torch.device("cpu"))
        (model,) = build_model(cfg, ctx)
        ids, labels, _ = batch(100 + i)
        mask = torch.ones_like(ids, dtype=torch.float64)  # equal halves: mean of means = mean
        sd0 = gathered_tensors([model], ctx.tp_group, cfg.model.swiglu)
        opt = build_optimizer([model], lr=1e-2, weight_decay=0.1)
        half = slice(2 * rank, 2 * rank + 2)
        mb = {"tokens": ids[half], "labels": labels[half], "loss_mask": mask[half]}
        result = train_step([model], opt, [mb], ctx, cfg, iteration=0, clip_grad=0.05)
        after = gathered_tensors([model], ctx.tp_group, cfg.model.swiglu)

        ref = {k: v.clone().requires_grad_(True) for k, v in sd0.items()}
        total, _, final = reference_losses(ref, cfg, ids, labels, mask, cfg.exits.weights_at(0))
        total.backward()
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in ref.values()))
        for p in ref.values():
            p.grad.mul_(min(1.0, 0.05 / (norm.item() + 1e-6)))
        ref_opt = torch.optim.AdamW([{"params": [p for p in ref.values() if p.ndim >= 2], "weight_decay": 0.1},
                                     {"params": [p for p in ref.values() if p.ndim < 2], "weight_decay": 0.0}],
                                    lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
        ref_opt.step()
        errs = {k: _rel(after[k], ref[k].detach()) for k in ref}
        errs["grad_norm"] = abs(result.grad_norm - norm.item()) / norm.item()
        errs["lm_loss"] = abs(result.lm_loss - final.item()) / final.item()
        worst[f"{arch}{i}"] = max(errs.items(), key=lambda kv: kv[1])
        destroy_parallel()
    return worst


def test_data_parallel_step_matches_combined_batch():
    for rank_result in run_distributed(_dp_scenario, 2):
        for variant, (key, err) in rank_result.items():
            assert err < 1e-6, f"{variant}: {key} differs from the reference by {err:.2e}"
