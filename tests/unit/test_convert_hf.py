"""HF <-> ours conversion, checked against transformers' own models on the same weights.

- import of tiny random Llama (GQA, untied), Qwen2 (QKV bias, tied) and Mistral models: our
  logits equal transformers' within 1e-5 (float32); sharded safetensors and pytorch_model.bin
  read the same; a vocabulary padded for TP keeps transformers' logits;
- export (sharded, with its index): transformers loads the directory as LlamaForCausalLM /
  Qwen2ForCausalLM and computes the original model's logits; ours -> HF -> ours is bit-identical, exits included;
- add-exits with copied heads at threshold 0: every token after the first exits at the new exit
  and equals argmax(lm_head(norm(h_k))) of transformers' hidden state h_k (output_hidden_states);
- the tokenizer (tokenizer.json + tokenizer_config.json with its chat template) is carried;
- unsupported HF config keys are refused naming the key; the name-based TP split and shapes of
  converted tensors equal those of a built model.

TP=2 / PP=2 imports: tests/distributed/test_convert_hf_parallel.py.
Run: ``OMP_NUM_THREADS=1 python -m pytest -q tests/unit/test_convert_hf.py``.
"""

import json
import os

import pytest
import torch

VOCAB = 96


def tiny_hf(kind: str, tied: bool, seed: int = 0, **overrides):
    """A random tiny transformers model (GQA: 6 heads, 2 KV heads) in eval mode; ``overrides``
    change config fields (e.g. vocab_size)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
                  num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5,
                  tie_word_embeddings=tied, max_position_embeddings=64)
    common.update(overrides)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_theta=5000.0, **common))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(
            rope_theta=7000.0, sliding_window=None, **common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(rope_theta=20000.0, **common))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def write_tokenizer(directory: str) -> None:
    """A word-level tokenizer.json and a tokenizer_config.json carrying a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 2)}
    vocab.update({"<unk>": VOCAB - 2, "<|endoftext|>": VOCAB - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}",
                   "eos_token": "<|endoftext|>"}, f)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{name: (hf model, its save_pretrained directory)} for the two architectures."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, kind, tied in (("llama", "llama", False), ("qwen2", "qwen2", True)):
        model = tiny_hf(kind, tied)
        path = str(root / name)
        model.save_pretrained(path)
        write_tokenizer(path)
        out[name] = (model, path)
    return out


def our_logits(ckpt: str, ids: torch.Tensor):
    """(final logits [b, s, V], exit logits {k: [b, s, V]}) of our model loaded from ckpt."""
    from megatron.early_exit.inference.loading import load_for_inference

    model, cfg, tok = load_for_inference(ckpt, torch.device("cpu"))
    with torch.no_grad():
        out = model(input_ids=ids, return_logits=True)
    exits = {k: v.transpose(0, 1) for k, v in out.exit_logits.items()}
    return out.final_logits.transpose(0, 1), exits, (model, cfg, tok)


IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_import_matches_transformers(name, hf_dirs, tmp_path, single_rank_parallel):
    from megatron.early_exit.checkpoint.hf import import_hf
    from megatron.early_exit.checkpoint.load import read_checkpoint_metadata

    model, path = hf_dirs[name]
    import_hf(path, str(tmp_path / "ours"))
    with torch.no_grad():
        want = model(IDS).logits
    got, _, (_, cfg, tok) = our_logits(str(tmp_path / "ours"), IDS)
    assert (got - want).abs().max().item() < 1e-5
    assert cfg.model.untie_embeddings_and_output_weights == (name == "llama")
    assert cfg.model.add_qkv_bias == (name == "qwen2") and cfg.model.num_query_groups == 2
    assert cfg.model.rotary_base == (5000.0 if name == "llama" else 20000.0)
    meta = read_checkpoint_metadata(str(tmp_path / "ours"))
    assert "tokenizer/tokenizer_config.json" in meta["tokenizer_files"]
    assert tok.tokenize("w3 w7") == [3, 7] and tok.eod == VOCAB - 1


def test_mistral_sharded_bin_and_padded_vocab(tmp_path, single_rank_parallel):
    """Mistral; sharded safetensors (index), pytorch_model.bin; a vocabulary of 95 imported at
    TP=2 is padded to 96 rows and still computes transformers' 95 logits."""
    from megatron.early_exit.checkpoint import load_full_state
    from megatron.early_exit.checkpoint.hf import import_hf

    model = tiny_hf("mistral", tied=False, vocab_size=95)
    ids = IDS.clamp(max=94)
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    os.makedirs(tmp_path / "bin")
    model.config.save_pretrained(str(tmp_path / "bin"))
    torch.save(model.state_dict(), str(tmp_path / "bin" / "pytorch_model.bin"))
    import_hf(str(tmp_path / "sharded"), str(tmp_path / "a"), tp=2)
    import_hf(str(tmp_path / "bin"), str(tmp_path / "b"), tp=2)
    cfg_a, a = load_full_state(str(tmp_path / "a"))
    _, b = load_full_state(str(tmp_path / "b"))
    assert all(torch.equal(a[n], b[n]) for n in a) and a.keys() == b.keys()
    assert (cfg_a["model"]["vocab_size"], cfg_a["model"]["tokenizer_vocab_size"]) == (96, 95)
    got, _, _ = our_logits(str(tmp_path / "a"), ids)
    assert (got[..., :95] - want).abs().max().item() < 1e-5


def test_export_loads_in_transformers(hf_dirs, tmp_path, single_rank_parallel):
    import transformers

    from megatron.early_exit.checkpoint.export_hf import export_hf
    from megatron.early_exit.checkpoint.hf import import_hf

    for name, cls in (("llama", transformers.LlamaForCausalLM),
                      ("qwen2", transformers.Qwen2ForCausalLM)):
        model, path = hf_dirs[name]
        import_hf(path, str(tmp_path / name))
        export_hf(str(tmp_path / name), str(tmp_path / f"{name}_hf"), max_shard_bytes=40_000)
        assert os.path.isfile(tmp_path / f"{name}_hf" / "model.safetensors.index.json")
        back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / f"{name}_hf"))
        assert type(back) is cls
        with torch.no_grad():
            assert torch.equal(back.eval()(IDS).logits, model(IDS).logits), name
        assert os.path.isfile(str(tmp_path / f"{name}_hf" / "tokenizer_config.json"))


def test_round_trip_with_exits_is_bit_identical(hf_dirs, tmp_path, single_rank_parallel):
    import transformers

    from megatron.early_exit.checkpoint import load_full_state, read_checkpoint_metadata
    from megatron.early_exit.checkpoint.exits import add_classifiers, add_exits
    from megatron.early_exit.checkpoint.export_hf import export_hf
    from megatron.early_exit.checkpoint.hf import import_hf

    model, path = hf_dirs["llama"]
    import_hf(path, str(tmp_path / "base"), tp=2)  # a sharded source for add-exits
    add_exits(str(tmp_path / "base"), str(tmp_path / "ee0"), [1, 3], use_exit_norm=True,
              use_exit_mlp=True, use_exit_block=True, random_init=True, seed=3)
    gen = torch.Generator().manual_seed(5)  # confidence classifiers ride along too
    h = read_checkpoint_metadata(str(tmp_path / "ee0"))["config"]["model"]["hidden_size"]
    add_classifiers(str(tmp_path / "ee0"), str(tmp_path / "ee"),
                    {k: (torch.randn(h, generator=gen), 0.25 * k) for k in (1, 3)})
    export_hf(str(tmp_path / "ee"), str(tmp_path / "hf"))
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["early_exit"]["exit_layer_nums"] == [1, 3]
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():  # the exit tensors do not disturb transformers' backbone
        assert torch.equal(back(IDS).logits, model(IDS).logits)
    import_hf(str(tmp_path / "hf"), str(tmp_path / "again"))
    cfg_a, a = load_full_state(str(tmp_path / "ee"))
    cfg_b, b = load_full_state(str(tmp_path / "again"))
    assert a.keys() == b.keys() and any(n.startswith("exits.3.block.") for n in a)
    assert "exits.3.classifier.weight" in a and cfg_b["exits"]["use_exit_classifier"]
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert cfg_a["exits"] == cfg_b["exits"]
    assert read_checkpoint_metadata(str(tmp_path / "ee"))["layout"]["tensor_model_parallel_size"] == 2


def test_add_exits_copied_head_matches_transformers_hidden_state(hf_dirs, tmp_path,
                                                                  single_rank_parallel):
    from megatron.early_exit.checkpoint.exits import add_exits
    from megatron.early_exit.checkpoint.hf import import_hf
    from megatron.early_exit.inference.engine import Engine
    from megatron.early_exit.inference.modes import EarlyExit

    model, path = hf_dirs["llama"]
    import_hf(path, str(tmp_path / "base"))
    add_exits(str(tmp_path / "base"), str(tmp_path / "ee"), [2], use_exit_norm=True,
              use_exit_mlp=True)
    _, exits, (ours, cfg, _) = our_logits(str(tmp_path / "ee"), IDS)
    with torch.no_grad():
        h2 = model(IDS, output_hidden_states=True).hidden_states[2]  # after layer 2
        assert (exits[2] - model.lm_head(model.model.norm(h2))).abs().max().item() < 1e-5
    prompt, steps = [5, 17, 42, 8], 6
    out = Engine(ours, cfg).generate([prompt], steps, mode=EarlyExit(threshold=0.0))[0]
    assert out.exit_layers == [4] + [2] * (steps - 1)
    seq = list(prompt)
    with torch.no_grad():  # independent: transformers' layer-2 hidden state, final norm, lm_head
        for i in range(steps):
            res = model(torch.tensor([seq]), output_hidden_states=True)
            h = res.hidden_states[2][0, -1] if i else None
            logits = res.logits[0, -1] if i == 0 else model.lm_head(model.model.norm(h))
            seq.append(int(logits.argmax()))
    assert out.tokens == seq[len(prompt):]


def test_add_exits_refusals(hf_dirs, tmp_path, single_rank_parallel):
    from megatron.early_exit.checkpoint import CheckpointError
    from megatron.early_exit.checkpoint.exits import add_exits
    from megatron.early_exit.checkpoint.hf import import_hf

    import_hf(hf_dirs["qwen2"][1], str(tmp_path / "base"))
    add_exits(str(tmp_path / "base"), str(tmp_path / "one"), [2], use_exit_norm=True)
    with pytest.raises(CheckpointError, match="already has an exit at layer 2"):
        add_exits(str(tmp_path / "one"), str(tmp_path / "two"), [2], use_exit_norm=True)
    with pytest.raises(CheckpointError, match="--use-exit-mlp"):
        add_exits(str(tmp_path / "one"), str(tmp_path / "two"), [3], use_exit_norm=True,
                  use_exit_mlp=True)
    with pytest.raises(CheckpointError, match="outside"):
        add_exits(str(tmp_path / "one"), str(tmp_path / "two"), [9], use_exit_norm=True)
    path = add_exits(str(tmp_path / "one"), str(tmp_path / "two"), [3], use_exit_norm=True)
    from megatron.early_exit.checkpoint import read_checkpoint_metadata

    exits = read_checkpoint_metadata(os.path.dirname(path))["config"]["exits"]
    assert exits["exit_layer_nums"] == [2, 3] and exits["untie_exit_output_weights"] is False


BASE = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 32, "vocab_size": 64,
        "max_position_embeddings": 128}


@pytest.mark.parametrize("key,value", [
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4}),
    ("num_local_experts", 8), ("attention_bias", True), ("mlp_bias", True),
    ("hidden_act", "gelu"), ("head_dim", 8), ("model_type", "gpt_neox"),
    ("sliding_window", 64), ("layer_types", ["sliding_attention", "full_attention"])])
def test_unsupported_config_refused_naming_the_key(key, value):
    from megatron.early_exit.checkpoint.hf import UnsupportedConfig, model_config_from_hf

    hf = dict(BASE, **{key: value})
    if key == "sliding_window":
        hf["model_type"] = "mistral"
    with pytest.raises(UnsupportedConfig, match=key.split(".")[0]):
        model_config_from_hf(hf)
    model_config_from_hf(dict(BASE, model_type="mistral", sliding_window=None))  # accepted


def test_name_based_split_and_shapes_match_a_built_model(single_rank_parallel):
    from megatron.early_exit.checkpoint.converted import expected_shapes, param_spec
    from megatron.early_exit.config import EarlyExitGPTConfig, ExitConfig, ModelConfig
    from megatron.early_exit.model.sharding import canonical_names, shard_spec
    from megatron.early_exit.parallel.state import build_model, initialize_parallel

    for arch, extra in (("llama", {"add_qkv_bias": True, "untie_embeddings_and_output_weights": True}),
                        ("gpt2", {})):
        cfg = EarlyExitGPTConfig(
            model=ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=4,
                              num_query_groups=2, ffn_hidden_size=24, vocab_size=32,
                              architecture=arch, **extra),
            exits=ExitConfig(exit_layer_nums=[1], use_exit_norm=True, use_exit_mlp=True,
                             use_exit_block=True, untie_exit_output_weights=True))
        (model,) = build_model(cfg, initialize_parallel(cfg, torch.device("cpu")))
        names = canonical_names(model)
        built = {names[n]: (tuple(p.shape), shard_spec(n, p, cfg.model.swiglu))
                 for n, p in model.named_parameters()}
        assert {n: s for n, (s, _) in built.items()} == expected_shapes(cfg), arch
        for name, (_, spec) in built.items():
            assert param_spec(name, cfg.model.swiglu) == spec, (arch, name)
