#!/usr/bin/env python
"""Rewrite an early-exit checkpoint for another tensor/pipeline-parallel layout (one process).

    python tools/checkpoint/reshard.py --load ckpt/run1 --save ckpt/run1_tp1 \\
        --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 [--load-iteration 100] \\
        [--no-optimizer]

Reads the full tensors of the checkpoint (latest iteration unless --load-iteration), writes the
per-(tp, pp) files of the target layout in the same format, with the optimizer state unless
--no-optimizer (or the source has none), and commits it atomically under --save. The result
loads with any data-parallel size; RNG states are not carried over. Bad input: one line
``error: --flag: ...`` and exit code 2 (``--debug``: the traceback).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.early_exit.checkpoint import CheckpointError, reshard_checkpoint  # noqa: E402
from megatron.early_exit.cli import UsageError, blame, run_cli  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="Checkpoint directory to read.")
    p.add_argument("--load-iteration", type=int, help="Iteration to read (default: latest).")
    p.add_argument("--save", required=True, help="Checkpoint directory to write.")
    p.add_argument("--tensor-model-parallel-size", type=int, required=True)
    p.add_argument("--pipeline-model-parallel-size", type=int, required=True)
    p.add_argument("--no-optimizer", action="store_true", help="Write the model only.")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if os.path.abspath(a.load) == os.path.abspath(a.save):
        raise UsageError("--save", "must differ from --load")
    try:
        path = reshard_checkpoint(a.load, a.save, a.tensor_model_parallel_size,
                                  a.pipeline_model_parallel_size, iteration=a.load_iteration,
                                  with_optimizer=not a.no_optimizer)
    except CheckpointError as e:  # the checkpoint read from --load (ConfigErrors name their flag)
        raise blame("--load", e) from e
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
