"""Teacher-forced passes over a text file: what calibration and classifier fitting read.

Early-exit decoding keeps the KV cache exact (pending tokens are recomputed), so for a given
prefix every exit sees the hidden state a plain teacher-forced forward computes. Tools that study
exits offline (tools/calibrate_threshold.py, tools/fit_exit_classifier.py) therefore run one
forward per window of a document and read every head at every position:

    docs = read_documents("heldout.jsonl", "text", limit=256)
    for out, targets in forward_windows(model, tokenizer, docs, window=128, max_tokens=20000,
                                        exit_states=True):
        out.final_logits      # [s, 1, V_padded]; out.exit_logits[k], out.exit_states[k] [s, 1, h]

Bad input raises ValueError naming the flag (``--data``, ``--text-key``), which the tools' run_cli
prints as one line.
"""

from __future__ import annotations

import json
from typing import Iterator, List, Tuple

import torch

__all__ = ["load_exit_model", "read_documents", "forward_windows"]


def load_exit_model(load_dir: str, iteration=None):
    """(model, cfg, tokenizer) of a checkpoint with exits and a tokenizer, on CPU, one process;
    ValueError naming ``--load`` otherwise."""
    from megatron.early_exit.checkpoint import CheckpointError
    from megatron.early_exit.inference.loading import load_for_inference

    try:
        model, cfg, tokenizer = load_for_inference(load_dir, torch.device("cpu"), iteration)
    except CheckpointError as e:
        raise ValueError(f"--load: {e}") from e
    if not cfg.exits.exit_layer_nums:
        raise ValueError("--load: the checkpoint has no exits (tools/checkpoint/add_exits.py)")
    if tokenizer is None:
        raise ValueError("--load: the checkpoint carries no tokenizer to read --data with")
    return model, cfg, tokenizer


def read_documents(path: str, key: str, limit: int) -> List[str]:
    """The ``key`` strings of the first ``limit`` JSON lines of ``path``."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"--data: {path}:{n} is not JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get(key), str):
                raise ValueError(f"--text-key: {path}:{n} has no string field {key!r}")
            docs.append(record[key])
            if len(docs) >= limit:
                break
    if not docs:
        raise ValueError(f"--data: {path} holds no documents")
    return docs


def forward_windows(model, tokenizer, docs, window: int, max_tokens: int,
                    exit_states: bool = False) -> Iterator[Tuple[object, torch.Tensor]]:
    """(StageOutput with logits of every head, next-token targets [s]) per window of ``window``
    tokens, until ``max_tokens`` positions were yielded. Needs a whole model (PP = 1)."""
    seen = 0
    for text in docs:
        ids = tokenizer.tokenize(text)
        for start in range(0, max(len(ids) - 1, 0), window):
            chunk = ids[start:start + window + 1]
            if len(chunk) < 2 or seen >= max_tokens:
                continue
            x = torch.tensor([chunk[:-1]])  # [1, s]
            with torch.no_grad():
                out = model(input_ids=x, return_logits=True, return_exit_states=exit_states)
            seen += len(chunk) - 1
            yield out, torch.tensor(chunk[1:])
    if seen == 0:
        raise ValueError("--data: no document has two tokens or more")
