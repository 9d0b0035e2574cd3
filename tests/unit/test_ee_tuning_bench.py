"""Smoke test of benchmarks/ee_tuning_bench.py on a tiny random Llama (a few seconds).

A random transformers Llama (4 layers) is imported, exits after layers 1 and 3 are added, and
the benchmark runs one round. Its rows must be all there, and the lossless rows must produce
the tokens transformers' own greedy ``generate`` produces on the same weights (the independent
reference): ours fused full depth, our self-speculation and transformers' assistant_early_exit.

Run: ``OMP_NUM_THREADS=1 python -m pytest -q tests/unit/test_ee_tuning_bench.py``.
"""

import json

from tests.unit.test_convert_hf import tiny_hf, write_tokenizer


def test_bench_rows_on_a_tiny_model(tmp_path, single_rank_parallel):
    from benchmarks.ee_tuning_bench import main
    from megatron.early_exit.checkpoint.exits import add_exits
    from megatron.early_exit.checkpoint.hf import import_hf

    tiny_hf("llama", tied=True).save_pretrained(str(tmp_path / "hf"))
    write_tokenizer(str(tmp_path / "hf"))
    import_hf(str(tmp_path / "hf"), str(tmp_path / "base"))
    add_exits(str(tmp_path / "base"), str(tmp_path / "ee"), [1, 3], use_exit_norm=True)
    with open(tmp_path / "held.jsonl", "w") as f:
        for start in (3, 17):
            f.write(json.dumps({"text": " ".join(f"w{start + i}" for i in range(12))}) + "\n")
    out = tmp_path / "rows.json"
    assert main(["--load", str(tmp_path / "ee"), "--data", str(tmp_path / "held.jsonl"),
                 "--prompts", "2", "--prompt-tokens", "8", "--new-tokens", "6", "--rounds", "1",
                 "--thresholds", "0.0", "--json", str(out)]) == 0
    rows = {r["engine"]: r for r in json.load(open(out))["rows"]}
    assert set(rows) == {"ours fused", "ours early exit tau=0", "ours self-spec exit=1",
                         "ours self-spec exit=3", "hf generate", "hf assistant_early_exit=1",
                         "hf assistant_early_exit=3"}
    for name in ("ours fused", "ours self-spec exit=1", "ours self-spec exit=3",
                 "hf assistant_early_exit=1", "hf assistant_early_exit=3"):
        assert rows[name]["same_tokens_as_hf"] == 1.0, (name, rows[name])
    # tau = 0: every token after the first exits at layer 1
    assert rows["ours early exit tau=0"]["mean_exit_layer"] < 2.0
    assert all(r["tokens_per_s"] > 0 for r in rows.values())


def test_bench_classifier_rows(tmp_path, single_rank_parallel):
    """--classifier-thresholds adds rows with confidence='classifier' (tau 0: every token after
    the first leaves at the first exit), and refuses a checkpoint without classifiers."""
    import pytest
    import torch

    from benchmarks.ee_tuning_bench import main
    from megatron.early_exit.checkpoint.exits import add_classifiers, add_exits
    from megatron.early_exit.checkpoint.hf import import_hf

    tiny_hf("llama", tied=True).save_pretrained(str(tmp_path / "hf"))
    write_tokenizer(str(tmp_path / "hf"))
    import_hf(str(tmp_path / "hf"), str(tmp_path / "base"))
    add_exits(str(tmp_path / "base"), str(tmp_path / "ee"), [1, 3], use_exit_norm=True)
    h = tiny_hf("llama", tied=True).config.hidden_size
    add_classifiers(str(tmp_path / "ee"), str(tmp_path / "clf"),
                    {k: (torch.zeros(h), 0.0) for k in (1, 3)})
    with open(tmp_path / "held.jsonl", "w") as f:
        f.write(json.dumps({"text": " ".join(f"w{3 + i}" for i in range(12))}) + "\n")
    args = ["--data", str(tmp_path / "held.jsonl"), "--prompts", "1", "--prompt-tokens", "8",
            "--new-tokens", "6", "--rounds", "1", "--thresholds", "--classifier-thresholds", "0.0",
            "--no-self-spec", "--json", str(tmp_path / "rows.json")]
    assert main(["--load", str(tmp_path / "clf")] + args) == 0
    rows = {r["engine"]: r for r in json.load(open(tmp_path / "rows.json"))["rows"]}
    assert set(rows) == {"ours fused", "ours early exit clf tau=0", "hf generate"}
    assert rows["ours early exit clf tau=0"]["mean_exit_layer"] < 2.0
    with pytest.raises(Exception, match="classifier"):
        main(["--load", str(tmp_path / "ee")] + args)
    bad = [a if a != "0.0" else "1.5" for a in args]
    with pytest.raises(Exception, match="--classifier-thresholds"):
        main(["--load", str(tmp_path / "clf")] + bad)
