"""Fixtures for single-process tests that need torch.distributed and megatron parallel state."""

import os
import socket

import pytest
import torch.distributed as dist


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
