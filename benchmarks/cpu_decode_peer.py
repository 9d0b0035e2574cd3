"""CPU batch-1 greedy decoding against transformers' ``generate`` on the same weights.

A transformers ``LlamaForCausalLM`` of SmolLM2-135M's shape (30 layers, hidden 576, 9 query heads
in 3 KV groups, SwiGLU 1536, vocabulary 49152, tied embeddings, RoPE theta 100000, RMSNorm) gets
random weights; they are copied into our EarlyExitGPTModel with the explicit mapping of
``copy_hf_llama`` (QKV fused per KV group, SwiGLU fc1 as [gate; up]), and the two models' full
forward logits are compared first. Then, in one process, round-robin for ``--rounds`` rounds,
each of these generates ``--new-tokens`` greedy tokens for each of ``--prompts`` prompts at batch 1:

- ``transformers``: ``model.generate`` (its default SDPA attention, dynamic cache);
- ``ours static``: ``Engine(model, cfg, fast_decode="static")``, the megatron-core layers;
- ``ours fused``: the same engine with ``StaticDecodeStep(fused=True)`` (inference/fused_decode.py).

It prints tokens/s (best and median of the rounds), the ratio to transformers, and the greedy
token agreement with transformers' tokens. ``--profile`` then lists, for one decode step of each,
the torch.profiler operators by self CPU time and the share taken by the matrix products.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/cpu_decode_peer.py [--profile]

``torch.set_num_threads(--threads)`` (default 1) applies to both sides. Single process, TP=1.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List

import torch

from megatron.early_exit.config import EarlyExitGPTConfig, ModelConfig
from megatron.early_exit.inference.engine import Engine
from megatron.early_exit.inference.modes import FullDepth
from megatron.early_exit.inference.static_decode import StaticDecodeStep
from megatron.early_exit.parallel.state import build_model, ensure_process_group, initialize_parallel


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--groups", type=int, default=3, help="KV heads (query groups)")
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--rope-base", type=float, default=100000.0)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="then profile one generation of each engine (torch.profiler)")
    args = p.parse_args()
    for flag in ("layers", "hidden", "heads", "groups", "ffn", "vocab", "new_tokens", "prompts",
                 "rounds", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.heads % args.groups or args.hidden % args.heads:
        p.error("--heads must divide --hidden and be a multiple of --groups")
    return args


def hf_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.groups, rope_theta=args.rope_base, rms_norm_eps=1e-5,
        tie_word_embeddings=True, max_position_embeddings=2048, bos_token_id=None,
        eos_token_id=None, pad_token_id=None)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(conf).eval()
    model.generation_config.eos_token_id = None  # always generate --new-tokens
    model.generation_config.pad_token_id = 0
    return model


def our_model(args):
    m = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                    num_query_groups=args.groups, ffn_hidden_size=args.ffn, vocab_size=args.vocab,
                    seq_length=2048, architecture="llama", untie_embeddings_and_output_weights=False,
                    rotary_base=args.rope_base, norm_epsilon=1e-5)
    cfg = EarlyExitGPTConfig(model=m, params_dtype="float32", seed=args.seed)
    ensure_process_group("gloo")
    (model,) = build_model(cfg, initialize_parallel(cfg, torch.device("cpu")))
    return cfg, model.eval()


@torch.no_grad()
def copy_hf_llama(hf, ours, heads: int, groups: int) -> None:
    """HF Llama weights -> our parameters. Our QKV is [ng, (q_per_group + 2) * hn, h]: for each
    KV group its q heads, then its k, then its v; fc1 is [gate; up]."""
    sd = hf.state_dict()
    hn = hf.config.hidden_size // heads
    per = heads // groups
    own = dict(ours.named_parameters())
    want = {"embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
            "decoder.final_layernorm.weight": sd["model.norm.weight"]}
    for i in range(hf.config.num_hidden_layers):
        a, o = f"model.layers.{i}.", f"decoder.layers.{i}."
        h = sd[a + "self_attn.q_proj.weight"].shape[1]
        q = sd[a + "self_attn.q_proj.weight"].view(groups, per * hn, h)
        k = sd[a + "self_attn.k_proj.weight"].view(groups, hn, h)
        v = sd[a + "self_attn.v_proj.weight"].view(groups, hn, h)
        want[o + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], 1).reshape(-1, h)
        want[o + "self_attention.linear_proj.weight"] = sd[a + "self_attn.o_proj.weight"]
        want[o + "input_layernorm.weight"] = sd[a + "input_layernorm.weight"]
        want[o + "pre_mlp_layernorm.weight"] = sd[a + "post_attention_layernorm.weight"]
        want[o + "mlp.linear_fc1.weight"] = torch.cat(
            [sd[a + "mlp.gate_proj.weight"], sd[a + "mlp.up_proj.weight"]], 0)
        want[o + "mlp.linear_fc2.weight"] = sd[a + "mlp.down_proj.weight"]
    missing = sorted(set(own) - set(want))
    assert not missing, f"parameters without an HF source: {missing}"
    for name, tensor in want.items():
        assert own[name].shape == tensor.shape, (name, own[name].shape, tensor.shape)
        own[name].copy_(tensor)


class FusedEngine(Engine):
    """Engine whose full-depth static step runs the fused layers (what fast_decode="fused"
    should select)."""

    def static_step(self, cache):
        if self._static is None or self._static.cache is not cache:
            self._static = None
            self._static = StaticDecodeStep(self.model, self.cfg, cache, fused=True)
        return self._static


def fused_engine(model, cfg) -> Engine:
    """``Engine(fast_decode="fused")`` once the engine offers it, else FusedEngine."""
    try:
        return Engine(model, cfg, fast_decode="fused")
    except ValueError:
        return FusedEngine(model, cfg, fast_decode="static")


def generators(hf, cfg, model, new_tokens: int):
    """name -> fn(prompt ids) -> new token ids (batch 1, greedy)."""
    static, fused = Engine(model, cfg, fast_decode="static"), fused_engine(model, cfg)

    def run_hf(prompt):
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          do_sample=False)
        return out[0, len(prompt):].tolist()

    def run_ours(engine):
        return lambda prompt: engine.generate([prompt], new_tokens, mode=FullDepth())[0].tokens

    def run_fused(prompt):
        tokens = run_ours(fused)(prompt)
        assert fused._static is not None and fused._static.fused is not None, "fused step unused"
        return tokens

    return {"transformers": run_hf, "ours static": run_ours(static), "ours fused": run_fused}


def bench(gens, prompts: List[List[int]], rounds: int):
    """Round-robin: in every round each prompt is generated by every engine in turn (the order
    rotates), so a burst of background load hits the engines alike.
    -> (name -> wall seconds per round, name -> CPU seconds per round, name -> tokens)."""
    names = list(gens)
    wall = {n: [0.0] * rounds for n in names}
    cpu = {n: [0.0] * rounds for n in names}
    toks: Dict[str, List[List[int]]] = {n: [] for n in names}
    with torch.no_grad():
        for name in names:  # warm-up: allocations, caches, lazy imports
            gens[name](prompts[0][:4])
        for r in range(rounds):
            for i, prompt in enumerate(prompts):
                k = (r * len(prompts) + i) % len(names)
                for name in names[k:] + names[:k]:
                    w0, c0 = time.perf_counter(), time.process_time()
                    out = gens[name](prompt)
                    wall[name][r] += time.perf_counter() - w0
                    cpu[name][r] += time.process_time() - c0
                    if r == 0:
                        toks[name].append(out)
    return wall, cpu, toks


def agreement(a: List[List[int]], b: List[List[int]]) -> str:
    same = sum(x == y for p, q in zip(a, b) for x, y in zip(p, q))
    total = sum(len(p) for p in a)
    prefix = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), len(p)) for p, q in zip(a, b)]
    return f"{same / total:.2f} (equal prefix {prefix})"


def weight_matrices(model) -> List[torch.Tensor]:
    """Every matrix a full-depth decode step multiplies by (the tied output projection too)."""
    mats = []
    for layer in model.decoder.layers:
        att, mlp = layer.self_attention, layer.mlp
        mats += [att.linear_qkv.weight, att.linear_proj.weight, mlp.linear_fc1.weight,
                 mlp.linear_fc2.weight]
    return mats + [model.tied_weight() if model.output_layer.weight is None else model.output_layer.weight]


@torch.no_grad()
def matmul_floor(model, reps: int = 20) -> float:
    """ms for one token's matrix products, each weight read once (the step's memory floor here)."""
    mats = weight_matrices(model)
    xs = [torch.randn(1, w.shape[1]) for w in mats]
    times = []
    for _ in range(reps + 2):
        start = time.perf_counter()
        for w, x in zip(mats, xs):
            torch.nn.functional.linear(x, w)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[2:])


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::mv", "aten::bmm", "aten::matmul", "aten::linear")


def profile(name: str, fn, prompt: List[int], tokens: int) -> None:
    """torch.profiler over one generation (prefill and ``tokens`` steps): self CPU time per
    generated token in the matrix products and in everything else, and the top operators."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(prompt)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / tokens  # ms per token
    mm = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1e3 / tokens
    calls = sum(e.count for e in events) / tokens
    print(f"\nprofile {name} (one {len(prompt)}-token prompt + {tokens} tokens; per generated "
          f"token): {calls:.0f} operator calls, self CPU {total:.1f} ms = matrix products "
          f"{mm:.1f} ms ({mm / total:.0%}) + the rest {total - mm:.1f} ms")
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    print("  top: " + "; ".join(f"{e.key} {e.self_cpu_time_total / 1e3 / tokens:.2f} ms "
                                f"({e.count / tokens:.0f} calls)" for e in top))


def report(wall, cpu, toks, n: int, ref: str = "transformers") -> None:
    print(f"\n{'engine':<14} {'tok/s best':>10} {'median':>7} {'ratio best':>10} {'median':>7}"
          f" {'ratio CPU s':>11}  agreement with transformers' tokens")
    for name in wall:
        best, med = n / min(wall[name]), n / statistics.median(wall[name])
        print(f"{name:<14} {best:>10.1f} {med:>7.1f} {min(wall[ref]) / min(wall[name]):>9.2f}x "
              f"{statistics.median(wall[ref]) / statistics.median(wall[name]):>6.2f}x "
              f"{statistics.median(cpu[ref]) / statistics.median(cpu[name]):>10.2f}x  "
              f"{agreement(toks[ref], toks[name])}")
    print("ratio = transformers' time / this engine's (> 1: faster than transformers), of the best "
          "and the median round; CPU s: median process CPU seconds of a round (steadier than wall "
          "time on a loaded machine); agreement: fraction of equal tokens, and equal prefix lengths")
    for label, d in (("wall", wall), ("CPU", cpu)):
        print(f"rounds, {label} s: " + "; ".join(
            f"{k} " + ", ".join(f"{x:.2f}" for x in v) for k, v in d.items()))


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    hf = hf_model(args)
    cfg, model = our_model(args)
    copy_hf_llama(hf, model, args.heads, args.groups)
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompts = [torch.randint(0, args.vocab, (n,), generator=gen).tolist()
               for n in torch.randint(8, 33, (args.prompts,), generator=gen).tolist()]
    with torch.no_grad():
        ids = torch.tensor([prompts[0]])
        diff = (hf(ids).logits[0] - model(input_ids=ids, return_logits=True).final_logits[:, 0]).abs().max()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.groups}, "
          f"ffn {args.ffn}, vocab {args.vocab}, tied, {params / 1e6:.1f}M parameters, float32, "
          f"random weights (transformers init, copied into ours; built in "
          f"{time.perf_counter() - t0:.1f}s); max |logit difference| of the full forward on a "
          f"{len(prompts[0])}-token prompt: {float(diff):.2e}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {args.prompts} prompts "
          f"(lengths {[len(p) for p in prompts]}) x {args.new_tokens} new tokens, greedy, batch 1, "
          f"{args.rounds} round-robin rounds")
    gens = generators(hf, cfg, model, args.new_tokens)
    wall, cpu, toks = bench(gens, prompts, args.rounds)
    report(wall, cpu, toks, args.prompts * args.new_tokens)
    floor = matmul_floor(model)
    print(f"\nmatrix products alone (every weight once, F.linear on one token, median of 20): "
          f"{floor:.1f} ms/token = {1e3 / floor:.1f} tok/s; per generated token above (median "
          "round, prefill included): " + ", ".join(
              f"{k} {1e3 * statistics.median(v) / (args.prompts * args.new_tokens):.1f} ms"
              for k, v in wall.items()))
    if args.profile:
        for name, fn in gens.items():
            profile(name, fn, prompts[0], args.new_tokens)


if __name__ == "__main__":
    main()
