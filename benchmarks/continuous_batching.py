"""Continuous batching on CPU: throughput of the scheduler at 1, 4 and 16 concurrent requests
against serving the same requests one after another, in one run.

The same N requests (prompts of 4..24 tokens, budgets of 16..48 new tokens, so they finish at
different steps and the scheduler refills freed rows) are served (a) one at a time with
``Engine.generate`` and (b) through ``Scheduler(max_rows=C)`` with all of them queued at once,
for C in --concurrency. Each configuration runs --repeats times round-robin; the best time is
kept. Prints tokens/s, the ratio to serial, and checks that every greedy request produced the
same tokens both ways. Random weights (the arithmetic per token does not depend on them);
--mode early-exit uses threshold 0 on the first exit, full uses full depth.

    PYTHONPATH=. python benchmarks/continuous_batching.py
    PYTHONPATH=. python benchmarks/continuous_batching.py --mode early-exit --requests 32
"""

from __future__ import annotations

import argparse
import time

import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--mode", choices=["full", "early-exit"], default="full")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def build(args):
    from megatron.early_exit.config import EarlyExitGPTConfig, ExitConfig, ModelConfig
    from megatron.early_exit.parallel.state import build_model, ensure_process_group, initialize_parallel

    ensure_process_group("gloo")
    m = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=8,
                    num_query_groups=4, vocab_size=args.vocab, seq_length=128)
    cfg = EarlyExitGPTConfig(model=m, exits=ExitConfig(exit_layer_nums=[args.layers // 4],
                                                       use_exit_norm=True), seed=3)
    (model,) = build_model(cfg, initialize_parallel(cfg, torch.device("cpu")))
    return cfg, model.eval()


def make_requests(args, mode):
    from megatron.early_exit.inference.requests import GenerationRequest

    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(args.requests):
        n = int(torch.randint(4, 25, (1,), generator=gen))
        prompt = torch.randint(0, args.vocab, (n,), generator=gen).tolist()
        out.append(GenerationRequest(prompt, 16 + (i * 7) % 33, mode=mode))
    return out


def serial(engine, reqs):
    outs = []
    for r in reqs:
        (o,) = engine.generate([r.prompt], r.max_new_tokens, mode=r.mode)
        outs.append(o.tokens)
    return outs


def scheduled(engine, reqs, rows):
    from megatron.early_exit.inference.scheduler import Scheduler

    sched = Scheduler(engine, max_rows=rows, max_queue=len(reqs), max_len=128)
    ids = {sched.add(r): i for i, r in enumerate(reqs)}
    outs = [[] for _ in reqs]
    while sched.has_work:
        for u in sched.step():
            outs[ids[u.request_id]].extend(u.tokens)
    return outs


def main():
    from megatron.early_exit.inference.engine import Engine
    from megatron.early_exit.inference.modes import EarlyExit, FullDepth

    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg, model = build(args)
    engine = Engine(model, cfg)
    mode = FullDepth() if args.mode == "full" else EarlyExit(threshold=0.0)
    reqs = make_requests(args, mode)
    configs = [("serial", None)] + [(f"C={c}", int(c)) for c in args.concurrency.split(",")]
    best = {name: float("inf") for name, _ in configs}
    tokens = {}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, rows in configs:
                start = time.perf_counter()
                outs = serial(engine, reqs) if rows is None else scheduled(engine, reqs, rows)
                best[name] = min(best[name], time.perf_counter() - start)
                tokens[name] = outs
    total = sum(len(t) for t in tokens["serial"])
    print(f"\n{args.requests} requests, {total} new tokens, {args.layers} layers x {args.hidden}, "
          f"vocab {args.vocab}, mode {args.mode}, {args.threads} thread(s), best of {args.repeats}\n")
    print(f"{'config':>8}  {'tok/s':>8}  {'vs serial':>9}  same tokens")
    for name, _ in configs:
        tps = total / best[name]
        same = tokens[name] == tokens["serial"]
        print(f"{name:>8}  {tps:>8.1f}  {best['serial'] / best[name]:>8.2f}x  {same}")


if __name__ == "__main__":
    main()
