"""Static, preallocated key/value cache for the early-exit engines (gpt-fast style).

One buffer pair per attention module (every decoder layer's core attention and, with
``--use-exit-block``, every exit block's), allocated once for ``batch`` rows and ``max_len``
positions. The cache is indexed by each row's *true* token positions: a row is never padded
inside the cache, so batching rows of different lengths changes no position id and no key.

Layers are filled to different depths when tokens exit early, so fill lengths are kept per
module *and* per row (``lengths [n_modules, batch]``). A module's fill is always a prefix
``[0, lengths)`` of the row's positions; a pass writes the in-flight positions
``[start, end)`` of each row with ``start == lengths`` (checked when ``check`` is on).

How a pass is described: a :class:`PassLayout` says which rows take part and which positions
each row carries. In-flight tensors are *end-aligned* (left-padded): slot ``j`` of row ``r``
in an ``[s, b_a, ...]`` tensor holds position ``end_r - s + j``; slots before ``start_r`` are
padding. Padding writes go to a scratch slot (index ``max_len``) that is never read, and a
padded query attends to position ``start_r`` only, so it stays finite.

The cache plugs into ``SDPAttention.kv_hook``: ``attach()`` installs :meth:`KVCache.hook` on
the modules for the duration of a ``with`` block and removes it afterwards (training is never
affected). Usage::

    cache = KVCache(modules, batch=2, max_len=64, num_groups=2, head_dim=8,
                    dtype=torch.float32, device=dev)
    with cache.attach():
        cache.layout = make_layout([0, 1], starts=[0, 0], ends=[5, 3], max_len=64, device=dev)
        model.run_layer(0, hidden, rotary)        # writes positions 0..4 / 0..2
    cache.truncate([1], [2])                        # speculative rollback of row 1
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["PassLayout", "make_layout", "KVCache"]


@dataclass
class PassLayout:
    """The rows and positions one pass carries through a layer (end-aligned)."""

    rows: torch.Tensor  # [b_a] int64 cache rows
    rows_list: List[int]
    starts: List[int]  # first in-flight position per row
    ends: List[int]  # one past the newest position per row
    s: int  # slots per row = max(end - start)
    pos: torch.Tensor  # [s, b_a] position of each slot (padding repeats the row's start)
    valid: torch.Tensor  # [s, b_a] bool, False on padding
    write_idx: torch.Tensor  # [s, b_a] cache slot to write (scratch for padding)
    mask: torch.Tensor  # [b_a, 1, s, S] True = attend, S = max(ends)
    start_t: torch.Tensor  # [b_a]
    end_t: torch.Tensor  # [b_a]
    full_batch: bool  # rows == arange(batch): the cache is read without a gather
    rotary: Optional[torch.Tensor] = None  # filled in by the engine for rope models

    @property
    def key_len(self) -> int:
        return self.mask.shape[-1]

    @property
    def counts(self) -> List[int]:
        return [e - s for s, e in zip(self.starts, self.ends)]


def make_layout(rows: Sequence[int], starts: Sequence[int], ends: Sequence[int], max_len: int,
                device: torch.device, batch: Optional[int] = None) -> PassLayout:
    """Layout for rows carrying positions ``[starts[i], ends[i])`` (each range non-empty)."""
    rows, starts, ends = list(rows), list(starts), list(ends)
    assert rows and all(0 <= a < b <= max_len for a, b in zip(starts, ends)), (starts, ends)
    s = max(b - a for a, b in zip(starts, ends))
    start_t = torch.tensor(starts, dtype=torch.int64, device=device)  # [b_a]
    end_t = torch.tensor(ends, dtype=torch.int64, device=device)  # [b_a]
    raw = end_t[None, :] - s + torch.arange(s, device=device)[:, None]  # [s, b_a]
    valid = raw >= start_t[None, :]
    pos = torch.maximum(raw, start_t[None, :])  # padding -> the row's first position
    write_idx = torch.where(valid, pos, torch.full_like(pos, max_len))
    key_pos = torch.arange(max(ends), device=device)  # [S]
    mask = key_pos[None, None, :] <= pos.t()[:, :, None]  # [b_a, s, S]
    full = batch is not None and rows == list(range(batch))
    return PassLayout(
        rows=torch.tensor(rows, dtype=torch.int64, device=device), rows_list=rows,
        starts=starts, ends=ends, s=s, pos=pos, valid=valid, write_idx=write_idx,
        mask=mask[:, None], start_t=start_t, end_t=end_t, full_batch=full)


class KVCache:
    """Per-module, per-row KV buffers ``[max_len + 1, batch, ng, hn]`` (last slot: scratch)."""

    def __init__(self, modules: Sequence[torch.nn.Module], batch: int, max_len: int,
                 num_groups: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.modules = list(modules)
        self.index = {id(m): i for i, m in enumerate(self.modules)}
        self.batch, self.max_len, self.device = batch, max_len, device
        shape = (len(self.modules), max_len + 1, batch, num_groups, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(len(self.modules), batch, dtype=torch.int64, device=device)
        self.layout: Optional[PassLayout] = None
        self.check = False  # verify start == lengths at every write (syncs; for tests)

    def fits(self, modules: Sequence[torch.nn.Module], batch: int, max_len: int,
             num_groups: int, head_dim: int, dtype: torch.dtype) -> bool:
        """Whether this cache can serve a request of this shape (so it can be reused)."""
        return ([id(m) for m in modules] == [id(m) for m in self.modules]
                and batch == self.batch and max_len <= self.max_len
                and self.k.shape[3:] == (num_groups, head_dim) and self.k.dtype == dtype)

    def reset(self) -> None:
        """Forget every row (buffers are not cleared: reads are masked by position)."""
        self.lengths.zero_()
        self.layout = None

    def hook(self, module: torch.nn.Module, key: torch.Tensor,
             value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SDPAttention.kv_hook: store key/value [s, b_a, ng, hn] of the in-flight slots and
        return all keys/values [S, b_a, ng, hn] of the rows with the attention mask."""
        lay = self.layout
        i = self.index[id(module)]
        kc, vc = self.k[i], self.v[i]  # [max_len + 1, B, ng, hn]
        if self.check:
            have = self.lengths[i].index_select(0, lay.rows)
            assert torch.equal(have, lay.start_t), (
                f"cache module {i}: rows {lay.rows_list} hold {have.tolist()} positions, "
                f"pass starts at {lay.starts}")
        cols = lay.rows[None, :].expand_as(lay.write_idx)  # [s, b_a]
        kc[lay.write_idx, cols] = key.to(kc.dtype)
        vc[lay.write_idx, cols] = value.to(vc.dtype)
        self.lengths[i].index_copy_(0, lay.rows, lay.end_t)
        S = lay.key_len
        if lay.full_batch:
            return kc[:S], vc[:S], lay.mask
        return kc[:S].index_select(1, lay.rows), vc[:S].index_select(1, lay.rows), lay.mask

    def truncate(self, rows: Sequence[int], lengths: Sequence[int]) -> None:
        """Roll rows back: every module keeps at most ``lengths[i]`` positions of ``rows[i]``."""
        r = torch.tensor(list(rows), dtype=torch.int64, device=self.device)
        n = torch.tensor(list(lengths), dtype=torch.int64, device=self.device)
        cur = self.lengths.index_select(1, r)  # [n_modules, len(rows)]
        self.lengths.index_copy_(1, r, torch.minimum(cur, n[None, :]))

    def module_kv(self, module: torch.nn.Module, row: int,
                  n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [n, ng, hn] of positions [0, n) of ``row`` in ``module``."""
        i = self.index[id(module)]
        return self.k[i, :n, row], self.v[i, :n, row]

    @contextlib.contextmanager
    def attach(self):
        """Install the hook on every module for the duration of the block."""
        previous = [m.kv_hook for m in self.modules]
        for m in self.modules:
            m.kv_hook = self.hook
        try:
            yield self
        finally:
            for m, old in zip(self.modules, previous):
                m.kv_hook = old
            self.layout = None
