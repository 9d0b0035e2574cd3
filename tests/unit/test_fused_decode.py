"""The fused full-depth decode step (inference/fused_decode.py, ``StaticDecodeStep(fused=True)``)
against the megatron-core layers (the same step with ``fused=False``) and an independent plain
PyTorch model (tests/reference_model.py, no cache, whole sequence recomputed, float64), over
several steps of a batch whose rows sit at different positions, for llama- and gpt2-style
models; deliberately broken variants must fail the same comparison; unsupported layouts are
refused by name.

Run: ``OMP_NUM_THREADS=1 python -m pytest -q tests/unit/test_fused_decode.py``.
"""

import dataclasses

import pytest
import torch

from megatron.early_exit.config import EarlyExitGPTConfig, ModelConfig, ParallelConfig
from megatron.early_exit.inference.early_exit import DepthRunner, RowState
from megatron.early_exit.inference.engine import Engine
from megatron.early_exit.inference.fused_decode import FusedDecoder, check_supported
from megatron.early_exit.inference.kv_cache import KVCache
from megatron.early_exit.inference.modes import FullDepth
from megatron.early_exit.inference.static_decode import StaticDecodeStep
from tests.reference_model import reference_logits
from tests.unit.engine_testlib import build, make_cfg, random_prompts, reference_greedy

ARCHS = {
    "llama": dict(architecture="llama"),  # RMSNorm, SwiGLU, RoPE, no biases, untied
    "llama-tied-bias": dict(architecture="llama", untie_embeddings_and_output_weights=False,
                            add_bias_linear=True, rotary_base=500.0),
    "gpt2": dict(architecture="gpt2"),  # LayerNorm, GELU, learned positions, biases, tied
}
LENS = [3, 7, 1]  # prompt lengths: the rows decode at different positions
STEPS = 5


def make_model(arch: str, dtype: str):
    m = ModelConfig(num_layers=3, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                    ffn_hidden_size=40, vocab_size=64, seq_length=32, **ARCHS[arch])
    cfg = EarlyExitGPTConfig(model=m, params_dtype=dtype, seed=5)
    model = build(cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-trivial biases and norm weights, so their paths are checked;
        for name, p in model.named_parameters():  # sharper attention, so positions matter
            if name.endswith("linear_qkv.weight"):
                p.mul_(6.0)
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
            elif "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return cfg, model


def decode_logits(model, cfg, fused: bool, prompts, new_tokens):
    """Prefill ``prompts`` through the engine's general pass, then STEPS static steps (each row
    feeds new_tokens[r][t] at position len(prompt) + t) -> [STEPS, B, V] logits."""
    m = cfg.model
    modules = [layer.self_attention.core_attention for layer in model.decoder.layers]
    B, max_len = len(prompts), max(LENS) + STEPS
    dtype = next(model.parameters()).dtype
    cache = KVCache(modules, B, max_len, m.num_query_groups, m.head_dim, dtype, torch.device("cpu"))
    out = []
    with torch.no_grad(), cache.attach():
        states = {r: RowState(newest=len(p) - 1) for r, p in enumerate(prompts)}
        DepthRunner(model, cfg, cache, store_slots=2).prefill(list(range(B)), states, prompts)
        step = StaticDecodeStep(model, cfg, cache, fused=fused)
        assert (step.fused is not None) == fused
        for t in range(STEPS):
            pos = torch.tensor([len(p) + t for p in prompts])
            out.append(step(torch.tensor([row[t] for row in new_tokens]), pos).clone())
    return torch.stack(out)


def reference(model, cfg, prompts, new_tokens) -> torch.Tensor:
    """[STEPS, B, V] next-token logits of the whole sequences, plain float64 PyTorch."""
    sd = {k: v.detach().double() for k, v in model.named_parameters()}
    cfg64 = dataclasses.replace(cfg, params_dtype="float64")
    out = torch.zeros(STEPS, len(prompts), cfg.model.vocab_size, dtype=torch.float64)
    for r, (p, extra) in enumerate(zip(prompts, new_tokens)):
        _, logits = reference_logits(sd, cfg64, torch.tensor([p + extra]))  # [1, s, V]
        out[:, r] = logits[0, len(p):]
    return out


def case(arch: str, dtype: str):
    cfg, model = make_model(arch, dtype)
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 64, (n,), generator=gen).tolist() for n in LENS]
    new_tokens = [torch.randint(0, 64, (STEPS,), generator=gen).tolist() for _ in LENS]
    return cfg, model, prompts, new_tokens


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fused_float64_equals_megatron_layers_and_reference(arch, single_rank_parallel):
    cfg, model, prompts, new_tokens = case(arch, "float64")
    fused = decode_logits(model, cfg, True, prompts, new_tokens)
    assert fused.dtype == torch.float64
    torch.testing.assert_close(fused, decode_logits(model, cfg, False, prompts, new_tokens),
                               rtol=0, atol=1e-10)
    torch.testing.assert_close(fused, reference(model, cfg, prompts, new_tokens), rtol=0,
                               atol=1e-10)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fused_float32_equals_megatron_layers(arch, single_rank_parallel):
    cfg, model, prompts, new_tokens = case(arch, "float32")
    fused = decode_logits(model, cfg, True, prompts, new_tokens)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, decode_logits(model, cfg, False, prompts, new_tokens),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.double(), reference(model, cfg, prompts, new_tokens),
                               rtol=1e-4, atol=1e-4)


_ROPE = FusedDecoder._rope
BROKEN = {
    "no RoPE": ("_rope", staticmethod(lambda qk, cos, sin: qk)),
    "RoPE sin sign": ("_rope", staticmethod(lambda qk, cos, sin: _ROPE(qk, cos, -sin))),
    "KV not written": ("_write_kv", staticmethod(lambda w, slot, k, v: None)),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_broken_fused_variants_fail(broken, single_rank_parallel, monkeypatch):
    cfg, model, prompts, new_tokens = case("llama", "float64")
    want = reference(model, cfg, prompts, new_tokens)
    name, fn = BROKEN[broken]
    monkeypatch.setattr(FusedDecoder, name, fn)
    got = decode_logits(model, cfg, True, prompts, new_tokens)
    assert (got - want).abs().max() > 1e-4, broken  # the tolerance is 1e-10


@pytest.mark.parametrize("variant", ["llama", "gpt2-pre-exit-block"])
def test_fused_engine_greedy_matches_reference(variant, single_rank_parallel):
    """Through the engine (``fast_decode="fused"``): greedy tokens of rows of
    different lengths equal the no-cache reference decoder's; the gpt2 variant has exit blocks,
    whose own KV caches share the cache buffers with the decoder layers'."""
    if variant == "llama":
        cfg, model = make_model("llama", "float64")
    else:
        cfg = make_cfg(variant)
        model = build(cfg)

    engine = Engine(model, cfg, fast_decode="fused")
    prompts = random_prompts(torch.Generator().manual_seed(4), 3, cfg.model.vocab_size, 1, 8)
    outs = engine.generate(prompts, 8, mode=FullDepth())
    assert engine._static.fused is not None and engine._static.logits is not None
    for p, out in zip(prompts, outs):
        assert out.tokens == reference_greedy(model, p, 8, num_layers=cfg.model.num_layers)[0]


def test_unsupported_layouts_are_refused(single_rank_parallel, monkeypatch):
    cfg, model = make_model("llama", "float32")
    tp2 = dataclasses.replace(cfg, parallel=ParallelConfig(tensor_model_parallel_size=2,
                                                           world_size=2))
    with pytest.raises(NotImplementedError, match="TP=1"):
        check_supported(model, tp2)
    monkeypatch.setattr(model.config, "qk_layernorm", True)
    with pytest.raises(NotImplementedError, match="qk_layernorm"):
        check_supported(model, cfg)


def test_fused_equals_transformers_llama(single_rank_parallel):
    """transformers' own LlamaForCausalLM (GQA, tied, RoPE) with its weights copied into ours by
    the benchmark's mapping: the fused step's logits equal transformers' full-sequence logits
    (float64 weights; transformers computes the RoPE angles in float32, hence 1e-6)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.cpu_decode_peer import copy_hf_llama

    conf = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=32)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(conf).double().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # sharper attention, non-trivial norms
            if "q_proj" in name or "k_proj" in name:
                p.mul_(6.0)
            elif "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    m = ModelConfig(num_layers=3, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                    ffn_hidden_size=40, vocab_size=64, seq_length=32, architecture="llama",
                    untie_embeddings_and_output_weights=False, rotary_base=500.0)
    cfg = EarlyExitGPTConfig(model=m, params_dtype="float64", seed=5)
    model = build(cfg, sharpen=1.0)
    copy_hf_llama(hf, model, heads=4, groups=2)
    _, _, prompts, new_tokens = case("llama", "float64")
    got = decode_logits(model, cfg, True, prompts, new_tokens)
    with torch.no_grad():
        for r, (p, extra) in enumerate(zip(prompts, new_tokens)):
            want = hf(torch.tensor([p + extra])).logits[0, len(p):]  # [STEPS, V]
            torch.testing.assert_close(got[:, r], want, rtol=0, atol=1e-6)
