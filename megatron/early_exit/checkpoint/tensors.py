"""This rank's parameters and AdamW state as canonical-name shards, and their resharded reload.

A saved shard file maps canonical names (model/sharding.py) to this rank's TP slice, with the
``ShardSpec`` needed to put the full tensor back together. Copies of the tied word embedding on
later stages (``word_embeddings_copy``) are not saved: they equal the first stage's embedding,
and so does their optimizer state (they receive identical gradients), so on load they are filled
from ``embedding.word_embeddings.weight``.

    params = local_params(setup.chunks, swiglu)
    payload = model_payload(params, ctx)              # -> torch.save
    load_model_tensors(params, reader, ctx)          # reader: checkpoint/reader.py
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from megatron.early_exit.checkpoint.format import CheckpointError
from megatron.early_exit.model.sharding import ShardSpec, canonical_names, full_shape, shard_spec

COPY_NAME = "word_embeddings_copy"


@dataclass
class LocalParam:
    canon: str  # canonical, layout-independent name
    local_name: str  # name inside its chunk
    param: torch.nn.Parameter
    spec: ShardSpec

    @property
    def is_copy(self) -> bool:
        """A stage's copy of the tied embedding (saved once, by the first stage)."""
        return self.local_name == COPY_NAME


def local_params(chunks, swiglu: bool) -> List[LocalParam]:
    out = []
    for model in chunks:
        names = canonical_names(model)
        for local_name, param in model.named_parameters():
            out.append(LocalParam(names[local_name], local_name, param,
                                  shard_spec(local_name, param, swiglu)))
    return out


def spec_dict(spec: ShardSpec) -> dict:
    return {"dim": spec.dim, "chunks": spec.chunks}


def _header(ctx) -> dict:
    return {"tp_rank": ctx.tp_rank, "tp_size": ctx.tp_size, "pp_rank": ctx.pp_rank,
            "pp_size": ctx.pp_size}


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    # clone: never save a view (it would drag a whole flat buffer into the file)
    return t.detach().to("cpu", copy=True).contiguous()


def model_payload(params: List[LocalParam], ctx) -> dict:
    saved = [p for p in params if not p.is_copy]
    return dict(_header(ctx), tensors={p.canon: _cpu_copy(p.param) for p in saved},
                specs={p.canon: spec_dict(p.spec) for p in saved})


def tensor_index(params: List[LocalParam], ctx) -> Dict[str, dict]:
    """canonical name -> where it is saved (pp rank), full shape, dtype and spec."""
    return {p.canon: dict(spec_dict(p.spec), pp_rank=ctx.pp_rank, dtype=str(p.param.dtype),
                          shape=list(full_shape(p.param, p.spec, ctx.tp_size)))
            for p in params if not p.is_copy}


def full_param_states(optimizer, params) -> Dict[int, dict]:
    """id(param) -> its optimizer state with whole tensors. An optimizer that shards its state
    (trainer/megatron_optimizer.py) has a ``full_param_states`` method, collective over DP:
    every DP rank calls it with the same parameters; torch optimizers are read directly."""
    if hasattr(optimizer, "full_param_states"):
        return optimizer.full_param_states(params)
    return {id(p): optimizer.state[p] for p in params if p in optimizer.state}


def load_full_param_states(optimizer, states: Dict[int, dict]) -> None:
    """Replace the per-parameter state (id(param) -> entry with whole tensors); the param
    groups' hyperparameters stay this run's."""
    if hasattr(optimizer, "load_full_param_states"):
        optimizer.load_full_param_states(states)
        return
    order = [q for g in optimizer.param_groups for q in g["params"]]
    sd = optimizer.state_dict()
    sd["state"] = {i: states[id(q)] for i, q in enumerate(order) if id(q) in states}
    optimizer.load_state_dict(sd)  # casts to each parameter's dtype/device ('step' kept as is)


def saved_optimizer_states(params: List[LocalParam], optimizer) -> Dict[int, dict]:
    """Whole per-parameter states of the saved parameters (collective over DP for a sharded
    optimizer: every rank calls it, dp_rank 0 writes)."""
    return full_param_states(optimizer, [p.param for p in params if not p.is_copy])


def _plain(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def optimizer_payload(params: List[LocalParam], optimizer, ctx, states: Dict[int, dict]) -> dict:
    state = {}
    for p in params:
        if p.is_copy or id(p.param) not in states:
            continue
        entry = {}
        for key, value in states[id(p.param)].items():
            if torch.is_tensor(value):
                if value.dim() and value.shape != p.param.shape:
                    raise ValueError(f"optimizer state {key!r} of {p.canon} has shape "
                                     f"{tuple(value.shape)}, not the parameter's {tuple(p.param.shape)}")
                value = _cpu_copy(value)
            entry[key] = value
        state[p.canon] = entry
    # hyperparameters for reference (plain values only: megatron's groups carry objects too)
    groups = [{k: v for k, v in g.items() if k != "params" and _plain(v)} for g in optimizer.param_groups]
    return dict(_header(ctx), state=state, specs={p.canon: spec_dict(p.spec) for p in params
                                                  if not p.is_copy}, param_groups=groups)


# ------------------------------------------------------------------------------ loading
def _check_local_shape(p: LocalParam, local: torch.Tensor, what: str) -> None:
    if tuple(local.shape) != tuple(p.param.shape):
        raise CheckpointError(f"{what} of {p.canon}: resharded to {tuple(local.shape)}, this rank "
                              f"holds {tuple(p.param.shape)}")


@torch.no_grad()
def load_model_tensors(params: List[LocalParam], reader, ctx) -> None:
    """Copy in each local parameter's slice of the saved tensor (absent ones are skipped)."""
    for p in params:
        if reader.has(p.canon):
            local = reader.tensor(p.canon, p.spec, ctx)
            _check_local_shape(p, local, "parameter")
            p.param.copy_(local.to(p.param.dtype))


def load_optimizer_state(params: List[LocalParam], optimizer, reader, ctx) -> None:
    """Replace ``optimizer``'s per-parameter state by the resharded saved state.

    Only the per-parameter state (``step``, ``exp_avg``, ``exp_avg_sq``) is loaded; the param
    groups' hyperparameters stay this run's (its TrainConfig sets lr every iteration). The saved
    groups are kept in the optim files for reference."""
    states = {}
    for p in params:
        if not p.param.requires_grad or not reader.has_state(p.canon):  # copies: the embedding's
            continue
        entry = reader.state(p.canon, p.spec, ctx)
        for key, value in entry.items():
            if torch.is_tensor(value):
                if value.dim():
                    _check_local_shape(p, value, f"optimizer state {key!r}")
                entry[key] = value.clone()  # own memory, not the memory-mapped file
        states[id(p.param)] = entry
    load_full_param_states(optimizer, states)
