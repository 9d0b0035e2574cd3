"""Shared helpers of the engine tests (tests/unit/test_engine_*.py): tiny models and no-cache
reference decoders built on the model's plain forward (no KV cache, no engine code).

``trained(variant)`` trains a tiny model for a few dozen Adam steps on a synthetic language
(half the tokens follow a fixed bigram, half depend on the previous two tokens, 10% noise) so
that exits are confident on some tokens and not on others, and agree with the final head often
but not always (both early exit and speculative acceptance get exercised). The trained weights
are cached per variant for the whole pytest process (about 1.5 s per variant on 2 CPU cores).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from megatron.early_exit.config import EarlyExitGPTConfig, ExitConfig, ModelConfig

VARIANTS = {
    "llama": dict(arch="llama", exits=dict(exit_layer_nums=[1, 2, 3])),
    "llama-block": dict(arch="llama", exits=dict(exit_layer_nums=[1, 3], use_exit_block=True,
                                                 use_exit_norm=True)),
    "gpt2-pre-exit-block": dict(arch="gpt2", exits=dict(exit_layer_nums=[1, 2], pre_exit=True,
                                                        use_exit_block=True, use_exit_mlp=True,
                                                        untie_exit_output_weights=True)),
    "llama-norm-mlp-pre": dict(arch="llama", exits=dict(exit_layer_nums=[2, 3], pre_exit=True,
                                                        use_exit_norm=True, use_exit_mlp=True)),
}


def make_cfg(variant: str, dtype: str = "float64", seed: int = 7, vocab: int = 48,
             layers: int = 4) -> EarlyExitGPTConfig:
    v = VARIANTS[variant]
    model = ModelConfig(num_layers=layers, hidden_size=32, num_attention_heads=4,
                        num_query_groups=2, ffn_hidden_size=48, vocab_size=vocab, seq_length=64,
                        architecture=v["arch"])
    return EarlyExitGPTConfig(model=model, exits=ExitConfig(**v["exits"]), params_dtype=dtype,
                              seed=seed)


@torch.no_grad()
def build(cfg: EarlyExitGPTConfig, sharpen: float = 4.0):
    """Build the (single-stage) model and scale its output projections by ``sharpen``."""
    from megatron.early_exit.parallel.state import build_model, initialize_parallel

    ctx = initialize_parallel(cfg, torch.device("cpu"))
    (model,) = build_model(cfg, ctx)
    model.embedding.word_embeddings.weight.mul_(sharpen)
    if model.output_layer.weight is not None:
        model.output_layer.weight.mul_(sharpen)
    for head in model.exits.values():
        if head.output_layer.weight is not None:
            head.output_layer.weight.mul_(sharpen)
    return model.eval()


_TRAINED = {}


def synthetic_batch(gen: torch.Generator, b: int, s: int, vocab: int):
    """Token ids [b, s] and labels [b, s] of the synthetic language."""
    perm_gen = torch.Generator().manual_seed(123)
    perm1, perm2 = torch.randperm(vocab, generator=perm_gen), torch.randperm(vocab, generator=perm_gen)
    x = torch.zeros(b, s + 1, dtype=torch.int64)
    x[:, :2] = torch.randint(0, vocab, (b, 2), generator=gen)
    for i in range(2, s + 1):
        t, p = x[:, i - 1], x[:, i - 2]
        nxt = torch.where(t < vocab // 2, perm1[t], perm2[(t + p) % vocab])
        noise = torch.rand(b, generator=gen) < 0.1
        x[:, i] = torch.where(noise, torch.randint(0, vocab, (b,), generator=gen), nxt)
    return x[:, :-1], x[:, 1:]


def trained(variant: str, dtype: str = "float64", steps: int = 30, **cfg_kw):
    """(cfg, model) of ``variant`` after ``steps`` Adam steps (float32 training, then cast)."""
    key = (variant, steps, tuple(sorted(cfg_kw.items())))
    if key not in _TRAINED:
        cfg32 = make_cfg(variant, dtype="float32", **cfg_kw)
        model = build(cfg32, sharpen=1.0).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        with torch.enable_grad():
            for _ in range(steps):
                ids, labels = synthetic_batch(gen, 8, 24, cfg32.model.vocab_size)
                out = model(input_ids=ids, labels=labels, loss_mask=torch.ones(labels.shape))
                opt.zero_grad()
                out.loss.backward()
                opt.step()
        _TRAINED[key] = {k: v.detach().clone() for k, v in model.state_dict().items()
                         if torch.is_tensor(v)}
    cfg = make_cfg(variant, dtype=dtype, **cfg_kw)
    model = build(cfg, sharpen=1.0)
    model.load_state_dict(_TRAINED[key], strict=False)
    return cfg, model.eval()


def random_prompts(gen: torch.Generator, n: int, vocab: int, lo: int = 1, hi: int = 9) -> List[List[int]]:
    lens = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
    return [torch.randint(0, vocab, (k,), generator=gen).tolist() for k in lens]


@torch.no_grad()
def forward_logits(model, seq: Sequence[int]):
    """(final logits [V], {exit layer: logits [V]}) at the last position, full forward, no cache."""
    out = model(input_ids=torch.tensor([list(seq)]), return_logits=True)
    return out.final_logits[-1, 0], {k: v[-1, 0] for k, v in out.exit_logits.items()}


def reference_greedy(model, prompt: Sequence[int], steps: int, tau: float = 1.0,
                     exit_layers: Optional[Sequence[int]] = None, num_layers: int = 4):
    """Greedy decoding by recomputing the whole sequence each step; with tau < 1 a token takes
    the first allowed exit whose max softmax probability is >= tau. -> (tokens, exit layers)."""
    seq, toks, layers = list(prompt), [], []
    for i in range(steps):
        final, exits = forward_logits(model, seq)
        tok, layer = int(final.argmax()), num_layers
        if tau < 1.0 and i > 0:  # the first token comes from the prefill's final head
            for k in sorted(exits):
                if exit_layers is not None and k not in exit_layers:
                    continue
                if float(torch.softmax(exits[k].double(), -1).max()) >= tau:
                    tok, layer = int(exits[k].argmax()), k
                    break
        seq.append(tok)
        toks.append(tok)
        layers.append(layer)
    return toks, layers
