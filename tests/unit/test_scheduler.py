"""Continuous batching: requests that join and leave a running batch (different lengths, modes,
seeds, stops) each produce exactly what they produce alone; greedy full-depth requests equal an
independent no-cache recomputation; cancellation frees the row; bad requests are refused by
field; the queue is bounded.

Run: ``python -m pytest -q tests/unit/test_scheduler.py``.
"""

import pytest
import torch

from megatron.early_exit.inference.engine import Engine
from megatron.early_exit.inference.modes import EarlyExit, FullDepth, SelfSpeculative
from megatron.early_exit.inference.requests import GenerationRequest, QueueFull, RequestError
from megatron.early_exit.inference.sampling import SamplingParams
from megatron.early_exit.inference.scheduler import Scheduler
from megatron.early_exit.inference.stopping import StopCriteria
from tests.unit.engine_testlib import random_prompts, reference_greedy, trained

GREEDY = SamplingParams(temperature=0.0)


def _requests(vocab):
    prompts = random_prompts(torch.Generator().manual_seed(11), 6, vocab, lo=2, hi=9)
    hot = SamplingParams(temperature=0.9, top_k=20, seed=1234)
    return [
        GenerationRequest(prompts[0], 10, GREEDY, FullDepth()),
        GenerationRequest(prompts[1], 7, hot, EarlyExit(threshold=0.4)),
        GenerationRequest(prompts[2], 12, GREEDY, EarlyExit(threshold=0.3, confidence="margin")),
        GenerationRequest(prompts[3], 9, SamplingParams(temperature=0.7, seed=99),
                          SelfSpeculative(exit_layer=2, num_draft=3)),
        GenerationRequest(prompts[4], 8, GREEDY, FullDepth(), stop=StopCriteria(
            stop_token_ids=frozenset({3, 7}))),
        GenerationRequest(prompts[5], 11, SamplingParams(temperature=1.0, seed=5), FullDepth()),
    ]


def _alone(engine, req):
    (out,) = engine.generate([req.prompt], req.max_new_tokens, sampling=req.sampling,
                             stop=req.stop, mode=req.mode)
    return out.tokens, out.exit_layers, out.finish_reason


def _collect(updates, results):
    for u in updates:
        r = results.setdefault(u.request_id, {"tokens": [], "layers": [], "reason": None})
        r["tokens"] += u.tokens
        r["layers"] += u.exit_layers
        if u.finished:
            r["reason"] = u.finish_reason


def test_joining_and_leaving_requests_match_their_solo_runs(single_rank_parallel):
    cfg, model = trained("llama")
    engine = Engine(model, cfg)
    reqs = _requests(cfg.model.vocab_size)
    sched = Scheduler(engine, max_rows=3, max_queue=8)
    arrivals = {0: [0, 1], 2: [2, 3], 3: [4], 6: [5]}  # step -> requests added before it
    ids, results, step = {}, {}, 0
    while step < 200 and (sched.has_work or step <= max(arrivals)):
        for i in arrivals.get(step, []):
            ids[sched.add(reqs[i])] = i
        _collect(sched.step(), results)
        assert sched.num_running <= 3
        step += 1
    assert not sched.has_work and len(results) == len(reqs)
    solo = Engine(model, cfg)
    exited = 0
    for rid, i in ids.items():
        got = results[rid]
        assert (got["tokens"], got["layers"], got["reason"]) == _alone(solo, reqs[i]), i
        exited += sum(layer < cfg.model.num_layers for layer in got["layers"])
    assert exited > 0, "no token left early: early exit was not exercised"
    ref_tokens, _ = reference_greedy(model, reqs[0].prompt, reqs[0].max_new_tokens)
    assert results[[r for r, i in ids.items() if i == 0][0]]["tokens"] == ref_tokens


def test_cancel_frees_the_row_and_leaves_others_alone(single_rank_parallel):
    cfg, model = trained("llama")
    engine = Engine(model, cfg)
    reqs = _requests(cfg.model.vocab_size)
    sched = Scheduler(engine, max_rows=2)
    keep, drop, late = sched.add(reqs[2]), sched.add(reqs[1]), sched.add(reqs[0])
    results = {}
    for _ in range(3):
        _collect(sched.step(), results)
    assert sched.num_running == 2 and sched.num_waiting == 1
    assert sched.cancel(drop) and not sched.cancel("no-such-id")
    _collect(sched.step(), results)  # the freed row takes the waiting request at once
    assert results[drop]["reason"] == "cancelled" and sched.num_waiting == 0
    for _ in range(100):
        if not sched.has_work:
            break
        _collect(sched.step(), results)
    solo = Engine(model, cfg)
    for rid, req in ((keep, reqs[2]), (late, reqs[0])):
        got = results[rid]
        assert (got["tokens"], got["layers"], got["reason"]) == _alone(solo, req)


def test_bad_requests_are_refused_by_field_and_the_queue_is_bounded(single_rank_parallel):
    cfg, model = trained("llama")
    sched = Scheduler(Engine(model, cfg), max_rows=1, max_queue=2)
    cases = [
        (GenerationRequest([], 4), "prompt"),
        (GenerationRequest([cfg.model.vocab_size], 4), "prompt"),
        (GenerationRequest([1], 0), "max_new_tokens"),
        (GenerationRequest([1] * 10, cfg.model.max_position_embeddings), "max_new_tokens"),
        (GenerationRequest([1], 4, mode=EarlyExit(threshold=0.5, exit_layers=(4,))),
         "mode.exit_layers"),
        (GenerationRequest([1], 4, mode=SelfSpeculative(exit_layer=9)), "mode.exit_layer"),
        (GenerationRequest([1], 4, stop=StopCriteria(stop_token_ids=frozenset({-1}))),
         "stop.stop_token_ids"),
    ]
    for req, field in cases:
        with pytest.raises(RequestError) as err:
            sched.add(req)
        assert err.value.field == field, (req, err.value)
    sched.add(GenerationRequest([1, 2], 4))
    sched.add(GenerationRequest([1, 2], 4))
    with pytest.raises(QueueFull):
        sched.add(GenerationRequest([1, 2], 4))
    assert sched.num_waiting == 2 and not sched.running  # nothing ran for the refused ones
