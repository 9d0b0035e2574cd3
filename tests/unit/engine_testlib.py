"""Shared helpers of the engine tests (tests/unit/test_engine_*.py): tiny random models and
no-cache reference decoders built on the model's plain forward (no KV cache, no engine code).

The models' output projections are scaled up (``sharpen``) so that exits are often confident
and early exit actually fires at moderate thresholds.
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
