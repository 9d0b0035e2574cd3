"""Batch-1 greedy decoding of one early-exit checkpoint: transformers' rows next to ours, one run.

On the same weights, on the same machine, in one process, each engine generates --new-tokens
greedy tokens for each of --prompts held-out prompts (the first --prompt-tokens tokens of the
first documents of --data), for --rounds rounds (the order rotates within a round, so
background load hits every row alike):

- ``hf generate``: transformers ``LlamaForCausalLM.generate`` on the backbone (the checkpoint
  exported with ``tools/checkpoint/convert.py --target-format hf``; exits are ignored there);
- ``hf assistant_early_exit=k``: transformers' self-speculation (``generate(...,
  assistant_early_exit=k)``): its draft runs the first k layers and then the model's own final
  norm and head, i.e. our exit k *before* tuning, not the tuned exit;
- ``ours fused``: ``Engine(fast_decode="fused")``, our fastest CPU full-depth decoding;
- ``ours early exit tau=T``: ``EarlyExit(T)`` (all exits) on ``Engine(fast_decode=
  --ee-fast-decode)``: ``fused`` (default; its layer segments run on the fused layer step, falling
  back to ``static`` for a model the fused step does not cover) or ``static``;
- ``ours early exit clf tau=T`` (``--classifier-thresholds``): the same with
  ``confidence="classifier"``: each exit is tested by its fitted classifier and only the firing
  exit pays its vocabulary projection (tools/fit_exit_classifier.py);
- ``ours self-spec exit=k``: ``SelfSpeculative(k, num_draft=--draft-length)``, lossless, on the
  same engine (``--no-self-spec`` drops these and the assistant rows).

It prints tokens/s (best round), the ratio to ours fused and to hf generate, the mean exit layer
of the generated tokens, and the share of generated tokens equal, position by position, to our
full-depth greedy output (=full) and to hf generate's (=hf); 1.0 for lossless modes up to
float ties. --json saves the rows;
--plot (with --calibration, the JSON of tools/calibrate_threshold.py --json) draws measured
speedup against teacher-forced agreement for the early-exit rows.

    OMP_NUM_THREADS=2 PYTHONPATH=. .venv/bin/python benchmarks/ee_tuning_bench.py \\
        --load runs/ee_tuning/tuned --data runs/ee_tuning/heldout.jsonl [--hf-dir DIR] \\
        [--thresholds 0.9 0.7 0.5] [--rounds 2] [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="Our checkpoint with exits (and its tokenizer).")
    p.add_argument("--data", required=True, help="JSON lines {\"text\": ...}: prompts come from here.")
    p.add_argument("--hf-dir", help="The checkpoint exported to HF (default: export to a temp dir).")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--thresholds", type=float, nargs="*", default=[0.9, 0.7, 0.5])
    p.add_argument("--classifier-thresholds", type=float, nargs="*", default=[],
                   help="Also early-exit rows with confidence='classifier' at these tau (the "
                        "checkpoint needs exit classifiers: tools/fit_exit_classifier.py).")
    p.add_argument("--no-self-spec", action="store_true", help="Skip the self-speculative rows.")
    p.add_argument("--draft-length", type=int, default=4)
    p.add_argument("--ee-fast-decode", choices=["fused", "static"], default="fused",
                   help="Engine fast_decode of the early-exit and self-spec rows (fused falls "
                        "back to static for a model the fused step does not cover).")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is).")
    p.add_argument("--json", help="Write the rows here.")
    p.add_argument("--calibration", help="tools/calibrate_threshold.py --json output (for --plot).")
    p.add_argument("--classifier-calibration",
                   help="Its --confidence classifier output (--plot then draws the clf rows too).")
    p.add_argument("--plot", help="PNG: measured speedup against teacher-forced agreement.")
    return p


def check_args(a) -> None:
    from megatron.early_exit.cli import UsageError

    for flag in ("prompts", "prompt_tokens", "new_tokens", "rounds", "draft_length"):
        if getattr(a, flag) < 1:
            raise UsageError("--" + flag.replace("_", "-"), f"must be >= 1, got {getattr(a, flag)}")
    if any(not 0.0 <= t < 1.0 for t in a.thresholds):
        raise UsageError("--thresholds", f"each must be in [0, 1), got {a.thresholds}")
    if any(not 0.0 <= t < 1.0 for t in a.classifier_thresholds):
        raise UsageError("--classifier-thresholds", f"each must be in [0, 1), got "
                         f"{a.classifier_thresholds}")
    if not os.path.isfile(a.data):
        raise UsageError("--data", f"{a.data} does not exist")
    if a.plot and not a.calibration:
        raise UsageError("--plot", "needs --calibration (the agreement comes from there)")
    if a.calibration and not os.path.isfile(a.calibration):
        raise UsageError("--calibration", f"{a.calibration} does not exist")
    if a.classifier_calibration and not os.path.isfile(a.classifier_calibration):
        raise UsageError("--classifier-calibration", f"{a.classifier_calibration} does not exist")


def read_prompts(path: str, tokenizer, n: int, length: int) -> list:
    from megatron.early_exit.cli import UsageError

    prompts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            ids = tokenizer.tokenize(json.loads(line)["text"]) if line.strip() else []
            if len(ids) >= length:
                prompts.append(ids[:length])
            if len(prompts) == n:
                return prompts
    raise UsageError("--data", f"fewer than {n} documents of {length} tokens or more")


def our_rows(load: str, a, num_layers_out: list) -> dict:
    """name -> callable(prompt ids) -> (new token ids, exit layers)."""
    import torch

    from megatron.early_exit.inference.engine import Engine
    from megatron.early_exit.inference.loading import load_for_inference
    from megatron.early_exit.inference.modes import EarlyExit, FullDepth, SelfSpeculative

    from megatron.early_exit.cli import UsageError
    model, cfg, tok = load_for_inference(load, torch.device("cpu"))
    num_layers_out.append(cfg.model.num_layers)
    def engine(kind):
        try:
            return Engine(model, cfg, fast_decode=kind)
        except ValueError as e:  # the fused step does not cover this model (it names why)
            print(f"fast_decode={kind!r} unavailable ({e}); using 'static'")
            return Engine(model, cfg, fast_decode="static")

    fused = engine("fused")
    ee = fused if a.ee_fast_decode == "fused" else engine("static")

    def run(engine, mode):
        def go(prompt):
            out = engine.generate([prompt], a.new_tokens, mode=mode)[0]
            return out.tokens, out.exit_layers
        return go

    rows = {"ours fused": run(fused, FullDepth())}
    for t in a.thresholds:
        rows[f"ours early exit tau={t:g}"] = run(ee, EarlyExit(t))
    if a.classifier_thresholds and not cfg.exits.use_exit_classifier:
        raise UsageError("--classifier-thresholds", f"{load} has no exit classifiers "
                         "(tools/fit_exit_classifier.py)")
    for t in a.classifier_thresholds:
        rows[f"ours early exit clf tau={t:g}"] = run(ee, EarlyExit(t, confidence="classifier"))
    for k in [] if a.no_self_spec else cfg.exits.exit_layer_nums:
        rows[f"ours self-spec exit={k}"] = run(ee, SelfSpeculative(k, num_draft=a.draft_length))
    print(f"ours fused: fast_decode={fused.fast_decode!r}; early-exit and self-spec rows: "
          f"fast_decode={ee.fast_decode!r}")
    return rows, cfg, tok


def hf_rows(hf_dir: str, a, exits: list, num_layers: int) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def run(**extra):
        def go(prompt):
            ids = torch.tensor([prompt])
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                                     pad_token_id=0, **extra)
            return out[0, len(prompt):].tolist(), [num_layers] * (out.shape[1] - len(prompt))
        return go

    rows = {"hf generate": run()}
    for k in [] if a.no_self_spec else exits:
        rows[f"hf assistant_early_exit={k}"] = run(assistant_early_exit=k,
                                                   num_assistant_tokens=a.draft_length)
    return rows


def measure(rows: dict, prompts: list, rounds: int) -> dict:
    """name -> {tokens_per_s (best round), tokens, exit_layers} (tokens of the last round)."""
    names, best, last = list(rows), {n: 0.0 for n in rows}, {}
    for fn in rows.values():  # warm-up
        fn(prompts[0])
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start, made, toks, layers = time.perf_counter(), 0, [], []
            for p in prompts:
                t, e = rows[name](p)
                made, toks, layers = made + len(t), toks + [t], layers + list(e)
            best[name] = max(best[name], made / (time.perf_counter() - start))
            last[name] = (toks, layers)
    return {n: {"tokens_per_s": best[n], "tokens": last[n][0], "exit_layers": last[n][1]} for n in names}


def agreement(tokens: list, ref: list) -> float:
    pairs = [(x, y) for t, r in zip(tokens, ref) for x, y in zip(t, r)]
    return sum(x == y for x, y in pairs) / max(len(pairs), 1)


def report(res: dict) -> list:
    ours, hf = res["ours fused"], res["hf generate"]
    print(f"{'engine':32} {'tok/s':>8} {'vs fused':>9} {'vs hf':>7} {'layer':>6} {'=full':>6} {'=hf':>6}")
    rows = []
    for name, r in res.items():
        row = {"engine": name, "tokens_per_s": r["tokens_per_s"],
               "vs_ours_fused": r["tokens_per_s"] / ours["tokens_per_s"],
               "vs_hf_generate": r["tokens_per_s"] / hf["tokens_per_s"],
               "mean_exit_layer": sum(r["exit_layers"]) / max(len(r["exit_layers"]), 1),
               "same_tokens_as_full": agreement(r["tokens"], ours["tokens"]),
               "same_tokens_as_hf": agreement(r["tokens"], hf["tokens"])}
        rows.append(row)
        print(f"{name:32} {row['tokens_per_s']:8.1f} {row['vs_ours_fused']:9.2f} "
              f"{row['vs_hf_generate']:7.2f} {row['mean_exit_layer']:6.2f} {row['same_tokens_as_full']:6.3f} "
              f"{row['same_tokens_as_hf']:6.3f}")
    return rows


def _points(rows: list, calibration: str, classifier: bool) -> list:
    """(measured speedup, teacher-forced agreement of all exits at that tau, tau) per row."""
    with open(calibration) as f:
        calib = json.load(f)["rows"]
    points = []
    for row in rows:
        if "tau=" in row["engine"] and (" clf " in row["engine"]) == classifier:
            tau = float(row["engine"].split("tau=")[1])
            match = [c for c in calib if abs(c["threshold"] - tau) < 1e-9 and len(c["exits"]) > 1]
            if match:
                points.append((row["vs_ours_fused"], match[0]["agreement"], tau))
    return points


def plot(rows: list, calibration: str, path: str, classifier_calibration: str = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    series = [("max-prob", calibration, False)]
    if classifier_calibration:
        series.append(("classifier", classifier_calibration, True))
    for label, calib, clf in series:
        points = _points(rows, calib, clf)
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
        for x, y, tau in points:
            ax.annotate(f"{tau:g}", (x, y), fontsize=7)
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("measured speedup over our fused full depth")
    ax.set_ylabel("greedy agreement (teacher-forced)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    check_args(a)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from megatron.early_exit.checkpoint.export_hf import export_hf

    layers = []
    rows, cfg, tok = our_rows(a.load, a, layers)
    prompts = read_prompts(a.data, tok, a.prompts, a.prompt_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = a.hf_dir or export_hf(a.load, os.path.join(tmp, "hf"))
        rows.update(hf_rows(hf_dir, a, list(cfg.exits.exit_layer_nums), layers[0]))
        print(f"{len(prompts)} prompts x {a.new_tokens} new tokens, batch 1, greedy, best of "
              f"{a.rounds} rounds, torch threads {torch.get_num_threads()}")
        table = report(measure(rows, prompts, a.rounds))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": table, "new_tokens": a.new_tokens, "prompts": len(prompts)}, f, indent=1)
    if a.plot:
        plot(table, a.calibration, a.plot, a.classifier_calibration)
    return 0


if __name__ == "__main__":
    from megatron.early_exit.cli import run_cli

    sys.exit(run_cli(main))
