"""Build a tokenizer from Megatron flags, and save / rebuild one from a directory of its files.

    from megatron.early_exit.data.tokenizers import (
        build_tokenizer, save_tokenizer_files, tokenizer_from_directory)
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file="vocab.json", merge_file="merges.txt")
    save_tokenizer_files(tok, "ckpt/tokenizer")     # copies the files + a small descriptor
    same = tokenizer_from_directory("ckpt/tokenizer")

The descriptor (``DESCRIPTOR_FILE``, JSON) records the tokenizer type, the copied file names
keyed by ``build_tokenizer`` argument, and the vocabulary size and end-of-document id, which
are checked when the tokenizer is rebuilt. It is deliberately not named ``tokenizer.json`` or
``tokenizer_config.json`` so it never collides with HuggingFace files in the same directory.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from megatron.early_exit.config import ConfigError

from .base import ByteTokenizer, Tokenizer

DESCRIPTOR_FILE = "early_exit_tokenizer.json"
DESCRIPTOR_FORMAT = "megatron-early-exit-tokenizer/1"

# --tokenizer-type value -> (canonical type, build_tokenizer arguments it needs)
TOKENIZER_TYPES = {
    "ByteTokenizer": ("ByteTokenizer", ()),
    "GPT2BPETokenizer": ("GPT2BPETokenizer", ("vocab_file", "merge_file")),
    "HuggingFaceTokenizer": ("HuggingFaceTokenizer", ("tokenizer_model",)),
    "SentencePieceTokenizer": ("SentencePieceTokenizer", ("tokenizer_model",)),
    "GPTSentencePieceTokenizer": ("SentencePieceTokenizer", ("tokenizer_model",)),
    "Llama2Tokenizer": ("SentencePieceTokenizer", ("tokenizer_model",)),
}
FLAGS = {"vocab_file": "--vocab-file", "merge_file": "--merge-file",
         "tokenizer_model": "--tokenizer-model"}


def _check_flags(tokenizer_type: str, needed: tuple, given: dict) -> None:
    for arg, flag in FLAGS.items():
        value = given[arg]
        if arg in needed and value is None:
            raise ConfigError(f"--tokenizer-type {tokenizer_type} needs {flag}")
        if arg not in needed and value is not None:
            used = " and ".join(FLAGS[a] for a in needed) or "no files"
            raise ConfigError(f"{flag} is not used by --tokenizer-type {tokenizer_type} "
                              f"(it takes {used})")
        if arg in needed and not (os.path.isfile(value) or
                                  (arg == "tokenizer_model" and os.path.isdir(value))):
            raise ConfigError(f"{flag} {value!r} does not exist")


def build_tokenizer(tokenizer_type: Optional[str], vocab_file: Optional[str] = None,
                    merge_file: Optional[str] = None,
                    tokenizer_model: Optional[str] = None) -> Tokenizer:
    """The tokenizer named by ``--tokenizer-type`` with its ``--vocab-file`` /
    ``--merge-file`` / ``--tokenizer-model``; ``ConfigError`` names the flag at fault."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ConfigError(f"--tokenizer-type must be one of {sorted(TOKENIZER_TYPES)}, "
                          f"got {tokenizer_type!r}")
    canonical, needed = TOKENIZER_TYPES[tokenizer_type]
    given = {"vocab_file": vocab_file, "merge_file": merge_file,
             "tokenizer_model": tokenizer_model}
    given = {k: (os.fspath(v) if v is not None else None) for k, v in given.items()}
    _check_flags(tokenizer_type, needed, given)
    if canonical == "ByteTokenizer":
        return ByteTokenizer()
    if canonical == "GPT2BPETokenizer":
        from .gpt2_bpe import GPT2BPETokenizer

        return GPT2BPETokenizer(given["vocab_file"], given["merge_file"])
    from .library import HuggingFaceTokenizer, SentencePieceTokenizer

    cls = HuggingFaceTokenizer if canonical == "HuggingFaceTokenizer" else SentencePieceTokenizer
    return cls(given["tokenizer_model"])


def _copy(src: str, dst: str) -> None:
    if os.path.exists(dst) and os.path.samefile(src, dst):
        return
    shutil.copyfile(src, dst)


def save_tokenizer_files(tokenizer: Tokenizer, directory: str) -> str:
    """Copy the tokenizer's files into ``directory`` and write its descriptor (last, by atomic
    rename). Returns the descriptor's path."""
    if not tokenizer.tokenizer_type:
        raise ValueError(f"{type(tokenizer).__name__} has no tokenizer_type; cannot save it")
    os.makedirs(directory, exist_ok=True)
    names: dict[str, str] = {}
    for arg, src in tokenizer.file_args().items():
        name = os.path.basename(src)
        if name in names.values():
            name = f"{arg}_{name}"
        _copy(src, os.path.join(directory, name))
        names[arg] = name
    descriptor = {"format": DESCRIPTOR_FORMAT, "tokenizer_type": tokenizer.tokenizer_type,
                  "files": names, "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod}
    path = os.path.join(directory, DESCRIPTOR_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(descriptor, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)
    return path


def read_descriptor(directory: str) -> dict:
    """The descriptor written by ``save_tokenizer_files`` in ``directory``."""
    path = os.path.join(directory, DESCRIPTOR_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory!r} holds no {DESCRIPTOR_FILE} "
                                "(written by save_tokenizer_files)")
    with open(path, encoding="utf-8") as f:
        descriptor = json.load(f)
    if descriptor.get("format") != DESCRIPTOR_FORMAT:
        raise ValueError(f"{path}: unknown format {descriptor.get('format')!r}, "
                         f"expected {DESCRIPTOR_FORMAT!r}")
    return descriptor


def tokenizer_from_directory(directory: str) -> Tokenizer:
    """Rebuild the tokenizer saved by ``save_tokenizer_files``; checks its vocab size and eod."""
    descriptor = read_descriptor(directory)
    files = {arg: os.path.join(directory, name) for arg, name in descriptor["files"].items()}
    unknown = set(files) - set(FLAGS)
    if unknown:
        raise ValueError(f"{directory}: unknown tokenizer file arguments {sorted(unknown)}")
    tokenizer = build_tokenizer(descriptor["tokenizer_type"], **files)
    for key in ("vocab_size", "eod"):
        if key in descriptor and getattr(tokenizer, key) != descriptor[key]:
            raise ValueError(f"{directory}: rebuilt tokenizer has {key} "
                             f"{getattr(tokenizer, key)}, the descriptor says {descriptor[key]}")
    return tokenizer
