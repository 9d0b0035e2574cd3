#!/usr/bin/env python
"""Per-exit held-out loss and agreement of one or more checkpoints, side by side.

    python examples/ee_tuning/exit_report.py --data heldout.jsonl --load untuned=ckpt/ee \\
        --load tuned=ckpt/tuned [--window 128] [--max-tokens 4096] [--json out.json]

For every checkpoint (``NAME=DIR``) one teacher-forced pass over the held-out documents
(JSON lines with a "text" field, the checkpoint's own tokenizer, --window-token windows, at
most --max-tokens positions) gives, for each exit and the final head, the mean cross-entropy
of the next token (nats) and the share of positions whose argmax equals the final head's.
The rows print as one table (exit layer, then loss and agreement per checkpoint). Used by
examples/ee_tuning/smollm2.sh; tools/calibrate_threshold.py holds the threshold sweep.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.early_exit.cli import UsageError, run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", action="append", required=True, help="NAME=CHECKPOINT_DIR (repeat).")
    p.add_argument("--data", required=True, help="Held-out JSON lines, one {\"text\": ...} each.")
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--json", help="Write the numbers as JSON here.")
    return p


def exit_stats(load_dir: str, texts: list, window: int, max_tokens: int) -> dict:
    """{layer: (mean cross-entropy, agreement with the final head)}; layer num_layers = final."""
    import torch
    import torch.nn.functional as F

    from megatron.early_exit.inference.loading import load_for_inference

    model, cfg, tok = load_for_inference(load_dir, torch.device("cpu"))
    if tok is None:
        raise UsageError("--load", f"{load_dir} carries no tokenizer")
    n_tok, final = cfg.model.num_tokens, cfg.model.num_layers
    ce, agree, seen = {}, {}, 0
    for text in texts:
        ids = tok.tokenize(text)
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor(ids[start:start + window + 1])
            if len(chunk) < 2 or seen >= max_tokens:
                continue
            with torch.no_grad():
                out = model(input_ids=chunk[None, :-1], return_logits=True)  # logits [s, 1, V]
            heads = {k: v[:, 0, :n_tok] for k, v in out.exit_logits.items()}
            heads[final] = out.final_logits[:, 0, :n_tok]  # [s, V]
            ref = heads[final].argmax(-1)  # [s]
            for k, logits in heads.items():
                ce[k] = ce.get(k, 0.0) + F.cross_entropy(logits.double(), chunk[1:], reduction="sum").item()
                agree[k] = agree.get(k, 0) + int((logits.argmax(-1) == ref).sum())
            seen += len(chunk) - 1
    if not seen:
        raise UsageError("--data", "no document has two tokens or more")
    return {k: (ce[k] / seen, agree[k] / seen) for k in sorted(ce)}, seen


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    named = []
    for item in a.load:
        name, sep, path = item.partition("=")
        if not sep or not name or not os.path.isdir(path):
            raise UsageError("--load", f"{item!r} is not NAME=EXISTING_DIR")
        named.append((name, path))
    if not os.path.isfile(a.data):
        raise UsageError("--data", f"{a.data} does not exist")
    with open(a.data, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    results = {}
    for name, path in named:
        results[name], seen = exit_stats(path, texts, a.window, a.max_tokens)
    print(f"held-out positions: {seen} (windows of {a.window} tokens)")
    print(f"{'layer':>6}" + "".join(f" {name + ' loss':>14} {name + ' agree':>14}" for name, _ in named))
    for k in results[named[0][0]]:
        print(f"{k:>6}" + "".join(f" {results[n][k][0]:14.4f} {results[n][k][1]:14.4f}" for n, _ in named))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"positions": seen, "checkpoints": {n: {str(k): {"loss": v[0], "agreement": v[1]}
                                                           for k, v in r.items()} for n, r in results.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
