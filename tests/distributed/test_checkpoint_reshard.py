"""Resharding checkpoints: TP2·PP2 -> TP1·PP1 (by loading, and by tools/checkpoint/reshard.py)
-> TP2·PP2, TP1·PP2 with two virtual chunks per stage, and TP2·PP1, all in one 4-rank spawn.

A float64 Llama-style model with a tied output layer (so the last stage holds a copy of the word
embedding), SwiGLU (sharded in two blocks) and exits with MLPs on both stages takes one AdamW
step with deterministic, layout-independent gradients at TP2·PP2 and is saved. Every later
layout must hold bit-identical full parameters and optimizer state (gathered over TP, merged
over stages and ranks); the logits at PP=1 must match between the loaded and the tool-resharded
checkpoints exactly, and at TP2 to rounding.
"""

import importlib.util
import os
import zlib

import torch
import torch.distributed as dist

from tests.distributed_harness import run_distributed

TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "checkpoint", "reshard.py")


def make_cfg(tp, pp, world, vpp=None):
    from megatron.early_exit.config import EarlyExitGPTConfig, ExitConfig, ModelConfig, ParallelConfig

    model = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=48, vocab_size=48, seq_length=8, architecture="llama",
                        untie_embeddings_and_output_weights=False)
    exits = ExitConfig(exit_layer_nums=[2, 3], use_exit_mlp=True, use_exit_norm=True)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              world_size=world, num_layers_per_virtual_pipeline_stage=vpp)
    return EarlyExitGPTConfig(model=model, exits=exits, parallel=parallel, params_dtype="float64",
                              seed=7)


def make_setup(tp, pp, world, vpp=None):
    from megatron.early_exit.config import TrainConfig
    from megatron.early_exit.parallel.state import build_model, initialize_parallel
    from megatron.early_exit.trainer.loop import TrainingSetup
    from megatron.early_exit.trainer.optimizer import build_optimizer

    cfg = make_cfg(tp, pp, world, vpp)
    ctx = initialize_parallel(cfg, torch.device("cpu"))
    chunks = build_model(cfg, ctx)
    tc = TrainConfig(micro_batch_size=1, global_batch_size=world, lr=1e-2)
    return TrainingSetup(cfg, tc, ctx, chunks, build_optimizer(chunks, 1e-2, weight_decay=0.1))


def fake_step(setup):
    """Layout-independent gradients (full tensor seeded by canonical name), then AdamW."""
    from megatron.early_exit.checkpoint.tensors import local_params
    from megatron.early_exit.parallel.grads import finalize_grads
    from megatron.early_exit.model.sharding import full_shape, shard

    ctx = setup.ctx
    for p in local_params(setup.chunks, setup.cfg.model.swiglu):
        gen = torch.Generator().manual_seed(zlib.crc32(p.canon.encode()))
        full = torch.randn(full_shape(p.param, p.spec, ctx.tp_size), generator=gen,
                           dtype=torch.float64)
        p.param.grad = shard(full, p.spec, ctx.tp_rank, ctx.tp_size).clone()
    finalize_grads(setup.chunks, ctx)
    setup.optimizer.step()
    setup.iteration = 1


def full_view(setup):
    """(canonical name -> full parameter, canonical name -> full AdamW state) on this rank."""
    from megatron.early_exit.checkpoint.tensors import local_params
    from megatron.early_exit.model.sharding import gather

    params, state = {}, {}
    for p in local_params(setup.chunks, setup.cfg.model.swiglu):
        params[p.canon] = gather(p.param.detach(), p.spec, setup.ctx.tp_group)
        st = setup.optimizer.state[p.param]
        state[p.canon] = {k: gather(v, p.spec, setup.ctx.tp_group) if v.dim() else v.clone()
                          for k, v in st.items()}
    return params, state


def pp1_logits(setup, tp_gather):
    (model,) = setup.chunks
    ids = torch.randint(0, 48, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(input_ids=ids, return_logits=True)
    heads = {"final": out.final_logits, **{str(k): v for k, v in out.exit_logits.items()}}
    if tp_gather:
        from megatron.early_exit.model.sharding import ShardSpec, gather

        heads = {k: gather(v, ShardSpec(2), setup.ctx.tp_group) for k, v in heads.items()}
    return heads


def run_tool(argv):
    spec = importlib.util.spec_from_file_location("checkpoint_reshard", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.main(argv)


def _scenario(rank, world, root):

    a, b, c = (os.path.join(root, x) for x in ("tp2pp2", "tp1pp1", "tool_tp1pp1"))
    out = {}
    setup = make_setup(2, 2, world)
    fake_step(setup)
    out["saved"] = full_view(setup)
    setup.save_checkpoint(a, args={"tensor_model_parallel_size": 2})

    setup = make_setup(1, 1, world)  # DP=4
    setup.load_checkpoint(a)
    out["tp1"], out["tp1_logits"] = full_view(setup), pp1_logits(setup, False)
    setup.save_checkpoint(b)
    if rank == 0:
        assert run_tool(["--load", a, "--save", c, "--tensor-model-parallel-size", "1",
                         "--pipeline-model-parallel-size", "1"]) == 0
    dist.barrier()

    setup = make_setup(1, 1, world)
    assert setup.load_checkpoint(c)["args"] == {"tensor_model_parallel_size": 1}
    out["tool"], out["tool_logits"] = full_view(setup), pp1_logits(setup, False)

    setup = make_setup(2, 2, world)
    setup.load_checkpoint(b)
    out["back"] = full_view(setup)

    setup = make_setup(1, 2, world, vpp=1)  # two virtual chunks per stage, DP=2
    setup.load_checkpoint(a)
    out["vpp"] = full_view(setup)

    setup = make_setup(2, 1, world)  # DP=2
    setup.load_checkpoint(a)
    out["tp2"], out["tp2_logits"] = full_view(setup), pp1_logits(setup, True)
    return out


def _merge(results, key):
    """Union over ranks of name -> value, checking that every copy agrees bit for bit."""
    merged = {}
    for res in results:
        for name, value in res[key][0].items():
            state = res[key][1][name]
            if name in merged:
                assert torch.equal(merged[name][0], value), (key, name)
                assert all(torch.equal(merged[name][1][k], v) for k, v in state.items()), (key, name)
            else:
                merged[name] = (value, state)
    return merged


def _assert_same(got, want, what):
    assert got.keys() == want.keys(), what
    for name, (param, state) in want.items():
        assert torch.equal(got[name][0], param), f"{what}: parameter {name}"
        assert got[name][1].keys() == state.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for k, v in state.items():
            assert torch.equal(got[name][1][k], v), f"{what}: {k} of {name}"


def test_reshard_tp2pp2_to_tp1pp1_and_back(tmp_path):
    results = run_distributed(_scenario, 4, str(tmp_path))
    saved = _merge(results, "saved")
    assert float(saved["embedding.word_embeddings.weight"][1]["step"]) == 1.0
    for key in ("tp1", "tool", "back", "vpp", "tp2"):
        _assert_same(_merge(results, key), saved, key)
    for res in results:
        for head, logits in results[0]["tp1_logits"].items():
            assert torch.equal(res["tp1_logits"][head], logits), head
            assert torch.equal(res["tool_logits"][head], logits), head
            err = (res["tp2_logits"][head] - logits).abs().max().item()
            assert err < 1e-12, (head, err)
    assert set(results[0]["tp1_logits"]) == {"final", "2", "3"}
