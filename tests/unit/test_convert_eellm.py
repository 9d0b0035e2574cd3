"""EE-LLM import: checkpoints written here in EE-LLM's Megatron-LM layout load as ours.

The test writes the same random weights twice in EE-LLM's layout (the writer below follows
EE-LLM's documented key names and Megatron's tensor-parallel splits, independently of the
importer): sharded at TP=2, PP=2 with three untied exits that have norms and blocks
(``mp_rank_TT_PPP/model_optim_rng.pt``), and as one shard (``mp_rank_00``). Both imports must
give back exactly the written tensors and the same logits at every head; EE-LLM's exit MLP
and a missing shard are refused with a message naming them.

Run: ``OMP_NUM_THREADS=1 python -m pytest -q tests/unit/test_convert_eellm.py``.
"""

import argparse
import os

import pytest
import torch

LAYERS, HIDDEN, HEADS, GROUPS, FFN, VOCAB, EXITS = 4, 32, 4, 2, 48, 64, [1, 2, 3]
SUB = {"input_layernorm": "input_norm", "self_attention.linear_qkv": "self_attention.query_key_value",
       "self_attention.linear_proj": "self_attention.dense", "pre_mlp_layernorm": "post_attention_norm",
       "mlp.linear_fc1": "mlp.dense_h_to_4h", "mlp.linear_fc2": "mlp.dense_4h_to_h"}


def megatron_args(**over):
    a = dict(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
             group_query_attention=True, num_query_groups=GROUPS, ffn_hidden_size=FFN,
             padded_vocab_size=VOCAB, seq_length=32, max_position_embeddings=32,
             normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
             add_bias_linear=False, untie_embeddings_and_output_weights=True, norm_epsilon=1e-5,
             exit_layer_nums=EXITS, pre_exit=False, use_exit_norm=True, use_exit_mlp=False,
             use_exit_block=True, untie_exit_output_weights=True, exit_layer_weight=[0.5] * 3,
             exit_layer_temperature=[1.0] * 3, tensor_model_parallel_size=2,
             pipeline_model_parallel_size=2)
    a.update(over)
    return argparse.Namespace(**a)


def layer_tensors(prefix, gen):
    qkv = (HEADS + 2 * GROUPS) * HIDDEN // HEADS
    shapes = {"input_layernorm.weight": (HIDDEN,), "pre_mlp_layernorm.weight": (HIDDEN,),
              "self_attention.linear_qkv.weight": (qkv, HIDDEN),
              "self_attention.linear_proj.weight": (HIDDEN, HIDDEN),
              "mlp.linear_fc1.weight": (2 * FFN, HIDDEN), "mlp.linear_fc2.weight": (HIDDEN, FFN)}
    return {prefix + k: (1 + 0.1 * torch.randn(s, generator=gen)) if "norm" in k
            else 0.2 * torch.randn(s, generator=gen) for k, s in shapes.items()}


def random_weights():
    gen = torch.Generator().manual_seed(11)
    w = {"embedding.word_embeddings.weight": 0.5 * torch.randn(VOCAB, HIDDEN, generator=gen),
         "output_layer.weight": 0.5 * torch.randn(VOCAB, HIDDEN, generator=gen),
         "decoder.final_layernorm.weight": 1 + 0.1 * torch.randn(HIDDEN, generator=gen)}
    for i in range(LAYERS):
        w.update(layer_tensors(f"decoder.layers.{i}.", gen))
    for k in EXITS:
        w.update(layer_tensors(f"exits.{k}.block.", gen))
        w[f"exits.{k}.norm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=gen)
        w[f"exits.{k}.output_layer.weight"] = 0.5 * torch.randn(VOCAB, HIDDEN, generator=gen)
    return w


def tp_slice(name, t, r, tp):
    """Rank r's slice under Megatron's splits (written out, not taken from the importer)."""
    if name.endswith("mlp.linear_fc1.weight"):  # SwiGLU: each rank holds [gate_r; up_r]
        gate, up = t.chunk(2)
        return torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]])
    if any(name.endswith(s) for s in ("word_embeddings.weight", "output_layer.weight",
                                      "linear_qkv.weight")):
        return t.chunk(tp, dim=0)[r].clone()
    if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
        return t.chunk(tp, dim=1)[r].clone()
    return t.clone()


def eellm_key(name, layer0, stage_exits):
    """EE-LLM's language_model key path (list) for canonical ``name`` on a stage."""
    parts = name.split(".")
    if parts[0] == "embedding":
        return ["embedding", "word_embeddings", "weight"]
    if name == "output_layer.weight":
        return ["output_layer", "weight"]
    if name == "decoder.final_layernorm.weight":
        return ["encoder", "final_norm.weight"]
    if parts[0] == "decoder":
        sub = ".".join(parts[3:-1])
        return ["encoder", f"layers.{int(parts[2]) - layer0}.{SUB[sub]}.weight"]
    k = int(parts[1])
    if parts[2] == "output_layer":
        return ["exit_output_layer", f"{stage_exits.index(k)}.weight"]
    if parts[2] == "norm":
        return ["encoder", f"layers.{k - 1 - layer0}.exit_norm.weight"]
    sub = ".".join(parts[3:-1])
    return ["encoder", f"layers.{k - 1 - layer0}.exit_block.{SUB[sub]}.weight"]


def stage_of(name, p, pp):
    per = LAYERS // pp
    parts = name.split(".")
    if parts[0] == "embedding":
        return p == 0
    if parts[0] == "decoder" and parts[1] == "layers":
        return p * per <= int(parts[2]) < (p + 1) * per
    if parts[0] == "exits":
        return p * per < int(parts[1]) <= (p + 1) * per
    return p == pp - 1


def write_eellm(root, weights, tp, pp, args):
    it = os.path.join(root, "iter_0000005")
    per = LAYERS // pp
    for t in range(tp):
        for p in range(pp):
            exits = [k for k in EXITS if p * per < k <= (p + 1) * per]
            lm = {}
            for name, value in weights.items():
                if stage_of(name, p, pp):
                    *path, leaf = eellm_key(name, p * per, exits)
                    node = lm
                    for part in path:
                        node = node.setdefault(part, {})
                    node[leaf] = tp_slice(name, value, t, tp)
            folder = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
            os.makedirs(os.path.join(it, folder))
            torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 5,
                        "model": {"language_model": lm}},
                       os.path.join(it, folder, "model_optim_rng.pt"))
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("5")


def logits(ckpt):
    from megatron.early_exit.inference.loading import load_for_inference

    model, cfg, _ = load_for_inference(ckpt, torch.device("cpu"))
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(input_ids=ids, return_logits=True)
    return {"final": out.final_logits, **out.exit_logits}


def test_sharded_and_single_shard_imports_agree(tmp_path, single_rank_parallel):
    from megatron.early_exit.checkpoint import load_full_state
    from megatron.early_exit.checkpoint.eellm import import_eellm

    weights = random_weights()
    write_eellm(str(tmp_path / "tp2pp2"), weights, 2, 2, megatron_args())
    write_eellm(str(tmp_path / "tp1pp1"), weights, 1, 1,
                megatron_args(tensor_model_parallel_size=1, pipeline_model_parallel_size=1))
    import_eellm(str(tmp_path / "tp2pp2"), str(tmp_path / "a"))
    import_eellm(str(tmp_path / "tp1pp1"), str(tmp_path / "b"))
    cfg_a, a = load_full_state(str(tmp_path / "a"))
    _, b = load_full_state(str(tmp_path / "b"))
    assert a.keys() == b.keys() == weights.keys()
    for name, value in weights.items():
        assert torch.equal(a[name], value) and torch.equal(b[name], value), name
    assert cfg_a["exits"]["exit_layer_nums"] == EXITS and cfg_a["exits"]["use_exit_block"]
    la, lb = logits(str(tmp_path / "a")), logits(str(tmp_path / "b"))
    assert la.keys() == {"final", 1, 2, 3}
    for head in la:
        assert torch.equal(la[head], lb[head]), head


def test_refusals(tmp_path):
    from megatron.early_exit.checkpoint import CheckpointError
    from megatron.early_exit.checkpoint.eellm import import_eellm

    weights = random_weights()
    write_eellm(str(tmp_path / "mlp"), weights, 1, 1, megatron_args(use_exit_mlp=True))
    with pytest.raises(CheckpointError, match="use_exit_mlp"):
        import_eellm(str(tmp_path / "mlp"), str(tmp_path / "out"))
    write_eellm(str(tmp_path / "cut"), weights, 2, 2, megatron_args())
    os.remove(str(tmp_path / "cut" / "iter_0000005" / "mp_rank_01_001" / "model_optim_rng.pt"))
    with pytest.raises(CheckpointError, match="mp_rank_01_001"):
        import_eellm(str(tmp_path / "cut"), str(tmp_path / "out"))
