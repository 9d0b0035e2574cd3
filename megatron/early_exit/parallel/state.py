"""Process groups and the model chunks of this rank, set up in one place.

``initialize_parallel`` wraps megatron-core's ``parallel_state.initialize_model_parallel`` (which
works on gloo) and makes its *embedding group* the set of pipeline stages that hold the tied word
embedding or a copy of it (first stage, tied last stage, stages with tied exits), so their
gradients can be all-reduced. ``build_model`` builds this rank's chunks on ``device`` and
initialises them deterministically (model/init.py).

    torch.distributed.init_process_group("gloo")
    ctx = initialize_parallel(cfg, torch.device("cpu"))
    chunks = build_model(cfg, ctx)
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron.early_exit.config import EarlyExitGPTConfig
from megatron.early_exit.model.placement import tied_weight_stages
from megatron.early_exit.parallel.cpu_compat import apply_cpu_patches


@dataclass
class ParallelContext:
    device: torch.device
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    tp_group: object
    pp_group: object
    dp_group: object
    model_parallel_group: object
    tied_group: Optional[object]  # None when this rank holds no tied weight
    prev_rank: Optional[int]  # global rank of the previous pipeline stage
    next_rank: Optional[int]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def ensure_process_group(backend: Optional[str] = None) -> None:
    """Join the torchrun world from its environment, or make a world of one on a free port."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))


def initialize_parallel(cfg: EarlyExitGPTConfig, device: torch.device) -> ParallelContext:
    """Create TP/PP/DP groups for ``cfg`` on the already initialised default process group."""
    if device.type == "cpu":
        apply_cpu_patches()
    p = cfg.parallel
    chunks = p.virtual_chunks(cfg.model)
    stages = tied_weight_stages(cfg)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=chunks if chunks > 1 else None,
        get_embedding_ranks=lambda ranks, *_: [ranks[i] for i in stages],
        create_gloo_process_groups=False,
    )
    pp_rank, pp_size = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    return ParallelContext(
        device=device,
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=pp_rank, pp_size=pp_size,
        dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        model_parallel_group=ps.get_model_parallel_group(),
        tied_group=ps.get_embedding_group() if pp_rank in stages else None,
        prev_rank=ps.get_pipeline_model_parallel_prev_rank() if pp_size > 1 else None,
        next_rank=ps.get_pipeline_model_parallel_next_rank() if pp_size > 1 else None,
    )


def build_model(cfg: EarlyExitGPTConfig, ctx: ParallelContext) -> List[torch.nn.Module]:
    """This rank's model chunks (one, or one per virtual stage), initialised, on ctx.device."""
    from megatron.early_exit.model.gpt_model import EarlyExitGPTModel
    from megatron.early_exit.model.init import initialize_model

    chunks = cfg.parallel.virtual_chunks(cfg.model)
    models = []
    for c in range(chunks):
        if chunks > 1:
            ps.set_virtual_pipeline_model_parallel_rank(c)
        model = EarlyExitGPTModel(cfg, pp_rank=ctx.pp_rank, vp_stage=c if chunks > 1 else None)
        initialize_model(model, cfg.seed, ctx.tp_rank, ctx.tp_size)
        models.append(model.to(ctx.device))
    return models


def destroy_parallel() -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
