"""Self-speculative decoding: greedy output identical to full-model greedy, and rejection
sampling keeps the full model's distribution (exact computation vs. a large sample).

Run: ``python -m pytest -q tests/unit/test_engine_speculative.py``.
"""

import itertools
import math

import pytest
import torch

from megatron.early_exit.inference.engine import Engine
from megatron.early_exit.inference.modes import FullDepth, SelfSpeculative
from megatron.early_exit.inference.sampling import SamplingParams, processed_probs
from megatron.early_exit.config import EarlyExitGPTConfig, ExitConfig, ModelConfig
from tests.unit.engine_testlib import reference_greedy, VARIANTS, build, random_prompts, trained


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_speculative_equals_full_greedy(variant, single_rank_parallel):
    cfg, model = trained(variant)
    engine = Engine(model, cfg)
    gen = torch.Generator().manual_seed(11)
    prompts = random_prompts(gen, 4, cfg.model.vocab_size)
    full = engine.generate(prompts, 14, mode=FullDepth())
    for p, a in zip(prompts, full):  # an independent no-cache full-depth recomputation
        assert a.tokens == reference_greedy(model, p, 14, num_layers=cfg.model.num_layers)[0]
    accepted = 0
    for exit_layer in cfg.exits.exit_layer_nums:
        for k, tau_draft in ((1, 0.0), (4, 0.5)):
            sess = engine.session(prompts, 14, mode=SelfSpeculative(exit_layer, k, tau_draft))
            with sess.attached():
                while not sess.done:
                    sess.step()
            for i, (a, b) in enumerate(zip(full, sess.outputs)):
                assert b.tokens == a.tokens, (exit_layer, k, tau_draft, i)
                assert b.finish_reason == "length"
                assert set(b.exit_layers) <= {exit_layer, cfg.model.num_layers}
            accepted += sess.stats["accepted"]
            assert sess.stats["accepted"] <= sess.stats["drafted"]
    assert accepted > 0, "no draft was ever accepted: the test exercises only rejections"


@pytest.mark.parametrize("variant", ["llama-block", "gpt2-pre-exit-block"])
def test_greedy_speculative_batch_rows_equal_single(variant, single_rank_parallel):
    """Rows of one batch stop drafting at different times; each equals its batch-1 run."""
    cfg, model = trained(variant)
    engine = Engine(model, cfg)
    prompts = random_prompts(torch.Generator().manual_seed(5), 5, cfg.model.vocab_size, 1, 12)
    mode = SelfSpeculative(cfg.exits.exit_layer_nums[-1], 5, draft_threshold=0.6)
    batched = engine.generate(prompts, 10, mode=mode)
    for p, out in zip(prompts, batched):
        (single,) = engine.generate([p], 10, mode=mode)
        assert out.tokens == single.tokens and out.exit_layers == single.exit_layers


def _exact_joint(model, prompt, params, vocab):
    """P(t2, t3, t4) of the full model's sampling, summed over t1 -> [V, V, V]."""
    seqs = torch.tensor([list(prompt) + list(t) for t in itertools.product(range(vocab), repeat=3)])
    with torch.no_grad():
        logits = model(input_ids=seqs, return_logits=True).final_logits  # [s, V^3, V]
    n = len(prompt)
    steps = [processed_probs(logits[n - 1 + i], params).double() for i in range(4)]  # [V^3, V]
    idx = torch.tensor(list(itertools.product(range(vocab), repeat=3)))  # [V^3, 3]
    rows = torch.arange(len(idx))
    p = steps[0][rows, idx[:, 0]] * steps[1][rows, idx[:, 1]] * steps[2][rows, idx[:, 2]]
    joint = p[:, None] * steps[3]  # [V^3 (t1 t2 t3), V (t4)]
    return joint.view(vocab, vocab, vocab, vocab).sum(0)  # [t2, t3, t4]


def _draft_only_joint(model, prompt, params, vocab, exit_layer):
    """The same joint if every draft (t2, t3) were accepted unchecked: what a broken
    acceptance rule would produce. Used to show the test can see such a bug."""
    seqs = torch.tensor([list(prompt) + list(t) for t in itertools.product(range(vocab), repeat=3)])
    with torch.no_grad():
        out = model(input_ids=seqs, return_logits=True)
    n = len(prompt)
    fin = [processed_probs(out.final_logits[n - 1 + i], params).double() for i in (0, 3)]
    q = [processed_probs(out.exit_logits[exit_layer][n - 1 + i], params).double() for i in (1, 2)]
    idx = torch.tensor(list(itertools.product(range(vocab), repeat=3)))
    rows = torch.arange(len(idx))
    p = fin[0][rows, idx[:, 0]] * q[0][rows, idx[:, 1]] * q[1][rows, idx[:, 2]]
    return (p[:, None] * fin[1]).view(vocab, vocab, vocab, vocab).sum(0)


def _bernstein_eps(p: torch.Tensor, n: int, log_term: float) -> torch.Tensor:
    """Smallest eps with 2 exp(-n eps^2 / (2 p (1 - p) + 2 eps / 3)) <= exp(-log_term) * 2,
    i.e. the root of n eps^2 - (2/3) L eps - 2 L p (1 - p) = 0 with L = log_term."""
    a, b, c = n, -(2.0 / 3.0) * log_term, -2.0 * log_term * p * (1 - p)
    return (-b + torch.sqrt(b * b - 4 * a * c)) / (2 * a)


def test_rejection_sampling_keeps_full_distribution(single_rank_parallel):
    """Tokens 2..4 of self-speculative sampling (one cycle of two drafts plus the bonus, or
    rejections and later cycles) against the exact joint law of the full model.

    Bound: cell c of the C = V^3 = 64 cells of (t2, t3, t4) has exact probability p_c; its
    empirical frequency over N independent rows satisfies Bernstein's inequality
    P(|f_c - p_c| >= eps) <= 2 exp(-N eps^2 / (2 p_c (1 - p_c) + 2 eps / 3)). Choosing eps_c
    so that each cell's bound is 2 delta / (2 C) with delta = 1e-7, a correct engine fails the
    union over all cells with probability < 1e-7 (< 1e-6 required).
    """
    vocab, prompt, exit_layer = 4, [1, 3, 0, 2], 1
    model_cfg = ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=2, num_query_groups=1,
                            ffn_hidden_size=32, vocab_size=vocab, seq_length=16)
    cfg = EarlyExitGPTConfig(model=model_cfg, exits=ExitConfig(exit_layer_nums=[1]), seed=3)
    model = build(cfg, sharpen=6.0)
    params = SamplingParams(temperature=0.9, top_k=3)
    exact = _exact_joint(model, prompt, params, vocab)  # [V, V, V]
    N, delta, C = 12000, 1e-7, vocab ** 3
    eps = _bernstein_eps(exact, N, math.log(2 * C / delta))  # [V, V, V]
    broken = _draft_only_joint(model, prompt, params, vocab, exit_layer)
    assert ((broken - exact).abs() > 2 * eps).any(), "no power against a broken acceptance rule"
    engine = Engine(model, cfg)
    # N independent rows: each row samples with its own generator, so each gets its own seed
    sp = [SamplingParams(temperature=0.9, top_k=3, seed=2024 + i) for i in range(N)]
    outs = engine.generate([prompt] * N, 4, sampling=sp, mode=SelfSpeculative(exit_layer, 2))
    toks = torch.tensor([o.tokens for o in outs])  # [N, 4]
    counts = torch.zeros(vocab, vocab, vocab, dtype=torch.float64)
    counts.index_put_((toks[:, 1], toks[:, 2], toks[:, 3]), torch.ones(N, dtype=torch.float64),
                      accumulate=True)
    err = (counts / N - exact).abs()
    assert (err < eps).all(), f"cell errors {err.max():.4f} exceed the bound (max eps {eps.max():.4f})"
