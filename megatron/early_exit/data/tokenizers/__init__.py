"""Tokenizers: interface, byte / GPT-2 BPE / HuggingFace / SentencePiece, build and save.

    from megatron.early_exit.data.tokenizers import build_tokenizer, ByteTokenizer, pad_vocab_size
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file="vocab.json", merge_file="merges.txt")
    ids = tok.tokenize("To be, or not to be") + [tok.eod]

Modules: ``base`` (Tokenizer ABC, ByteTokenizer, pad_vocab_size), ``gpt2_bpe`` (pure-Python
GPT-2 byte-level BPE), ``library`` (HuggingFace ``tokenizers`` / ``sentencepiece`` wrappers,
optional dependencies imported lazily), ``registry`` (``build_tokenizer`` from Megatron flags,
``save_tokenizer_files`` / ``tokenizer_from_directory`` for checkpoints).

Tests: ``python -m pytest -q tests/unit/test_data_tokenizers.py tests/unit/test_corpus_tokenizer.py``.
"""

from .base import ByteTokenizer, Tokenizer, pad_vocab_size
from .gpt2_bpe import GPT2BPETokenizer
from .library import HuggingFaceTokenizer, SentencePieceTokenizer
from .registry import (DESCRIPTOR_FILE, TOKENIZER_TYPES, build_tokenizer, read_descriptor,
                       save_tokenizer_files, tokenizer_from_directory)

__all__ = [
    "ByteTokenizer", "DESCRIPTOR_FILE", "GPT2BPETokenizer", "HuggingFaceTokenizer",
    "SentencePieceTokenizer", "TOKENIZER_TYPES", "Tokenizer", "build_tokenizer",
    "pad_vocab_size", "read_descriptor", "save_tokenizer_files", "tokenizer_from_directory",
]
