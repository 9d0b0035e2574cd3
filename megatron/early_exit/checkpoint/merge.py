"""Whole checkpoints from a truncated exit-tuning run (``--tune-exit-pipeline-parallel-size``).

A run that tunes exits on only the first K of P pipeline stages builds a model cut after those
stages' layers, so its own checkpoint lacks the later layers and holds a copy of the final head.
``merge_tuned_exits`` writes the whole model instead: every backbone tensor from the base
checkpoint the run loaded (the run froze them), every ``exits.*`` tensor from the tuning run, the
base model's config with the tuned exits, at the layout (TP, P). No optimizer or RNG state (exit
tuning restarts from its loaded weights). The backbone tensors the tuned run holds are checked
against the base ones, so a run that did not load this base is refused.

    merge_tuned_exits("ckpt/base", "ckpt/tune/.truncated", "ckpt/tune", tp=1, pp=4)
"""

from __future__ import annotations

import copy
import os
from typing import Optional

import torch

from megatron.early_exit.checkpoint import format as fmt
from megatron.early_exit.checkpoint.load import config_from_dict, open_checkpoint
from megatron.early_exit.checkpoint.reshard import stage_of, target_config, write_whole_checkpoint


def _is_exit(name: str) -> bool:
    return name.startswith("exits.")


def merge_tuned_exits(base_dir: str, tuned_dir: str, save_dir: str, tp: int, pp: int,
                      base_iteration: Optional[int] = None) -> str:
    """Commit base backbone + tuned exits to ``save_dir`` at (tp, pp); returns its directory."""
    _, base, base_reader = open_checkpoint(base_dir, base_iteration)
    tuned_src, tuned, tuned_reader = open_checkpoint(tuned_dir)
    config = copy.deepcopy(base["config"])
    config["exits"] = copy.deepcopy(tuned["config"]["exits"])
    config = target_config(config, tp, pp)
    cfg = config_from_dict(config)  # validates the exits against the whole model
    entries = {n: e for n, e in base["tensors"].items() if not _is_exit(n)}
    entries.update({n: e for n, e in tuned["tensors"].items() if _is_exit(n)})
    index = {n: dict(e, pp_rank=stage_of(n, cfg)) for n, e in entries.items()}
    tensors = {}
    for name in index:
        reader = tuned_reader if _is_exit(name) else base_reader
        tensors[name] = reader.tensor(name)
    for name in tuned["tensors"]:
        if not _is_exit(name) and name in tensors and not torch.equal(tuned_reader.tensor(name),
                                                                      tensors[name]):
            raise fmt.CheckpointError(f"{tuned_dir} was not tuned from {base_dir}: backbone "
                                      f"tensor {name} differs")
    args = dict(tuned["args"] or {})
    args.update(num_layers=base["config"]["model"]["num_layers"],
                tune_exit_pipeline_parallel_size=None)
    meta = dict(tuned, config=config, tensors=index, args=args)
    tok = [os.path.join(tuned_src, rel) for rel in tuned["tokenizer_files"]]
    return write_whole_checkpoint(save_dir, meta, tensors, tok)
