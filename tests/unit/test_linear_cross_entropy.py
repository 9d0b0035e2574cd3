"""The chunked, fused output-projection + cross entropy (model/linear_cross_entropy.py) on one rank.

Reference: a plain float64 computation written here (full logits, log_softmax over the real ids,
autograd for the gradients). Checked: the masked-mean loss (with and without the dynamic exit
weight's max probability and a temperature) and the gradients of the hidden states and of the
weight (padded rows get none), for chunk sizes that do and do not divide the token count; no
gradient work without grad; and the peak CPU memory of forward + backward, measured at the
allocator with the profiler, against the materialised path.
TP=2 is covered by tests/distributed/test_padded_vocab_layouts.py.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from megatron.early_exit.model.linear_cross_entropy import linear_cross_entropy

S, B, H, V, REAL = 7, 3, 16, 45, 40  # 5 padded vocabulary rows


def _inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(S, B, H, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.7).to(dtype)
    labels = torch.randint(0, REAL, (B, S), generator=gen)
    mask = (torch.rand(B, S, generator=gen) > 0.3).double()
    return h, w, labels, mask


def _reference(h, w, labels, mask, temperature, dynamic):
    """Float64 loss = masked mean of CE (x detached max prob), with its gradients."""
    h = h.detach().double().requires_grad_(True)
    w = w.detach().double().requires_grad_(True)
    z = (h.transpose(0, 1) @ w[:REAL].T) / temperature  # [b, s, REAL]: padded ids never scored
    logp = z.log_softmax(-1)
    ce = -logp.gather(-1, labels[..., None]).squeeze(-1)  # [b, s]
    pmax = logp.max(-1).values.exp().detach()
    loss = ((ce * pmax if dynamic else ce) * mask).sum() / mask.sum()
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _ours(h, w, labels, mask, temperature, dynamic, chunk):
    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss = linear_cross_entropy(h, w, labels, mask, num_tokens=REAL, temperature=temperature,
                                dynamic=dynamic, chunk_size=chunk)
    (3.0 * loss).backward()  # an upstream scale (exit weight, 1/M) reaches both gradients
    return loss.detach(), h.grad / 3.0, w.grad / 3.0


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("chunk", [1, 4, 21, 4096])
@pytest.mark.parametrize("temperature, dynamic", [(1.0, False), (1.7, True)])
def test_matches_float64_full_logits(dtype, tol, chunk, temperature, dynamic):
    h, w, labels, mask = _inputs(dtype)
    ref = _reference(h, w, labels, mask, temperature, dynamic)
    got = _ours(h, w, labels, mask, temperature, dynamic, chunk)
    for name, a, b in zip(("loss", "grad h", "grad w"), got, ref):
        assert a.dtype == dtype
        assert _rel(a, b) < tol, f"{name}: {_rel(a, b):.2e}"
    assert torch.count_nonzero(got[2][REAL:]) == 0  # padded rows: no gradient


def test_without_grad_same_loss():
    h, w, labels, mask = _inputs(torch.float64, seed=5)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, labels, mask, num_tokens=REAL, chunk_size=4)
    assert _rel(loss, _reference(h, w, labels, mask, 1.0, False)[0]) < 1e-12


def test_float32_error_is_that_of_materialised_logits():
    """Chunking does not add error: float32 chunked is as close to float64 as float32 full
    logits through torch's own cross entropy are."""
    h, w, labels, mask = _inputs(torch.float32, seed=3)
    ref = _reference(h, w, labels, mask, 1.0, False)
    hm, wm = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    z = hm.transpose(0, 1) @ wm[:REAL].T
    plain = torch.nn.functional.cross_entropy(z.reshape(-1, REAL), labels.reshape(-1), reduction="none")
    ((plain.view(B, S) * mask.float()).sum() / mask.sum()).backward()
    got = _ours(h, w, labels, mask, 1.0, False, chunk=5)
    for a, m, b in ((got[1], hm.grad, ref[1]), (got[2], wm.grad, ref[2])):
        assert _rel(a, b) < 4 * max(_rel(m, b), 1e-7)


def _cpu_peak_bytes(fn) -> int:
    """Peak of the bytes allocated by ``fn`` (CPU allocator events recorded by the profiler)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    now = peak = 0
    for _, nbytes in events:
        now += nbytes
        peak = max(peak, now)
    return peak


def test_peak_memory_is_one_chunk_of_logits():
    n, hidden, vocab = 1024, 32, 4096  # full float32 logits: 16 MiB
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, 1, hidden, generator=gen, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=gen, requires_grad=True)
    labels = torch.randint(0, vocab, (1, n), generator=gen)

    def chunked():
        linear_cross_entropy(h, w, labels, num_tokens=vocab, chunk_size=64).backward()

    def materialised():
        z = h[:, 0] @ w.T
        torch.nn.functional.cross_entropy(z, labels[0]).backward()

    logits_bytes = n * vocab * 4
    peak_chunked, peak_full = _cpu_peak_bytes(chunked), _cpu_peak_bytes(materialised)
    assert peak_full > logits_bytes
    assert peak_chunked < logits_bytes / 4, (peak_chunked, peak_full)
