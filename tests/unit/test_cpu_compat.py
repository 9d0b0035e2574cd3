"""The CPU patch (parallel/cpu_compat.py) is still needed, and applied only without CUDA."""

import inspect

import torch
from megatron.core.tensor_parallel import mappings

from megatron.early_exit.parallel import cpu_compat


def test_megatron_sequence_parallel_mappings_still_call_cuda():
    # If this fails, megatron-core stopped allocating on torch.cuda.current_device() in its SP
    # mappings: delete parallel/cpu_compat.py and this test.
    for fn in (mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim):
        assert "torch.cuda.current_device()" in inspect.getsource(fn)


def test_patch_applies_only_without_cuda():
    assert cpu_compat.cpu_patch_needed() == (not torch.cuda.is_available())
    if not torch.cuda.is_available():
        assert cpu_compat.apply_cpu_patches()
        assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
