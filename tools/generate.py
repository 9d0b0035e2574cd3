"""Generate text from an early-exit checkpoint: `--load` alone is enough (config and tokenizer
come from the checkpoint).

    python tools/generate.py --load ckpt --prompt "ROMEO:" --tokens-to-generate 64 --early-exit-thres 0.8
    python tools/generate.py --load ckpt --prompt-file prompts.txt --self-speculative --draft-exit 2 --json
    torchrun --nproc-per-node 2 tools/generate.py --load ckpt --prompt "ROMEO:" \
        --pipeline-model-parallel-size 2 --early-exit-thres 0.8     # or --tensor-model-parallel-size 2

Under torchrun the world must be TP x PP ranks; the checkpoint is sliced to that layout at load
(whatever layout it was saved in), every rank takes part in every step, and global rank 0
prints. Pipeline-based decoding (PP > 1) supports full depth and early exit, not
--self-speculative.

Without ``--json`` each token is printed coloured by the layer whose head produced it (on a
terminal), followed by the exit-layer histogram; with ``--json`` one JSON object per prompt per
line: text, tokens, exit_layers, confidences, finish_reason.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLOURS = ["\033[31m", "\033[33m", "\033[32m", "\033[36m", "\033[34m", "\033[35m"]
RESET = "\033[0m"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate text with early exit from a checkpoint.")
    p.add_argument("--load", required=True, help="Checkpoint directory (pretrain_early_exit_gpt.py --save).")
    p.add_argument("--load-iteration", type=int, help="Iteration to load (default: latest).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="One prompt.")
    src.add_argument("--prompt-file", help="A file with one prompt per line.")
    p.add_argument("--tokens-to-generate", type=int, default=64, help="Max new tokens per prompt.")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy.")
    p.add_argument("--top-k", type=int, default=0, help="Top-k sampling (0: off).")
    p.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling (1: off).")
    p.add_argument("--seed", type=int, help="Sampling seed.")
    p.add_argument("--stop", action="append", default=[], help="Stop string (repeatable).")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--early-exit-thres", type=float,
                      help="Confidence threshold tau for early exit (default: the checkpoint's "
                           "calibrated default if it has one, else full depth).")
    mode.add_argument("--no-early-exit", action="store_true", help="Full-depth decoding.")
    mode.add_argument("--self-speculative", action="store_true", help="Lossless self-speculative decoding.")
    p.add_argument("--exit-layers", type=int, nargs="*", help="Exits allowed to fire (default: all).")
    p.add_argument("--confidence", choices=["max_prob", "margin", "classifier"],
                   help="What --early-exit-thres thresholds: max softmax probability (default), "
                        "top-1 minus top-2, or the exits' fitted classifiers "
                        "(tools/fit_exit_classifier.py).")
    p.add_argument("--draft-exit", type=int, help="Exit layer that drafts (--self-speculative).")
    p.add_argument("--draft-length", type=int, help="Max draft tokens per cycle (default 4).")
    p.add_argument("--draft-threshold", type=float,
                   help="Stop drafting below this confidence (default 0).")
    p.add_argument("--json", action="store_true", help="One JSON object per prompt per line.")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available).")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="TP ranks (run under torchrun; world size = TP x PP).")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="PP stages: pipeline-based early-exit decoding (run under torchrun).")
    p.add_argument("--fast-decode", choices=["static", "fused", "cuda_graph", "compile"],
                   help="Decode steps on static shapes (full depth; early exit and self-speculative "
                        "too, for one prompt); fused: full-depth steps as fused torch ops (TP=1, "
                        "fastest on CPU); cuda_graph / compile replay them as CUDA graphs (GPU only).")
    return p


# GenerationRequest fields -> the flags that set them (for error messages)
FIELD_FLAGS = {"prompt": "--prompt", "max_new_tokens": "--tokens-to-generate",
               "mode.threshold": "--early-exit-thres", "mode.exit_layers": "--exit-layers",
               "mode.exit_layer": "--draft-exit", "mode": "--self-speculative",
               "stop.stop_token_ids": "--load", "sampling": "--temperature",
               "mode.confidence": "--confidence"}


def make_mode(args, cfg):
    from megatron.early_exit.cli import UsageError
    from megatron.early_exit.inference.modes import EarlyExit, FullDepth, SelfSpeculative

    if args.self_speculative:
        layer = args.draft_exit or (cfg.exits.exit_layer_nums[0] if cfg.exits.exit_layer_nums else None)
        if layer is None:
            raise UsageError("--self-speculative", "needs a model with exits (--draft-exit)")
        return SelfSpeculative(exit_layer=layer, num_draft=4 if args.draft_length is None
                               else args.draft_length, draft_threshold=args.draft_threshold or 0.0)
    if args.no_early_exit:
        return FullDepth()
    if args.early_exit_thres is None:
        return serving_default(args.load, args.load_iteration)
    return EarlyExit(threshold=args.early_exit_thres,
                     exit_layers=tuple(args.exit_layers) if args.exit_layers else None,
                     confidence=args.confidence or "max_prob")


def serving_default(load_dir, iteration):
    """The checkpoint's serving default (tools/calibrate_threshold.py --write-default), else
    full depth."""
    from megatron.early_exit.checkpoint.serving import serving_defaults
    from megatron.early_exit.inference.modes import EarlyExit, FullDepth

    d = serving_defaults(load_dir, iteration)
    if not d:
        return FullDepth()
    layers = d.get("exit_layers")
    kind = d.get("confidence") or "max_prob"
    print(f"early exit at the checkpoint's calibrated default tau={d['early_exit_thres']}"
          + (f", exits {layers}" if layers else "") + f", confidence {kind}", file=sys.stderr)
    return EarlyExit(threshold=float(d["early_exit_thres"]),
                     exit_layers=tuple(layers) if layers else None, confidence=kind)


def check_layout(args) -> None:
    import torch.distributed as dist

    from megatron.early_exit.cli import UsageError

    for flag, v in (("--tensor-model-parallel-size", args.tensor_model_parallel_size),
                    ("--pipeline-model-parallel-size", args.pipeline_model_parallel_size)):
        if v < 1:
            raise UsageError(flag, f"must be >= 1, got {v}")
    need = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    if dist.get_world_size() != need:
        raise UsageError("--tensor-model-parallel-size", f"TP x PP = {need} ranks, but the world "
                         f"has {dist.get_world_size()} (launch with torchrun --nproc-per-node {need})")


def render(tokenizer, out, num_layers: int, colour: bool) -> str:
    if not colour:
        return tokenizer.detokenize(out.tokens)
    layers = sorted(set(out.exit_layers) | {num_layers})
    pieces = []
    for tok, layer in zip(out.tokens, out.exit_layers):
        c = COLOURS[layers.index(layer) % len(COLOURS)] if layer != num_layers else ""
        pieces.append(c + tokenizer.detokenize([tok]) + (RESET if c else ""))
    return "".join(pieces)


def main(argv=None) -> list:
    import torch

    from megatron.early_exit.cli import UsageError, check_requires
    from megatron.early_exit.inference.loading import load_engine
    from megatron.early_exit.inference.requests import RequestError
    from megatron.early_exit.inference.sampling import SamplingParams
    from megatron.early_exit.inference.stopping import StopCriteria
    from megatron.early_exit.parallel.state import ensure_process_group

    args = build_parser().parse_args(argv)
    check_requires(args, [("exit_layers", "early_exit_thres"), ("confidence", "early_exit_thres"),
                          ("draft_exit", "self_speculative"),
                          ("draft_length", "self_speculative"), ("draft_threshold", "self_speculative")])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.fast_decode in ("cuda_graph", "compile") and device.type != "cuda":
        raise UsageError("--fast-decode", f"{args.fast_decode} needs a CUDA device (use static on CPU)")
    if args.fast_decode == "fused" and args.tensor_model_parallel_size > 1:
        raise UsageError("--fast-decode", "fused covers TP = 1 only (use static)")
    if args.fast_decode and args.pipeline_model_parallel_size > 1:
        raise UsageError("--fast-decode", "is not supported with --pipeline-model-parallel-size > 1")
    if not Path(args.load).is_dir():
        raise UsageError("--load", f"{args.load} is not a directory")
    ensure_process_group()
    check_layout(args)
    engine, tokenizer = load_engine(args.load, device, args.tensor_model_parallel_size,
                                    args.pipeline_model_parallel_size, fast_decode=args.fast_decode,
                                    iteration=args.load_iteration)
    cfg = engine.cfg
    if tokenizer is None:
        raise UsageError("--load", f"{args.load} holds no tokenizer files; re-save it with "
                         "pretrain_early_exit_gpt.py")
    prompts = [args.prompt] if args.prompt is not None else Path(args.prompt_file).read_text().splitlines()
    prompts = [p for p in prompts if p]
    if not prompts:
        raise UsageError("--prompt-file", "holds no non-empty line")
    ids = [tokenizer.tokenize(p) for p in prompts]
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    stop = StopCriteria(stop_token_ids=frozenset({tokenizer.eod}), stop_strings=tuple(args.stop))
    try:
        outs = engine.generate(ids, args.tokens_to_generate, sampling=sampling, stop=stop,
                               mode=make_mode(args, cfg), detokenize=tokenizer.detokenize)
    except RequestError as e:
        raise UsageError(FIELD_FLAGS.get(e.field, "--" + e.field.replace("_", "-")), e.message) from None
    return report(args, prompts, outs, tokenizer, cfg)


def report(args, prompts, outs, tokenizer, cfg) -> list:
    import torch.distributed as dist

    records = []
    show = dist.get_rank() == 0
    for prompt, out in zip(prompts, outs):
        text = tokenizer.detokenize(out.tokens)
        if out.text_len is not None:
            text = text[:out.text_len]
        rec = {"prompt": prompt, "text": text, "tokens": out.tokens, "exit_layers": out.exit_layers,
               "confidences": [round(c, 6) for c in out.confidences], "finish_reason": out.finish_reason}
        records.append(rec)
        if not show:
            continue
        if args.json:
            print(json.dumps(rec), flush=True)
        else:
            print(prompt + render(tokenizer, out, cfg.model.num_layers, sys.stdout.isatty()))
            hist = Counter(out.exit_layers)
            print("exit layers: " + ", ".join(f"{k}: {hist[k]}" for k in sorted(hist)), flush=True)
    return records


if __name__ == "__main__":
    from megatron.early_exit.cli import run_cli

    run_cli(main)
