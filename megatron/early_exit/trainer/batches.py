"""Deterministic global batches from an indexable dataset, split by data-parallel rank.

Sample ``j`` of iteration ``it`` is dataset index ``(it * global_batch_size + j) % len(dataset)``
(megatron-core's GPTDataset is already shuffled and sized for the run). DP rank r takes a
contiguous slice of the global batch and cuts it into micro-batches. Because the batch is a pure
function of the iteration, a resumed run reads exactly the data it would have read.

Each dataset item is a dict with ``tokens``, ``labels``, ``loss_mask`` (each ``[s]``), the
format of megatron-core's GPTDataset.
"""

from __future__ import annotations

from typing import Dict, List

import torch


def microbatches_for_iteration(dataset, iteration: int, global_batch_size: int,
                               micro_batch_size: int, dp_rank: int, dp_size: int,
                               device: torch.device, start: int = None) -> List[Dict[str, torch.Tensor]]:
    per_rank = global_batch_size // dp_size
    start = (iteration * global_batch_size if start is None else start) + dp_rank * per_rank
    items = [dataset[(start + j) % len(dataset)] for j in range(per_rank)]
    out = []
    for k in range(0, per_rank, micro_batch_size):
        group = items[k:k + micro_batch_size]
        out.append({key: torch.stack([torch.as_tensor(it[key]) for it in group]).to(device)
                    for key in ("tokens", "labels", "loss_mask")})
    for mb in out:
        mb["tokens"] = mb["tokens"].long()
        mb["labels"] = mb["labels"].long()
        mb["loss_mask"] = mb["loss_mask"].float()
    return out


class TokenWindowDataset:
    """Fixed-length windows over one token stream, in a seeded random order.

    A small in-memory stand-in for GPTDataset (tests, demo); same item format.
    """

    def __init__(self, tokens: torch.Tensor, seq_length: int, seed: int = 0):
        self.tokens = torch.as_tensor(tokens, dtype=torch.long)
        self.seq_length = seq_length
        if len(self.tokens) < seq_length + 1:
            raise ValueError(f"corpus has {len(self.tokens)} tokens, fewer than --seq-length + 1")
        self.order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_length

    def __getitem__(self, i: int):
        i = int(self.order[i])
        window = self.tokens[i * self.seq_length: i * self.seq_length + self.seq_length + 1]
        return {"tokens": window[:-1], "labels": window[1:],
                "loss_mask": torch.ones(self.seq_length)}
