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
The flags are parsed by the tool; here they are a ``PreprocessConfig``::

    preprocess(PreprocessConfig(input="corpus.jsonl", output_prefix="data/c", tokenizer_type="ByteTokenizer"))

Tests: ``python -m pytest -q tests/unit/test_data_preprocess.py``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, List, Optional, Sequence

from megatron.early_exit.config import ConfigError

from .tokenizers import TOKENIZER_TYPES, build_tokenizer

_WORKER: dict = {}


@dataclass
class PreprocessConfig:
    """What tools/preprocess_data.py does (its flags; ``ConfigError`` names the flag at fault)."""

    input: str  # --input: JSON-lines file, one document per line
    output_prefix: str  # --output-prefix: writes OUTPUT_PREFIX_{key}_document.bin/.idx
    tokenizer_type: str  # --tokenizer-type
    json_keys: List[str] = field(default_factory=lambda: ["text"])  # --json-keys
    vocab_file: Optional[str] = None  # --vocab-file
    merge_file: Optional[str] = None  # --merge-file
    tokenizer_model: Optional[str] = None  # --tokenizer-model
    append_eod: bool = False  # --append-eod
    workers: int = 1  # --workers: tokenizer processes
    chunk_size: int = 32  # --chunk-size: lines per worker task
    log_interval: int = 1000  # --log-interval: documents between progress lines (no tqdm)

    def __post_init__(self):
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise ConfigError(f"--tokenizer-type must be one of {sorted(TOKENIZER_TYPES)}, "
                              f"got {self.tokenizer_type!r}")
        if not os.path.isfile(self.input):
            raise ConfigError(f"--input {self.input!r} does not exist")
        for flag, value in (("--workers", self.workers), ("--chunk-size", self.chunk_size),
                            ("--log-interval", self.log_interval)):
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if not self.json_keys or len(set(self.json_keys)) != len(self.json_keys):
            raise ConfigError(f"--json-keys needs distinct keys, got {self.json_keys}")


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
        raise ConfigError(f"--input {source}:{lineno}: not valid JSON ({e})") from None
    tok = _WORKER["tokenizer"]
    out = {}
    for key in _WORKER["keys"]:
        if not isinstance(record, dict) or not isinstance(record.get(key), str):
            raise ConfigError(f"--input {source}:{lineno}: no string under --json-keys {key!r}")
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


def preprocess(args: PreprocessConfig) -> dict:
    """Tokenize ``args.input``; returns ``{"prefixes": {key: prefix}, "documents": {key: n},
    "skipped": {key: n}, "tokens": {key: n}}``."""
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
