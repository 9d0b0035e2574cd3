#!/usr/bin/env python
"""Add exit heads to a checkpoint of ours (any TP/PP layout; the result keeps it).

    python tools/checkpoint/add_exits.py --load-dir ckpt/smollm2 --save-dir ckpt/smollm2_ee \\
        --exit-layer-nums 8 15 22 --use-exit-norm [--use-exit-mlp] [--use-exit-block] \\
        [--random-init] [--pre-exit] [--untie-exit-output-weights | --tie-exit-output-weights]

By default a new exit copies the final norm and output layer (the last layer for a block head;
an exit MLP starts as a zero residual branch), so before tuning it computes exactly the final
head on that layer's hidden state; ``--random-init`` draws the new tensors as our init does
(``--seed``). An exit at a layer that already has one is refused, and new exits must have the
same head structure as the checkpoint's existing ones. Bad input: one line
``error: --flag: ...`` and exit code 2 (``--debug``: the traceback).
See megatron/early_exit/checkpoint/exits.py.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.early_exit.checkpoint import CheckpointError  # noqa: E402
from megatron.early_exit.cli import UsageError, blame, run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load-dir", required=True, help="Checkpoint of ours to read.")
    p.add_argument("--load-iteration", type=int, help="Iteration to read (default: latest).")
    p.add_argument("--save-dir", required=True, help="Directory to write.")
    p.add_argument("--exit-layer-nums", type=int, nargs="+", required=True,
                   help="1-based layers that get a new exit.")
    p.add_argument("--pre-exit", action="store_true", help="Exits read the layer's input.")
    p.add_argument("--use-exit-norm", action="store_true")
    p.add_argument("--use-exit-mlp", action="store_true")
    p.add_argument("--use-exit-block", action="store_true")
    tie = p.add_mutually_exclusive_group()
    tie.add_argument("--untie-exit-output-weights", dest="untie", action="store_true", default=None,
                     help="Each exit has its own output layer (default when the model's head "
                          "is untied).")
    tie.add_argument("--tie-exit-output-weights", dest="untie", action="store_false",
                     help="Exits use the word embedding as output layer.")
    p.add_argument("--random-init", action="store_true", help="Random new heads, not copies.")
    p.add_argument("--seed", type=int, default=1234, help="Seed of --random-init.")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    from megatron.early_exit.checkpoint.exits import add_exits

    if os.path.abspath(a.load_dir) == os.path.abspath(a.save_dir):
        raise UsageError("--save-dir", "must differ from --load-dir")
    if os.path.isdir(a.save_dir) and os.listdir(a.save_dir):
        raise UsageError("--save-dir", f"{a.save_dir} is not empty: choose a new directory "
                         "(nothing is overwritten)")
    try:
        path = add_exits(a.load_dir, a.save_dir, a.exit_layer_nums, a.use_exit_norm,
                         a.use_exit_mlp, a.use_exit_block, a.pre_exit, a.untie, a.random_init,
                         a.seed, a.load_iteration)
    except CheckpointError as e:
        if "--" in str(e):  # names its flag (--exit-layer-nums, --use-exit-mlp, ...)
            raise
        raise blame("--load-dir", e) from e
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
