"""Moving AdamW state between optimizers that keep the step counter per parameter (torch's
AdamW) and per param group (the fused Adams megatron-core uses when Transformer Engine or Apex is
installed), through trainer/megatron_optimizer.py's adam_state / set_adam_state, which checkpoints
use for megatron-core's optimizer."""

import torch

from megatron.early_exit.trainer.megatron_optimizer import adam_state, set_adam_state


class GroupStepAdam(torch.optim.Optimizer):
    """Plain Adam with the fused optimizers' layout: ``step`` in the param group."""

    def __init__(self, params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            g["step"] = g.get("step", 0) + 1
            b1, b2 = g["betas"]
            for p in g["params"]:
                st = self.state[p]
                m = st.setdefault("exp_avg", torch.zeros_like(p)).mul_(b1).add_(p.grad, alpha=1 - b1)
                v = st.setdefault("exp_avg_sq", torch.zeros_like(p)).mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (v / (1 - b2 ** g["step"])).sqrt_().add_(g["eps"])
                p.addcdiv_(m, denom, value=-g["lr"] / (1 - b1 ** g["step"]))


def _steps(opt, params, n, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()


def test_state_moves_between_per_param_and_per_group_step_optimizers():
    src = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    adamw = torch.optim.AdamW(src, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0, foreach=False)
    assert adam_state(adamw, src[0]) == {}  # no state before the first step
    _steps(adamw, src, 3, seed=0)

    dst = [torch.nn.Parameter(p.detach().clone()) for p in src]
    fused = GroupStepAdam(dst)
    for p, q in zip(src, dst):
        st = adam_state(adamw, p)
        set_adam_state(fused, q, st["step"], {k: st[k].clone() for k in ("exp_avg", "exp_avg_sq")})
    assert fused.param_groups[0]["step"] == 3 and "step" not in fused.state[dst[0]]
    for p, q in zip(src, dst):
        a, b = adam_state(adamw, p), adam_state(fused, q)
        assert float(a["step"]) == float(b["step"]) == 3.0
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])

    # and back into a fresh AdamW: its next step equals the original's
    back = [torch.nn.Parameter(p.detach().clone()) for p in src]
    adamw2 = torch.optim.AdamW(back, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0, foreach=False)
    for q, r in zip(dst, back):
        st = adam_state(fused, q)
        set_adam_state(adamw2, r, st["step"], {k: st[k].clone() for k in ("exp_avg", "exp_avg_sq")})
    _steps(adamw, src, 1, seed=1)
    _steps(adamw2, back, 1, seed=1)
    for p, r in zip(src, back):
        assert torch.equal(p, r)


def test_backend_selection_and_errors_name_the_flags(single_rank_parallel):
    """auto picks torch AdamW on CPU; megatron-core's optimizer is refused there by name."""
    import pytest

    from megatron.early_exit.config import ConfigError, EarlyExitGPTConfig, ExitConfig, ModelConfig, TrainConfig
    from megatron.early_exit.parallel.state import build_model, initialize_parallel
    from megatron.early_exit.trainer.optimizer import build_trainer_optimizer

    cfg = EarlyExitGPTConfig(model=ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=2,
                                               vocab_size=32, seq_length=8),
                             exits=ExitConfig(exit_layer_nums=[1]))
    ctx = initialize_parallel(cfg, torch.device("cpu"))
    chunks = build_model(cfg, ctx)
    assert isinstance(build_trainer_optimizer(chunks, ctx, TrainConfig()), torch.optim.AdamW)
    with pytest.raises(ConfigError, match="--optimizer-backend megatron"):
        build_trainer_optimizer(chunks, ctx, TrainConfig(optimizer_backend="megatron"))
    with pytest.raises(ConfigError, match="--use-distributed-optimizer"):
        build_trainer_optimizer(chunks, ctx, TrainConfig(use_distributed_optimizer=True))
    with pytest.raises(ConfigError, match="--use-distributed-optimizer"):
        TrainConfig(optimizer_backend="torch", use_distributed_optimizer=True)
    with pytest.raises(ConfigError, match="--optimizer-backend"):
        TrainConfig(optimizer_backend="apex")
