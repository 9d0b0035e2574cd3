"""Suite-wide pytest configuration.

- one intra-op thread per process unless the caller says otherwise (CI machines have 2 cores
  and the multi-process tests run several ranks at once);
- tests under tests/gpu/ or marked ``gpu`` are skipped when no CUDA device is present.

The fixture ``single_rank_parallel`` gives a test a world of one gloo rank.

Markers (``slow``, ``gpu``) are registered in pyproject.toml. Run: ``make test``.
"""

import os
import socket

import pytest
import torch.distributed as dist

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def single_rank_parallel():
    """A world of one gloo rank; megatron's parallel state and the process group are torn down
    afterwards, so every test starts from a clean state."""
    created = not dist.is_initialized()
    if created:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    from megatron.early_exit.parallel.state import destroy_parallel

    destroy_parallel()
    if created and dist.is_initialized():
        dist.destroy_process_group()
