"""Decoding benchmark: full depth vs confidence-based early exit vs self-speculative decoding.

Builds a small early-exit GPT, trains it briefly on a synthetic language (half the tokens
follow a fixed bigram, half depend on the last token and the one three back, 10% noise: shallow
exits get the easy half right and are confident there), then decodes the same prompts greedily
in every mode at batch 1 and batch 8 and prints tokens/s, speedup over full depth, mean exit
layer, agreement with the full model's greedy tokens (position by position) and the draft
acceptance rate. Modes are timed round-robin, best of ``--repeats`` runs.

    PYTHONPATH=. python benchmarks/decode.py                    # CPU, about a minute idle
    PYTHONPATH=. python benchmarks/decode.py --device cuda --dtype bfloat16 \
        --layers 24 --hidden 2048 --heads 16 --exits 6,12,18 --lr 3e-4     # EE-LLM's 1.3B shape

Full depth runs three ways: the engine's general pass ("full"), static shapes ("full static",
inference/static_decode.py) and, on CUDA, the static step replayed as one CUDA graph ("full
graph"); at batch 1, early exit and self-speculative decoding also run on static layer segments
("... static", or "... graph" on CUDA: one CUDA graph per segment, inference/static_early_exit.py).
Speedups are relative to "full". On CUDA the run ends with the memory roofline of a
batch-1 full-depth step: bytes of the parameters one step reads (every decoder layer, the final
norm and the output projection) over the HBM bandwidth measured here by a device-to-device copy,
against the graph replay's time per step (CUDA events, tokens and positions fixed).

Single process (PP=1, TP=1); the engine is megatron/early_exit/inference/engine.py.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist

from megatron.early_exit.config import EarlyExitGPTConfig, ExitConfig, ModelConfig
from megatron.early_exit.inference.engine import Engine
from megatron.early_exit.inference.modes import EarlyExit, FullDepth, SelfSpeculative
from megatron.early_exit.parallel.state import build_model, initialize_parallel


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--exits", default="2,4,6", help="exit layer numbers")
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--compile", action="store_true", help="also torch.compile + CUDA graph (CUDA)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--taus", default="1.0,0.9,0.8,0.6,0.4")
    p.add_argument("--spec-exits", default="2,4", help="drafting exits for self-speculative")
    p.add_argument("--num-draft", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="best of this many timed runs")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args()


def synthetic(gen: torch.Generator, b: int, s: int, vocab: int, device) -> torch.Tensor:
    """[b, s + 1] token ids of the synthetic language."""
    g = torch.Generator().manual_seed(123)
    perm1, perm2 = torch.randperm(vocab, generator=g), torch.randperm(vocab, generator=g)
    x = torch.zeros(b, s + 1, dtype=torch.int64)
    x[:, :2] = torch.randint(0, vocab, (b, 2), generator=gen)
    for i in range(2, s + 1):
        t, back = x[:, i - 1], x[:, max(i - 3, 0)]
        nxt = torch.where(t < vocab // 2, perm1[t], perm2[(t + back) % vocab])
        noise = torch.rand(b, generator=gen) < 0.1
        x[:, i] = torch.where(noise, torch.randint(0, vocab, (b,), generator=gen), nxt)
    return x.to(device)


def build(args, dtype: str):
    m = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                    vocab_size=args.vocab, seq_length=256, ffn_hidden_size=4 * args.hidden)
    exits = ExitConfig(exit_layer_nums=[int(x) for x in args.exits.split(",")], use_exit_norm=True)
    cfg = EarlyExitGPTConfig(model=m, exits=exits, params_dtype=dtype, seed=args.seed)
    ctx = initialize_parallel(cfg, torch.device(args.device))
    (model,) = build_model(cfg, ctx)
    return cfg, model


def train(model, args, device) -> float:
    """AdamW on float32 weights (bf16 autocast on CUDA when decoding in bf16)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    autocast = device.type == "cuda" and args.dtype == "bfloat16"
    loss = None
    for step in range(args.train_steps):
        x = synthetic(gen, 8, 48, args.vocab, device)
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            out = model(input_ids=x[:, :-1], labels=x[:, 1:],
                        loss_mask=torch.ones(x[:, 1:].shape, device=device))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        loss = out.final_loss.item()
    model.eval()
    return loss


def timed(engine, prompts, batch, new_tokens, mode, repeats):
    """Generate for all prompts in batches of ``batch``, ``repeats`` times.

    -> (outputs, best wall seconds, drafted, accepted). Each step reads the new tokens to the
    host, so the device is synchronised when a generation returns.
    """
    best = float("inf")
    for _ in range(repeats):
        outs, drafted, accepted = [], 0, 0
        start = time.perf_counter()
        for i in range(0, len(prompts), batch):
            sess = engine.session(prompts[i:i + batch], new_tokens, mode=mode)
            with sess.attached():
                while not sess.done:
                    sess.step()
            outs += sess.outputs
            drafted, accepted = drafted + sess.stats["drafted"], accepted + sess.stats["accepted"]
        best = min(best, time.perf_counter() - start)
    return outs, best, drafted, accepted


def run_modes(engines, prompts, batch, args):
    """Every mode, timed round-robin ``repeats`` times (best run kept): background load then
    affects all modes alike. ``engines``: name -> Engine (general, static, graph)."""
    general = engines["full"]
    modes = [(name, FullDepth(), engine) for name, engine in engines.items()]
    modes += [(f"early-exit tau={t}", EarlyExit(threshold=float(t)), general)
              for t in args.taus.split(",")]
    fast = engines.get("full graph") or engines.get("full static")
    if batch == 1:  # batch-1 early exit on static segments (static_early_exit.py)
        kind = "graph" if "full graph" in engines else "static"
        modes += [(f"early-exit tau={t} {kind}", EarlyExit(threshold=float(t)), fast)
                  for t in args.taus.split(",") if float(t) < 1.0]
        modes += [(f"self-spec exit={e} k={args.num_draft} {kind}",
                   SelfSpeculative(int(e), args.num_draft), fast) for e in args.spec_exits.split(",")]
    modes += [(f"self-spec exit={e} k={args.num_draft}", SelfSpeculative(int(e), args.num_draft), general)
              for e in args.spec_exits.split(",")]
    for engine in engines.values():  # warm-up (captures the CUDA graph of this batch size)
        timed(engine, prompts[:batch], batch, 4, FullDepth(), 1)
    best = {name: None for name, _, _ in modes}
    for _ in range(args.repeats):
        for name, mode, engine in modes:
            res = timed(engine, prompts, batch, args.new_tokens, mode, 1)
            if best[name] is None or res[1] < best[name][1]:
                best[name] = res
    rows, ref, base = [], None, None
    for name, _, _ in modes:
        outs, secs, drafted, accepted = best[name]
        toks = sum(len(o.tokens) for o in outs)
        if ref is None:
            ref, base = outs, toks / secs
        agree = sum(a == b for o, r in zip(outs, ref) for a, b in zip(o.tokens, r.tokens)) / toks
        layers = [x for o in outs for x in o.exit_layers]
        acc = f"{accepted / drafted:.2f}" if drafted else "-"
        rows.append((batch, name, toks / secs, toks / secs / base, sum(layers) / len(layers),
                     agree, acc))
    return rows


def hbm_bandwidth(device, nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written (median)."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(iters + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times = sorted(times[3:])
    return 2 * src.numel() * 4 / times[len(times) // 2]


def step_bytes(model) -> int:
    """Bytes of the parameters one full-depth decode step reads (exit heads and the embedding
    table excluded; a tied output projection reads the whole embedding matrix)."""
    params = list(model.decoder.parameters())
    weight = model.output_layer.weight
    params.append(weight if weight is not None else model.tied_weight())
    return sum(p.numel() * p.element_size() for p in params)


def roofline(engine, model, device, iters: int = 200):
    """(ms per graph replay, ms at the roofline, bandwidth) for the batch-1 graph of ``engine``."""
    step = engine._static
    assert step is not None and step.graph is not None and step.cache.batch == 1
    tokens, pos = step.tokens.clone(), step.pos.clone()
    for _ in range(10):
        step(tokens, pos)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        step(tokens, pos)
    b.record()
    b.synchronize()
    ms = a.elapsed_time(b) / iters
    bw = hbm_bandwidth(device)
    return ms, step_bytes(model) / bw * 1e3, bw


def main():
    args = parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("gloo", rank=0, world_size=1)
    device = torch.device(args.device)
    cfg32, model32 = build(args, "float32")
    t0 = time.perf_counter()
    loss = train(model32, args, device)
    cfg, model = cfg32, model32
    if args.dtype != "float32":
        cfg, model = build(args, args.dtype)
        model.load_state_dict(model32.state_dict())
        del model32
    model.eval()
    print(f"model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, exits {args.exits}, "
          f"{args.dtype} on {device}; trained {args.train_steps} steps in "
          f"{time.perf_counter() - t0:.1f}s (final LM loss {loss:.3f})")
    gen = torch.Generator().manual_seed(args.seed + 1)
    lens = torch.randint(8, 25, (args.prompts,), generator=gen).tolist()
    prompts = [synthetic(gen, 1, n - 1, args.vocab, "cpu")[0].tolist() for n in lens]
    rows, graphs = [], {}
    with torch.no_grad():
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            engines = {"full": Engine(model, cfg), "full static": Engine(model, cfg, fast_decode="static")}
            if device.type == "cuda":
                engines["full graph"] = Engine(model, cfg, fast_decode="cuda_graph")
                if args.compile:
                    engines["full compiled+graph"] = Engine(model, cfg, fast_decode="compile")
            rows += run_modes(engines, prompts, batch, args)
            graphs[batch] = {k: v for k, v in engines.items() if k in ("full graph", "full compiled+graph")}
    print(f"\n{len(prompts)} prompts x {args.new_tokens} new tokens, greedy, best of {args.repeats} "
          f"runs; agree = fraction of tokens equal to full-depth greedy at the same position; "
          f"accept = accepted / drafted tokens\n")
    head = f"{'batch':>5}  {'mode':<26} {'tok/s':>9} {'speedup':>8} {'mean exit':>10} {'agree':>6} {'accept':>7}"
    print(head)
    print("-" * len(head))
    for batch, name, tps, speed, mean_exit, agree, acc in rows:
        print(f"{batch:>5}  {name:<26} {tps:>9.1f} {speed:>7.2f}x {mean_exit:>10.2f} {agree:>6.2f} {acc:>7}")
    for name, engine in graphs.get(1, {}).items():
        with torch.no_grad():
            ms, floor_ms, bw = roofline(engine, model, device)
        gb = step_bytes(model) / 1e9
        print(f"\nroofline, batch 1 {name} ({torch.cuda.get_device_name(device)}): {gb:.3f} GB of "
              f"parameters per step, measured copy bandwidth {bw / 1e12:.2f} TB/s -> floor "
              f"{floor_ms:.3f} ms/step; replay {ms:.3f} ms/step = {floor_ms / ms:.0%} of the "
              f"memory roofline")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
