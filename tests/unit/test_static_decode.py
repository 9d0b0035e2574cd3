"""Static-shape full-depth decoding (inference/static_decode.py, ``fast_decode="static"``) against
the no-cache reference decoder and the engine's general pass, on CPU; the CUDA-graph replay of the
same step is checked in tests/gpu/test_gpu_decode.py.

Run: ``python -m pytest -q tests/unit/test_static_decode.py``.
"""

import pytest
import torch

from megatron.early_exit.inference.early_exit import DepthRunner
from megatron.early_exit.inference.engine import Engine
from megatron.early_exit.inference.static_early_exit import StaticRunner
from megatron.early_exit.inference.modes import EarlyExit, FullDepth, SelfSpeculative
from megatron.early_exit.inference.sampling import SamplingParams
from megatron.early_exit.inference.stopping import StopCriteria
from tests.unit.engine_testlib import random_prompts, reference_greedy, trained


@pytest.mark.parametrize("variant", ["llama", "gpt2-pre-exit-block"])
def test_static_greedy_matches_no_cache_reference(variant, single_rank_parallel):
    cfg, model = trained(variant)  # float64
    engine = Engine(model, cfg, fast_decode="static")
    prompts = random_prompts(torch.Generator().manual_seed(11), 3, cfg.model.vocab_size, 1, 10)
    outs = engine.generate(prompts, 10, mode=FullDepth())
    assert engine._static is not None and engine._static.logits is not None  # the static path ran
    for p, out in zip(prompts, outs):
        ref_tokens, _ = reference_greedy(model, p, 10, num_layers=cfg.model.num_layers)
        assert out.tokens == ref_tokens


def test_static_equals_general_pass_with_stops_and_sampling(single_rank_parallel):
    """Rows of different lengths, one stopping early (it keeps being recomputed in place, its
    output must not change the others'), tau = 1.0 routed to the static step, seeded sampling."""
    cfg, model = trained("llama")
    prompts = random_prompts(torch.Generator().manual_seed(12), 4, cfg.model.vocab_size, 2, 12)
    general, static = Engine(model, cfg), Engine(model, cfg, fast_decode="static")
    ref = general.generate(prompts, 14, mode=FullDepth())
    stop = StopCriteria(stop_token_ids={ref[1].tokens[3]})  # row 1 stops after 4 tokens
    sampled = SamplingParams(temperature=0.9, top_k=20, seed=3)
    for mode, sampling in ((FullDepth(), SamplingParams(temperature=0.0)),
                           (EarlyExit(threshold=1.0), sampled)):
        want = general.generate(prompts, 14, sampling=sampling, stop=stop, mode=mode)
        got = static.generate(prompts, 14, sampling=sampling, stop=stop, mode=mode)
        for a, b in zip(want, got):
            assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
            assert a.exit_layers == b.exit_layers
            assert a.confidences == pytest.approx(b.confidences, rel=1e-9)
    assert any(o.finish_reason == "stop" for o in got)


def test_static_step_is_not_used_when_exits_can_fire(single_rank_parallel):
    cfg, model = trained("llama")
    engine = Engine(model, cfg, fast_decode="static")
    prompts = random_prompts(torch.Generator().manual_seed(13), 2, cfg.model.vocab_size, 2, 8)
    sess = engine.session(prompts, 4, mode=EarlyExit(threshold=0.5))
    assert isinstance(sess.runner, DepthRunner)  # batch 2 with exits: the general pass
    with pytest.raises(ValueError, match="fast_decode"):
        Engine(model, cfg, fast_decode="graph")
    with pytest.raises(ValueError, match="CUDA"):
        Engine(model, cfg, fast_decode="cuda_graph").generate(prompts, 2)


@pytest.mark.parametrize("variant", ["llama", "llama-norm-mlp-pre"])
def test_static_early_exit_equals_general_pass(variant, single_rank_parallel):
    """Batch-1 early exit on static segment slots (static_early_exit.py) against the general
    pass: same tokens, exit layers and confidences, with pending tokens joining at their depths,
    a small pending cap (capped rows run to full depth) and the margin confidence."""
    cfg, model = trained(variant)  # float64
    prompts = random_prompts(torch.Generator().manual_seed(14), 3, cfg.model.vocab_size, 2, 10)
    general, static = Engine(model, cfg), Engine(model, cfg, fast_decode="static")
    exited = 0
    for mode in (EarlyExit(threshold=0.6), EarlyExit(threshold=0.3, max_pending=2),
                 EarlyExit(threshold=0.2, confidence="margin", max_pending=3),
                 EarlyExit(threshold=0.4, exit_layers=(cfg.exits.exit_layer_nums[-1],))):
        for p in prompts:
            sess = static.session([p], 16, mode=mode)
            assert isinstance(sess.runner, StaticRunner)
            want = general.generate([p], 16, mode=mode)[0]
            got = static.generate([p], 16, mode=mode)[0]
            assert (got.tokens, got.exit_layers) == (want.tokens, want.exit_layers), mode
            assert got.confidences == pytest.approx(want.confidences, rel=1e-9)
            exited += sum(layer < cfg.model.num_layers for layer in want.exit_layers)
    assert exited > 10  # early exits (and so pending tokens and joins) were exercised


@pytest.mark.parametrize("variant", ["llama", "llama-norm-mlp-pre"])
def test_static_self_speculative_equals_general_pass(variant, single_rank_parallel):
    """Self-speculative drafting (forced exit) and verification (final logits of every slot)
    through the StaticRunner: same tokens, exit layers, confidences and acceptance counts as the
    general pass, greedy and sampled."""
    cfg, model = trained(variant)
    prompts = random_prompts(torch.Generator().manual_seed(15), 3, cfg.model.vocab_size, 2, 10)
    general, static = Engine(model, cfg), Engine(model, cfg, fast_decode="static")
    drafted = 0
    for exit_layer in cfg.exits.exit_layer_nums[:2]:
        for k, sampling in ((3, SamplingParams(temperature=0.0)),
                            (4, SamplingParams(temperature=0.8, seed=7))):
            mode = SelfSpeculative(exit_layer=exit_layer, num_draft=k)
            for p in prompts:
                ws, gs = general.session([p], 15, sampling=sampling, mode=mode), static.session(
                    [p], 15, sampling=sampling, mode=mode)
                assert isinstance(gs.runner, StaticRunner)
                for sess in (ws, gs):
                    with sess.attached():
                        while not sess.done:
                            sess.step()
                want, got = ws.outputs[0], gs.outputs[0]
                assert (got.tokens, got.exit_layers) == (want.tokens, want.exit_layers)
                assert got.confidences == pytest.approx(want.confidences, rel=1e-9)
                assert gs.stats == ws.stats
                drafted += ws.stats["drafted"]
    assert drafted > 0
