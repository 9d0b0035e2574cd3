"""Confidence-based early exit with KV recomputation against a no-cache reference that runs
the whole sequence through the full forward each step and applies the exit rule.

Run: ``python -m pytest -q tests/unit/test_engine_early_exit.py``.
"""

import pytest
import torch

from megatron.early_exit.inference.engine import Engine
from megatron.early_exit.inference.modes import EarlyExit
from tests.unit.engine_testlib import VARIANTS, random_prompts, reference_greedy, trained


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_early_exit_matches_no_cache_reference(variant, single_rank_parallel):
    cfg, model = trained(variant)
    engine = Engine(model, cfg)
    L = cfg.model.num_layers
    prompts = random_prompts(torch.Generator().manual_seed(4), 3, cfg.model.vocab_size)
    allowed = cfg.exits.exit_layer_nums[-1:]
    cases = [(0.8, None, 16), (0.4, allowed, 2)]
    exited = 0
    for tau, exit_layers, cap in cases:
        mode = EarlyExit(threshold=tau, exit_layers=exit_layers, max_pending=cap)
        outs = engine.generate(prompts, 10, mode=mode)
        for p, out in zip(prompts, outs):
            ref_tokens, ref_layers = reference_greedy(model, p, 10, tau, exit_layers, L)
            assert (out.tokens, out.exit_layers) == (ref_tokens, ref_layers), (tau, exit_layers, cap)
            exited += sum(layer < L for layer in out.exit_layers)
            if exit_layers is not None:
                assert set(out.exit_layers) <= set(exit_layers) | {L}
    assert exited > 0


@pytest.mark.parametrize("variant", ["llama", "llama-norm-mlp-pre"])
def test_low_threshold_exits_early_with_confident_tokens(variant, single_rank_parallel):
    cfg, model = trained(variant, dtype="float32")
    engine = Engine(model, cfg)
    L = cfg.model.num_layers
    prompts = random_prompts(torch.Generator().manual_seed(6), 4, cfg.model.vocab_size)
    tau = 0.3
    outs = engine.generate(prompts, 16, mode=EarlyExit(threshold=tau))
    layers = [x for o in outs for x in o.exit_layers]
    assert sum(layers) / len(layers) < L
    for o in outs:
        assert len(o.tokens) == len(o.exit_layers) == len(o.confidences) == 16
        for layer, conf in zip(o.exit_layers, o.confidences):
            assert layer in cfg.exits.exit_layer_nums + [L]
            if layer < L:
                assert conf >= tau
            assert 0.0 < conf <= 1.0


def test_margin_confidence_and_pending_cap(single_rank_parallel):
    """The margin criterion exits only when top-1 minus top-2 >= tau; the cap never changes
    the tokens, only when the deep KV gets filled."""
    cfg, model = trained("llama")
    engine = Engine(model, cfg)
    prompts = random_prompts(torch.Generator().manual_seed(8), 3, cfg.model.vocab_size)
    runs = [engine.generate(prompts, 12, mode=EarlyExit(0.3, max_pending=cap, confidence="margin"))
            for cap in (0, 1, 16)]
    for outs in runs[1:]:
        assert [o.tokens for o in outs] == [o.tokens for o in runs[0]]
        assert [o.exit_layers for o in outs] == [o.exit_layers for o in runs[0]]
    for o in runs[0]:
        for layer, conf in zip(o.exit_layers, o.confidences):
            if layer < cfg.model.num_layers:
                assert conf >= 0.3
