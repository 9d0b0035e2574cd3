"""Suite-wide pytest configuration.

- one intra-op thread per process unless the caller says otherwise (CI machines have 2 cores
  and the multi-process tests run several ranks at once);
- tests under tests/gpu/ or marked ``gpu`` are skipped when no CUDA device is present.

Markers (``slow``, ``gpu``) are registered in pyproject.toml. Run: ``make test``.
"""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    gpu_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu") + os.sep
    gpu_items = [
        it for it in items if it.get_closest_marker("gpu") or str(it.path).startswith(gpu_dir)
    ]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for it in gpu_items:
        it.add_marker(skip)
