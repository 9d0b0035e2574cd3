#!/usr/bin/env python
"""Tokenize a JSON-lines corpus into Megatron indexed datasets (``PREFIX_{key}_document``).

    python tools/preprocess_data.py --input shakespeare.jsonl --json-keys text \\
        --output-prefix data/shakespeare --tokenizer-type GPT2BPETokenizer \\
        --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt --append-eod --workers 4

Then train with ``--data-path data/shakespeare_text_document``. All options:
``python tools/preprocess_data.py --help``; the code is megatron/early_exit/data/preprocess.py.
Bad input: one line ``error: --flag: ...`` and exit code 2 (``--debug``: the traceback).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.early_exit.cli import run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from megatron.early_exit.data.tokenizers import TOKENIZER_TYPES

    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSON-lines file, one document per line")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize")
    p.add_argument("--output-prefix", required=True,
                   help="writes OUTPUT_PREFIX_{key}_document.bin/.idx")
    p.add_argument("--tokenizer-type", required=True, choices=sorted(TOKENIZER_TYPES))
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--append-eod", action="store_true", help="end each document with eod")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--chunk-size", type=int, default=32, help="lines per worker task")
    p.add_argument("--log-interval", type=int, default=1000,
                   help="documents between progress lines (when tqdm is not installed)")
    p.add_argument("--debug", action="store_true", help="tracebacks for input errors too")
    return p


def main(argv=None) -> dict:
    from megatron.early_exit.data.preprocess import PreprocessConfig, preprocess

    args = vars(build_parser().parse_args(argv))
    args.pop("debug")
    return preprocess(PreprocessConfig(**args))


if __name__ == "__main__":
    run_cli(main)
