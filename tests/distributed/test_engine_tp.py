"""Tensor parallelism: every TP rank runs the same engine on the same inputs and seed and gets
the same tokens as a single process (the initialisation does not depend on the layout, and
logits are gathered over TP before any decision). One 2-rank gloo spawn runs every mode, and
loads a checkpoint whose vocabulary (49 ids, unpadded) TP = 2 does not divide: the loader pads
it, and the padded ids never appear.

Marked slow (two spawned interpreters import megatron-core: ~20 s of CPU); run it with
``python -m pytest -q tests/distributed/test_engine_tp.py``.
"""

import pytest

from tests.distributed_harness import run_distributed

MODES = ("full", "early-exit", "speculative", "sampled")
PROMPTS = [[1, 5, 9, 2], [7], [3, 3, 8, 40, 11, 6, 2]]


def _generate(tp: int):
    from megatron.early_exit.config import ParallelConfig
    from megatron.early_exit.inference.engine import Engine
    from megatron.early_exit.inference.modes import EarlyExit, FullDepth, SelfSpeculative
    from megatron.early_exit.inference.sampling import SamplingParams
    from tests.unit.engine_testlib import build, make_cfg

    cfg = make_cfg("llama-block", seed=5)
    cfg.parallel = ParallelConfig(tensor_model_parallel_size=tp, world_size=tp)
    engine = Engine(build(cfg, sharpen=8.0), cfg)
    greedy = SamplingParams(temperature=0.0)
    runs = {
        "full": (FullDepth(), greedy),
        "early-exit": (EarlyExit(threshold=0.7, max_pending=3), greedy),
        "speculative": (SelfSpeculative(exit_layer=1, num_draft=3), greedy),
        "sampled": (SelfSpeculative(exit_layer=3, num_draft=2), SamplingParams(0.9, top_k=8, seed=3)),
    }
    out = {}
    for name in MODES:
        mode, sampling = runs[name]
        res = engine.generate(PROMPTS, 10, sampling=sampling, mode=mode)
        out[name] = [(o.tokens, o.exit_layers) for o in res]
    return out


def _odd_vocab_checkpoint(path: str):
    """A 49-id model saved at TP = 1 -> its greedy and sampled tokens on PROMPTS."""
    import torch

    from megatron.early_exit.checkpoint.save import save_checkpoint
    from megatron.early_exit.parallel.state import build_model, initialize_parallel
    from tests.unit.engine_testlib import make_cfg

    cfg = make_cfg("llama", seed=6, vocab=49)
    ctx = initialize_parallel(cfg, torch.device("cpu"))
    chunks = build_model(cfg, ctx)
    save_checkpoint(path, chunks, ctx, cfg, iteration=1, save_rng=False)
    return _odd_vocab_tokens(path, 1)


def _odd_vocab_tokens(path: str, tp: int):
    import torch

    from megatron.early_exit.inference.loading import load_engine
    from megatron.early_exit.inference.modes import EarlyExit
    from megatron.early_exit.inference.sampling import SamplingParams

    engine, _ = load_engine(path, torch.device("cpu"), tensor_model_parallel_size=tp)
    outs = [engine.generate(PROMPTS, 8, sampling=s, mode=EarlyExit(threshold=0.05))
            for s in (SamplingParams(temperature=0.0), SamplingParams(3.0, seed=1))]
    return engine.cfg.model.vocab_size, [[(o.tokens, o.exit_layers) for o in r] for r in outs]


def _tp_rank(rank, world_size, path):
    return _generate(world_size), _odd_vocab_tokens(path, world_size)


@pytest.mark.slow
def test_tp2_ranks_match_single_process(single_rank_parallel, tmp_path):
    from megatron.early_exit.parallel.state import destroy_parallel

    single = _generate(1)
    assert any(layer < 4 for name in ("early-exit",) for _, ls in single[name] for layer in ls)
    destroy_parallel()
    odd_single = _odd_vocab_checkpoint(str(tmp_path / "odd"))
    assert odd_single[0] == 49
    ranks = run_distributed(_tp_rank, 2, str(tmp_path / "odd"))
    assert ranks[0] == ranks[1]
    assert ranks[0][0] == single
    vocab, odd = ranks[0][1]
    assert vocab == 50 and odd == odd_single[1]  # padded to 50 rows at TP = 2, same tokens
    assert all(t < 49 for run in odd for tokens, _ in run for t in tokens)
