"""Wiring of the generation server on every rank: Scheduler, engine loop, control group, app.

    app, service = build_app(engine, tokenizer, options, chat_template)   # one process
    serve_ranks(engine, tokenizer, options, chat_template, run_http)       # any TP x PP

``serve_ranks`` is what tools/run_text_generation_server.py runs on each rank of a torchrun
job: global rank 0 builds the app and calls ``run_http(app)`` (uvicorn; it returns when the
server is told to stop), every other rank of pipeline stage 0 (``engine.drives``) follows rank
0's plans (service.follow), and the ranks of later stages run ``engine.serve()``. When rank 0's
HTTP server stops, its service broadcasts the shutdown plan; the stage-0 ranks then call
``engine.shutdown()``, which releases the later stages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Optional

from megatron.early_exit.server.app import ServerConfig, create_app
from megatron.early_exit.server.metrics import ServerMetrics
from megatron.early_exit.server.service import ControlGroup, GenerationService, follow

__all__ = ["ServeOptions", "build_app", "serve_ranks", "make_scheduler"]

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    server: ServerConfig = field(default_factory=ServerConfig)
    max_batch_size: int = 8  # KV rows: requests decoded together
    max_queue: int = 64  # waiting requests before 429
    max_cached_tokens: Optional[int] = None


def make_scheduler(engine, tokenizer, options: ServeOptions):
    from megatron.early_exit.inference.scheduler import Scheduler

    return Scheduler(engine, max_rows=options.max_batch_size,
                     max_cached_tokens=options.max_cached_tokens, max_queue=options.max_queue,
                     detokenize=tokenizer.detokenize)


def build_app(engine, tokenizer, options: ServeOptions, chat_template=None,
              control: Optional[ControlGroup] = None, scheduler=None):
    """(ASGI app, started GenerationService) over ``engine`` (this process drives it)."""
    scheduler = scheduler or make_scheduler(engine, tokenizer, options)
    service = GenerationService(scheduler, control=control, max_queue=options.max_queue,
                                max_rows=options.max_batch_size)
    metrics = ServerMetrics(engine.cfg.model.num_layers, service)
    service.on_step = metrics.on_step
    app = create_app(service, tokenizer, engine.cfg, options.server, chat_template, metrics)
    return app, service.start()


def _control_group(engine) -> Optional[ControlGroup]:
    """A gloo group of the stage-0 ranks (collective over the world); None on one rank."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    drives = [None] * dist.get_world_size()
    dist.all_gather_object(drives, bool(engine.drives))
    ranks = [r for r, d in enumerate(drives) if d]
    if 0 not in ranks:
        raise RuntimeError("global rank 0 must hold pipeline stage 0 (it serves HTTP)")
    group = dist.new_group(ranks=ranks, backend="gloo", timeout=timedelta(minutes=30))
    return ControlGroup(group, src=0) if engine.drives else ControlGroup(None, src=0)


def _shutdown(engine) -> None:
    stop = getattr(engine, "shutdown", None)
    if stop is not None:
        stop()


def serve_ranks(engine, tokenizer, options: ServeOptions, chat_template,
                run_http: Callable) -> None:
    """Run this rank's part of the server until rank 0's HTTP server stops."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    control = _control_group(engine)
    if not engine.drives:
        engine.serve()
        return
    scheduler = make_scheduler(engine, tokenizer, options)
    if rank != 0:
        follow(scheduler, control, on_shutdown=lambda: _shutdown(engine))
        return
    app, service = build_app(engine, tokenizer, options, chat_template, control, scheduler)
    try:
        run_http(app)
    finally:
        service.stop()
        _shutdown(engine)
