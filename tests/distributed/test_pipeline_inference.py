"""Pipeline-based early-exit decoding (PP=2 and PP=4, gloo) gives the same tokens, exit layers
and confidences as the PP=1 recomputation engine on the same weights. At PP=4 (one layer per
stage) exits sit on stages 0 and 2 only, so verdicts come from stages without exits too."""

import dataclasses

import pytest
import torch

from tests.distributed_harness import run_distributed


def _scenario(rank, world, variants):
    from megatron.early_exit.config import ParallelConfig
    from megatron.early_exit.inference.engine import Engine
    from megatron.early_exit.inference.loading import load_model_weights
    from megatron.early_exit.inference.modes import EarlyExit, FullDepth
    from megatron.early_exit.inference.pipeline_engine import PipelineEngine
    from megatron.early_exit.inference.stopping import StopCriteria
    from megatron.early_exit.model.sharding import gathered_tensors
    from megatron.early_exit.parallel.state import build_model, destroy_parallel, initialize_parallel
    from tests.unit.engine_testlib import random_prompts, trained

    results = {}
    for variant in variants:
        cfg, model = trained(variant, dtype="float64")
        from megatron.core import parallel_state

        full = gathered_tensors([model], parallel_state.get_tensor_model_parallel_group(), cfg.model.swiglu)
        prompts = random_prompts(torch.Generator().manual_seed(3), 4, cfg.model.vocab_size)
        modes = [FullDepth(), EarlyExit(threshold=0.6), EarlyExit(threshold=0.3), EarlyExit(threshold=1.0)]
        stop = StopCriteria(stop_token_ids=frozenset({5}))
        ref = [Engine(model, cfg).generate(prompts, 12, mode=m, stop=stop) for m in modes]
        destroy_parallel()
        cfg2 = dataclasses.replace(cfg, parallel=ParallelConfig(pipeline_model_parallel_size=2, world_size=world))
        ctx = initialize_parallel(cfg2, torch.device("cpu"))
        chunks = build_model(cfg2, ctx)
        load_model_weights(chunks[0], full, ctx.tp_rank, ctx.tp_size)
        engine = PipelineEngine(chunks, cfg2, ctx)
        got = [engine.generate(prompts, 12, mode=m, stop=stop) for m in modes]
        destroy_parallel()
        for m, r, g in zip(modes, ref, got):
            results[(variant, str(m))] = [((a.tokens, a.exit_layers, a.finish_reason), (b.tokens, b.exit_layers, b.finish_reason),
                                           max([abs(x - y) for x, y in zip(a.confidences, b.confidences)], default=0.0))
                                          for a, b in zip(r, g)]
    return results


@pytest.mark.parametrize("pp,variants", [(2, ("llama-block", "gpt2-pre-exit-block")),
                                         (4, ("llama-block",))])
def test_pipeline_based_equals_recomputation(pp, variants):
    results = run_distributed(_scenario, pp, variants)[0]
    exited = 0
    for key, rows in results.items():
        for ref, got, conf_err in rows:
            assert got == ref, f"{key}: {got} != {ref}"
            assert conf_err < 1e-5, key  # both report float32 softmax maxima
            exited += sum(layer < 4 for layer in ref[1])
    assert exited > 0, "no token exited early: the test does not exercise early exit"
