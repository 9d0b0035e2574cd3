#!/usr/bin/env python
"""Calibrate the early-exit threshold tau of a checkpoint on held-out text.

    python tools/calibrate_threshold.py --load ckpt/smollm2_ee --data heldout.jsonl \\
        --target-agreement 0.95 [--exit-sets each] [--plot calib.png] [--write-default]
    python tools/calibrate_threshold.py --load ckpt --data heldout.jsonl --max-loss-increase 0.05

One teacher-forced pass over the held-out documents (JSON lines with a "text" field, tokenized
with the checkpoint's tokenizer, cut into --window-token windows) records, at every position,
each exit's confidence (max softmax, or top-1 minus top-2 with --confidence margin), argmax
and cross-entropy of the next token, and the final head's. Early-exit decoding keeps the KV
cache exact (pending tokens are recomputed), so for a given prefix the hidden states it sees
are the teacher-forced ones: a token leaves at the first allowed exit whose confidence is
>= tau (tau = 1.0 never exits), exactly as the engine decides. For every tau (--thresholds)
and every set of exits allowed to fire (--exit-sets all | each | every) the tool reports

    agreement    share of positions whose token equals the full model's (greedy)
    loss         held-out cross-entropy of the tokens it would emit (and the increase over full)
    mean layer   average exit layer (num_layers for the final head)
    speedup      full-depth cost / early-exit cost in multiply-adds per token, counting every
                 layer run and every exit head evaluated (an exit head's vocabulary projection
                 costs hidden x vocab; a token passing an exit without leaving pays it too)
    tok/s        measured decoding speed with the engine, batch 1, best of three runs
                 (--measure-speed N new tokens per prompt), and its ratio to full depth

and picks the fastest (by the cost model) row meeting --target-agreement or
--max-loss-increase (nats per token); tau = 1.0 always qualifies. --plot saves agreement
against speedup; --write-default records the chosen tau and exits in the checkpoint as the
serving default (checkpoint/serving.py); --json saves the rows. Bad input: one line
``error: --flag: ...`` and exit code 2 (``--debug``: the traceback).
"""

import argparse
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.early_exit.cli import UsageError, run_cli  # noqa: E402

THRESHOLDS = (1.0, 0.99, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4, 0.3)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="Checkpoint with exits (and its tokenizer).")
    p.add_argument("--load-iteration", type=int)
    p.add_argument("--data", required=True, help="Held-out JSON lines, one {\"text\": ...} each.")
    p.add_argument("--text-key", default="text")
    p.add_argument("--max-docs", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=50000, help="Stop after this many positions.")
    p.add_argument("--window", type=int, default=256, help="Tokens per teacher-forced window.")
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-agreement", type=float, help="Least share of tokens equal to "
                      "the full model's (greedy), in (0, 1].")
    goal.add_argument("--max-loss-increase", type=float, help="Most held-out loss increase over "
                      "the full model, nats per token (>= 0).")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    p.add_argument("--exit-sets", choices=("all", "each", "every"), default="all",
                   help="Which exits may fire: all of them; also each one alone; every subset.")
    p.add_argument("--confidence", choices=("max_prob", "margin", "classifier"), default="max_prob",
                   help="classifier: the exits' fitted classifiers (tools/fit_exit_classifier.py).")
    p.add_argument("--measure-speed", type=int, default=0, metavar="N",
                   help="Also decode N new tokens per row with the engine and report tokens/s.")
    p.add_argument("--speed-prompts", type=int, default=2, help="Prompts for --measure-speed.")
    p.add_argument("--plot", help="PNG of agreement against speedup.")
    p.add_argument("--json", help="Write the rows and the choice as JSON.")
    p.add_argument("--write-default", action="store_true",
                   help="Record the chosen tau (and exits) in the checkpoint for serving.")
    return p


def check_args(a) -> None:
    if a.target_agreement is not None and not 0.0 < a.target_agreement <= 1.0:
        raise UsageError("--target-agreement", f"must be in (0, 1], got {a.target_agreement}")
    if a.max_loss_increase is not None and a.max_loss_increase < 0:
        raise UsageError("--max-loss-increase", f"must be >= 0, got {a.max_loss_increase}")
    bad = [t for t in a.thresholds if not 0.0 <= t <= 1.0]
    if bad:
        raise UsageError("--thresholds", f"must lie in [0, 1], got {bad}")
    for flag, value in (("--window", a.window), ("--max-docs", a.max_docs),
                        ("--max-tokens", a.max_tokens)):
        if value < 1:
            raise UsageError(flag, f"must be >= 1, got {value}")
    if not os.path.isfile(a.data):
        raise UsageError("--data", f"{a.data} does not exist")


# ------------------------------------------------------------------------------ statistics
def _head_stats(logits, targets, kind: str):
    """logits [s, V] (float32), targets [s] -> (confidence, argmax, cross-entropy), each [s]."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    probs = logp.exp()
    if kind == "margin":
        top = probs.topk(2, dim=-1).values
        conf = top[:, 0] - top[:, 1]
    else:
        conf = probs.amax(dim=-1)
    return conf, logp.argmax(dim=-1), -logp.gather(1, targets[:, None])[:, 0]


def collect(model, cfg, tokenizer, docs, window: int, max_tokens: int, kind: str) -> dict:
    """Per-position statistics of every exit ([E, N]) and of the final head ([N]). Kind
    ``classifier``: an exit's confidence is its classifier's score of the head state."""
    import torch

    from megatron.early_exit.inference.teacher_forced import forward_windows

    layers, n_tok = list(cfg.exits.exit_layer_nums), cfg.model.num_tokens
    conf, pred, ce = ([[] for _ in layers] for _ in range(3))
    final_pred, final_ce = [], []
    scored = kind == "classifier"
    for out, y in forward_windows(model, tokenizer, docs, window, max_tokens, exit_states=scored):
        _, fp, fc = _head_stats(out.final_logits[:, 0, :n_tok], y, kind)
        final_pred.append(fp)
        final_ce.append(fc)
        for i, k in enumerate(layers):
            c, p, e = _head_stats(out.exit_logits[k][:, 0, :n_tok], y, kind)
            if scored:
                with torch.no_grad():
                    c = model.exits[str(k)].score(out.exit_states[k][:, 0])  # [s]
            conf[i].append(c)
            pred[i].append(p)
            ce[i].append(e)
    stack = lambda rows: torch.stack([torch.cat(r) for r in rows])  # noqa: E731
    return {"layers": layers, "conf": stack(conf), "pred": stack(pred), "ce": stack(ce),
            "final_pred": torch.cat(final_pred), "final_ce": torch.cat(final_ce)}


def costs(cfg, kind: str = "max_prob") -> dict:
    """Multiply-adds per token of one backbone layer, of an exit a token passes without leaving
    (``exit_test``) and of the exit it leaves at (``exit_head``), and of the final head. With
    max-prob or margin confidence the test is the whole head; a classifier tests the head's
    transformed state (its norm, MLP or block) for ``hidden`` more, and only the leaving exit
    pays the vocabulary projection."""
    m, ex = cfg.model, cfg.exits
    h, hn = m.hidden_size, m.head_dim
    attn = h * (m.num_attention_heads + 2 * m.num_query_groups) * hn + m.num_attention_heads * hn * h
    mlp = (3 if m.swiglu else 2) * h * m.ffn_hidden_size
    layer = attn + mlp
    head = m.num_tokens * h
    transform = (mlp if ex.use_exit_mlp else 0) + (layer if ex.use_exit_block else 0)
    test = transform + (h if kind == "classifier" else head)
    return {"layer": layer, "exit_test": test, "exit_head": transform + head, "projection": head,
            "final_head": head, "classifier": kind == "classifier"}


def decide(stats: dict, tau: float, allowed: list):
    """Index into stats['layers'] of the exit each position leaves at (-1: the final head)."""
    import torch

    n = stats["final_pred"].shape[0]
    choice = torch.full((n,), -1, dtype=torch.long)
    if tau >= 1.0:
        return choice
    for i, k in enumerate(stats["layers"]):
        if k in allowed:
            take = (choice < 0) & (stats["conf"][i] >= tau)
            choice[take] = i
    return choice


def evaluate(stats: dict, cfg, tau: float, allowed: list, kind: str = "max_prob") -> dict:
    """One row of the table: agreement, loss, mean exit layer, cost-model speedup."""
    import torch

    choice = decide(stats, tau, allowed)
    exited = choice >= 0
    idx = choice.clamp(min=0)
    cols = torch.arange(choice.shape[0])
    tokens = torch.where(exited, stats["pred"][idx, cols], stats["final_pred"])
    loss = torch.where(exited, stats["ce"][idx, cols], stats["final_ce"])
    L, c = cfg.model.num_layers, costs(cfg, kind)
    lag = 1 if cfg.exits.pre_exit else 0  # a pre-exit at layer k reads layer k's input
    depths = torch.tensor([k - lag for k in stats["layers"]])
    layer_of = torch.where(exited, torch.tensor(stats["layers"])[idx], torch.tensor(L))
    depth = torch.where(exited, depths[idx], torch.tensor(L)).double()  # layers run
    tests = torch.zeros_like(depth)  # exits tested: every allowed one on the way
    if tau < 1.0:
        for i, k in enumerate(stats["layers"]):
            if k in allowed:
                tests += (depths[i] <= depth).double()
    leave = exited.double()  # the leaving exit's projection (tested already without a classifier)
    extra = leave * c["projection"] if c["classifier"] else 0.0
    cost = depth * c["layer"] + tests * c["exit_test"] + extra + (~exited).double() * c["final_head"]
    full = L * c["layer"] + c["final_head"]
    agree = (tokens == stats["final_pred"]).double().mean()
    return {"threshold": tau, "exits": sorted(allowed), "agreement": float(agree),
            "loss": float(loss.double().mean()),
            "full_loss": float(stats["final_ce"].double().mean()),
            "exit_fraction": float(exited.double().mean()),
            "mean_layer": float(layer_of.double().mean()), "speedup": float(full / cost.mean())}


def exit_sets(layers: list, how: str) -> list:
    if how == "all":
        return [list(layers)]
    if how == "each":
        return [list(layers)] + ([[k] for k in layers] if len(layers) > 1 else [])
    if len(layers) > 8:
        raise UsageError("--exit-sets", f"every: {len(layers)} exits give too many subsets")
    return [list(s) for r in range(len(layers), 0, -1) for s in itertools.combinations(layers, r)]


def choose(rows: list, target_agreement=None, max_loss_increase=None) -> dict:
    """The fastest row (cost model) meeting the goal; ties go to the higher threshold."""
    def ok(r):
        if target_agreement is not None:
            return r["agreement"] >= target_agreement
        return r["loss"] - r["full_loss"] <= max_loss_increase

    good = [r for r in rows if ok(r)]
    return max(good, key=lambda r: (round(r["speedup"], 9), r["threshold"]))


# ------------------------------------------------------------------------------ speed, output
def measure_speed(model, cfg, prompts: list, new_tokens: int, rows: list,
                  kind: str = "max_prob") -> None:
    """Add measured tokens/s (and the ratio to full depth) to every row, in place."""
    from megatron.early_exit.inference.engine import Engine
    from megatron.early_exit.inference.modes import EarlyExit, FullDepth

    engine = Engine(model, cfg)

    def rate(mode, repeats: int = 3):  # best of ``repeats`` runs, after a warm-up
        engine.generate(prompts[:1], new_tokens, mode=mode)
        best = 0.0
        for _ in range(repeats):
            start, made = time.perf_counter(), 0
            for prompt in prompts:
                made += len(engine.generate([prompt], new_tokens, mode=mode)[0].tokens)
            best = max(best, made / (time.perf_counter() - start))
        return best

    full = rate(FullDepth())
    for r in rows:
        mode = FullDepth() if r["threshold"] >= 1.0 else EarlyExit(r["threshold"], tuple(r["exits"]),
                                                                           confidence=kind)
        r["tokens_per_s"] = rate(mode)
        r["measured_speedup"] = r["tokens_per_s"] / full


def print_table(rows: list, chosen: dict) -> None:
    speed = "tokens_per_s" in rows[0]
    print(f"{'tau':>5} {'exits':>14} {'agree':>7} {'loss':>7} {'+loss':>7} {'exit%':>6} "
          f"{'layer':>6} {'speedup':>7}" + ("   tok/s  ratio" if speed else ""))
    for r in rows:
        mark = " <-" if r is chosen else ""
        extra = f" {r['tokens_per_s']:7.1f} {r['measured_speedup']:6.2f}" if speed else ""
        print(f"{r['threshold']:5.2f} {','.join(map(str, r['exits'])):>14} {r['agreement']:7.4f} "
              f"{r['loss']:7.4f} {r['loss'] - r['full_loss']:+7.4f} {100 * r['exit_fraction']:5.1f}% "
              f"{r['mean_layer']:6.2f} {r['speedup']:7.3f}{extra}{mark}")


def plot(rows: list, chosen: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for exits in sorted({tuple(r["exits"]) for r in rows}):
        sel = [r for r in rows if tuple(r["exits"]) == exits]
        ax.plot([r["speedup"] for r in sel], [r["agreement"] for r in sel], "o-",
                label="exits " + ",".join(map(str, exits)))
        for r in sel:
            ax.annotate(f"{r['threshold']:g}", (r["speedup"], r["agreement"]), fontsize=7)
    ax.plot([chosen["speedup"]], [chosen["agreement"]], "r*", markersize=14, label="chosen")
    ax.set_xlabel("speedup (multiply-adds per token, full / early exit)")
    ax.set_ylabel("greedy agreement with the full model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    check_args(a)
    from megatron.early_exit.inference.teacher_forced import load_exit_model, read_documents

    model, cfg, tokenizer = load_exit_model(a.load, a.load_iteration)
    if a.confidence == "classifier" and not cfg.exits.use_exit_classifier:
        raise UsageError("--confidence", "classifier: the checkpoint's exits have no classifiers "
                         "(tools/fit_exit_classifier.py fits them)")
    docs = read_documents(a.data, a.text_key, a.max_docs)
    stats = collect(model, cfg, tokenizer, docs, a.window, a.max_tokens, a.confidence)
    rows = [evaluate(stats, cfg, t, s, a.confidence) for s in exit_sets(stats["layers"], a.exit_sets)
            for t in sorted(set(a.thresholds), reverse=True)]
    if a.measure_speed:
        prompts = [tokenizer.tokenize(d)[:32] for d in docs[:a.speed_prompts]]
        measure_speed(model, cfg, [p for p in prompts if p], a.measure_speed, rows, a.confidence)
    chosen = choose(rows, a.target_agreement, a.max_loss_increase)
    print(f"{stats['final_pred'].shape[0]} held-out positions from {len(docs)} documents")
    print_table(rows, chosen)
    print(f"chosen: tau={chosen['threshold']:g} exits={chosen['exits']} agreement="
          f"{chosen['agreement']:.4f} speedup={chosen['speedup']:.3f}")
    if a.plot:
        plot(rows, chosen, a.plot)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "chosen": chosen, "positions": int(stats["final_pred"].shape[0])},
                      f, indent=1)
    if a.write_default:
        from megatron.early_exit.checkpoint.serving import set_serving_defaults

        goal = {"target_agreement": a.target_agreement, "max_loss_increase": a.max_loss_increase}
        set_serving_defaults(a.load, chosen["threshold"], chosen["exits"],
                             dict(goal, **{k: chosen[k] for k in ("agreement", "loss", "speedup")}),
                             a.load_iteration, confidence=a.confidence)
        print(f"wrote the serving default tau={chosen['threshold']:g} into {a.load}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
