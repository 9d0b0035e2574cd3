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
    """Batch 1, prompt after prompt (a batched pass runs until its deepest row is done); each
    prompt gets ``tokens`` new tokens, or what is left of the model's positions."""
    from megatron.early_exit.inference.requests import max_positions

    limit = max_positions(engine.cfg)
    start = time.perf_counter()
    outs = [engine.generate([p], min(tokens, limit - len(p)), mode=mode, detokenize=detok,
                            stop=stop)[0] for p in ids]
    return outs, time.perf_counter() - start


def _agreement(a, b) -> float:
    same = total = 0
    for x, y in zip(a, b):
        n = min(len(x.tokens), len(y.tokens))
        same += sum(int(p == q) for p, q in zip(x.tokens[:n], y.tokens[:n]))
        total += n
    return same / max(total, 1)


def early_exit_showcase(ckpt: str, tokens: int = 96, thresholds=(0.8, 0.5, 0.3), repeats: int = 3) -> None:
    from megatron.early_exit.inference.engine import Engine
    from megatron.early_exit.inference.loading import load_for_inference
    from megatron.early_exit.inference.modes import EarlyExit, FullDepth, SelfSpeculative
    from megatron.early_exit.inference.stopping import StopCriteria

    model, cfg, tok = load_for_inference(ckpt, torch.device("cpu"))
    engine = Engine(model, cfg)
    from megatron.early_exit.inference.requests import max_positions

    keep = max_positions(cfg) // 2  # a prompt keeps at most half the positions (its end)
    ids = [tok.tokenize(p)[-keep:] for p in PROMPTS]
    stop = StopCriteria(stop_token_ids=frozenset({tok.eod}))
    L = cfg.model.num_layers
    modes = [("full depth", FullDepth())] + [(f"early exit tau={t}", EarlyExit(threshold=t)) for t in thresholds]
    if cfg.exits.exit_layer_nums:
        modes.append((f"self-speculative (exit {cfg.exits.exit_layer_nums[0]})",
                      SelfSpeculative(exit_layer=cfg.exits.exit_layer_nums[0], num_draft=4)))
    _run(engine, ids[:1], 8, FullDepth(), tok.detokenize, stop)  # warm-up
    best, outputs = {}, {}
    for _ in range(repeats):  # round-robin, best of `repeats`: background load hits all modes alike
        for name, mode in modes:
            outputs[name], t = _run(engine, ids, tokens, mode, tok.detokenize, stop)
            best[name] = min(best.get(name, float("inf")), t)
    full = outputs["full depth"]
    rate = {name: sum(len(o.tokens) for o in outputs[name]) / best[name] for name, _ in modes}
    print(f"{'mode':<28}{'tok/s':>9}{'speedup':>9}{'mean exit layer':>17}{'agree w/ full':>15}")
    shown = None
    for name, mode in modes:
        layers = [layer for o in outputs[name] for layer in o.exit_layers]
        print(f"{name:<28}{rate[name]:>9.1f}{rate[name] / rate['full depth']:>9.2f}"
              f"{sum(layers) / max(len(layers), 1):>17.2f}{_agreement(outputs[name], full):>15.2f}")
        if isinstance(mode, EarlyExit) and mode.threshold == thresholds[1]:
            shown = (name, outputs[name])
    print("(speedup: measured tokens/s, best of %d round-robin runs on this machine; 'mean exit layer' "
          "is the depth actually computed per token)" % repeats)
    name, outs = shown
    hist = Counter(layer for o in outs for layer in o.exit_layers)
    total = sum(hist.values())
    print(f"\nexit-layer histogram with {name} ({total} tokens):")
    for layer in sorted(hist):
        label = f"layer {layer}" + (" (final)" if layer == L else "")
        print(f"  {label:<16}{hist[layer]:>6}  {'#' * round(40 * hist[layer] / total)}")
    print(f"\nsample ({name}):\n{PROMPTS[0]}{tok.detokenize(outs[0].tokens)}")
