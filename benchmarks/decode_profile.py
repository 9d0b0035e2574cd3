"""Where a batch-1 full-depth decode step spends its time on a GPU (CUDA only).

Builds the decode benchmark's 1.3B shape (24 layers, hidden 2048, SwiGLU 4x, bf16; weights
random: the time of a step does not depend on them), captures the static decode step as a CUDA
graph (inference/static_decode.py) and prints:

1. the replay time per step and the memory roofline floor (parameter bytes / copy bandwidth),
   measured by benchmarks/decode.py's ``roofline``;
2. the CUDA kernels of 20 replays by total time (torch.profiler), grouped by name: the matrix
   products (cuBLAS ``nvjet`` kernels) against the many small element-wise ones.

    PYTHONPATH=. python benchmarks/decode_profile.py [--fast-decode compile] [--layers 24 ...]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections import defaultdict

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import roofline, step_bytes  # noqa: E402  (benchmarks/decode.py)

from megatron.early_exit.config import EarlyExitGPTConfig, ExitConfig, ModelConfig
from megatron.early_exit.inference.engine import Engine
from megatron.early_exit.parallel.state import build_model, initialize_parallel


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--fast-decode", default="cuda_graph", choices=["cuda_graph", "compile"])
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    dev = torch.device("cuda")
    m = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                    vocab_size=args.vocab, seq_length=256, ffn_hidden_size=4 * args.hidden)
    cfg = EarlyExitGPTConfig(model=m, exits=ExitConfig(exit_layer_nums=[args.layers // 4]),
                             params_dtype="bfloat16", seed=1)
    ctx = initialize_parallel(cfg, dev)
    (model,) = build_model(cfg, ctx)
    model.eval()
    engine = Engine(model, cfg, fast_decode=args.fast_decode)
    with torch.no_grad():
        engine.generate([[1, 2, 3, 4, 5, 6, 7, 8]], 8)
        step = engine._static
        tokens, pos = step.tokens.clone(), step.pos.clone()
        ms, floor_ms, bw = roofline(engine, model, dev)
        print(f"{args.fast_decode}: step {ms:.3f} ms, {step_bytes(model) / 1e9:.3f} GB of "
              f"parameters, copy bandwidth {bw / 1e12:.2f} TB/s -> floor {floor_ms:.3f} ms "
              f"({floor_ms / ms:.0%})")

        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                step(tokens, pos)
            torch.cuda.synchronize()
        per_kernel = defaultdict(lambda: [0.0, 0])
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                per_kernel[ev.name][0] += ev.device_time / 20 / 1e3  # ms per step
                per_kernel[ev.name][1] += 1
        total = sum(v[0] for v in per_kernel.values())
        print(f"\nkernels per step: {sum(v[1] for v in per_kernel.values()) // 20}, busy "
              f"{total:.3f} ms of {ms:.3f} ms")
        for name, (t, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:12]:
            print(f"  {t:7.3f} ms  {n // 20:4d}x  {name[:110]}")

    dist.destroy_process_group()


if __name__ == "__main__":
    main()
