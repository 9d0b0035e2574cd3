"""``ShardReader``: tensors of one checkpoint directory, read from its saved TP shards.

Files are opened lazily, memory-mapped, and sha256-checked against the manifest before first
use. A tensor is asked for either whole (``tensor(name)``: the saved shards ``unshard``-ed) or
as one rank's slice (``tensor(name, spec, ctx)``). When the loading TP size and split equal the
saving ones, the slice is read straight from that rank's own file, so an unchanged layout reads
(and hashes) only its own shards; otherwise the full tensor is assembled and re-``shard``-ed.

    reader = ShardReader(iter_dir, metadata)
    full = reader.tensor("decoder.layers.0.mlp.linear_fc1.weight")
    mine = reader.tensor(name, spec, ctx)          # ctx: tp_rank, tp_size
    adam = reader.state(name, spec, ctx)           # {"step", "exp_avg", "exp_avg_sq"}
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch

from megatron.early_exit.checkpoint import format as fmt
from megatron.early_exit.model.sharding import ShardSpec, shard, unshard


class ShardReader:
    def __init__(self, dir_path: str, meta: dict):
        self.dir, self.meta = dir_path, meta
        self.index: Dict[str, dict] = meta["tensors"]
        self.tp = meta["layout"]["tensor_model_parallel_size"]
        self._files: Dict[str, dict] = {}

    def open(self, rel: str) -> dict:
        if rel not in self._files:
            path = fmt.check_file(self.dir, rel, self.meta["files"], hash_it=True)
            try:
                self._files[rel] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise fmt.CheckpointError(f"cannot read checkpoint file {path}: {e}") from e
        return self._files[rel]

    def has(self, name: str) -> bool:
        return name in self.index

    def saved_spec(self, name: str) -> ShardSpec:
        entry = self.index[name]
        return ShardSpec(entry["dim"], entry["chunks"])

    def _direct(self, name: str, spec: Optional[ShardSpec], ctx) -> bool:
        """Whether this rank's slice is exactly what saved TP rank ``ctx.tp_rank`` wrote."""
        return ctx is not None and self.tp == ctx.tp_size and self.saved_spec(name) == spec

    def _ranks(self, name: str, spec, ctx) -> List[int]:
        if self._direct(name, spec, ctx):
            return [ctx.tp_rank]
        return list(range(self.tp)) if self.saved_spec(name).dim is not None else [0]

    def _parts(self, name: str, file_name, key: str, ranks: List[int]) -> list:
        parts = []
        for t in ranks:
            rel = file_name(t, self.index[name]["pp_rank"])
            table = self.open(rel)[key]
            if name not in table:
                raise fmt.CheckpointError(f"{os.path.join(self.dir, rel)} lacks {name} ({key})")
            parts.append(table[name])
        return parts

    def _combine(self, name: str, parts: list, spec, ctx) -> torch.Tensor:
        if self._direct(name, spec, ctx):
            return parts[0]
        full = unshard(parts, self.saved_spec(name))
        return full if ctx is None else shard(full, spec, ctx.tp_rank, ctx.tp_size)

    def prefetch(self, wanted, optimizer: bool, ctx) -> None:
        """Open (so verify) every file that ``wanted`` (name, spec) pairs need, up front."""
        kinds = (fmt.model_file, fmt.optim_file) if optimizer else (fmt.model_file,)
        for name, spec in wanted:
            if self.has(name):
                for t in self._ranks(name, spec, ctx):
                    for kind in kinds:
                        self.open(kind(t, self.index[name]["pp_rank"]))

    def tensor(self, name: str, spec: Optional[ShardSpec] = None, ctx=None) -> torch.Tensor:
        """The full tensor ``name``, or (given this rank's spec and ctx) this rank's slice."""
        parts = self._parts(name, fmt.model_file, "tensors", self._ranks(name, spec, ctx))
        return self._combine(name, parts, spec, ctx)

    def has_state(self, name: str) -> bool:
        if not self.has(name):
            return False
        rel = fmt.optim_file(self._ranks(name, None, None)[0], self.index[name]["pp_rank"])
        return name in self.open(rel)["state"]

    def state(self, name: str, spec: Optional[ShardSpec] = None, ctx=None) -> dict:
        """Optimizer state of ``name``: per-element tensors full, or this rank's slices."""
        parts = self._parts(name, fmt.optim_file, "state", self._ranks(name, spec, ctx))
        out = {}
        for key, value in parts[0].items():
            if torch.is_tensor(value) and value.dim():
                value = self._combine(name, [p[key] for p in parts], spec, ctx)
            out[key] = value
        return out
