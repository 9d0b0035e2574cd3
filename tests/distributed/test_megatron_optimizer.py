"""megatron-core's optimizer path (trainer/megatron_optimizer.py) against torch AdamW, on CPU.

One 4-rank gloo spawn, PP=2 x DP=2 with tied embeddings (a copy on the last stage) and exits on
both stages, float32. In the same processes three models with the same layout-independent init
train on the same micro-batches: torch AdamW + parallel/grads.py, megatron-core's DDP buffers +
DistributedOptimizer (optimizer state sharded over DP), and megatron-core's FP32Optimizer. Losses, grad norms (clipping
active) and every parameter must agree to float32 rounding after several steps. Then checkpoints
cross backends: the distributed optimizer's save loads into a torch-AdamW run whose optimizer
state and next step equal the torch run's, and the torch run's save loads into a fresh
DistributedOptimizer run whose next step equals it too.

megatron-core's optimizer wrappers allocate on 'cuda', so the workers run inside the test-only
tests/megatron_cpu_shim.py; on a GPU the same code runs unpatched (tests/gpu).
"""

import pytest
import torch

from tests.distributed_harness import run_distributed

STEPS, MICRO = 3, 2


def _cfg():
    from megatron.early_exit.config import EarlyExitGPTConfig, ExitConfig, ModelConfig, ParallelConfig

    model = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=48, vocab_size=48, seq_length=8, architecture="llama")
    exits = ExitConfig(exit_layer_nums=[1, 3], use_exit_norm=True, exit_layer_weight=[0.5, 0.8])
    parallel = ParallelConfig(pipeline_model_parallel_size=2, world_size=4)
    return EarlyExitGPTConfig(model=model, exits=exits, parallel=parallel, seed=21)


def _setup(cfg, ctx, backend, distributed=True):
    from megatron.early_exit.config import TrainConfig
    from megatron.early_exit.parallel.state import build_model
    from megatron.early_exit.trainer.loop import TrainingSetup
    from megatron.early_exit.trainer.optimizer import build_trainer_optimizer

    t = TrainConfig(micro_batch_size=2, global_batch_size=2 * MICRO * 2, train_iters=10, lr=3e-3,
                    lr_warmup_iters=2, weight_decay=0.1, clip_grad=0.5, optimizer_backend=backend,
                    use_distributed_optimizer=distributed and backend == "megatron")
    chunks = build_model(cfg, ctx)
    return TrainingSetup(cfg, t, ctx, chunks, build_trainer_optimizer(chunks, ctx, t))


def _microbatches(iteration, dp_rank):
    out = []
    for j in range(MICRO):
        gen = torch.Generator().manual_seed(100 * iteration + 10 * dp_rank + j)
        ids = torch.randint(0, 48, (2, 9), generator=gen)
        mask = (torch.rand(2, 8, generator=gen) > 0.2).float()
        out.append({"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": mask})
    return out


def _step(setup):
    from megatron.early_exit.trainer.loop import set_learning_rate
    from megatron.early_exit.trainer.step import train_step

    it = setup.iteration
    set_learning_rate(setup, it)
    res = train_step(setup.chunks, setup.optimizer, _microbatches(it, setup.ctx.dp_rank), setup.ctx,
                     setup.cfg, it, clip_grad=setup.train.clip_grad)
    setup.iteration += 1
    return res


def _max_diff(a, b):
    pa = [p for m in a.chunks for p in m.parameters()]
    pb = [p for m in b.chunks for p in m.parameters()]
    assert len(pa) == len(pb)
    return max((x.detach() - y.detach()).abs().max().item() for x, y in zip(pa, pb))


def _state_diff(a, b):
    from megatron.early_exit.checkpoint.tensors import full_param_states

    pa = [p for m in a.chunks for p in m.parameters()]
    pb = [p for m in b.chunks for p in m.parameters()]
    sa, sb = full_param_states(a.optimizer, pa), full_param_states(b.optimizer, pb)
    assert len(sa) == len(sb) > 0
    worst = 0.0
    for x, y in zip(pa, pb):
        for key in ("exp_avg", "exp_avg_sq"):
            worst = max(worst, (sa[id(x)][key] - sb[id(y)][key]).abs().max().item())
        assert float(sa[id(x)]["step"]) == float(sb[id(y)]["step"])
    return worst


def _scenario(rank, world, root):
    from megatron.early_exit.parallel.state import initialize_parallel
    from megatron.early_exit.trainer.megatron_optimizer import MegatronCoreOptimizer
    from tests.megatron_cpu_shim import cpu_optimizer_shim

    with cpu_optimizer_shim():
        cfg = _cfg()
        ctx = initialize_parallel(cfg, torch.device("cpu"))
        ref, meg = _setup(cfg, ctx, "torch"), _setup(cfg, ctx, "megatron")
        plain = _setup(cfg, ctx, "megatron", distributed=False)  # FP32Optimizer
        assert isinstance(meg.optimizer, MegatronCoreOptimizer) and meg.optimizer.distributed
        assert not plain.optimizer.distributed
        out = {"losses": [], "norms": []}
        for _ in range(STEPS):
            ra, rb, rc = _step(ref), _step(meg), _step(plain)
            out["losses"].append((ra.lm_loss, rb.lm_loss, ra.exit_losses, rb.exit_losses))
            out["losses"].append((ra.lm_loss, rc.lm_loss, ra.exit_losses, rc.exit_losses))
            out["norms"] += [(ra.grad_norm, rb.grad_norm), (ra.grad_norm, rc.grad_norm)]
        out["param_diff"] = max(_max_diff(ref, meg), _max_diff(ref, plain))
        out["state_diff"] = max(_state_diff(ref, meg), _state_diff(ref, plain))

        meg.save_checkpoint(f"{root}/meg")  # sharded state -> whole tensors on disk
        ref.save_checkpoint(f"{root}/ref")
        from_meg = _setup(cfg, ctx, "torch")
        from_meg.load_checkpoint(f"{root}/meg")
        out["loaded_state_diff"] = _state_diff(ref, from_meg)
        from_ref = _setup(cfg, ctx, "megatron")
        from_ref.load_checkpoint(f"{root}/ref")
        out["reloaded_state_diff"] = _state_diff(ref, from_ref)
        for s in (ref, from_meg, from_ref):
            _step(s)
        out["continued"] = (_max_diff(ref, from_meg), _max_diff(ref, from_ref))
    return out


def test_distributed_optimizer_matches_torch_adamw_and_checkpoints_cross(tmp_path):
    results = run_distributed(_scenario, 4, str(tmp_path), timeout=400)
    for out in results:
        for ra, rb in out["norms"]:
            assert abs(ra - rb) <= 1e-5 * ra, out["norms"]
        assert out["norms"][0][0] > 0.5  # clipping was active
        for la, lb, ea, eb in out["losses"]:
            assert abs(la - lb) <= 1e-5 * la
            assert all(abs(ea[k] - eb[k]) <= 1e-5 * ea[k] for k in ea)
        # float32 updates of lr-sized steps: equal up to rounding
        assert out["param_diff"] < 2e-6, out["param_diff"]
        assert out["state_diff"] < 1e-6, out["state_diff"]
        assert out["loaded_state_diff"] < 1e-6 and out["reloaded_state_diff"] == 0.0, out
        assert max(out["continued"]) < 3e-6, out["continued"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is for CPU-only machines")
def test_megatron_optimizer_still_needs_the_cpu_shim():
    """Drop tests/megatron_cpu_shim.py when this fails: megatron-core then runs on CPU as is."""
    from tests.megatron_cpu_shim import needs_shim

    assert needs_shim()
