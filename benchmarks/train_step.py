"""Training-step benchmark: plain megatron-core GPTModel vs our early-exit model, same data.

Variants, built on the same weights (the backbone of ours is copied into megatron-core's model)
and stepped in alternating repetitions on the same micro-batches:

  a  megatron-core ``GPTModel`` (our layer spec: SDPA core attention, Llama options), trained
     with megatron-core's ``forward_backward_no_pipelining``, DDP gradient buffers,
     ``finalize_model_grads`` and ``get_megatron_optimizer`` (FP32Optimizer, Adam);
  b  our ``EarlyExitGPTModel`` with 2 exits through our trainer (trainer/step.py ``train_step``,
     megatron-core's optimizer via trainer/megatron_optimizer.py), chunked fused exit losses;
  c  ours without exits (the plain-backbone configuration);
  d  ours with 2 exits and materialised logits (``--cross-entropy-chunk-size 0``).

Printed per variant: ms/step (median), tokens/s, model TFLOP/s, MFU (``--peak-tflops``; on CUDA
H100/H200 default to 989 dense bf16), peak memory, the model FLOPs per token (formula of
trainer/metrics_log.py; the chunked loss computes its gradients in forward, so it executes the
same matmuls as materialised logits), the first step's LM loss (the same weights and data give
the same loss in every variant when no vocabulary padding is present; at the 1.3B shape
megatron-core's model also scores the 47 padded ids of 50304, ours does not); then the ratios
b/a measured and predicted by the FLOPs, c/a, and peak memory b/c and d/c (goal: b within 10%
of c).

Peak memory of a variant = what its build and first step leave allocated (weights, gradient
buffers, optimizer state) + the largest extra allocation during one more step. CUDA:
``torch.cuda.max_memory_allocated``; CPU: the allocator's events recorded by
``torch.profiler`` (``profile_memory``), summed in time order.

Runs on a CPU-only machine at a tiny shape with the same code: megatron-core's optimizer and its no-pipelining
schedule allocate on 'cuda', so on a CPU-only machine they run inside the test-suite shim
(tests/megatron_cpu_shim.py: 'cuda' allocations go to the CPU; nothing else changes). Precision:
float32 parameters, ``--bf16`` = autocast to bfloat16 on CUDA for every variant (megatron-core's
``enable_autocast``; our trainer's autocast), as the project trains.

    PYTHONPATH=. python benchmarks/train_step.py                     # CPU, tiny shape, ~20 s
    PYTHONPATH=. python benchmarks/train_step.py --shape small       # CPU, logits dominate memory
    PYTHONPATH=. python benchmarks/train_step.py --device cuda --shape 1.3b --bf16
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from functools import partial
from typing import Dict, List

import torch

SHAPES = {  # EE-LLM's 1.3B: 24 x 2048, 16 heads, seq 2048, micro-batch 8, exits at 1/4, 1/2 depth
    "tiny": dict(layers=4, hidden=64, heads=4, ffn=None, vocab=512, tokens=512, seq=64, mbs=2, exits="1,2"),
    # CPU memory comparison: the logits ([1024, 32000] per head) outweigh the model
    "small": dict(layers=4, hidden=128, heads=4, ffn=None, vocab=32000, tokens=32000, seq=256,
                  mbs=4, exits="1,2"),
    "1.3b": dict(layers=24, hidden=2048, heads=16, ffn=5504, vocab=50304, tokens=50257, seq=2048,
                 mbs=8, exits="6,12"),
}
DENSE_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--micro-batches", type=int, default=1, help="micro-batches per step")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant (alternating)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    p.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (CUDA)")
    p.add_argument("--chunk", type=int, default=4096, help="--cross-entropy-chunk-size of b, c")
    p.add_argument("--variants", help="comma-separated, default a,b,c,d on CPU and a,b,c on "
                   "CUDA (each variant holds ~16 bytes per parameter: 1.3B -> ~23 GB)")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU")
    a = p.parse_args(argv)
    a.variants = a.variants or ("a,b,c" if a.device.startswith("cuda") else "a,b,c,d")
    bad = set(a.variants.split(",")) - set("abcd")
    if bad:
        p.error(f"--variants: unknown {sorted(bad)} (choose from a,b,c,d)")
    if a.device == "cpu" and torch.cuda.is_available():
        p.error("--device cpu: the CPU path is for CPU-only machines (megatron-core places "
                "RoPE and its optimizer's buffers on the current CUDA device); use --device cuda")
    if a.bf16 and not a.device.startswith("cuda"):
        p.error("--bf16: autocast to bfloat16 is measured on CUDA only")
    return a


def make_cfg(shape: dict, exits: bool, chunk: int):
    from megatron.early_exit.config import EarlyExitGPTConfig, ExitConfig, ModelConfig

    model = ModelConfig(num_layers=shape["layers"], hidden_size=shape["hidden"],
                        num_attention_heads=shape["heads"], ffn_hidden_size=shape["ffn"],
                        vocab_size=shape["vocab"], tokenizer_vocab_size=shape["tokens"],
                        seq_length=shape["seq"])
    layers = [int(x) for x in shape["exits"].split(",")] if exits else []
    return EarlyExitGPTConfig(model=model, exits=ExitConfig(exit_layer_nums=layers), seed=1,
                              cross_entropy_chunk_size=chunk)


def make_data(shape: dict, n: int, device) -> List[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, shape["tokens"], (shape["mbs"], shape["seq"] + 1), generator=gen)
        out.append({"tokens": ids[:, :-1].to(device), "labels": ids[:, 1:].to(device),
                    "loss_mask": torch.ones(shape["mbs"], shape["seq"], device=device)})
    return out


def train_config(a):
    from megatron.early_exit.config import TrainConfig

    return TrainConfig(micro_batch_size=1, global_batch_size=a.micro_batches, lr=1e-4,
                       weight_decay=0.1, clip_grad=1.0, bf16=a.bf16, optimizer_backend="megatron")


class Ours:
    """EarlyExitGPTModel through our trainer's step."""

    def __init__(self, cfg, ctx, a, data):
        from megatron.early_exit.parallel.state import build_model
        from megatron.early_exit.trainer.optimizer import build_trainer_optimizer

        self.cfg, self.ctx, self.data, self.bf16 = cfg, ctx, data, a.bf16
        self.chunks = build_model(cfg, ctx)
        self.optimizer = build_trainer_optimizer(self.chunks, ctx, train_config(a))

    def step(self) -> float:
        from megatron.early_exit.trainer.step import train_step

        result = train_step(self.chunks, self.optimizer, self.data, self.ctx, self.cfg, iteration=0,
                            bf16=self.bf16)
        return result.lm_loss


class MegatronCore:
    """megatron-core GPTModel + forward_backward_no_pipelining + its optimizer."""

    def __init__(self, cfg, ctx, a, data, weights_from):
        from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                               finalize_model_grads)
        from megatron.core.models.gpt import GPTModel
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        from megatron.early_exit.model.layers import layer_spec, transformer_config

        m, tc = cfg.model, transformer_config(cfg)
        tc.enable_autocast, tc.autocast_dtype = a.bf16, torch.bfloat16
        gpt = GPTModel(tc, layer_spec(cfg), m.vocab_size, m.max_position_embeddings,
                       share_embeddings_and_output_weights=False, position_embedding_type="rope",
                       rotary_base=int(m.rotary_base)).to(ctx.device)
        copy_weights(gpt, weights_from)
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False)
        self.model = DistributedDataParallel(config=tc, ddp_config=ddp_config, module=gpt)
        tc.no_sync_func, tc.finalize_model_grads_func = self.model.no_sync, finalize_model_grads
        t = train_config(a)
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=t.lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad, bf16=False,
            fp16=False, params_dtype=torch.float32), [self.model], use_gloo_process_groups=False)
        self.data, self.seq, self.mbs = data, m.seq_length, data[0]["tokens"].shape[0]

    def step(self) -> float:
        from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = forward_backward_no_pipelining(
            forward_step_func=_mcore_forward_step, data_iterator=iter(self.data), model=[self.model],
            num_microbatches=len(self.data), seq_length=self.seq, micro_batch_size=self.mbs)
        ok, _, _ = self.optimizer.step()
        assert ok, "megatron-core skipped the update"
        return statistics.fmean(float(x["lm loss"]) for x in losses)


def _mcore_loss(loss_mask, per_token):  # per_token [b, s] from GPTModel with labels
    loss = (per_token.float() * loss_mask).sum() / loss_mask.sum()
    return loss, {"lm loss": loss.detach()}


def _mcore_forward_step(data_iterator, model):
    mb = next(data_iterator)
    out = model(mb["tokens"], None, None, labels=mb["labels"])
    return out, partial(_mcore_loss, mb["loss_mask"])


@torch.no_grad()
def copy_weights(gpt, ours) -> None:
    """Give megatron-core's model our (no-exit) model's weights: the names are megatron's own."""
    mine = dict(ours.named_parameters())
    theirs = dict(gpt.named_parameters())
    assert set(theirs) == set(mine), sorted(set(theirs) ^ set(mine))
    for name, p in theirs.items():
        p.copy_(mine[name])


def memory_meter(device: torch.device):
    """``measure(fn) -> (bytes still allocated after fn, peak extra bytes during fn)``."""
    if device.type == "cuda":
        def measure(fn):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated() - base, torch.cuda.max_memory_allocated() - base
        return measure

    def measure(fn):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        now = peak = 0
        for _, nbytes in events:
            now += nbytes
            peak = max(peak, now)
        return now, peak
    return measure


def flops_per_token(cfg) -> float:
    from megatron.early_exit.trainer.metrics_log import train_flops_per_token

    return train_flops_per_token(cfg)


NAMES = {"a": "megatron-core GPTModel", "b": "ours, 2 exits", "c": "ours, no exits",
         "d": "ours, 2 exits, materialised logits"}


def build_variant(key: str, shape: dict, ctx, a, data):
    from megatron.early_exit.parallel.state import build_model

    if key == "a":
        plain = make_cfg(shape, exits=False, chunk=a.chunk)
        (weights,) = build_model(plain, ctx)
        return MegatronCore(plain, ctx, a, data, weights), plain
    cfg = make_cfg(shape, exits=key != "c", chunk=0 if key == "d" else a.chunk)
    return Ours(cfg, ctx, a, data), cfg


def timed(step, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_tflops(a, device):
    if a.peak_tflops or device.type != "cuda":
        return a.peak_tflops
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DENSE_BF16_TFLOPS.items() if k in name), None)


def run(a) -> Dict[str, dict]:
    from megatron.early_exit.parallel.state import ensure_process_group, initialize_parallel

    device, shape = torch.device(a.device), SHAPES[a.shape]
    ensure_process_group()
    ctx = initialize_parallel(make_cfg(shape, exits=False, chunk=a.chunk), device)
    data = make_data(shape, a.micro_batches, device)
    measure, keys = memory_meter(device), a.variants.split(",")
    variants, res = {}, {}
    for key in keys:  # build + first step (allocates the optimizer state) = static memory
        holder = {}

        def build(key=key, holder=holder):
            holder["v"], holder["cfg"] = build_variant(key, shape, ctx, a, data)
            holder["loss"] = holder["v"].step()

        static, _ = measure(build)
        variants[key] = holder["v"]
        res[key] = {"static": static, "step1_loss": holder["loss"],
                    "flops": flops_per_token(holder["cfg"])}
    for _ in range(a.warmup):
        for key in keys:
            variants[key].step()
    times = {key: [] for key in keys}
    for _ in range(a.repeats):  # alternating repetitions
        for key in keys:
            times[key].append(timed(variants[key].step, device))
    tokens = a.micro_batches * shape["mbs"] * shape["seq"]
    peak = peak_tflops(a, device)
    for key in keys:
        r = res[key]
        r["ms"] = 1e3 * statistics.median(times[key])
        r["tokens_per_s"] = tokens / (r["ms"] / 1e3)
        r["tflops"] = r["flops"] * r["tokens_per_s"] / 1e12
        r["mfu"] = r["tflops"] / peak if peak else None
        r["peak_bytes"] = r["static"] + measure(variants[key].step)[1]
    return res


def report(a, res: Dict[str, dict], out=sys.stdout) -> Dict[str, float]:
    shape = SHAPES[a.shape]
    print(f"device {a.device}, shape {a.shape} ({shape['layers']} layers, hidden {shape['hidden']}, "
          f"seq {shape['seq']}, micro-batch {shape['mbs']} x {a.micro_batches}, vocab "
          f"{shape['vocab']} / {shape['tokens']} ids), bf16 {a.bf16}, median of {a.repeats}", file=out)
    print(f"{'variant':38s} {'ms/step':>9s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s} "
          f"{'peak MiB':>9s} {'GFLOP/token':>12s} {'step-1 loss':>11s}", file=out)
    for key, r in res.items():
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "   n/a"
        print(f"{key} {NAMES[key]:36s} {r['ms']:9.2f} {r['tokens_per_s']:10.0f} {r['tflops']:8.3f} "
              f"{mfu} {r['peak_bytes'] / 2**20:9.1f} {r['flops'] / 1e9:12.5g} {r['step1_loss']:11.6f}",
              file=out)
    ratios = {}
    if "a" in res and "b" in res:
        ratios["time b/a"] = res["b"]["ms"] / res["a"]["ms"]
        ratios["FLOP-predicted b/a"] = res["b"]["flops"] / res["a"]["flops"]
    if "a" in res and "c" in res:
        ratios["time c/a"] = res["c"]["ms"] / res["a"]["ms"]
    for num in ("b", "d", "a"):
        if num in res and "c" in res and num != "c":
            ratios[f"peak memory {num}/c"] = res[num]["peak_bytes"] / res["c"]["peak_bytes"]
    for name, value in ratios.items():
        print(f"{name:32s} {value:.3f}", file=out)
    return ratios


def main(argv=None) -> Dict[str, object]:
    a = parse_args(argv)
    shim = contextlib.nullcontext()
    if a.device == "cpu":  # megatron-core's optimizer and schedule allocate on 'cuda'
        from tests.megatron_cpu_shim import cpu_optimizer_shim

        shim = cpu_optimizer_shim()
    with shim:
        res = run(a)
    return {"results": res, "ratios": report(a, res)}


if __name__ == "__main__":
    main()
