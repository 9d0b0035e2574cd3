"""Unit tests for megatron.early_exit.inference.sampling (CPU, float64 references).

Run: python -m pytest -q tests/unit/test_sampling.py
"""

import math

import pytest
import torch

from megatron.early_exit.inference.sampling import (
    BatchSamplingParams,
    SamplingParams,
    processed_probs,
    sample,
    speculative_accept,
    speculative_accept_greedy,
)


def _logits(b, v, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, v, generator=g) * scale  # [b, V]


def _reference_probs(logits_row, temperature, top_k, top_p):
    """Brute force in float64 for one row: temperature, top-k, top-p (smallest set >= top_p)."""
    x = logits_row.double()
    if temperature == 0:
        out = torch.zeros_like(x)
        out[int(x.argmax())] = 1.0
        return out
    x = x / temperature
    order = sorted(range(x.numel()), key=lambda i: -float(x[i]))
    keep = order[:top_k] if top_k > 0 else order
    p = torch.softmax(x[keep], dim=0)
    if top_p < 1.0:
        total, cut = 0.0, len(keep)
        for j in range(len(keep)):
            total += float(p[j])
            if total >= top_p:
                cut = j + 1
                break
        keep = keep[:cut]
    out = torch.zeros_like(x)
    out[keep] = torch.softmax(x[keep], dim=0)
    return out


# -- SamplingParams ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": -3}, "seed"),
    ],
)
def test_params_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_batch_params_validation():
    with pytest.raises(ValueError, match="top_p"):
        BatchSamplingParams(torch.ones(2), torch.zeros(2, dtype=torch.long), torch.tensor([1.0, 0.0]))
    rows = BatchSamplingParams(torch.tensor([0.0, 1.0]), torch.tensor([0, 3]), torch.tensor([1.0, 1.0]))
    assert rows.any_greedy and not rows.all_greedy and rows.needs_top_k and not rows.needs_top_p


# -- processed_probs / sample -----------------------------------------------------------------


def test_greedy_is_argmax():
    logits = _logits(8, 50)
    assert torch.equal(sample(logits, SamplingParams(temperature=0.0)), logits.argmax(-1))
    probs = processed_probs(logits, SamplingParams(temperature=0.0))
    assert torch.equal(probs.argmax(-1), logits.argmax(-1)) and torch.all(probs.sum(-1) == 1)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_temperature_matches_softmax(temperature):
    logits = _logits(4, 37, seed=1)
    got = processed_probs(logits, SamplingParams(temperature=temperature))
    want = torch.softmax(logits.double() / temperature, dim=-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_keeps_exactly_k(k):
    logits = _logits(6, 40, seed=2)
    probs = processed_probs(logits, SamplingParams(top_k=k))
    assert torch.all((probs > 0).sum(-1) == k)
    kept = set(map(tuple, probs.topk(k, dim=-1).indices.sort(-1).values.tolist()))
    want = set(map(tuple, logits.topk(k, dim=-1).indices.sort(-1).values.tolist()))
    assert kept == want
    # ties: exactly k survive even when all logits are equal
    flat = processed_probs(torch.zeros(2, 9), SamplingParams(top_k=4))
    assert torch.all((flat > 0).sum(-1) == 4)


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 0.9), (0.7, 0, 0.5), (1.3, 8, 0.8), (1.0, 5, 1.0), (0.5, 0, 1e-4), (2.0, 20, 0.95)],
)
def test_top_p_matches_float64_reference(temperature, top_k, top_p):
    logits = _logits(16, 30, seed=3)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    got = processed_probs(logits, params)
    want = torch.stack([_reference_probs(r, temperature, top_k, top_p) for r in logits])
    assert torch.equal(got > 0, want > 0)  # same support
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert torch.all((got > 0).sum(-1) >= 1)


def test_per_row_params_match_single_params():
    logits = _logits(5, 33, seed=4)
    plist = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_k=4),
        SamplingParams(temperature=1.2, top_p=0.7),
        SamplingParams(temperature=1.0, top_k=10, top_p=0.6),
        SamplingParams(),
    ]
    rows = BatchSamplingParams.stack(plist)
    got = processed_probs(logits, rows)
    for i, p in enumerate(plist):
        torch.testing.assert_close(got[i], processed_probs(logits[i : i + 1], p)[0])
        want = _reference_probs(logits[i], p.temperature, p.top_k, p.top_p)
        torch.testing.assert_close(got[i].double(), want, rtol=1e-5, atol=1e-7)
    # tensors built directly behave the same as stack()
    direct = BatchSamplingParams(rows.temperature, rows.top_k, rows.top_p)
    torch.testing.assert_close(processed_probs(logits, direct), got)
    # a greedy row of a mixed batch always samples its argmax
    for seed in range(5):
        tok = sample(logits, rows, torch.Generator().manual_seed(seed))
        assert tok[0] == logits[0].argmax()


def test_seeded_sampling_reproducible():
    logits = _logits(64, 100, seed=5, scale=1.0)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    a = sample(logits, params, params.make_generator())
    b = sample(logits, params, params.make_generator())
    c = sample(logits, params, SamplingParams(seed=99).make_generator())
    assert a.dtype == torch.int64 and a.shape == (64,)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert SamplingParams().make_generator() is None


def test_sample_frequencies_follow_processed_probs():
    """Loose sanity check (Hoeffding, 1e-6 false failure) that `sample` draws from probs."""
    n, v = 40_000, 6
    logits = _logits(1, v, seed=6, scale=1.0).expand(n, v)
    params = SamplingParams(temperature=0.8, top_k=4)
    tok = sample(logits, params, torch.Generator().manual_seed(7))
    freq = torch.bincount(tok, minlength=v).double() / n
    tol = math.sqrt(math.log(2 * v / 1e-6) / (2 * n))
    assert (freq - processed_probs(logits[:1], params)[0].double()).abs().max() < tol


# -- speculative acceptance -------------------------------------------------------------------


def _hoeffding_tol(n, num_cells, delta=1e-6):
    """|freq - p| bound for one cell over n iid rows, union-bounded over num_cells cells.

    Hoeffding: P(|freq - p| >= t) <= 2 exp(-2 n t^2). With t chosen so that each term is
    delta / num_cells, the chance that any cell fails is at most delta.
    """
    return math.sqrt(math.log(2 * num_cells / delta) / (2 * n))


def _rand_dist(g, *shape):
    x = torch.rand(*shape, generator=g, dtype=torch.float64) ** 2 + 0.02
    return x / x.sum(-1, keepdim=True)


def _spec_setup(n, v, seed):
    """Draft/target laws for k = 3 where position 1 depends on the first draft token."""
    g = torch.Generator().manual_seed(seed)
    P0, Q0, P2, Q2, P3 = (_rand_dist(g, v) for _ in range(5))  # [V] each
    P1, Q1 = _rand_dist(g, v, v), _rand_dist(g, v, v)  # [V(first token), V]
    x1 = torch.multinomial(Q0.expand(n, v), 1, generator=g).squeeze(1)  # [n]
    x2 = torch.multinomial(Q1[x1], 1, generator=g).squeeze(1)  # [n]
    x3 = torch.multinomial(Q2.expand(n, v), 1, generator=g).squeeze(1)  # [n]
    draft = torch.stack([x1, x2, x3], dim=1)  # [n, 3]
    q = torch.stack([Q0.expand(n, v), Q1[x1], Q2.expand(n, v)], dim=1).float()  # [n, 3, V]
    p = torch.stack([P0.expand(n, v), P1[x1], P2.expand(n, v), P3.expand(n, v)], 1).float()
    lengths = torch.multinomial(torch.tensor([0.1, 0.15, 0.15, 0.6]).expand(n, 4), 1, generator=g)
    lengths = lengths.squeeze(1)  # [n] in {0..3}
    pad = torch.arange(3) >= lengths[:, None]  # [n, 3] positions beyond a row's drafts
    draft = draft.masked_fill(pad, -1)  # padding must be ignored, whatever it holds
    q = q.masked_fill(pad[..., None], float("nan"))
    p = p.masked_fill(torch.cat([torch.zeros(n, 1, dtype=torch.bool), pad], 1)[..., None], float("nan"))
    return dict(P0=P0, Q0=Q0, P1=P1, P2=P2, P3=P3, draft=draft, q=q, p=p, lengths=lengths)


def test_speculative_rejection_sampling_is_lossless():
    n, v = 60_000, 5
    s = _spec_setup(n, v, seed=11)
    lengths = s["lengths"]
    n_acc, nxt = speculative_accept(s["draft"], s["q"], s["p"], torch.Generator().manual_seed(12), lengths)
    assert torch.all(n_acc <= lengths) and n_acc.dtype == nxt.dtype == torch.int64
    emitted = torch.cat([s["draft"], torch.zeros(n, 1, dtype=torch.long)], 1)  # [n, 4]
    emitted[torch.arange(n), n_acc] = nxt  # row: accepted drafts, then the next token
    first, second = emitted[:, 0], emitted[:, 1]

    # (law, rows) pairs: each row set is iid given its membership, so Hoeffding applies.
    checks = [(s["P0"], torch.ones(n, dtype=torch.bool))]
    checks += [(s["P0"], lengths == L) for L in range(4)]  # first token, per draft length
    checks += [(s["P1"][a], (n_acc >= 1) & (first == a)) for a in range(v)]  # 2nd | 1st = a
    checks += [(s["P2"], (lengths == 2) & (n_acc == 2)), (s["P3"], (lengths == 3) & (n_acc == 3))]
    tokens = [first] * 5 + [second] * v + [nxt, nxt]
    for (law, rows), tok in zip(checks, tokens):
        m = int(rows.sum())
        assert m > 1000
        freq = torch.bincount(tok[rows], minlength=v).double() / m
        tol = _hoeffding_tol(m, num_cells=len(checks) * v)
        assert (freq - law).abs().max() < tol, (freq, law, tol)

    # power: the classic bug (resample from p instead of max(0, p - q)) would fail the first
    # check. Its first-token law is min(p, q) + (1 - sum min(p, q)) p.
    P0, Q0 = s["P0"], s["Q0"]
    overlap = torch.minimum(P0, Q0)
    wrong = overlap + (1 - overlap.sum()) * P0
    assert (wrong - P0).abs().max() > 2 * _hoeffding_tol(n, len(checks) * v)


def test_speculative_accept_degenerate_cases():
    g = torch.Generator().manual_seed(0)
    p = _rand_dist(g, 4, 3, 7).float()  # [b, k+1=3, V]
    draft = torch.tensor([[1, 2], [3, 3], [0, 6], [5, 4]])
    # q == p: every draft is accepted (u < 1 = p/q)
    n_acc, _ = speculative_accept(draft, p[:, :2], p, g)
    assert torch.all(n_acc == 2)
    # q puts all mass on the draft token while p gives it zero mass: always rejected
    q = torch.zeros(4, 2, 7).scatter_(-1, draft[..., None], 1.0)
    p0 = p.clone()
    p0[:, 0].scatter_(-1, draft[:, :1], 0.0)
    n_acc, nxt = speculative_accept(draft, q, p0, g)
    assert torch.all(n_acc == 0) and torch.all(nxt != draft[:, 0])
    # k = 0: plain sampling from target_probs[:, 0]
    n_acc, nxt = speculative_accept(draft[:, :0], q[:, :0], p[:, :1], g)
    assert torch.all(n_acc == 0) and nxt.shape == (4,)


def _greedy_reference(draft, target, lengths):
    out_n, out_t = [], []
    for row in range(draft.shape[0]):
        n = 0
        while n < int(lengths[row]) and int(draft[row, n]) == int(target[row, n].argmax()):
            n += 1
        out_n.append(n)
        out_t.append(int(target[row, n].argmax()))
    return torch.tensor(out_n), torch.tensor(out_t)


def test_greedy_speculative_accept_matches_sequential_reference():
    g = torch.Generator().manual_seed(3)
    b, k, v = 200, 4, 6
    target = torch.randn(b, k + 1, v, generator=g)  # [b, k+1, V]
    argmax = target.argmax(-1)
    # drafts agree with the target argmax often, so every acceptance length occurs
    noise = torch.randint(0, v, (b, k), generator=g)
    draft = torch.where(torch.rand(b, k, generator=g) < 0.7, argmax[:, :k], noise)
    lengths = torch.randint(0, k + 1, (b,), generator=g)
    n_acc, nxt = speculative_accept_greedy(draft, target, lengths)
    want_n, want_t = _greedy_reference(draft, target, lengths)
    assert torch.equal(n_acc, want_n) and torch.equal(nxt, want_t)
    assert set(n_acc.tolist()) == set(range(k + 1))
    # full-length default and probabilities instead of logits give the same answer
    n_full, t_full = speculative_accept_greedy(draft, torch.softmax(target, -1))
    want_n, want_t = _greedy_reference(draft, target, torch.full((b,), k))
    assert torch.equal(n_full, want_n) and torch.equal(t_full, want_t)

    # the stochastic rule on greedy (one-hot) processed distributions is exactly greedy
    greedy = SamplingParams(temperature=0.0)
    p = processed_probs(target.reshape(-1, v), greedy).reshape(b, k + 1, v)
    q = torch.zeros(b, k, v).scatter_(-1, draft[..., None], 1.0)
    n_s, t_s = speculative_accept(draft, q, p, g, lengths)
    want_n, want_t = _greedy_reference(draft, target, lengths)
    assert torch.equal(n_s, want_n) and torch.equal(t_s, want_t)
