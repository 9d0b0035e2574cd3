"""Closed-loop load on the generation server (CPU, 127.0.0.1): requests/s, output tokens/s,
p50 / p99 latency and time to first token at 1, 8 and 32 concurrent clients, full depth vs
early exit vs self-speculative decoding, all in one run against one server process.

    PYTHONPATH=. python benchmarks/serve.py                       # random-weight model
    PYTHONPATH=. python benchmarks/serve.py --load ckpt --tau 0.8  # a trained checkpoint

The server is tools/run_text_generation_server.py in its own process (so clients and engine do
not share a GIL), ``--max-batch-size`` = the largest concurrency. Each client sends streaming
``/v1/completions`` requests back to back (closed loop: a new request as soon as the last one
ends) until the configuration has served ``--requests-per-client`` x clients requests; TTFT is
the time to the first chunk with a token, latency the time to ``[DONE]``. Every request asks
for exactly ``--tokens`` new tokens (``stop_token_ids`` cannot end it early: the eod id is
always a stop, so outputs may be shorter; output tokens are counted as received).

Without ``--load`` a model with random weights is written to a temporary directory (8 layers,
hidden 256, byte tokenizer, one exit after layer 2). Its exits are never confident, so early
exit there uses tau = 0: every token leaves at layer 2, the compute bound of early exit; and
self-speculative drafts are almost always rejected (its worst case). With a trained
checkpoint pass the tau to measure (``--tau``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["ROMEO:", "To be, or not to be", "First Citizen:\nBefore we proceed", "KING LEAR:",
           "O, what a rogue", "Friends, Romans, countrymen", "Now is the winter", "Shall I"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", help="Checkpoint (default: random weights in a temporary folder).")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--tokens", type=int, default=32, help="max_tokens per request")
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--tau", type=float, default=None, help="early-exit threshold (default: 0 "
                                                           "for random weights, 0.8 otherwise)")
    p.add_argument("--draft-exit", type=int, help="self-speculative drafting exit (default: first)")
    p.add_argument("--threads", type=int, default=None, help="server OMP threads (default: cores)")
    return p.parse_args()


def random_checkpoint(root: str) -> str:
    import torch

    from megatron.early_exit.checkpoint import save_checkpoint
    from megatron.early_exit.config import EarlyExitGPTConfig, ExitConfig, ModelConfig
    from megatron.early_exit.data.tokenizers import ByteTokenizer, save_tokenizer_files
    from megatron.early_exit.parallel.state import (build_model, destroy_parallel,
                                                    ensure_process_group, initialize_parallel)

    ensure_process_group("gloo")
    m = ModelConfig(num_layers=8, hidden_size=256, num_attention_heads=8, num_query_groups=4,
                    vocab_size=384, tokenizer_vocab_size=257, seq_length=256)
    cfg = EarlyExitGPTConfig(model=m, exits=ExitConfig(exit_layer_nums=[2], use_exit_norm=True),
                             params_dtype="float32", seed=3)
    ctx = initialize_parallel(cfg, torch.device("cpu"))
    chunks = build_model(cfg, ctx)
    tok = save_tokenizer_files(ByteTokenizer(), os.path.join(root, "tok"))
    path = os.path.join(root, "ckpt")
    save_checkpoint(path, chunks, ctx, cfg, iteration=0, tokenizer_files=[tok])
    destroy_parallel()
    return path


def start_server(load: str, port: int, max_batch: int, threads):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = str(threads or os.cpu_count())
    cmd = [sys.executable, str(ROOT / "tools/run_text_generation_server.py"), "--load", load,
           "--port", str(port), "--max-batch-size", str(max_batch), "--max-queue", "256",
           "--max-tokens", "64"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def wait_up(client, proc, timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode()[-2000:])
        try:
            if (await client.get("/health")).status_code == 200:
                return (await client.get("/info")).json()
        except Exception:  # noqa: BLE001 - not up yet
            pass
        await asyncio.sleep(0.3)
    raise RuntimeError("the server did not come up")


async def one_request(client, body):
    """(latency, ttft, output tokens) of one streaming request."""
    start = time.perf_counter()
    ttft, n = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            k = len(json.loads(line[6:])["choices"][0]["tokens"])
            if k and ttft is None:
                ttft = time.perf_counter() - start
            n += k
    return time.perf_counter() - start, ttft or 0.0, n


async def closed_loop(client, clients: int, per_client: int, extra: dict, tokens: int):
    records = []

    async def worker(w):
        for i in range(per_client):
            body = {"prompt": PROMPTS[(w + i) % len(PROMPTS)], "max_tokens": tokens,
                    "temperature": 0, "stream": True, **extra}
            records.append(await one_request(client, body))

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(clients)))
    return time.perf_counter() - start, records


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def run(args, load):
    import httpx

    levels = [int(c) for c in args.concurrency.split(",")]
    port = free_port()
    proc = start_server(load, port, max(levels), args.threads)
    rows = []
    try:
        limits = httpx.Limits(max_connections=max(levels) + 4)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600,
                                     limits=limits) as client:
            info = await wait_up(client, proc)
            tau = args.tau if args.tau is not None else (0.0 if args.load is None else 0.8)
            draft = args.draft_exit or info["exit_layers"][0]
            modes = [("full depth", {}), (f"early exit tau={tau:g}", {"early_exit_thres": tau}),
                     (f"self-spec (exit {draft}, k=4)",
                      {"self_speculative": {"draft_exit": draft, "num_draft": 4}})]
            await closed_loop(client, 2, 1, {}, 8)  # warm-up
            for c in levels:
                for name, extra in modes:
                    wall, rec = await closed_loop(client, c, args.requests_per_client, extra,
                                                  args.tokens)
                    lat, ttft, toks = zip(*rec)
                    rows.append((c, name, len(rec) / wall, sum(toks) / wall,
                                 statistics.median(lat), pct(lat, 0.99),
                                 statistics.median(ttft), pct(ttft, 0.99)))
    finally:
        proc.terminate()
        proc.wait(30)
    return rows


def main():
    args = parse_args()
    load = args.load
    tmp = None
    if load is None:
        tmp = tempfile.TemporaryDirectory()
        load = random_checkpoint(tmp.name)
    rows = asyncio.run(run(args, load))
    full = {c: tps for c, name, _, tps, *_ in rows if name == "full depth"}
    print(f"{'clients':>7}  {'mode':<26}{'req/s':>7}{'tok/s':>8}{'vs full':>8}"
          f"{'p50 lat':>9}{'p99 lat':>9}{'p50 TTFT':>10}{'p99 TTFT':>10}")
    for c, name, rps, tps, l50, l99, t50, t99 in rows:
        print(f"{c:>7}  {name:<26}{rps:>7.2f}{tps:>8.1f}{tps / full[c]:>8.2f}"
              f"{l50 * 1e3:>7.0f}ms{l99 * 1e3:>7.0f}ms{t50 * 1e3:>8.0f}ms{t99 * 1e3:>8.0f}ms")
    print(f"({args.tokens} new tokens per request, {args.requests_per_client} requests per "
          f"client, streaming /v1/completions, server --max-batch-size "
          f"{max(int(c) for c in args.concurrency.split(','))}, {os.cpu_count()} cores)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
