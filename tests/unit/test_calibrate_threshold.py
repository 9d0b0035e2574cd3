"""tools/calibrate_threshold.py: the chosen tau meets its target on the held-out set.

A tiny random Llama (sharpened head) imported from transformers, with exits copied from its
final head at layers 2 and 3, is calibrated for 80% greedy agreement on random held-out text.
The agreement of the chosen (tau, exits) is then measured independently: every prefix of every
document run through the model on its own, the exit rule applied to the last position (first
allowed exit with max softmax >= tau, else the final head) and compared with the final head's
argmax. It must equal the tool's number and meet the target; no faster row meets it; the
choice is written into the checkpoint as the serving default, which still loads.

Run: ``OMP_NUM_THREADS=1 python -m pytest -q tests/unit/test_calibrate_threshold.py``.
"""

import importlib.util
import json
import os
import random

import pytest
import torch

from tests.unit.test_convert_hf import VOCAB, tiny_hf, write_tokenizer

TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "calibrate_threshold.py")


def tool():
    spec = importlib.util.spec_from_file_location("calibrate_threshold", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def calibrated_ckpt(tmp_path):
    from megatron.early_exit.checkpoint.exits import add_exits
    from megatron.early_exit.checkpoint.hf import import_hf

    model = tiny_hf("llama", tied=False)
    with torch.no_grad():  # confident heads, so that some tokens exit
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.mul_(3.0)
    model.save_pretrained(str(tmp_path / "hf"))
    write_tokenizer(str(tmp_path / "hf"))
    import_hf(str(tmp_path / "hf"), str(tmp_path / "base"))
    add_exits(str(tmp_path / "base"), str(tmp_path / "ee"), [2, 3], use_exit_norm=True)
    rng = random.Random(0)
    with open(tmp_path / "heldout.jsonl", "w") as f:
        for _ in range(6):
            words = " ".join(f"w{rng.randrange(VOCAB - 2)}" for _ in range(30))
            f.write(json.dumps({"text": words}) + "\n")
    return str(tmp_path / "ee"), str(tmp_path / "heldout.jsonl")


def max_prob(model, out, k):
    """The max softmax probability of exit k's logits at the last position."""
    return float(torch.softmax(out.exit_logits[k][-1, 0].double(), dim=-1).max())


def prefix_agreement(ckpt, data, tau, exits, confidence=max_prob):
    """Share of positions where the exit rule's token equals the final head's, one prefix at
    a time (no batching over positions, no shared pass); ``confidence(model, out, k)``."""
    from megatron.early_exit.inference.loading import load_for_inference

    model, cfg, tok = load_for_inference(ckpt, torch.device("cpu"))
    same = total = 0
    with open(data) as f:
        docs = [json.loads(line)["text"] for line in f]
    for text in docs:
        ids = tok.tokenize(text)
        for t in range(1, len(ids)):
            with torch.no_grad():
                out = model(input_ids=torch.tensor([ids[:t]]), return_logits=True,
                            return_exit_states=True)
            final = int(out.final_logits[-1, 0].argmax())
            token = final
            for k in sorted(exits):
                if tau < 1.0 and confidence(model, out, k) >= tau:
                    token = int(out.exit_logits[k][-1, 0].argmax())
                    break
            same += token == final
            total += 1
    return same / total


def test_chosen_threshold_meets_the_target(calibrated_ckpt, tmp_path, single_rank_parallel):
    from megatron.early_exit.checkpoint.serving import serving_defaults
    from megatron.early_exit.inference.loading import load_for_inference

    ckpt, data = calibrated_ckpt
    t = tool()
    out = str(tmp_path / "calib.json")
    assert t.run_cli(t.main, ["--load", ckpt, "--data", data, "--target-agreement", "0.8",
                              "--exit-sets", "each", "--json", out, "--plot",
                              str(tmp_path / "calib.png"), "--write-default"]) == 0
    with open(out) as f:
        result = json.load(f)
    chosen, rows = result["chosen"], result["rows"]
    assert chosen["threshold"] < 1.0 and chosen["exit_fraction"] > 0.1, chosen
    measured = prefix_agreement(ckpt, data, chosen["threshold"], chosen["exits"])
    assert measured >= 0.8 and abs(measured - chosen["agreement"]) < 1e-9, (measured, chosen)
    assert all(r["agreement"] < 0.8 for r in rows if r["speedup"] > chosen["speedup"])
    full = [r for r in rows if r["threshold"] == 1.0]
    assert all(r["agreement"] == 1.0 and r["speedup"] == 1.0 for r in full)
    assert os.path.getsize(tmp_path / "calib.png") > 1000
    saved = serving_defaults(ckpt)
    assert saved["early_exit_thres"] == chosen["threshold"] and saved["exit_layers"] == chosen["exits"]
    load_for_inference(ckpt, torch.device("cpu"))  # the re-sealed metadata still verifies


def test_bad_input(calibrated_ckpt, tmp_path, capsys):
    ckpt, data = calibrated_ckpt
    t = tool()
    for argv, flag in ((["--target-agreement", "1.5"], "--target-agreement"),
                       (["--max-loss-increase", "-1"], "--max-loss-increase"),
                       (["--target-agreement", "0.9", "--thresholds", "2"], "--thresholds")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            t.run_cli(t.main, ["--load", ckpt, "--data", data] + argv)
        assert e.value.code == 2 and capsys.readouterr().err.startswith(f"error: {flag}")
