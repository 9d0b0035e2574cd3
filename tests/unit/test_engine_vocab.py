"""Padded vocabulary columns are not tokens: the engine never samples one (greedy, hot
sampling, early exit, self-speculative), and confidences are softmaxes over the tokenizer's
vocabulary only, even when the padded columns carry the largest logits.

Run: ``python -m pytest -q tests/unit/test_engine_vocab.py``.
"""

import dataclasses

import torch

from megatron.early_exit.inference.engine import Engine
from megatron.early_exit.inference.modes import EarlyExit, FullDepth, SelfSpeculative
from megatron.early_exit.inference.sampling import SamplingParams
from tests.unit.engine_testlib import build, forward_logits, make_cfg, random_prompts

TOKENS = 40  # the tokenizer's vocabulary; the layers are padded to 48


def _bumped(fn):
    def wrapped(*args):
        logits = fn(*args).clone()  # [.., V_padded]
        logits[..., TOKENS:] += 100.0  # the padded columns dominate every head
        return logits
    return wrapped


def _padded_model():
    cfg = make_cfg("llama", vocab=48)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tokenizer_vocab_size=TOKENS))
    model = build(cfg)
    model.final_logits = _bumped(model.final_logits)
    model.exit_logits = _bumped(model.exit_logits)
    return cfg, model


def test_padded_ids_are_never_generated(single_rank_parallel):
    cfg, model = _padded_model()
    prompts = random_prompts(torch.Generator().manual_seed(4), 3, TOKENS)
    engine = Engine(model, cfg)
    hot = SamplingParams(temperature=5.0, seed=3)
    for mode in (FullDepth(), EarlyExit(threshold=0.0), SelfSpeculative(exit_layer=2)):
        for sampling in (SamplingParams(temperature=0.0), hot):
            for out in engine.generate(prompts, 16, sampling=sampling, mode=mode):
                assert max(out.tokens) < TOKENS, (mode, sampling, out.tokens)
    # the padded columns do dominate the raw logits: a softmax over them would pick them
    hidden = torch.randn(1, 1, cfg.model.hidden_size, dtype=torch.float64)
    assert int(model.final_logits(hidden).argmax()) >= TOKENS


def test_confidence_is_over_real_tokens_only(single_rank_parallel):
    cfg, model = _padded_model()
    prompt = random_prompts(torch.Generator().manual_seed(5), 1, TOKENS)[0]
    (out,) = Engine(model, cfg).generate([prompt], 1)
    final, _ = forward_logits(model, prompt)
    want = torch.softmax(final[:TOKENS].double(), -1)
    assert out.tokens == [int(want.argmax())]
    assert abs(out.confidences[0] - float(want.max())) < 1e-9
