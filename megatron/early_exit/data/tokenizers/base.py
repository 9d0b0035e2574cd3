"""Tokenizer interface, vocabulary padding and a dependency-free UTF-8 byte tokenizer.

    from megatron.early_exit.data.tokenizers import ByteTokenizer, pad_vocab_size
    tok = ByteTokenizer()
    ids = tok.tokenize("héllo") + [tok.eod]
    tok.detokenize(ids)                          # 'héllo' (special ids render as nothing)
    pad_vocab_size(tok.vocab_size, 128, tensor_model_parallel_size=2)   # 512

As in Megatron, ``vocab_size`` is the tokenizer's real vocabulary; the model's embedding and
output layers use the padded size from ``pad_vocab_size`` (``--make-vocab-size-divisible-by``
times the tensor-parallel size), whose extra ids no tokenizer ever produces. The interface is
duck-type compatible with what megatron.core's GPTDataset reads (``vocab_size``, ``eod``).

Every tokenizer also names the files that define it (``file_args()``: constructor argument ->
path; ``files()``: those paths) so a checkpoint can copy them and inference can rebuild it
(see ``registry.save_tokenizer_files`` / ``tokenizer_from_directory``).

Run the tests: ``python -m pytest -q tests/unit/test_corpus_tokenizer.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterable


def pad_vocab_size(
    vocab_size: int, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1
) -> int:
    """Round ``vocab_size`` up to a multiple of ``make_vocab_size_divisible_by * TP``."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if make_vocab_size_divisible_by < 1 or tensor_model_parallel_size < 1:
        raise ValueError(
            "make_vocab_size_divisible_by and tensor_model_parallel_size must be >= 1, got "
            f"{make_vocab_size_divisible_by} and {tensor_model_parallel_size}"
        )
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


class Tokenizer(ABC):
    """Text <-> token ids. Subclasses define the vocabulary and the end-of-document id."""

    #: the ``--tokenizer-type`` value that builds this tokenizer
    tokenizer_type: str = ""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (unpadded)."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """End-of-document id, appended between documents and used as the stop token."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text`` (no special tokens added)."""

    @abstractmethod
    def detokenize(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special ids render as nothing."""

    @property
    def eos(self) -> int:
        """End-of-sequence id; the end-of-document id unless a tokenizer has its own."""
        return self.eod

    @property
    def bos(self) -> int | None:
        """Beginning-of-sequence id, or None when the tokenizer has none."""
        return None

    def file_args(self) -> dict[str, str]:
        """Files defining the tokenizer, keyed by ``build_tokenizer`` argument name
        (``vocab_file``, ``merge_file``, ``tokenizer_model``); empty for a built-in one."""
        return {}

    def files(self) -> list[str]:
        """Paths of the files that define the tokenizer (copy them to rebuild it elsewhere)."""
        return list(self.file_args().values())

    def padded_vocab_size(
        self, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1
    ) -> int:
        """``pad_vocab_size(self.vocab_size, ...)``."""
        return pad_vocab_size(
            self.vocab_size, make_vocab_size_divisible_by, tensor_model_parallel_size
        )


class ByteTokenizer(Tokenizer):
    """One id per UTF-8 byte (0..255) plus the end-of-document id 256: vocab_size 257."""

    tokenizer_type = "ByteTokenizer"

    NUM_BYTES = 256
    EOD = 256

    @property
    def vocab_size(self) -> int:
        return self.NUM_BYTES + 1

    @property
    def eod(self) -> int:
        return self.EOD

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Iterable[int]) -> str:
        data = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < self.NUM_BYTES:
                data.append(i)
            elif i != self.EOD:
                raise ValueError(f"id {i} is outside the byte tokenizer's vocabulary [0, 257)")
        # a model may emit byte sequences that are not valid UTF-8: never fail on them
        return data.decode("utf-8", errors="replace")
