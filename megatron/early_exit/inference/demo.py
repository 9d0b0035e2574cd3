"""The generation part of ``make demo``: decode from a checkpoint at full depth, with early exit
at a few thresholds and with self-speculative decoding; print the speedups, agreement with the
full model and the histogram of exit layers.

    python -c "from megatron.early_exit.inference.demo import early_exit_showcase as s; s('ckpt')"
"""

from __future__ import annotations

import time
from collections import Counter

import torch

PROMPTS = ["ROMEO:\n", "First Citizen:\nBefore we proceed any further, ", "KING LEAR:\n",
           "To be, or not to be"]


def _run(engine, ids, tokens, mode, detok, stop):
    start = time.perf_counter()
    outs = engine.generate(ids, tokens, mode=mode, detokenize=detok, stop=stop)
    return outs, time.perf_counter() - start


def _agreement(a, b) -> float:
    same = total = 0
    for x, y in zip(a, b):
        n = min(len(x.tokens), len(y.tokens))
        same += sum(int(p == q) for p, q in zip(x.tokens[:n], y.tokens[:n]))
        total += n
    return same / max(total, 1)


def early_exit_showcase(ckpt: str, tokens: int = 96, thresholds=(0.9, 0.8, 0.6)) -> None:
    from megatron.early_exit.inference.engine import Engine
    from megatron.early_exit.inference.loading import load_for_inference
    from megatron.early_exit.inference.modes import EarlyExit, FullDepth, SelfSpeculative
    from megatron.early_exit.inference.stopping import StopCriteria

    model, cfg, tok = load_for_inference(ckpt, torch.device("cpu"))
    engine = Engine(model, cfg)
    ids = [tok.tokenize(p) for p in PROMPTS]
    stop = StopCriteria(stop_token_ids=frozenset({tok.eod}))
    L = cfg.model.num_layers
    _run(engine, ids[:1], 8, FullDepth(), tok.detokenize, stop)  # warm-up
    full, t_full = _run(engine, ids, tokens, FullDepth(), tok.detokenize, stop)
    n_full = sum(len(o.tokens) for o in full)
    print(f"{'mode':<28}{'tok/s':>9}{'speedup':>9}{'mean exit layer':>17}{'agree w/ full':>15}")
    print(f"{'full depth':<28}{n_full / t_full:>9.1f}{1.0:>9.2f}{L:>17.2f}{1.0:>15.2f}")
    shown = None
    modes = [(f"early exit tau={t}", EarlyExit(threshold=t)) for t in thresholds]
    if cfg.exits.exit_layer_nums:
        modes.append((f"self-speculative (exit {cfg.exits.exit_layer_nums[0]})",
                      SelfSpeculative(exit_layer=cfg.exits.exit_layer_nums[0], num_draft=4)))
    for name, mode in modes:
        outs, t = _run(engine, ids, tokens, mode, tok.detokenize, stop)
        n = sum(len(o.tokens) for o in outs)
        layers = [layer for o in outs for layer in o.exit_layers]
        print(f"{name:<28}{n / t:>9.1f}{(n / t) / (n_full / t_full):>9.2f}"
              f"{sum(layers) / max(len(layers), 1):>17.2f}{_agreement(outs, full):>15.2f}")
        if shown is None and isinstance(mode, EarlyExit):
            shown = (name, outs)
    name, outs = shown
    hist = Counter(layer for o in outs for layer in o.exit_layers)
    total = sum(hist.values())
    print(f"\nexit-layer histogram with {name} ({total} tokens):")
    for layer in sorted(hist):
        label = f"layer {layer}" + (" (final)" if layer == L else "")
        print(f"  {label:<16}{hist[layer]:>6}  {'#' * round(40 * hist[layer] / total)}")
    print(f"\nsample ({name}):\n{PROMPTS[0]}{tok.detokenize(outs[0].tokens)}")
