"""Test-only shim: lets megatron-core's optimizer stack (DDP buffers, FP32Optimizer,
DistributedOptimizer) run on CPU so CI can check trainer/megatron_optimizer.py against torch
AdamW. Never imported by the package; the real GPU run is tests/gpu/test_gpu_train.py.

megatron-core 0.16.1's optimizer wrappers allocate with ``device='cuda'`` and accept only
parameters whose ``Tensor.type()`` is ``'torch.cuda.FloatTensor'``. Inside ``cpu_optimizer_shim()``
such allocations go to the CPU and float32 CPU tensors report the CUDA type string;
``needs_shim()`` says whether the stock code still fails on CPU (tests/unit checks it, so the
shim is dropped once megatron-core runs on CPU by itself).
"""

from __future__ import annotations

import contextlib

import torch

_ALLOCATORS = ("tensor", "zeros", "ones", "empty", "full")
_CUDA_TYPES = {torch.float32: "torch.cuda.FloatTensor", torch.bfloat16: "torch.cuda.BFloat16Tensor",
               torch.float16: "torch.cuda.HalfTensor"}


def _on_cpu(fn):
    def wrapped(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)
    return wrapped


@contextlib.contextmanager
def cpu_optimizer_shim():
    """Patch torch allocators, Tensor.type and the device check of megatron_optimizer."""
    from megatron.early_exit.trainer import megatron_optimizer

    saved = {name: getattr(torch, name) for name in _ALLOCATORS}
    saved_type, saved_check = torch.Tensor.type, megatron_optimizer.check_supported

    def fake_type(self, *args, **kwargs):
        if args or kwargs:
            return saved_type(self, *args, **kwargs)
        return _CUDA_TYPES.get(self.dtype) or saved_type(self)

    try:
        for name in _ALLOCATORS:
            setattr(torch, name, _on_cpu(saved[name]))
        torch.Tensor.type = fake_type
        megatron_optimizer.check_supported = lambda *args: None
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)
        torch.Tensor.type = saved_type
        megatron_optimizer.check_supported = saved_check


def needs_shim() -> bool:
    """Whether megatron-core's FP32Optimizer still fails on a CPU-only machine."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer

    param = torch.nn.Parameter(torch.zeros(2))
    try:
        FP32Optimizer(torch.optim.AdamW([param]), OptimizerConfig(lr=1e-3), None)
    except (AssertionError, RuntimeError):
        return True
    return False
