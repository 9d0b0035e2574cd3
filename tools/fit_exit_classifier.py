#!/usr/bin/env python
"""Fit a confidence classifier on every exit of a checkpoint (CALM-style) and save the result.

    python tools/fit_exit_classifier.py --load ckpt/tuned --data train.jsonl --save-dir ckpt/tuned_clf
    python tools/calibrate_threshold.py --load ckpt/tuned_clf --data heldout.jsonl \\
        --confidence classifier --target-agreement 0.95 --write-default

One teacher-forced pass over the documents (JSON lines with a "text" field, tokenized with the
checkpoint's tokenizer, in --window-token windows) records at every position each exit head's
hidden state (the input of its vocabulary projection) and whether the exit's argmax equals the
final head's. A logistic regression per exit (L-BFGS, float64, L2 weight --l2) is fitted on the
first positions and evaluated on the last --valid-fraction of them (accuracy at 0.5, AUC, share of
positives). The classifiers go into a copy of the checkpoint at --save-dir (its layout and
iteration; model weights only), with ``exits.use_exit_classifier`` set: decoding with confidence
``classifier`` then scores an exit for ``hidden`` multiply-adds and pays its vocabulary projection
only for tokens that leave there. Fit on training text, calibrate tau on held-out text.

Bad input: one line ``error: --flag: ...`` and exit code 2 (``--debug``: the traceback).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.early_exit.cli import UsageError, blame, run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="Checkpoint with exits (and its tokenizer).")
    p.add_argument("--load-iteration", type=int)
    p.add_argument("--data", required=True, help="JSON lines, one {\"text\": ...} each.")
    p.add_argument("--save-dir", required=True, help="New checkpoint (must not exist or be empty).")
    p.add_argument("--text-key", default="text")
    p.add_argument("--max-docs", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=20000, help="Positions to fit and validate on.")
    p.add_argument("--window", type=int, default=128, help="Tokens per teacher-forced window.")
    p.add_argument("--valid-fraction", type=float, default=0.1,
                   help="Share of the positions (the last ones) held out to evaluate the fit.")
    p.add_argument("--l2", type=float, default=1e-3, help="L2 weight on the standardised weights.")
    p.add_argument("--json", help="Write the per-exit fit report as JSON.")
    return p


def check_args(a) -> None:
    for flag, value in (("--window", a.window), ("--max-docs", a.max_docs),
                        ("--max-tokens", a.max_tokens)):
        if value < 1:
            raise UsageError(flag, f"must be >= 1, got {value}")
    if not 0.0 <= a.valid_fraction < 1.0:
        raise UsageError("--valid-fraction", f"must be in [0, 1), got {a.valid_fraction}")
    if a.l2 < 0:
        raise UsageError("--l2", f"must be >= 0, got {a.l2}")
    if not os.path.isfile(a.data):
        raise UsageError("--data", f"{a.data} does not exist")
    if os.path.exists(a.save_dir) and os.listdir(a.save_dir):
        raise UsageError("--save-dir", f"{a.save_dir} is not empty (nothing is overwritten)")


def print_report(report: dict) -> None:
    print(f"{'exit':>5} {'train':>7} {'valid':>7} {'agree%':>7} {'acc':>6} {'base':>6} {'auc':>6}")
    for k, r in report.items():
        v = r["valid"]
        base = max(v["positives"], 1 - v["positives"])  # always guessing the majority class
        print(f"{k:>5} {r['train']['positions']:7d} {v['positions']:7d} {100 * v['positives']:6.1f}% "
              f"{v['accuracy']:6.3f} {base:6.3f} "
              + ("   n/a" if v["auc"] is None else f"{v['auc']:6.3f}"))


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    check_args(a)
    from megatron.early_exit.checkpoint import CheckpointError
    from megatron.early_exit.checkpoint.exits import add_classifiers
    from megatron.early_exit.inference.classifier_fit import (collect_features, evaluate,
                                                              fit_logistic, split)
    from megatron.early_exit.inference.teacher_forced import load_exit_model, read_documents

    model, cfg, tokenizer = load_exit_model(a.load, a.load_iteration)
    docs = read_documents(a.data, a.text_key, a.max_docs)
    feats = collect_features(model, cfg, tokenizer, docs, a.window, a.max_tokens)
    fits, report = {}, {}
    for k, f in feats.items():
        train, valid = split(f, a.valid_fraction)
        fits[k] = fit_logistic(*train, l2=a.l2)
        report[k] = {"train": evaluate(fits[k], *train),
                     "valid": evaluate(fits[k], *valid) if a.valid_fraction else {}}
    print_report(report if a.valid_fraction else {k: dict(r, valid=r["train"]) for k, r in report.items()})
    try:
        out = add_classifiers(a.load, a.save_dir, fits, a.load_iteration,
                              {"data": os.path.abspath(a.data), "l2": a.l2, "window": a.window,
                               "fit": {str(k): r for k, r in report.items()}})
    except CheckpointError as e:
        raise blame("--save-dir", e) from e
    print(f"wrote {out}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({str(k): r for k, r in report.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
