"""EE-Tuning on an imported model: HF import -> add exits -> pretrain_early_exit_gpt.py --tune-exit.

A tiny random Llama from transformers is imported (tokenizer carried), two exits copied from
its final head are added, and only the exits are tuned for a few iterations on a small
structured language (each word is followed by the next one, modulo the vocabulary) with
``--use-checkpoint-args`` (the model comes from the imported checkpoint). Afterwards every
backbone tensor is bit-identical to the import, and each exit's cross-entropy on held-out
documents of the same language (computed here from the model's exit logits) is lower than
before tuning.

Run: ``OMP_NUM_THREADS=1 python -m pytest -q tests/e2e/test_convert_tune_exit.py``.
"""

import json
import random
import subprocess
import sys

import torch
import torch.nn.functional as F

from tests.e2e.test_pretrain_cli import ENV, ROOT, launch
from tests.unit.test_convert_hf import VOCAB, tiny_hf, write_tokenizer


def documents(n: int, seed: int) -> list:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        start = rng.randrange(VOCAB - 2)
        docs.append(" ".join(f"w{(start + i) % (VOCAB - 2)}" for i in range(40)))
    return docs


def exit_losses(ckpt: str, docs: list) -> dict:
    """Held-out cross-entropy of every exit's next-token prediction."""
    from megatron.early_exit.inference.loading import load_for_inference

    model, cfg, tok = load_for_inference(ckpt, torch.device("cpu"))
    total = {k: 0.0 for k in cfg.exits.exit_layer_nums}
    for text in docs:
        ids = torch.tensor([tok.tokenize(text)])
        with torch.no_grad():
            out = model(input_ids=ids[:, :-1], return_logits=True)
        for k in total:
            total[k] += F.cross_entropy(out.exit_logits[k][:, 0, :VOCAB].double(), ids[0, 1:]).item()
    return {k: v / len(docs) for k, v in total.items()}


def test_tune_exit_on_an_imported_model(tmp_path, single_rank_parallel):
    from megatron.early_exit.checkpoint import load_full_state
    from megatron.early_exit.checkpoint.exits import add_exits
    from megatron.early_exit.checkpoint.hf import import_hf

    model = tiny_hf("llama", tied=False)
    model.save_pretrained(str(tmp_path / "hf"))
    write_tokenizer(str(tmp_path / "hf"))
    import_hf(str(tmp_path / "hf"), str(tmp_path / "base"))
    ee = add_exits(str(tmp_path / "base"), str(tmp_path / "ee"), [1, 3], use_exit_norm=True,
                   use_exit_mlp=True)
    with open(tmp_path / "train.jsonl", "w") as f:
        for text in documents(64, seed=1):
            f.write(json.dumps({"text": text}) + "\n")
    tokenizer = f"{ee}/tokenizer/tokenizer.json"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input",
                           str(tmp_path / "train.jsonl"), "--output-prefix", str(tmp_path / "d"),
                           "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                           tokenizer, "--append-eod", "--workers", "1"],
                          env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    done = subprocess.run(launch([
        "--use-checkpoint-args", "--load", str(tmp_path / "ee"), "--save", str(tmp_path / "tuned"),
        "--tune-exit", "--data-path", str(tmp_path / "d_text_document"), "--split", "100,0,0",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer,
        "--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "4",
        "--train-iters", "30", "--lr", "1e-2", "--lr-warmup-iters", "0", "--eval-iters", "0",
        "--log-interval", "10"]), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    _, before = load_full_state(str(tmp_path / "ee"))
    _, after = load_full_state(str(tmp_path / "tuned"))
    assert before.keys() == after.keys()
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed and all(n.startswith("exits.") for n in changed), changed
    held = documents(8, seed=2)
    loss_before, loss_after = exit_losses(str(tmp_path / "ee"), held), exit_losses(str(tmp_path / "tuned"), held)
    for k in (1, 3):
        assert loss_after[k] < loss_before[k], (k, loss_before, loss_after)
