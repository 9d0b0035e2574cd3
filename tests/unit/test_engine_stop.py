"""Stop token ids, stop strings and max tokens in every decoding mode (batched, rows stop at
different steps; self-speculative emits several tokens per step).

Run: ``python -m pytest -q tests/unit/test_engine_stop.py``.
"""

import pytest
import torch

from megatron.early_exit.inference.engine import Engine
from megatron.early_exit.inference.modes import EarlyExit, FullDepth, SelfSpeculative
from megatron.early_exit.inference.stopping import StopCriteria
from tests.unit.engine_testlib import random_prompts, trained

MODES = {
    "full": FullDepth(),
    "early-exit": EarlyExit(threshold=0.4, max_pending=3),
    "speculative": SelfSpeculative(exit_layer=1, num_draft=3),
}


def detok(ids):
    return "".join(chr(ord("a") + t % 26) + ("-" if t >= 26 else "") for t in ids)


@pytest.mark.parametrize("name", sorted(MODES))
def test_stop_ids_strings_and_length(name, single_rank_parallel):
    cfg, model = trained("llama-block")
    engine = Engine(model, cfg)
    mode = MODES[name]
    prompts = random_prompts(torch.Generator().manual_seed(12), 4, cfg.model.vocab_size)
    free = engine.generate(prompts, 16, mode=mode)
    assert all(o.finish_reason == "length" and len(o.tokens) == 16 for o in free)

    # stop id: the 6th token of row 0 (its first occurrence ends generation, not kept)
    stop_id = free[0].tokens[5]
    outs = engine.generate(prompts, 16, mode=mode, stop=StopCriteria(stop_token_ids={stop_id}))
    for f, o in zip(free, outs):
        cut = f.tokens.index(stop_id) if stop_id in f.tokens else None
        if cut is None:
            assert o.tokens == f.tokens and o.finish_reason == "length"
        else:
            assert o.tokens == f.tokens[:cut] and o.finish_reason == "stop"
        assert len(o.exit_layers) == len(o.confidences) == len(o.tokens)

    # stop string: the text of row 1's tokens 4..5; the completing token is kept
    text1 = detok(free[1].tokens)
    target = detok(free[1].tokens[4:6])
    outs = engine.generate(prompts, 16, mode=mode, stop=StopCriteria(stop_strings=(target,)),
                           detokenize=detok)
    for f, o in zip(free, outs):
        full_text = detok(f.tokens)
        pos = full_text.find(target)
        if pos < 0:
            assert o.tokens == f.tokens and o.finish_reason == "length"
            continue
        n = next(i for i in range(1, 17) if target in detok(f.tokens[:i]))
        assert o.tokens == f.tokens[:n] and o.finish_reason == "stop"
        assert detok(o.tokens)[: o.text_len] == full_text[:pos]
    assert outs[1].finish_reason == "stop" and text1.find(target) >= 0

    # max tokens from the criteria (the smaller limit wins), and rows dropping out early
    outs = engine.generate(prompts, 16, mode=mode, stop=StopCriteria(max_new_tokens=5))
    assert [o.tokens for o in outs] == [f.tokens[:5] for f in free]
    assert all(o.finish_reason == "length" for o in outs)


def test_stream_yields_the_kept_tokens(single_rank_parallel):
    cfg, model = trained("llama-block")
    engine = Engine(model, cfg)
    prompts = random_prompts(torch.Generator().manual_seed(13), 3, cfg.model.vocab_size)
    free = engine.generate(prompts, 10, mode=MODES["speculative"])
    got = {r: [] for r in range(3)}
    for new in engine.stream(prompts, 10, mode=MODES["speculative"]):
        for r, toks in new.items():
            got[r].extend(toks)
    assert [got[r] for r in range(3)] == [o.tokens for o in free]
