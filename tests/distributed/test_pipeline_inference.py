"""Pipeline-based decoding (PP = 2 and a real PP = 4, gloo) against the PP = 1 engine on the same
float64 weights: same tokens, exit layers and confidences for batches of prompts, greedy and
seeded sampling, max-prob and margin confidence, early exit and full depth; and the scheduler
over a pipelined engine. At PP = 4 (one layer per stage) the exits sit on stages 0 and 2 only,
so stages 1 and 3 have none. Bad requests fail on every rank at once, before any message.

Run: ``python -m pytest -q tests/distributed/test_pipeline_inference.py``.
"""

import dataclasses
import time

import pytest
import torch

from tests.distributed_harness import run_distributed

HOT = dict(temperature=0.9, top_k=16, seed=4321)


def _modes(cfg):
    from megatron.early_exit.inference.modes import EarlyExit, FullDepth

    last = cfg.exits.exit_layer_nums[-1]
    return [FullDepth(), EarlyExit(threshold=0.5), EarlyExit(threshold=0.3, confidence="margin"),
            EarlyExit(threshold=0.25, exit_layers=(last,)), EarlyExit(threshold=1.0)]


def _scheduled_requests(cfg, prompts):
    from megatron.early_exit.inference.requests import GenerationRequest
    from megatron.early_exit.inference.sampling import SamplingParams

    modes = _modes(cfg)
    return [GenerationRequest(p, 6 + i, SamplingParams(**HOT) if i % 2 else SamplingParams(0.0),
                              modes[(i + 1) % len(modes)]) for i, p in enumerate(prompts)]


def _pipelined_engine(cfg, model, world, pp):
    from megatron.core import parallel_state

    from megatron.early_exit.config import ParallelConfig
    from megatron.early_exit.inference.engine import Engine
    from megatron.early_exit.inference.loading import load_model_weights
    from megatron.early_exit.model.sharding import gathered_tensors
    from megatron.early_exit.parallel.state import build_model, destroy_parallel, initialize_parallel

    full = gathered_tensors([model], parallel_state.get_tensor_model_parallel_group(),
                            cfg.model.swiglu)
    destroy_parallel()
    cfg2 = dataclasses.replace(cfg, parallel=ParallelConfig(pipeline_model_parallel_size=pp,
                                                            world_size=world))
    ctx = initialize_parallel(cfg2, torch.device("cpu"))
    (chunk,) = build_model(cfg2, ctx)
    load_model_weights(chunk, full, ctx.tp_rank, ctx.tp_size)
    return Engine(chunk, cfg2, ctx=ctx), ctx


def _summary(outs):
    return [(o.tokens, o.exit_layers, o.finish_reason, [round(c, 9) for c in o.confidences])
            for o in outs]


def _scenario(rank, world, pp, variant):
    from megatron.early_exit.inference.engine import Engine
    from megatron.early_exit.inference.sampling import SamplingParams
    from megatron.early_exit.inference.stopping import StopCriteria
    from tests.unit.engine_testlib import random_prompts, trained

    cfg, model = trained(variant, dtype="float64")
    prompts = random_prompts(torch.Generator().manual_seed(3), 4, cfg.model.vocab_size)
    stop = StopCriteria(stop_token_ids=frozenset({5}))
    samplings = [SamplingParams(temperature=0.0), SamplingParams(**HOT)]
    cases = [(m, s) for m in _modes(cfg) for s in samplings]
    ref_engine = Engine(model, cfg)
    ref = [_summary(ref_engine.generate(prompts, 12, sampling=s, stop=stop, mode=m))
           for m, s in cases]
    solo = [_summary(ref_engine.generate([r.prompt], r.max_new_tokens, sampling=r.sampling,
                                         mode=r.mode))[0][:2]
            for r in _scheduled_requests(cfg, prompts)]
    engine, ctx = _pipelined_engine(cfg, model, world, pp)
    got = [_summary(engine.generate(prompts, 12, sampling=s, stop=stop, mode=m))
           for m, s in cases]
    return {"cases": [str(c) for c in cases], "ref": ref, "got": got, "solo": solo,
            "errors": _bad_requests(engine, cfg), "scheduled": _scheduled(engine, cfg, prompts)}


def _bad_requests(engine, cfg):
    """(message, seconds) of each bad call; every rank must raise the same message at once."""
    from megatron.early_exit.inference.modes import EarlyExit, SelfSpeculative
    from megatron.early_exit.inference.sampling import SamplingParams

    calls = [
        dict(prompts=[[]], max_new_tokens=4),
        dict(prompts=[[cfg.model.vocab_size]], max_new_tokens=4),
        dict(prompts=[[1]], max_new_tokens=0),
        dict(prompts=[[1] * 8], max_new_tokens=cfg.model.max_position_embeddings),
        dict(prompts=[[1]], max_new_tokens=4, mode=EarlyExit(threshold=0.5, exit_layers=(4,))),
        dict(prompts=[[1]], max_new_tokens=4, mode=SelfSpeculative(exit_layer=1)),
        dict(prompts=[[1]], max_new_tokens=4, sampling=[SamplingParams(), SamplingParams()]),
    ]
    out = []
    for kw in calls:
        t0 = time.monotonic()
        try:
            engine.generate(**kw)
            out.append(("no error", 0.0))
        except ValueError as e:
            out.append((str(e), time.monotonic() - t0))
    return out


def _scheduled(engine, cfg, prompts):
    """The scheduler over the pipelined engine (stage 0 drives, the others serve), two rows
    for four requests of different modes and samplings: {request index: (tokens, layers)}."""
    from megatron.early_exit.inference.scheduler import Scheduler

    if not engine.drives:
        engine.serve()
        return None
    sched = Scheduler(engine, max_rows=2)
    ids = {sched.add(r): i for i, r in enumerate(_scheduled_requests(cfg, prompts))}
    results = {i: ([], []) for i in ids.values()}
    for _ in range(100):
        if not sched.has_work:
            break
        for u in sched.step():
            results[ids[u.request_id]][0].extend(u.tokens)
            results[ids[u.request_id]][1].extend(u.exit_layers)
    engine.shutdown()
    return [results[i] for i in range(len(ids))]


def _check(results, cfg_layers=4):
    first = results[0]
    exited = 0
    for rank_result in results:  # every rank returns stage 0's outputs
        assert rank_result["got"] == first["got"]
    for case, ref, got in zip(first["cases"], first["ref"], first["got"]):
        for a, b in zip(ref, got):
            assert a[:3] == b[:3], f"{case}: {b} != {a}"
            assert max([abs(x - y) for x, y in zip(a[3], b[3])], default=0.0) < 1e-9, case
            exited += sum(layer < cfg_layers for layer in a[1])
    assert exited > 0, "no token exited early: the test does not exercise early exit"
    for rank_result in results:
        msgs = [m for m, _ in rank_result["errors"]]
        assert msgs == [m for m, _ in first["errors"]], "ranks disagree on an error"
        assert "no error" not in msgs, msgs
        assert max(s for _, s in rank_result["errors"]) < 5.0, rank_result["errors"]
    fields = " ".join(m for m, _ in first["errors"])
    for word in ("prompt 0", "max_new_tokens", "exit_layers", "self-speculative", "sampling"):
        assert word in fields, (word, fields)


@pytest.mark.parametrize("pp,variant", [(2, "gpt2-pre-exit-block"), (4, "llama-block")])
def test_pipeline_equals_single_stage(pp, variant):
    """PP = 2 (pre-exit blocks) and PP = 4 (exits on stages 0 and 2 only), batched, against
    PP = 1; plus the continuous-batching scheduler over the pipeline against solo PP = 1 runs."""
    results = run_distributed(_scenario, pp, pp, variant, timeout=240)
    _check(results)
    assert [tuple(x) for x in results[0]["scheduled"]] == [tuple(x) for x in results[0]["solo"]]
