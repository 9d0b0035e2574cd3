"""Full-depth decoding with the static KV cache against no-cache recomputation, tau = 1.0
against full depth, batched rows against batch-1 runs, and seeded sampling.

Run: ``python -m pytest -q tests/unit/test_engine_full.py``.
"""

import pytest
import torch

from megatron.early_exit.inference.engine import Engine
from megatron.early_exit.inference.modes import EarlyExit, FullDepth
from megatron.early_exit.inference.sampling import SamplingParams, processed_probs
from tests.unit.engine_testlib import forward_logits, random_prompts, reference_greedy, trained


@pytest.mark.parametrize("variant", ["llama", "gpt2-pre-exit-block"])
def test_full_greedy_matches_no_cache_recompute(variant, single_rank_parallel):
    cfg, model = trained(variant)
    engine = Engine(model, cfg)
    prompts = random_prompts(torch.Generator().manual_seed(1), 3, cfg.model.vocab_size, 1, 10)
    outs = engine.generate(prompts, 10, mode=FullDepth())
    L = cfg.model.num_layers
    for p, out in zip(prompts, outs):
        ref_tokens, _ = reference_greedy(model, p, 10, num_layers=L)
        assert out.tokens == ref_tokens
        assert out.exit_layers == [L] * 10 and out.finish_reason == "length"
        final, _ = forward_logits(model, p)
        assert out.confidences[0] == pytest.approx(float(torch.softmax(final, -1).max()), rel=1e-9)


@pytest.mark.parametrize("variant", ["llama", "gpt2-pre-exit-block"])
def test_tau_one_reproduces_full_model(variant, single_rank_parallel):
    cfg, model = trained(variant, dtype="float32")
    engine = Engine(model, cfg)
    prompts = random_prompts(torch.Generator().manual_seed(2), 4, cfg.model.vocab_size)
    full = engine.generate(prompts, 12, mode=FullDepth())
    tau1 = engine.generate(prompts, 12, mode=EarlyExit(threshold=1.0))
    for a, b in zip(full, tau1):
        assert (a.tokens, a.exit_layers, a.confidences) == (b.tokens, b.exit_layers, b.confidences)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=5)
    a = engine.generate(prompts, 12, sampling=sampled, mode=FullDepth())
    b = engine.generate(prompts, 12, sampling=sampled, mode=EarlyExit(threshold=1.0))
    assert [o.tokens for o in a] == [o.tokens for o in b]
    # against an independent no-cache full-depth recomputation (float64 weights)
    cfg64, model64 = trained(variant)
    L = cfg64.model.num_layers
    for p, out in zip(prompts, Engine(model64, cfg64).generate(prompts, 12, mode=EarlyExit(threshold=1.0))):
        ref_tokens, _ = reference_greedy(model64, p, 12, num_layers=L)
        assert (out.tokens, out.exit_layers) == (ref_tokens, [L] * 12)


@pytest.mark.parametrize("mode", [FullDepth(), EarlyExit(threshold=0.5, max_pending=3)],
                         ids=["full", "early-exit"])
def test_batched_rows_equal_batch_one(mode, single_rank_parallel):
    cfg, model = trained("llama-block")
    engine = Engine(model, cfg)
    prompts = random_prompts(torch.Generator().manual_seed(3), 5, cfg.model.vocab_size, 1, 14)
    batched = engine.generate(prompts, 12, mode=mode)
    for p, out in zip(prompts, batched):
        (single,) = engine.generate([p], 12, mode=mode)
        assert out.tokens == single.tokens
        assert out.exit_layers == single.exit_layers
        assert out.confidences == pytest.approx(single.confidences, rel=1e-9)


def test_seeded_sampling_matches_reference_sampler(single_rank_parallel):
    """Batch of one: the engine draws exactly what a no-cache sampler with the same generator
    draws (temperature, top-k and top-p applied by sampling.processed_probs)."""
    cfg, model = trained("llama")
    engine = Engine(model, cfg)
    prompt = [3, 9, 27, 4]
    for params in (SamplingParams(temperature=0.7, seed=1), SamplingParams(1.2, top_k=5, seed=2),
                   SamplingParams(1.0, top_p=0.8, seed=3)):
        (out,) = engine.generate([prompt], 10, sampling=params)
        gen = params.make_generator()
        seq, ref = list(prompt), []
        for _ in range(10):
            final, _ = forward_logits(model, seq)
            probs = processed_probs(final[None], params)
            ref.append(int(torch.multinomial(probs, 1, generator=gen)))
            seq.append(ref[-1])
        assert out.tokens == ref
        (again,) = engine.generate([prompt], 10, sampling=params)
        assert again.tokens == out.tokens


def test_engine_rejects_bad_requests(single_rank_parallel):
    cfg, model = trained("llama")
    engine = Engine(model, cfg)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], 4)
    with pytest.raises(ValueError, match="outside"):
        engine.generate([[cfg.model.vocab_size]], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([[1]], 0)
    with pytest.raises(ValueError, match="not exits"):
        engine.generate([[1]], 4, mode=EarlyExit(threshold=0.5, exit_layers=[4]))
    assert all(m.kv_hook is None for m in engine.attention), "hooks must be removed"
