#!/usr/bin/env python
"""Tokenize a JSON-lines corpus into Megatron indexed datasets (``PREFIX_{key}_document``).

    python tools/preprocess_data.py --input shakespeare.jsonl --json-keys text \\
        --output-prefix data/shakespeare --tokenizer-type GPT2BPETokenizer \\
        --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt --append-eod --workers 4

Then train with ``--data-path data/shakespeare_text_document``. All options:
``python tools/preprocess_data.py --help``; the code is megatron/early_exit/data/preprocess.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.early_exit.config import ConfigError  # noqa: E402
from megatron.early_exit.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    try:
        main()
    except (ConfigError, ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")
