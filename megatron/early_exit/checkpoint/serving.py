"""Serving defaults stored in a checkpoint: the calibrated early-exit threshold and exits.

    set_serving_defaults("ckpt/smollm2_ee", early_exit_thres=0.85, exit_layers=[15, 22],
                         calibration={"target_agreement": 0.95, "agreement": 0.953},
                         confidence="classifier")
    serving_defaults("ckpt/smollm2_ee")   # {"early_exit_thres": 0.85, "exit_layers": [15, 22],
                                          #  "confidence": "classifier", ...}

tools/calibrate_threshold.py --write-default writes them. They live in the latest iteration's
``metadata.json`` under ``extra.serving_defaults``; the metadata is re-sealed (its sha256) and
replaced atomically (temp file + rename), so a reader sees the old or the new file, never a
torn one. A tool that serves the checkpoint reads them when its own flag
(``--early-exit-thres``) is not given.
"""

from __future__ import annotations

import os
import tempfile
from typing import List, Optional

from megatron.early_exit.checkpoint import format as fmt
from megatron.early_exit.checkpoint.load import open_checkpoint

KEY = "serving_defaults"
CONFIDENCE_KINDS = ("max_prob", "margin", "classifier")  # inference/exit_points.py's kinds


def serving_defaults(load_dir: str, iteration: Optional[int] = None) -> Optional[dict]:
    """The serving defaults saved with the checkpoint, or None."""
    _, meta, _ = open_checkpoint(load_dir, iteration)
    return (meta.get("extra") or {}).get(KEY)


def set_serving_defaults(load_dir: str, early_exit_thres: float,
                         exit_layers: Optional[List[int]] = None,
                         calibration: Optional[dict] = None,
                         iteration: Optional[int] = None, confidence: str = "max_prob") -> str:
    """Record the default threshold (and allowed exits, and the confidence kind tau is a
    threshold of) in the checkpoint; returns the metadata path. Exits must be exits of the
    model; the threshold in [0, 1]; kind ``classifier`` needs exit classifiers."""
    if not 0.0 <= float(early_exit_thres) <= 1.0:
        raise fmt.CheckpointError(f"--early-exit-thres must be in [0, 1], got {early_exit_thres}")
    if confidence not in CONFIDENCE_KINDS:
        raise fmt.CheckpointError(f"--confidence must be one of {CONFIDENCE_KINDS}, got {confidence!r}")
    dir_path, meta, _ = open_checkpoint(load_dir, iteration)
    known = list(meta["config"].get("exits", {}).get("exit_layer_nums") or [])
    bad = [k for k in exit_layers or [] if k not in known]
    if bad:
        raise fmt.CheckpointError(f"--exit-layers {bad} are not exits of this model ({known})")
    if confidence == "classifier" and not meta["config"].get("exits", {}).get("use_exit_classifier"):
        raise fmt.CheckpointError("--confidence classifier: the checkpoint's exits have no classifiers")
    meta = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    extra = dict(meta.get("extra") or {})
    extra[KEY] = {"early_exit_thres": float(early_exit_thres),
                  "exit_layers": sorted(exit_layers) if exit_layers else None,
                  "confidence": confidence,
                  "calibration": calibration or {}}
    meta["extra"] = extra
    with tempfile.TemporaryDirectory(dir=dir_path) as tmp:
        fmt.write_metadata(tmp, meta)
        os.replace(os.path.join(tmp, fmt.METADATA), os.path.join(dir_path, fmt.METADATA))
    fmt.fsync_dir(dir_path)
    return os.path.join(dir_path, fmt.METADATA)
