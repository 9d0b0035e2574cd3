"""JSON lines -> Megatron indexed datasets (``PREFIX_{key}_document.bin/.idx``), in parallel.

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text \\
        --output-prefix data/shakespeare --tokenizer-type GPT2BPETokenizer \\
        --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt --append-eod --workers 4

Each input line is a JSON object; the string under each ``--json-keys`` key is one document.
``--workers`` processes tokenize chunks of lines (``multiprocessing.Pool.imap``, so document
order is kept); the parent writes one ``IndexedDatasetBuilder`` per key, with the smallest
integer dtype that holds the vocabulary. Documents that tokenize to nothing are skipped.
``--append-eod`` ends every document with the tokenizer's end-of-document id, which GPTDataset
needs to tell documents apart when it packs them into sequences. The result is used as
``--data-path PREFIX_text_document``. Progress goes to stderr (tqdm when installed).

Tests: ``python -m pytest -q tests/unit/test_data_preprocess.py``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from typing import Iterable, Iterator, Optional, Sequence

from megatron.early_exit.config import ConfigError

from .tokenizers import TOKENIZER_TYPES, build_tokenizer

_WORKER: dict = {}


def build_parser() -> argparse.ArgumentParser:
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
    return p


def _init_worker(tokenizer_type: str, files: dict, keys: Sequence[str], append_eod: bool):
    _WORKER["tokenizer"] = build_tokenizer(tokenizer_type, **files)
    _WORKER["keys"], _WORKER["append_eod"] = list(keys), append_eod


def _encode(item: tuple[int, str, str]) -> tuple[Optional[dict], int]:
    """(line number, line, input name) -> ({key: ids} or None for a blank line, bytes read)."""
    lineno, line, source = item
    if not line.strip():
        return None, len(line)
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}:{lineno}: not valid JSON ({e})") from None
    tok = _WORKER["tokenizer"]
    out = {}
    for key in _WORKER["keys"]:
        if not isinstance(record, dict) or not isinstance(record.get(key), str):
            raise ValueError(f"{source}:{lineno}: no string under --json-keys {key!r}")
        ids = tok.tokenize(record[key])
        if ids and _WORKER["append_eod"]:
            ids.append(tok.eod)
        out[key] = ids
    return out, len(line)


class _Progress:
    """tqdm when importable, else a stderr line every ``interval`` documents."""

    def __init__(self, path: str, interval: int):
        self.interval, self.docs, self.nbytes, self.start = interval, 0, 0, time.time()
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=os.path.getsize(path), unit="B", unit_scale=True,
                            desc="tokenizing", file=sys.stderr)

    def update(self, nbytes: int) -> None:
        self.docs += 1
        self.nbytes += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
        elif self.interval > 0 and self.docs % self.interval == 0:
            rate = self.nbytes / max(time.time() - self.start, 1e-9) / 2**20
            print(f"processed {self.docs} documents ({rate:.2f} MB/s)", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _lines(path: str) -> Iterator[tuple[int, str, str]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            yield lineno, line, path


def _encoded(args, files: dict) -> Iterable[tuple[Optional[dict], int]]:
    init = (args.tokenizer_type, files, args.json_keys, args.append_eod)
    if args.workers == 1:
        _init_worker(*init)
        yield from map(_encode, _lines(args.input))
        return
    with multiprocessing.Pool(args.workers, initializer=_init_worker, initargs=init) as pool:
        yield from pool.imap(_encode, _lines(args.input), chunksize=args.chunk_size)


def _check_args(args) -> None:
    if not os.path.isfile(args.input):
        raise ConfigError(f"--input {args.input!r} does not exist")
    if args.workers < 1 or args.chunk_size < 1:
        raise ConfigError("--workers and --chunk-size must be >= 1")
    if len(set(args.json_keys)) != len(args.json_keys):
        raise ConfigError(f"--json-keys has a repeated key: {args.json_keys}")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the tool; returns ``{"prefixes": {key: prefix}, "documents": {key: n},
    "skipped": {key: n}, "tokens": {key: n}}``."""
    args = build_parser().parse_args(argv)
    _check_args(args)
    tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file,
                                args.tokenizer_model)
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    prefixes = {k: f"{args.output_prefix}_{k}_document" for k in args.json_keys}
    builders = {k: IndexedDatasetBuilder(p + ".bin", dtype=dtype) for k, p in prefixes.items()}
    stats = {s: dict.fromkeys(args.json_keys, 0) for s in ("documents", "skipped", "tokens")}
    progress = _Progress(args.input, args.log_interval)
    try:
        for record, nbytes in _encoded(args, tokenizer.file_args()):
            progress.update(nbytes)
            for key, ids in (record or {}).items():
                if not ids:
                    stats["skipped"][key] += 1
                    continue
                builders[key].add_document(ids, [len(ids)])
                stats["documents"][key] += 1
                stats["tokens"][key] += len(ids)
    except BaseException:
        for builder in builders.values():
            builder.data_file.close()
        raise
    finally:
        progress.close()
    for key, prefix in prefixes.items():
        builders[key].finalize(prefix + ".idx")
        print(f"{key}: {stats['documents'][key]} documents, {stats['tokens'][key]} tokens "
              f"({stats['skipped'][key]} empty skipped) -> --data-path {prefix}")
    return {"prefixes": prefixes, **stats}
