"""Capture and restore every random generator a rank uses (one file per global rank).

Covers torch's CPU generator, every CUDA device's generator (when CUDA is available), Python's
``random``, numpy's global generator and, if megatron-core's tensor-parallel RNG tracker is in
use, its named states. Only plain types and tensors are stored, so the file loads with
``torch.load(weights_only=True)``.

    state = capture_rng_state()
    restore_rng_state(state)
"""

from __future__ import annotations

import random
import sys

import numpy as np
import torch


def _tracker():
    tp = sys.modules.get("megatron.core.tensor_parallel.random")
    return None if tp is None else tp.get_cuda_rng_tracker()


def capture_rng_state() -> dict:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch_cpu": torch.get_rng_state(),
        "python": (version, list(internal), gauss),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    tracker = _tracker()
    if tracker is not None and tracker.get_states():
        state["tracker"] = {k: v.clone() for k, v in tracker.get_states().items()}
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch_cpu"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            torch.cuda.set_rng_state(cuda[torch.cuda.current_device() % len(cuda)])
    tracker = _tracker()
    if "tracker" in state and tracker is not None:
        tracker.set_states(state["tracker"])
