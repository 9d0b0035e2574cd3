#!/usr/bin/env python
"""Plot the loss curves of a training run from its ``--log-json`` file: one curve per exit and
one for the final LM head, against the iteration.

    python tools/plot_training.py runs/tiny/log.jsonl runs/tiny/loss.png
    python tools/plot_training.py log.jsonl loss.png --eval --log-scale --title "1.3B, exits 6/12"

The log has one JSON object per line (trainer/loop.py, trainer/metrics_log.py): training records
carry ``iteration``, ``lm_loss`` and ``exit_losses`` ({layer: loss}); evaluation records also
carry ``"kind": "eval"``. Training records are drawn as lines; ``--eval`` adds the evaluation
records as markers joined by dashed lines, in the same colour as the head they belong to. When an
iteration appears more than once (a resumed run appends to the same file and logs again from its
checkpoint) the last record wins. A final loss that is 0 at every point (``--tune-exit`` runs
skip the final head) is not drawn. matplotlib is needed (imported only once the log has been
read); a missing, empty or malformed log is reported in one line ``error: LOG: <file>:<line>: ...``
with exit status 2 (megatron/early_exit/cli.py; ``--debug``: the traceback).

Tests: ``python -m pytest -q tests/unit/test_plot_training.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.early_exit.cli import UsageError, run_cli  # noqa: E402

FINAL = "final"


class LogError(ValueError):
    """The log file cannot be plotted; the message names the file (and line)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("log", help="JSON-lines file written by --log-json")
    p.add_argument("out", help="PNG (or any format matplotlib infers from the suffix) to write")
    p.add_argument("--eval", action="store_true", help="also draw the evaluation records")
    p.add_argument("--log-scale", action="store_true", help="logarithmic loss axis")
    p.add_argument("--title", help="figure title (default: the log's file name)")
    p.add_argument("--dpi", type=int, default=120, help="resolution of the saved figure")
    return p.parse_args(argv)


def read_log(path: str) -> Tuple[List[dict], List[dict]]:
    """(training records, evaluation records) of a ``--log-json`` file, each sorted by iteration
    with one record per iteration (the last one logged)."""
    if not os.path.exists(path):
        raise LogError(f"{path}: no such file")
    if os.path.isdir(path):
        raise LogError(f"{path}: is a directory, expected a --log-json file")
    train: Dict[int, dict] = {}
    evals: Dict[int, dict] = {}
    seen_any = False
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            seen_any = True
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LogError(f"{path}:{lineno}: not a JSON line ({e.msg}); expected the "
                               "one-object-per-line file written by --log-json") from None
            _check_record(record, path, lineno)
            target = evals if record.get("kind") == "eval" else train
            target[int(record["iteration"])] = record
    if not seen_any:
        raise LogError(f"{path}: the file is empty (no records logged yet?)")
    return ([train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)])


def _check_record(record, path: str, lineno: int) -> None:
    where = f"{path}:{lineno}"
    if not isinstance(record, dict):
        raise LogError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("iteration", "lm_loss"):
        if key not in record:
            raise LogError(f"{where}: record has no {key!r} (is this a --log-json file?)")
    if not isinstance(record["iteration"], int) or isinstance(record["iteration"], bool):
        raise LogError(f"{where}: 'iteration' must be an integer, got {record['iteration']!r}")
    if not _is_number(record["lm_loss"]):
        raise LogError(f"{where}: 'lm_loss' must be a number, got {record['lm_loss']!r}")
    exits = record.get("exit_losses", {})
    if not isinstance(exits, dict) or not all(_is_number(v) for v in exits.values()):
        raise LogError(f"{where}: 'exit_losses' must map exit layers to numbers, got {exits!r}")
    for layer in exits:
        try:
            int(layer)
        except ValueError:
            raise LogError(f"{where}: exit layer {layer!r} is not an integer") from None


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def curves(records: List[dict]) -> Dict[str, Tuple[List[int], List[float]]]:
    """{head: (iterations, losses)}; heads are exit layers as strings (ascending) then "final".
    The final head is left out when its loss is 0 at every point (not computed)."""
    heads: Dict[str, Tuple[List[int], List[float]]] = {}
    for rec in records:
        for layer, loss in rec.get("exit_losses", {}).items():
            xs, ys = heads.setdefault(str(int(layer)), ([], []))
            xs.append(rec["iteration"])
            ys.append(float(loss))
    out = {k: heads[k] for k in sorted(heads, key=int)}
    if records and any(float(r["lm_loss"]) != 0.0 for r in records):
        out[FINAL] = ([r["iteration"] for r in records], [float(r["lm_loss"]) for r in records])
    return out


def _label(head: str) -> str:
    return "final LM head" if head == FINAL else f"exit @ layer {head}"


def plot(train: List[dict], evals: List[dict], out: str, log_scale: bool = False,
         title: Optional[str] = None, dpi: int = 120) -> List[str]:
    """Draw and save the figure; returns the heads drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_curves, eval_curves = curves(train), curves(evals)
    heads = [h for h in train_curves] + [h for h in eval_curves if h not in train_curves]
    exits = sorted((h for h in heads if h != FINAL), key=int)
    cmap = plt.get_cmap("viridis")
    colors = {h: cmap(0.85 * i / max(len(exits) - 1, 1)) for i, h in enumerate(exits)}
    colors[FINAL] = "black"
    order = exits + ([FINAL] if FINAL in heads else [])

    fig, ax = plt.subplots(figsize=(8, 5))
    for head in order:
        if head in train_curves:
            xs, ys = train_curves[head]
            ax.plot(xs, ys, color=colors[head], linewidth=2.0 if head == FINAL else 1.5,
                    marker="." if len(xs) < 30 else None, label=_label(head))
        if head in eval_curves:
            xs, ys = eval_curves[head]
            ax.plot(xs, ys, color=colors[head], linestyle="--", marker="o", markersize=5,
                    linewidth=1.0, label=f"{_label(head)} (eval)")
    if log_scale:
        from matplotlib.ticker import FormatStrFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (cross entropy, nats/token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if log_scale:
        ax.grid(True, which="minor", axis="y", alpha=0.15)
    ax.legend(loc="upper right", fontsize="small", ncol=2 if len(order) > 6 else 1)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return order


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        train, evals = read_log(a.log)
    except LogError as e:
        raise UsageError("LOG", str(e)) from e
    if not a.eval:
        evals = []
    if not train and not evals:
        hint = " (it has evaluation records only: add --eval)" if not a.eval else ""
        raise UsageError("LOG", f"{a.log}: no training records to plot{hint}")
    if a.eval and not evals:
        print(f"note: {a.log} has no evaluation records (--eval-interval / --eval-iters)",
              file=sys.stderr)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: plotting needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 1
    title = a.title if a.title is not None else os.path.basename(a.log)
    heads = plot(train, evals, a.out, log_scale=a.log_scale, title=title, dpi=a.dpi)
    last = train[-1]["iteration"] if train else evals[-1]["iteration"]
    print(f"wrote {a.out}: {len(heads)} heads ({', '.join(_label(h) for h in heads)}), "
          f"{len(train)} training and {len(evals)} evaluation points up to iteration {last}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
