"""Pipeline-based decoding (PP > 1): what the overlap of stage 0 with the later stages buys.

Every token computes every layer in pipeline-based decoding (the later stages fill their KV),
so an early exit saves no arithmetic there: it saves *waiting*. When a token is decided on
stage 0, stage 0 embeds the next token while the later stages still work on the previous one;
a token decided on a later stage makes stage 0 wait for that stage's verdict.
This benchmark runs the same prompts at threshold 1.0 (no exit ever fires: stage 0 waits every
token, the synchronous baseline) and at thresholds where exits fire, and prints tokens/s and the
share of tokens decided on stage 0. The weights are random, so the threshold is the knob; the
tokens differ between thresholds, the work per token does not (every token runs every layer).
The prompts are decoded as one batch (rows exit independently).

    PYTHONPATH=. python benchmarks/pipeline_decode.py            # spawns 2 gloo ranks (CPU)
    PYTHONPATH=. python benchmarks/pipeline_decode.py --pp 4 --layers 8
"""

from __future__ import annotations

import argparse
import time

import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--exit", type=int, default=1, help="exit layer (on stage 0 by default)")
    p.add_argument("--taus", default="1.0,0.0", help="thresholds; 0.0 exits every token")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args()


def _worker(rank, world, args):
    from megatron.early_exit.config import EarlyExitGPTConfig, ExitConfig, ModelConfig, ParallelConfig
    from megatron.early_exit.inference.modes import EarlyExit
    from megatron.early_exit.inference.engine import Engine
    from megatron.early_exit.parallel.state import build_model, initialize_parallel

    m = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=4,
                    vocab_size=512, seq_length=256)
    cfg = EarlyExitGPTConfig(model=m, exits=ExitConfig(exit_layer_nums=[args.exit]),
                             parallel=ParallelConfig(pipeline_model_parallel_size=args.pp,
                                                     world_size=world), seed=3)
    ctx = initialize_parallel(cfg, torch.device("cpu"))
    engine = Engine(build_model(cfg, ctx), cfg, ctx=ctx)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (12,), generator=gen).tolist() for _ in range(args.prompts)]
    engine.generate(prompts[:1], 4)  # warm-up
    rows = []
    for tau in (float(t) for t in args.taus.split(",")):
        best, outs = float("inf"), None
        for _ in range(args.repeats):
            start = time.perf_counter()
            outs = engine.generate(prompts, args.new_tokens, mode=EarlyExit(threshold=tau))
            best = min(best, time.perf_counter() - start)
        tokens = sum(len(o.tokens) for o in outs)
        on_stage0 = sum(layer == args.exit for o in outs for layer in o.exit_layers) / tokens
        rows.append((tau, tokens / best, on_stage0))
    return rows


def main():
    from tests.distributed_harness import run_distributed

    args = parse_args()
    rows = run_distributed(_worker, args.pp, args, timeout=1200)[0]
    base = rows[0][1]
    print(f"\nPP={args.pp}, {args.layers} layers, hidden {args.hidden}, exit after layer {args.exit}, "
          f"{args.prompts} prompts x {args.new_tokens} tokens, best of {args.repeats}, gloo on CPU\n")
    print(f"{'threshold':>9}  {'tok/s':>8}  {'vs first':>8}  {'decided on stage 0':>18}")
    for tau, tps, share in rows:
        print(f"{tau:>9.2f}  {tps:>8.1f}  {tps / base:>7.2f}x  {share:>18.0%}")


if __name__ == "__main__":
    main()
