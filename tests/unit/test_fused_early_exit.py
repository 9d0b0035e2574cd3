"""Batch-1 early exit and self-speculative decoding on the fused layer step
(``Engine(fast_decode="fused")`` -> ``StaticRunner(fused=True)`` -> ``FusedDecoder.run_slots``).

- ``run_slots`` on in-flight slots of one row of a batch-2 cache (padding slots writing the scratch
  slot, a layer range whose fill stays behind) writes the same cache buffers and fill lengths as
  the megatron-core layers through the KV hook, and returns the same hidden states;
- through the engine, against independent no-cache references (the whole sequence recomputed by
  the model's plain forward at every step, float64): early exit at several thresholds (0: every
  token leaves at the first exit, pending tokens pile up to the cap and are recomputed), the
  margin confidence and an exit-layer restriction give the same tokens, exit layers and
  confidences; self-speculative decoding, greedy and seeded sampling (the reference replays the
  draws with the same generator on no-cache distributions), likewise; after every step every
  layer's cache equals a fresh forward's keys/values (``cache.check`` on);
- deliberately broken fused steps fail those comparisons.

Run: ``OMP_NUM_THREADS=1 python -m pytest -q tests/unit/test_fused_early_exit.py``.
"""

from typing import List, Optional, Sequence

import pytest
import torch

from megatron.early_exit.config import EarlyExitGPTConfig, ExitConfig, ModelConfig
from megatron.early_exit.inference.early_exit import DepthRunner
from megatron.early_exit.inference.engine import Engine
from megatron.early_exit.inference.fused_decode import FusedDecoder, RowSlots
from megatron.early_exit.inference.kv_cache import KVCache, PassLayout
from megatron.early_exit.inference.modes import EarlyExit, SelfSpeculative
from megatron.early_exit.inference.runner import RowState
from megatron.early_exit.inference.sampling import (SamplingParams, processed_probs,
                                                    speculative_accept)
from megatron.early_exit.inference.static_early_exit import StaticRunner
from tests.unit.engine_testlib import build, forward_logits, random_prompts, trained
from tests.unit.test_engine_kv_cache import _check_cache

NEW = 14  # new tokens per prompt


def conf_of(logits: torch.Tensor, kind: str = "max_prob") -> float:
    """Max softmax probability, or top-1 minus top-2, of logits [V] in float64."""
    p = torch.softmax(logits.double(), dim=-1)
    top = p.topk(2).values
    return float(top[0] - top[1]) if kind == "margin" else float(top[0])


def gpt2_model():
    """(cfg, model): gpt2-style (LayerNorm, GELU, learned positions, biases, tied), exits after
    layers 1 and 2 with a norm and their own output weights; random biases and norm weights, so
    every fused path (biases, LayerNorm affine) is exercised; float64, untrained."""
    m = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                    ffn_hidden_size=48, vocab_size=48, seq_length=64, architecture="gpt2")
    exits = ExitConfig(exit_layer_nums=[1, 2], use_exit_norm=True, untie_exit_output_weights=True)
    cfg = EarlyExitGPTConfig(model=m, exits=exits, params_dtype="float64", seed=7)
    model = build(cfg, sharpen=6.0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
            elif "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return cfg, model


def model_of(variant: str):
    return gpt2_model() if variant == "gpt2" else trained(variant)  # float64


# ---------------------------------------------------------------------- no-cache references
def ref_early_exit(model, prompt, steps: int, tau: float, kind: str,
                   exit_layers: Optional[Sequence[int]], L: int):
    """Greedy early exit by full recomputation: a token takes the first allowed exit whose
    confidence >= tau (the first token: the prefill's final head) -> (tokens, layers, confs)."""
    seq, toks, layers, confs = list(prompt), [], [], []
    for i in range(steps):
        final, exits = forward_logits(model, seq)
        logits, layer = final, L
        for k in sorted(exits) if i > 0 else ():
            if (exit_layers is None or k in exit_layers) and conf_of(exits[k], kind) >= tau:
                logits, layer = exits[k], k
                break
        seq.append(int(logits.argmax()))
        toks.append(seq[-1])
        layers.append(layer)
        confs.append(conf_of(logits, kind))
    return toks, layers, confs


def ref_self_spec(model, prompt, steps: int, exit_layer: int, k: int, params: SamplingParams,
                  L: int, draft_threshold: float = 0.0):
    """Self-speculative cycles on no-cache logits: drafts from exit ``exit_layer`` (sampled with
    the request's generator, in the engine's order), targets from the final head at every draft
    position, greedy prefix acceptance or ``speculative_accept`` -> (tokens, layers, confs)."""
    gen = torch.Generator().manual_seed(params.seed) if not params.greedy else None

    def pick(logits):
        if params.greedy:
            return int(logits.argmax())
        return int(torch.multinomial(processed_probs(logits[None], params), 1, generator=gen))

    seq = list(prompt)
    final, _ = forward_logits(model, seq)
    toks, layers, confs = [pick(final)], [L], [conf_of(final)]
    seq.append(toks[0])
    while len(toks) < steps:
        drafts, qs, dconf = [], [], []
        while len(drafts) < min(k, steps - len(toks) - 1):
            logits = forward_logits(model, seq + drafts)[1][exit_layer]
            qs.append(processed_probs(logits[None], params)[0])
            drafts.append(pick(logits))
            dconf.append(conf_of(logits))
            if dconf[-1] < draft_threshold:
                break
        targets = torch.stack([forward_logits(model, seq + drafts[:j])[0]
                               for j in range(len(drafts) + 1)])  # [m + 1, V]
        if params.greedy:
            n = 0
            while n < len(drafts) and drafts[n] == int(targets[n].argmax()):
                n += 1
            nxt = int(targets[n].argmax())
        else:
            V = targets.shape[-1]
            q = torch.stack(qs)[None] if qs else targets.new_zeros(1, 0, V).float()
            a, t = speculative_accept(torch.tensor([drafts], dtype=torch.int64).view(1, -1), q,
                                      processed_probs(targets, params)[None], gen,
                                      torch.tensor([len(drafts)]))
            n, nxt = int(a), int(t)
        f32 = [float(torch.tensor(c, dtype=torch.float32)) for c in dconf[:n]]  # as stored
        toks += drafts[:n] + [nxt]
        layers += [exit_layer] * n + [L]
        confs += f32 + [conf_of(targets[n])]
        seq += drafts[:n] + [nxt]
    return toks, layers, confs


# ---------------------------------------------------------------------- the layer step itself
@pytest.mark.parametrize("variant", ["llama", "gpt2"])
def test_run_slots_writes_what_the_kv_hook_writes(variant, single_rank_parallel):
    """Row 1 of a batch-2 cache, layers [1, 3) of 4, slots: two padding (newest position, the
    same hidden state, both writing the scratch slot) then positions 5 and 6 (start 5)."""
    cfg, model = model_of(variant)
    m, dev, S, R, row = cfg.model, torch.device("cpu"), 12, 4, 1
    mods = [layer.self_attention.core_attention for layer in model.decoder.layers]
    cache = KVCache(mods, 2, S, m.num_query_groups, m.head_dim, torch.float64, dev)
    cache.check = True
    prompts = random_prompts(torch.Generator().manual_seed(3), 2, m.vocab_size, 7, 7)
    states = {r: RowState(newest=6) for r in (0, 1)}
    with torch.no_grad(), cache.attach():
        DepthRunner(model, cfg, cache, store_slots=2).prefill([0, 1], states, prompts)
    cache.truncate([row], [5])
    pos = torch.tensor([6, 6, 5, 6])  # [R]
    valid = torch.tensor([False, False, True, True])
    write_idx = torch.where(valid, pos, torch.full_like(pos, S))
    mask = torch.arange(S)[None, :] <= pos[:, None]  # [R, S]
    x0 = torch.randn(R, 1, m.hidden_size, generator=torch.Generator().manual_seed(5),
                     dtype=torch.float64)
    x0[0] = x0[1]
    saved = (cache.k.clone(), cache.v.clone(), cache.lengths.clone())
    lay = PassLayout(rows=torch.tensor([row]), rows_list=[row], starts=[5], ends=[7], s=R,
                     pos=pos.view(R, 1), valid=valid.view(R, 1), write_idx=write_idx.view(R, 1),
                     mask=mask[None, None], start_t=torch.tensor([5]), end_t=torch.tensor([7]),
                     full_batch=False)
    with torch.no_grad(), cache.attach():
        cache.layout = lay
        want = x0
        for d in (1, 2):
            want = model.run_layer(d, want, model.rotary(pos.view(R, 1)))  # rotary None: gpt2
    hook = (cache.k.clone(), cache.v.clone(), cache.lengths.clone())
    assert hook[2][:, row].tolist() == [5, 7, 7, 5]
    for buf, old in zip((cache.k, cache.v, cache.lengths), saved):
        buf.copy_(old)
    slots = RowSlots(row=row, pos=pos, write_idx=write_idx, mask=mask, start=torch.tensor([5]),
                     end=torch.tensor([7]))
    with torch.no_grad():
        got = FusedDecoder(model, cfg, cache).run_slots(1, 3, x0[:, 0].clone(), slots)
    torch.testing.assert_close(got, want[:, 0], rtol=0, atol=1e-12)
    torch.testing.assert_close(cache.k, hook[0], rtol=0, atol=1e-12)  # scratch slot included
    torch.testing.assert_close(cache.v, hook[1], rtol=0, atol=1e-12)
    assert torch.equal(cache.lengths, hook[2])
    with pytest.raises(AssertionError, match="pass starts at"):  # cache.check, as the hook
        FusedDecoder(model, cfg, cache).run_slots(1, 3, x0[:, 0].clone(), slots)


# ---------------------------------------------------------------------- through the engine
def run_checked(engine: Engine, prompt, mode, sampling=SamplingParams(temperature=0.0)):
    """Generate NEW tokens for one prompt on the fused StaticRunner, with ``cache.check`` on and
    the whole cache compared to a fresh forward after every step -> (output, session, the most
    pending tokens seen, steps that ended with pending tokens recomputed to full depth)."""
    model, cfg = engine.model, engine.cfg
    sess = engine.session([prompt], NEW, sampling=sampling, mode=mode)
    assert isinstance(sess.runner, StaticRunner) and sess.runner.fused is not None
    used = [mode.exit_layer] if isinstance(mode, SelfSpeculative) else cfg.exits.exit_layer_nums
    sess.cache.check = True
    most, recomputed = 0, 0
    while not sess.done:
        before = len(sess.states[0].pend)
        with sess.attached():
            sess.step()
        if 0 in sess.states:
            most = max(most, len(sess.states[0].pend))
            recomputed += before > 0 and not sess.states[0].pend
        _check_cache(sess, model, cfg, used)
    return sess.outputs[0], sess, most, recomputed


def early_exit_cases(cfg) -> List[EarlyExit]:
    last = cfg.exits.exit_layer_nums[-1]
    return [EarlyExit(threshold=0.8), EarlyExit(threshold=0.5, max_pending=4),
            EarlyExit(threshold=0.3), EarlyExit(threshold=0.0, max_pending=3),
            EarlyExit(threshold=0.2, confidence="margin", max_pending=3),
            EarlyExit(threshold=0.4, exit_layers=(last,))]


def check_early_exit(variant: str) -> int:
    """Every case of early_exit_cases on 3 prompts against ref_early_exit -> tokens exited."""
    cfg, model = model_of(variant)
    L, first = cfg.model.num_layers, cfg.exits.exit_layer_nums[0]
    engine = Engine(model, cfg, fast_decode="fused")
    exited = 0
    for mode in early_exit_cases(cfg):
        for p in random_prompts(torch.Generator().manual_seed(21), 3, cfg.model.vocab_size, 2, 10):
            out, _, most, recomputed = run_checked(engine, p, mode)
            toks, layers, confs = ref_early_exit(model, p, NEW, mode.threshold, mode.confidence,
                                                 mode.exit_layers, L)
            assert (out.tokens, out.exit_layers) == (toks, layers), mode
            assert out.confidences == pytest.approx(confs, rel=1e-9, abs=1e-12), mode
            exited += sum(x < L for x in layers)
            if mode.threshold == 0.0:  # every decode pass leaves at the first exit
                assert layers[1:] == [first] * (NEW - 1)
                # pending tokens piled up to the cap, then a capped pass filled their deep KV
                assert most == mode.max_pending and recomputed >= 2
    return exited


@pytest.mark.parametrize("variant", ["llama", "llama-norm-mlp-pre", "gpt2"])
def test_fused_early_exit_matches_no_cache_reference(variant, single_rank_parallel):
    assert check_early_exit(variant) > 30  # exits, pending tokens and joins were exercised


def test_fused_falls_back_where_unsupported(single_rank_parallel):
    """Exit blocks or batches > 1 take the general pass; the fused runner refuses graphs.
    (Classifier confidence runs on it: tests/unit/test_exit_classifier.py.)"""
    cfg, model = trained("llama")
    engine = Engine(model, cfg, fast_decode="fused")
    prompts = random_prompts(torch.Generator().manual_seed(23), 2, cfg.model.vocab_size, 2, 8)
    assert type(engine.session(prompts, 4, mode=EarlyExit(0.5)).runner) is DepthRunner
    sess = engine.session(prompts[:1], 4, mode=EarlyExit(0.5))
    with pytest.raises(ValueError, match="fused=True"):
        StaticRunner(sess.runner.runner, cfg, sess.cache, sess.exits, 3, cuda_graph=True,
                     fused=True)
    cfg_b, model_b = trained("llama-block")
    sess = Engine(model_b, cfg_b, fast_decode="fused").session(prompts[:1], 4, mode=EarlyExit(0.5))
    assert type(sess.runner) is DepthRunner


@pytest.mark.parametrize("variant", ["llama", "llama-norm-mlp-pre"])
def test_fused_self_speculative_matches_no_cache_reference(variant, single_rank_parallel):
    cfg, model = trained(variant)
    L = cfg.model.num_layers
    engine = Engine(model, cfg, fast_decode="fused")
    drafted = accepted = 0
    cases = [(SamplingParams(temperature=0.0), 3, 0.0), (SamplingParams(temperature=0.0), 4, 0.5),
             (SamplingParams(temperature=0.8, seed=7), 4, 0.0),
             (SamplingParams(temperature=1.0, top_k=8, seed=11), 2, 0.0)]
    for exit_layer in cfg.exits.exit_layer_nums[:2]:
        for sampling, k, tau_d in cases:
            mode = SelfSpeculative(exit_layer=exit_layer, num_draft=k, draft_threshold=tau_d)
            for p in random_prompts(torch.Generator().manual_seed(22), 2, cfg.model.vocab_size, 2, 9):
                out, sess, _, _ = run_checked(engine, p, mode, sampling)
                toks, layers, confs = ref_self_spec(model, p, NEW, exit_layer, k, sampling, L, tau_d)
                assert (out.tokens, out.exit_layers) == (toks, layers), (mode, sampling)
                assert out.confidences == pytest.approx(confs, rel=1e-9, abs=1e-12)
                drafted += sess.stats["drafted"]
                accepted += sess.stats["accepted"]
    assert 0 < accepted < drafted  # acceptances and rejections (rollbacks) both exercised


_WRITE_KV = FusedDecoder._write_kv
_ATTEND_ROW = FusedDecoder._attend_row
BROKEN = {
    "write slot one position late": ("_write_kv", staticmethod(
        lambda w, slot, k, v: _WRITE_KV(w, (slot + 1).clamp(max=w.k_flat.shape[0] - 1), k, v))),
    "slot mask ignored": ("_attend_row", staticmethod(
        lambda w, q, row, mask: _ATTEND_ROW(w, q, row, torch.ones_like(mask)))),
    "mask not repeated per query head": ("_attend_row", staticmethod(
        lambda w, q, row, mask: _ATTEND_ROW(w, q, row, mask[::2].repeat(2, 1)))),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_broken_fused_row_steps_fail(broken, single_rank_parallel, monkeypatch):
    name, fn = BROKEN[broken]
    monkeypatch.setattr(FusedDecoder, name, fn)
    with pytest.raises(AssertionError):
        check_early_exit("llama")
