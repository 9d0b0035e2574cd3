"""HF import at TP=2 and at PP=2: logits equal transformers' own model (float32, 1e-5).

A tiny random Llama (GQA, untied) and Qwen2 (QKV bias, tied) are saved with save_pretrained
and imported at TP=2 and at PP=2 (checkpoint files sharded by the import); in one 2-rank
spawn each layout is built, every rank reads its own slices from those files, runs the
forward (TP: logits gathered over the vocabulary; PP: stage 0 sends its hidden states to
stage 1) and returns the logits, which must equal transformers' logits computed here.

Run: ``OMP_NUM_THREADS=1 python -m pytest -q tests/distributed/test_convert_hf_parallel.py``.
"""

import dataclasses

import torch
import torch.distributed as dist

from tests.distributed_harness import run_distributed
from tests.unit.test_convert_hf import IDS, tiny_hf


def _load_local(ckpt, tp, pp, world):
    """This rank's model chunk, weights read from its own slices of the checkpoint files."""
    from megatron.early_exit.checkpoint.load import config_from_dict, open_checkpoint
    from megatron.early_exit.checkpoint.tensors import local_params
    from megatron.early_exit.config import ParallelConfig
    from megatron.early_exit.parallel.state import build_model, initialize_parallel

    _, meta, reader = open_checkpoint(ckpt)
    cfg = config_from_dict(meta["config"])
    cfg = dataclasses.replace(cfg, parallel=ParallelConfig(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, world_size=world))
    ctx = initialize_parallel(cfg, torch.device("cpu"))
    chunks = build_model(cfg, ctx)
    with torch.no_grad():
        for p in local_params(chunks, cfg.model.swiglu):
            p.param.copy_(reader.tensor(p.canon, p.spec, ctx))  # copies: the embedding's name
    return chunks[0].eval(), ctx


def _scenario(rank, world, ckpts):
    from megatron.early_exit.model.sharding import ShardSpec, gather

    out = {}
    for name, (tp2, pp2) in ckpts.items():
        model, ctx = _load_local(tp2, 2, 1, world)
        with torch.no_grad():
            logits = model(input_ids=IDS, return_logits=True).final_logits  # [s, b, V/2]
        out[(name, "tp2")] = gather(logits, ShardSpec(2), ctx.tp_group).transpose(0, 1)
        model, ctx = _load_local(pp2, 1, 2, world)
        with torch.no_grad():
            if ctx.pp_rank == 0:
                dist.send(model(input_ids=IDS).hidden.contiguous(), dst=ctx.next_rank)
            else:
                hidden = torch.empty(IDS.shape[1], IDS.shape[0], model.cfg.model.hidden_size)
                dist.recv(hidden, src=ctx.prev_rank)
                logits = model(hidden_states=hidden, return_logits=True).final_logits
                out[(name, "pp2")] = logits.transpose(0, 1)
    return out


def test_hf_import_at_tp2_and_pp2_matches_transformers(tmp_path):
    from megatron.early_exit.checkpoint.hf import import_hf

    ckpts, want = {}, {}
    for name, kind, tied in (("llama", "llama", False), ("qwen2", "qwen2", True)):
        model = tiny_hf(kind, tied)
        model.save_pretrained(str(tmp_path / name))
        with torch.no_grad():
            want[name] = model(IDS).logits
        ckpts[name] = tuple(str(tmp_path / f"{name}_{lay}") for lay in ("tp2", "pp2"))
        import_hf(str(tmp_path / name), ckpts[name][0], tp=2)
        import_hf(str(tmp_path / name), ckpts[name][1], pp=2)
    results = run_distributed(_scenario, 2, ckpts)
    for name in ckpts:
        for rank in (0, 1):
            err = (results[rank][(name, "tp2")] - want[name]).abs().max().item()
            assert err < 1e-5, (name, "tp2", rank, err)
        err = (results[1][(name, "pp2")] - want[name]).abs().max().item()
        assert err < 1e-5, (name, "pp2", err)
