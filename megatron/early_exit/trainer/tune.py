"""Exit tuning (EE-Tuning, ``--tune-exit``): freeze the backbone, train only the exit heads.

    trainable = freeze_backbone(chunks)   # names of the parameters left trainable

A parameter is trainable when it belongs to an exit head (``exits.<layer>.*``), except the
exits' confidence classifiers (fitted afterwards by tools/fit_exit_classifier.py). Exit output
projections tied to the word embedding stay frozen with it; use ``--untie-exit-output-weights``
(or exit norm / MLP / block) to give exits something to learn.
"""

from __future__ import annotations

from typing import List

from megatron.early_exit.config import ConfigError


def freeze_backbone(chunks) -> List[str]:
    trainable = []
    for c, model in enumerate(chunks):
        for name, param in model.named_parameters():
            # exit heads train; their confidence classifiers are fitted afterwards, never here
            param.requires_grad_(name.startswith("exits.") and ".classifier." not in name)
            if param.requires_grad:
                trainable.append(f"chunk{c}.{name}")
    return trainable


def check_tunable(cfg) -> None:
    ex = cfg.exits
    if not ex.exit_layer_nums:
        raise ConfigError("--tune-exit needs --exit-layer-nums")
    if not (ex.untie_exit_output_weights or ex.use_exit_norm or ex.use_exit_mlp or ex.use_exit_block):
        raise ConfigError("--tune-exit: the exits have no trainable parameters (tied output only); "
                          "add --untie-exit-output-weights, --use-exit-norm, --use-exit-mlp or --use-exit-block")
