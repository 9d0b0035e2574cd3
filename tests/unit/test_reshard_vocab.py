"""Resharding to a layout that pads the vocabulary differently (checkpoint/reshard.py).

A float64 model with 257 token ids padded to 384 rows (TP=1, --make-vocab-size-divisible-by
128), untied final and exit output layers, is written as a checkpoint with AdamW state. Resharded
to TP=2 x PP=2 it must hold 512 rows: the real rows and their optimizer state unchanged, the new
rows zero; cut back to 257 rows it is the unpadded model. Both must compute the same losses as
the original model on the same batch (padded rows never enter a softmax), and cutting a real row
is refused. An old checkpoint without ``tokenizer_vocab_size`` keeps its size.
"""

import copy
import dataclasses

import pytest
import torch

TOKENS = 257


def _cfg(vocab):
    from megatron.early_exit.config import EarlyExitGPTConfig, ExitConfig, ModelConfig

    model = ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32,
                        seq_length=6, vocab_size=vocab, tokenizer_vocab_size=TOKENS)
    exits = ExitConfig(exit_layer_nums=[1], untie_exit_output_weights=True)
    return EarlyExitGPTConfig(model=model, exits=exits, params_dtype="float64", seed=2)


def _model(cfg, tensors=None):
    from megatron.early_exit.model.sharding import canonical_names
    from megatron.early_exit.parallel.state import build_model, initialize_parallel

    ctx = initialize_parallel(cfg, torch.device("cpu"))
    (model,) = build_model(cfg, ctx)
    if tensors is not None:
        names = canonical_names(model)
        with torch.no_grad():
            for local, p in model.named_parameters():
                p.copy_(tensors[names[local]])
    return model


def _losses(model):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TOKENS, (2, 7), generator=gen)
    ids[0, 1:4] = TOKENS - 1
    out = model(input_ids=ids[:, :-1], labels=ids[:, 1:])
    return torch.stack([out.final_loss, *out.exit_losses.values()])


def _write_source(path, model, cfg):
    from megatron.early_exit.checkpoint.reshard import write_whole_checkpoint
    from megatron.early_exit.model.sharding import canonical_names, shard_spec

    names = canonical_names(model)
    tensors, index, optim = {}, {}, {}
    for local, p in model.named_parameters():
        spec, name = shard_spec(local, p, cfg.model.swiglu), names[local]
        tensors[name] = p.detach().clone()
        index[name] = {"dim": spec.dim, "chunks": spec.chunks, "pp_rank": 0, "dtype": str(p.dtype),
                       "shape": list(p.shape)}
        optim[name] = {"step": torch.tensor(3.0), "exp_avg": torch.randn_like(p) + 1,
                       "exp_avg_sq": torch.rand_like(p) + 1}
    meta = {"iteration": 3, "config": dataclasses.asdict(cfg), "tensors": index, "train_config": None,
            "args": {"make_vocab_size_divisible_by": 128}, "extra": {}}
    write_whole_checkpoint(str(path), meta, tensors, [], optim, [{"lr": 0.1}])
    return tensors, optim


def test_reshard_pads_and_cuts_only_padded_rows(tmp_path, single_rank_parallel):
    from megatron.early_exit.checkpoint import CheckpointError
    from megatron.early_exit.checkpoint.load import (config_from_dict, load_full_optimizer_state,
                                                     load_full_state)
    from megatron.early_exit.checkpoint.reshard import reshard_checkpoint, target_vocab_size
    from megatron.early_exit.parallel.state import destroy_parallel

    cfg = _cfg(384)
    model = _model(cfg)
    expected = _losses(model).detach()
    src, optim = _write_source(tmp_path / "tp1", model, cfg)
    destroy_parallel()

    reshard_checkpoint(str(tmp_path / "tp1"), str(tmp_path / "tp2pp2"), tp=2, pp=2)
    config, full = load_full_state(str(tmp_path / "tp2pp2"))
    assert config["model"]["vocab_size"] == 512
    state = load_full_optimizer_state(str(tmp_path / "tp2pp2"))
    for name in ("embedding.word_embeddings.weight", "output_layer.weight", "exits.1.output_layer.weight"):
        assert full[name].shape[0] == 512 and torch.equal(full[name][:384], src[name])
        assert torch.count_nonzero(full[name][384:]) == 0
        assert torch.equal(state[name]["exp_avg"][:384], optim[name]["exp_avg"])
        assert torch.count_nonzero(state[name]["exp_avg_sq"][384:]) == 0
    assert torch.equal(full["decoder.layers.0.mlp.linear_fc1.weight"],
                       src["decoder.layers.0.mlp.linear_fc1.weight"])

    reshard_checkpoint(str(tmp_path / "tp2pp2"), str(tmp_path / "cut"), tp=1, pp=1, vocab_size=TOKENS)
    config_cut, cut = load_full_state(str(tmp_path / "cut"))
    for source in ((config, full), (config_cut, cut)):
        cfg2 = dataclasses.replace(config_from_dict(source[0]), parallel=cfg.parallel)
        torch.testing.assert_close(_losses(_model(cfg2, source[1])).detach(), expected, rtol=1e-12, atol=0)
        destroy_parallel()
    with pytest.raises(CheckpointError, match="cut real token rows"):
        reshard_checkpoint(str(tmp_path / "tp1"), str(tmp_path / "bad"), tp=1, pp=1, vocab_size=200)

    old = {"config": copy.deepcopy(config), "args": {}}
    del old["config"]["model"]["tokenizer_vocab_size"]
    assert config_from_dict(old["config"]).model.tokenizer_vocab_size is None  # old checkpoints load
    assert target_vocab_size(old, 4) == 512 and target_vocab_size({"config": config, "args": {}}, 4) == 512
    assert target_vocab_size({"config": config, "args": {}}, 3) == 258
