#!/usr/bin/env python
"""Convert checkpoints: Hugging Face / GGUF / EE-LLM / ours -> ours or Hugging Face.

    # HF Llama / Mistral / Qwen2 directory -> ours (tokenizer carried; TP/PP of the result)
    python tools/checkpoint/convert.py --source-format hf --load-dir SmolLM2-135M \\
        --save-dir ckpt/smollm2 --target-tensor-parallel-size 2 --dtype bfloat16
    # a llama-architecture GGUF file -> ours (dequantised; tokenizer + chat template carried)
    python tools/checkpoint/convert.py --source-format gguf --load-file model.gguf --save-dir ckpt/m
    # EE-LLM (Megatron-LM) checkpoint at any TP/PP -> ours (EE-LLM saves no tokenizer:
    # --tokenizer-dir names HF tokenizer files to carry)
    python tools/checkpoint/convert.py --source-format eellm --load-dir EE-LLM-7B --save-dir ckpt/7b
    # ours -> HF (loads in transformers as LlamaForCausalLM; exits kept as extra tensors)
    python tools/checkpoint/convert.py --source-format ee --target-format hf --load-dir ckpt/run \\
        --save-dir hf/run
    # ours -> ours at another layout (the same as tools/checkpoint/reshard.py, model only)
    python tools/checkpoint/convert.py --source-format ee --load-dir ckpt/tp2 --save-dir ckpt/tp1

A non-ours source converted to HF goes through ours in a temporary directory. A progress bar
(tqdm) shows the weight files or tensors being read. Bad input: one line ``error: --flag: ...``
and exit code 2 (``--debug``: the traceback). Formats: docs/conversion.md.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.early_exit.checkpoint import CheckpointError  # noqa: E402
from megatron.early_exit.cli import UsageError, blame, run_cli  # noqa: E402

SOURCES = ("hf", "gguf", "eellm", "ee")
TARGETS = ("ee", "hf")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source-format", required=True, choices=SOURCES)
    p.add_argument("--target-format", default="ee", choices=TARGETS,
                   help="ee: our checkpoint (default); hf: a transformers model directory.")
    p.add_argument("--load-dir", help="Source directory (hf, eellm, ee).")
    p.add_argument("--load-file", help="Source file (gguf).")
    p.add_argument("--load-iteration", type=int, help="Source iteration (eellm, ee; default: latest).")
    p.add_argument("--save-dir", required=True, help="Directory to write.")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float64"),
                   help="Parameter dtype of the result (default: float32 for imports, the "
                        "checkpoint's for ee sources).")
    p.add_argument("--seq-length", type=int, help="Training sequence length recorded in the "
                   "imported config (default: the model's context length).")
    p.add_argument("--tokenizer-dir", help="HF tokenizer files to carry (eellm).")
    p.add_argument("--trust-pickle", action="store_true",
                   help="eellm: unpickle any object in the files (only for files you trust).")
    return p


def progress():
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return lambda items: tqdm(items, desc="reading", unit="item", leave=False)


def check_args(a) -> None:
    if a.source_format == "gguf":
        if not a.load_file or a.load_dir:
            raise UsageError("--load-file", "--source-format gguf reads one file: give --load-file "
                             "(not --load-dir)")
    elif not a.load_dir or a.load_file:
        raise UsageError("--load-dir", f"--source-format {a.source_format} reads a directory: give "
                         "--load-dir (not --load-file)")
    src = a.load_file or a.load_dir
    if not os.path.exists(src):
        raise UsageError("--load-file" if a.load_file else "--load-dir", f"{src} does not exist")
    if os.path.abspath(src) == os.path.abspath(a.save_dir):
        raise UsageError("--save-dir", "must differ from the source")
    if os.path.isdir(a.save_dir) and os.listdir(a.save_dir):
        raise UsageError("--save-dir", f"{a.save_dir} is not empty: choose a new directory "
                         "(nothing is overwritten)")
    for flag, value in (("--target-tensor-parallel-size", a.target_tensor_parallel_size),
                        ("--target-pipeline-parallel-size", a.target_pipeline_parallel_size)):
        if value < 1:
            raise UsageError(flag, f"must be >= 1, got {value}")
    if a.target_format == "hf" and (a.target_tensor_parallel_size, a.target_pipeline_parallel_size) != (1, 1):
        raise UsageError("--target-tensor-parallel-size", "an HF directory is not sharded")
    if a.tokenizer_dir and a.source_format != "eellm":
        raise UsageError("--tokenizer-dir", "is only used with --source-format eellm (the other "
                         "sources carry their own tokenizer)")
    if a.trust_pickle and a.source_format != "eellm":
        raise UsageError("--trust-pickle", "is only used with --source-format eellm")


def to_ours(a, save_dir: str, tp: int, pp: int) -> str:
    """Convert the source to a checkpoint of ours in ``save_dir``; returns its iteration dir."""
    from megatron.early_exit.checkpoint import reshard_checkpoint

    bar = progress()
    if a.source_format == "hf":
        from megatron.early_exit.checkpoint.hf import import_hf

        return import_hf(a.load_dir, save_dir, tp, pp, a.dtype, a.seq_length, bar)
    if a.source_format == "gguf":
        from megatron.early_exit.checkpoint.gguf_import import import_gguf

        return import_gguf(a.load_file, save_dir, tp, pp, a.dtype, a.seq_length, bar)
    if a.source_format == "eellm":
        from megatron.early_exit.checkpoint.eellm import import_eellm

        return import_eellm(a.load_dir, save_dir, tp, pp, a.dtype, a.load_iteration,
                            a.tokenizer_dir, a.trust_pickle, bar)
    if a.dtype:
        raise UsageError("--dtype", "ee -> ee keeps the checkpoint's dtype (reshard only)")
    return reshard_checkpoint(a.load_dir, save_dir, tp, pp, iteration=a.load_iteration,
                              with_optimizer=False)


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    check_args(a)
    flag = "--load-file" if a.load_file else "--load-dir"
    try:
        if a.target_format == "ee":
            path = to_ours(a, a.save_dir, a.target_tensor_parallel_size,
                           a.target_pipeline_parallel_size)
        else:
            from megatron.early_exit.checkpoint.export_hf import export_hf

            if a.source_format == "ee":
                path = export_hf(a.load_dir, a.save_dir, a.dtype, a.load_iteration)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    to_ours(a, tmp, 1, 1)
                    path = export_hf(tmp, a.save_dir, a.dtype)
    except CheckpointError as e:  # about the source (ConfigErrors name their own flag)
        raise blame(flag, e) from e
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
