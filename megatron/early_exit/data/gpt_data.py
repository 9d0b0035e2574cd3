"""Train / valid / test GPT datasets from preprocessed corpora, through megatron-core.

    from megatron.early_exit.data.gpt_data import build_gpt_datasets
    run = RunConfig(data_path=["0.7", "data/a_text_document", "0.3", "data/b_text_document"],
                    split="98,2,0")
    train, valid, test = build_gpt_datasets(run, seq_length=512, seed=1234,
                                            tokenizer=tok, num_samples=(8000, 160, 0))
    train[0]   # {"tokens": int64 [s], "labels": int64 [s] (tokens shifted by one), "loss_mask"}

``--data-path`` takes prefixes written by ``tools/preprocess_data.py``, optionally weighted
(``W1 P1 W2 P2 ...``: blended in those proportions). ``--split`` divides each corpus's
documents into train / valid / test; a split whose weight is 0, or for which no samples are
asked, comes back as ``None``.
megatron-core's ``GPTDataset`` packs documents (each ending in eod, see ``--append-eod``) into
``seq_length + 1``-token windows in a seeded shuffled order and ``BlendedDataset`` mixes
corpora; their index files are cached in ``--data-cache-path`` (default ``.cache`` beside the
first corpus) and reused by later runs.

Distributed: with torch.distributed initialised, every rank must call this (rank 0 builds the
cache first, the others wait at a barrier and read it); ranks for which ``is_built_on_rank()``
is False get ``None`` datasets. Without it, a private one-process gloo group stands in for the
duration of the build (megatron-core's BlendedDataset asks for the rank unconditionally).
Tests: ``python -m pytest -q tests/unit/test_data_gpt.py``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional, Sequence

import torch

from megatron.early_exit.config import ConfigError

from .tokenizers import Tokenizer

PAD_ID = -1  # never a real token: nothing in the data is masked or rewritten as padding


class MegatronTokenizerAdapter:
    """What megatron-core's datasets read from a tokenizer (vocab_size, eod, eos, pad and
    ``unique_identifiers``, which goes into the cache key), wrapped around ours."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod
        self.eos = tokenizer.eos
        self.pad = PAD_ID
        self.unique_identifiers = {"class": type(tokenizer).__name__,
                                   "tokenizer_type": tokenizer.tokenizer_type,
                                   "vocab_size": self.vocab_size, "eod": self.eod}

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.tokenize(text)

    def detokenize(self, ids) -> str:
        return self.tokenizer.detokenize(ids)


class GPTSamples:
    """An indexable view of a megatron dataset whose items are ``{"tokens": int64 [s],
    "labels": int64 [s], "loss_mask": float32 [s]}``; ``.dataset`` is the megatron one."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[int(i)]
        return {"tokens": torch.as_tensor(item["tokens"], dtype=torch.long),
                "labels": torch.as_tensor(item["labels"], dtype=torch.long),
                "loss_mask": torch.as_tensor(item["loss_mask"], dtype=torch.float32)}


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def parse_data_path(data_path: Sequence[str]) -> tuple[list[str], Optional[list[float]]]:
    """``--data-path`` -> (prefixes, weights or None). Accepts ``P1 P2 ...`` or
    ``W1 P1 W2 P2 ...``; entries may themselves hold several space-separated items."""
    tokens = [t for entry in data_path or [] for t in str(entry).split()]
    if not tokens:
        raise ConfigError("--data-path is empty: give the prefix(es) written by "
                          "tools/preprocess_data.py, e.g. data/corpus_text_document")
    numeric = [_is_number(t) for t in tokens]
    if not any(numeric):
        return tokens, None
    if len(tokens) % 2 or numeric[0::2] != [True] * (len(tokens) // 2) or any(numeric[1::2]):
        raise ConfigError(f"--data-path must be `PREFIX ...` or `WEIGHT PREFIX WEIGHT PREFIX "
                          f"...`, got {' '.join(tokens)!r}")
    weights = [float(t) for t in tokens[0::2]]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"--data-path weights must be >= 0 with a positive sum, got {weights}")
    return tokens[1::2], weights


def _check_prefixes(prefixes: Sequence[str]) -> None:
    for prefix in prefixes:
        missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
        if missing:
            raise ConfigError(f"--data-path: {missing[0]!r} does not exist (write it with "
                              f"tools/preprocess_data.py)")


def _check_corpora(config, prefixes: Sequence[str], sizes: Sequence[Optional[int]]) -> None:
    """Every split that wants samples has documents; the first documents' ids fit the
    tokenizer (a cheap guard against data preprocessed with another tokenizer)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    vocab_size = config.tokenizer.vocab_size
    for prefix in prefixes:
        corpus = IndexedDataset(prefix)
        n = len(corpus.sequence_lengths)
        top = max((int(corpus[i].max()) for i in range(min(n, 4)) if len(corpus[i])), default=0)
        if top >= vocab_size:
            raise ConfigError(f"--data-path {prefix} holds id {top}, outside the vocabulary "
                              f"({vocab_size}) of --tokenizer-type "
                              f"{config.tokenizer.unique_identifiers['tokenizer_type']}: was it "
                              f"preprocessed with another tokenizer?")
        for name, bounds, size in zip(("train", "valid", "test"), config.split_matrix, sizes):
            if bounds is None or size == 0:
                continue
            if int(round(bounds[1] * n)) <= int(round(bounds[0] * n)):
                raise ConfigError(f"--split {config.split!r} leaves the {name} split no "
                                  f"documents of {prefix} ({n} in all): change --split, ask "
                                  f"for 0 {name} samples, or give more documents")


@contextlib.contextmanager
def _rank_available():
    """Make ``torch.distributed.get_rank()`` answer during the build (a private gloo world of
    one when none is initialised; destroyed afterwards)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def default_cache_path(prefixes: Sequence[str], data_cache_path: Optional[str]) -> str:
    """``--data-cache-path`` if given, else ``.cache`` in the first corpus's directory."""
    if data_cache_path:
        return data_cache_path
    return os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), ".cache")


def _split_string(split: str) -> str:
    return ",".join(p.strip() for p in split.replace("/", ",").split(","))


def build_gpt_datasets(run_cfg, seq_length: int, seed: int, tokenizer: Tokenizer,
                       num_samples: Sequence[Optional[int]],
                       is_built_on_rank: Optional[Callable[[], bool]] = None):
    """(train, valid, test) ``GPTSamples`` (or ``None``) over ``run_cfg.data_path``.

    ``num_samples``: samples wanted per split (``None``: one epoch; weighted blends need a
    number). ``run_cfg`` needs ``data_path``, ``split``, ``data_cache_path``.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes, weights = parse_data_path(run_cfg.data_path)
    sizes = list(num_samples)
    if len(sizes) != 3 or any(s is not None and (int(s) != s or s < 0) for s in sizes):
        raise ConfigError(f"num_samples must be three counts >= 0 (train, valid, test), "
                          f"got {num_samples}")
    if weights is not None and None in sizes:
        raise ConfigError("a weighted --data-path needs a sample count for every split")
    if seq_length < 1:
        raise ConfigError(f"--seq-length must be positive, got {seq_length}")
    _check_prefixes(prefixes)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights),
        split=_split_string(run_cfg.split),
        path_to_cache=default_cache_path(prefixes, run_cfg.data_cache_path),
        tokenizer=MegatronTokenizerAdapter(tokenizer), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
    _check_corpora(config, prefixes, sizes)
    # a split asked for no samples is not built (megatron would loop forever on an empty one)
    config.split_matrix = [None if n == 0 else b for b, n in zip(config.split_matrix, sizes)]
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank or (lambda: True),
                                            config)
    with _rank_available():
        datasets = builder.build()
    return tuple(None if ds is None else GPTSamples(ds) for ds in datasets)
