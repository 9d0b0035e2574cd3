"""Tokenizers backed by optional libraries: HuggingFace ``tokenizers`` and ``sentencepiece``.

    from megatron.early_exit.data.tokenizers import HuggingFaceTokenizer, SentencePieceTokenizer
    hf = HuggingFaceTokenizer("path/to/tokenizer.json")      # pip install tokenizers
    sp = SentencePieceTokenizer("path/to/tokenizer.model")   # pip install sentencepiece

Both libraries are optional (``pip install 'megatron-early-exit[tokenizers]'``) and imported
only when such a tokenizer is built; a missing one raises ``ImportError`` naming the package.
Special ids (end-of-document, beginning-of-sequence, padding) never come out of ``tokenize``
and render as nothing in ``detokenize``.

Tests: ``python -m pytest -q tests/unit/test_data_tokenizers.py``.
"""

from __future__ import annotations

import importlib
import os
from typing import Iterable, Optional

from .base import Tokenizer

# End-of-document / beginning-of-sequence tokens tried in order when none is named.
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>")
BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")


def import_optional(module: str, pip_name: str, what: str):
    """Import ``module`` or raise an ImportError telling how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{what} needs the `{pip_name}` package: `pip install {pip_name}` "
            f"(or `pip install 'megatron-early-exit[tokenizers]'`)"
        ) from e


def _check_file(path: str, flag: str) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: no such file {path!r}")
    return path


class HuggingFaceTokenizer(Tokenizer):
    """A HuggingFace ``tokenizer.json`` (``--tokenizer-type HuggingFaceTokenizer
    --tokenizer-model PATH``; PATH may also be a directory holding ``tokenizer.json``)."""

    tokenizer_type = "HuggingFaceTokenizer"

    def __init__(self, tokenizer_json_path: str, eod_token: Optional[str] = None):
        if os.path.isdir(tokenizer_json_path):
            tokenizer_json_path = os.path.join(tokenizer_json_path, "tokenizer.json")
        self.path = _check_file(tokenizer_json_path, "--tokenizer-model")
        lib = import_optional("tokenizers", "tokenizers", "HuggingFaceTokenizer")
        self._tok = lib.Tokenizer.from_file(self.path)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        names = (eod_token,) if eod_token else EOD_CANDIDATES
        found = [vocab[n] for n in names if n in vocab]
        if not found:
            raise ValueError(f"{self.path} has none of the end-of-document tokens {names}")
        self._eod = found[0]
        bos = [vocab[n] for n in BOS_CANDIDATES if n in vocab]
        self._bos = bos[0] if bos else None
        self._vocab_size = max(vocab.values()) + 1

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def bos(self) -> Optional[int]:
        return self._bos

    def file_args(self) -> dict[str, str]:
        return {"tokenizer_model": self.path}

    def tokenize(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def detokenize(self, ids: Iterable[int]) -> str:
        keep = [int(i) for i in ids]
        bad = [i for i in keep if not 0 <= i < self._vocab_size]
        if bad:
            raise ValueError(f"id {bad[0]} is outside the vocabulary [0, {self._vocab_size}) "
                             f"of {self.path}")
        # the eod id is dropped even when the file does not mark it special
        return self._tok.decode([i for i in keep if i != self._eod], skip_special_tokens=True)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` file (``--tokenizer-type SentencePieceTokenizer
    --tokenizer-model PATH``); its ``</s>`` is the end-of-document id."""

    tokenizer_type = "SentencePieceTokenizer"

    def __init__(self, model_path: str):
        self.path = _check_file(model_path, "--tokenizer-model")
        spm = import_optional("sentencepiece", "sentencepiece", "SentencePieceTokenizer")
        self._sp = spm.SentencePieceProcessor(model_file=self.path)
        if self._sp.eos_id() < 0:
            raise ValueError(f"{self.path} defines no end-of-sequence piece to use as eod")

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def eod(self) -> int:
        return int(self._sp.eos_id())

    @property
    def bos(self) -> Optional[int]:
        bos = int(self._sp.bos_id())
        return bos if bos >= 0 else None

    @property
    def pad(self) -> Optional[int]:
        pad = int(self._sp.pad_id())
        return pad if pad >= 0 else None

    def file_args(self) -> dict[str, str]:
        return {"tokenizer_model": self.path}

    def tokenize(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    def detokenize(self, ids: Iterable[int]) -> str:
        size = self.vocab_size
        keep = []
        for i in ids:
            i = int(i)
            if not 0 <= i < size:
                raise ValueError(f"id {i} is outside the vocabulary [0, {size}) of {self.path}")
            if not self._sp.is_control(i):
                keep.append(i)
        return self._sp.decode(keep)
