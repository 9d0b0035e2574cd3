"""GPU checks (skipped without CUDA; tests/conftest.py): training steps with NCCL through the
command line, with megatron-core's optimizer (plain and distributed) against torch AdamW.

    python -m pytest -q tests/gpu
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text corpus (seeded pseudo-words: no corpus package needed on the GPU machine)."""
    from megatron.early_exit.data import preprocess

    d = tmp_path_factory.mktemp("corpus")
    gen = torch.Generator().manual_seed(0)
    words = ["".join(chr(97 + int(c)) for c in torch.randint(0, 26, (int(n),), generator=gen))
             for n in torch.randint(1, 8, (300,), generator=gen)]
    with open(d / "c.jsonl", "w") as f:
        for _ in range(400):
            idx = torch.randint(0, len(words), (60,), generator=gen).tolist()
            f.write(json.dumps({"text": " ".join(words[i] for i in idx)}) + "\n")
    preprocess.main(["--input", str(d / "c.jsonl"), "--json-keys", "text", "--output-prefix",
                     str(d / "c"), "--tokenizer-type", "ByteTokenizer", "--append-eod"])
    return str(d / "c_text_document")


def run_cli(tmp_path, corpus, name, *extra, iters=5):
    log = tmp_path / f"{name}.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           str(ROOT / "pretrain_early_exit_gpt.py"), "--num-layers", "4", "--hidden-size", "256",
           "--num-attention-heads", "4", "--seq-length", "256", "--exit-layer-nums", "1", "2",
           "--use-exit-norm", "--micro-batch-size", "4", "--global-batch-size", "8",
           "--train-iters", str(iters), "--lr", "1e-3", "--clip-grad", "0.5", "--log-interval", "1",
           "--eval-iters", "0", "--data-path", corpus, "--split", "98,2,0", "--log-json", str(log),
           *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])})
    print(done.stdout[-2000:])
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_bf16_nccl_training_step_from_cli(tmp_path, corpus):
    records = run_cli(tmp_path, corpus, "bf16", "--bf16", "--use-distributed-optimizer")
    assert len(records) == 5 and all(r["lm_loss"] == r["lm_loss"] for r in records)


def test_megatron_optimizers_match_torch_adamw(tmp_path, corpus):
    """fp32, same seed and data: megatron-core's FP32Optimizer and DistributedOptimizer follow
    torch AdamW's loss curve (clipping active); resuming the distributed one from its checkpoint
    continues the same curve."""
    ref = run_cli(tmp_path, corpus, "torch", "--optimizer-backend", "torch")
    plain = run_cli(tmp_path, corpus, "megatron", "--optimizer-backend", "megatron")
    dist = run_cli(tmp_path, corpus, "dist", "--use-distributed-optimizer", "--save",
                   str(tmp_path / "ckpt"), "--save-interval", "3")
    resumed = run_cli(tmp_path, corpus, "resumed", "--use-distributed-optimizer", "--load",
                      str(tmp_path / "ckpt"), "--load-iteration", "3")
    assert ref[0]["grad_norm"] > 0.5
    for other in (plain, dist):
        for a, b in zip(ref, other):
            assert abs(a["lm_loss"] - b["lm_loss"]) <= 1e-4 * a["lm_loss"], (a, b)
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-3 * a["grad_norm"], (a, b)
    assert [r["iteration"] for r in resumed] == [4, 5]
    for a, b in zip(dist[3:], resumed):
        assert abs(a["lm_loss"] - b["lm_loss"]) <= 1e-6 * a["lm_loss"], (a, b)
