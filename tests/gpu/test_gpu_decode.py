"""CUDA-graph full-depth decoding (inference/static_decode.py) against the engine's general pass
on the GPU (skipped without CUDA).

    python -m pytest -q tests/gpu/test_gpu_decode.py
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _model(dtype):
    from megatron.early_exit.config import EarlyExitGPTConfig, ExitConfig, ModelConfig
    from megatron.early_exit.parallel.state import build_model, initialize_parallel

    m = ModelConfig(num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                    vocab_size=256, seq_length=128)
    cfg = EarlyExitGPTConfig(model=m, exits=ExitConfig(exit_layer_nums=[1, 2]), params_dtype=dtype,
                             seed=3)
    ctx = initialize_parallel(cfg, torch.device("cuda"))
    (model,) = build_model(cfg, ctx)
    with torch.no_grad():  # sharper logits: fewer near-ties between the top tokens
        model.embedding.word_embeddings.weight.mul_(8.0)
    return cfg, model.eval()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_decode_matches_general_pass(dtype, single_rank_parallel):
    from megatron.early_exit.inference.engine import Engine
    from megatron.early_exit.inference.modes import FullDepth
    from megatron.early_exit.inference.stopping import StopCriteria

    cfg, model = _model(dtype)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (3, 17, 9, 30)]
    ref = Engine(model, cfg).generate(prompts, 24, mode=FullDepth())
    stop = StopCriteria(stop_token_ids={ref[2].tokens[5]})
    want = Engine(model, cfg, fast_decode="static").generate(prompts, 24, stop=stop)
    graph_engine = Engine(model, cfg, fast_decode="cuda_graph")
    for _ in range(2):  # the second generation replays the graph captured by the first
        got = graph_engine.generate(prompts, 24, stop=stop)
        for a, b in zip(want, got):  # same kernels, eager vs replayed: identical
            assert (a.tokens, a.confidences) == (b.tokens, b.confidences)
    assert graph_engine._static.graph is not None
    if dtype == "float32":  # static shapes (eager, compiled) vs the general pass
        compiled = Engine(model, cfg, fast_decode="compile").generate(prompts, 24, stop=stop)
        for a, b, c in zip(ref, want, compiled):
            n = len(b.tokens)
            assert a.tokens[:n] == b.tokens == c.tokens
            assert a.confidences[:n] == pytest.approx(b.confidences, rel=1e-4)
            assert c.confidences == pytest.approx(b.confidences, rel=1e-4)


def test_cuda_graph_early_exit_matches_static_and_general(single_rank_parallel):
    """Batch-1 early exit replayed as one CUDA graph per layer segment: identical to the same
    step run eagerly, and equal to the general pass (float32) in tokens and exit layers."""
    from megatron.early_exit.inference.engine import Engine
    from megatron.early_exit.inference.modes import EarlyExit

    cfg, model = _model("float32")
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 21, 12)]
    engines = {kind: Engine(model, cfg, fast_decode=kind) for kind in (None, "static", "cuda_graph")}
    exited = 0
    # random weights are rarely confident: threshold 0 makes every token exit at the first exit,
    # so pending tokens pile up and capped passes join them (max_pending 2 and the default 16)
    for mode in (EarlyExit(threshold=0.0, max_pending=2), EarlyExit(threshold=0.0),
                 EarlyExit(threshold=0.3, max_pending=3)):
        for p in prompts:
            outs = {k: e.generate([p], 24, mode=mode)[0] for k, e in engines.items()}
            assert (outs["static"].tokens, outs["static"].confidences) == (
                outs["cuda_graph"].tokens, outs["cuda_graph"].confidences)
            assert outs[None].tokens == outs["static"].tokens
            assert outs[None].exit_layers == outs["static"].exit_layers
            assert outs[None].confidences == pytest.approx(outs["static"].confidences, rel=1e-4)
            exited += sum(layer < cfg.model.num_layers for layer in outs[None].exit_layers)
    assert exited > 0
    from megatron.early_exit.inference.modes import SelfSpeculative

    for p in prompts:  # drafting (forced exit) and verification on the same segment graphs
        outs = {k: e.generate([p], 24, mode=SelfSpeculative(exit_layer=1, num_draft=3))[0]
                for k, e in engines.items()}
        assert (outs["static"].tokens, outs["static"].confidences) == (
            outs["cuda_graph"].tokens, outs["cuda_graph"].confidences)
        assert outs[None].tokens == outs["static"].tokens
    assert all(seg.graph is not None for step in engines["cuda_graph"]._static_ee.values()
               for seg in step.segments)
