"""The one place where we adapt megatron-core to a machine without CUDA.

megatron-core 0.16.1's sequence-parallel mappings (``_gather_along_first_dim``,
``_reduce_scatter_along_first_dim`` in tensor_parallel/mappings.py) allocate their outputs with
``device=torch.cuda.current_device()``, which raises on a CPU-only build of PyTorch. When (and
only when) CUDA is unavailable, ``apply_cpu_patches`` makes ``torch.cuda.current_device`` return
``"cpu"`` so those allocations land on the CPU. It is never applied on a GPU machine.
tests/unit/test_cpu_compat.py fails when the patch stops being needed (megatron no longer calls
it) and the sequence-parallel distributed tests fail if it stops being sufficient.
"""

from __future__ import annotations

import torch

_APPLIED = False


def cpu_patch_needed() -> bool:
    return not torch.cuda.is_available()


def apply_cpu_patches() -> bool:
    """Apply the CPU patch if CUDA is absent; returns whether it is in effect."""
    global _APPLIED
    if _APPLIED or not cpu_patch_needed():
        return _APPLIED
    torch.cuda.current_device = lambda: "cpu"
    _APPLIED = True
    return True
