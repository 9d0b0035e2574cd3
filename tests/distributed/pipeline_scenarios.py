"""Shared pieces of the pipeline exactness tests: config, data, reference objective, gathering."""

import torch
import torch.distributed as dist

from tests.reference_model import reference_losses

SEQ, MBS, VOCAB = 8, 2, 32


def make_cfg(tp=1, pp=1, world=1, vpp_layers=None, exits=(1, 5), arch="llama", **exit_kwargs):
    from megatron.early_exit.config import EarlyExitGPTConfig, ExitConfig, ModelConfig, ParallelConfig

    model = ModelConfig(num_layers=8, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32,
                        vocab_size=VOCAB, seq_length=SEQ, architecture=arch)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              num_layers_per_virtual_pipeline_stage=vpp_layers, world_size=world)
    ex = ExitConfig(exit_layer_nums=list(exits), use_exit_norm=True, exit_layer_weight=[0.6, 0.9],
                    **exit_kwargs)
    return EarlyExitGPTConfig(model=model, exits=ex, parallel=parallel, params_dtype="float64", seed=5)


def microbatch(index):
    gen = torch.Generator().manual_seed(1000 + index)
    ids = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=gen)
    mask = (torch.rand(MBS, SEQ, generator=gen) > 0.2).double()
    return {"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": mask}


def gather_grads(chunks, ctx, swiglu, grads=True):
    from megatron.early_exit.model.sharding import gathered_tensors

    mine = gathered_tensors(chunks, ctx.tp_group, swiglu, grads=grads)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    merged = {}
    for part in everyone:
        merged.update(part)
    return merged


def reference_objective(sd, cfg, full, partials=(), partial_exits=(), num_micro=None):
    """(1/M) [sum_m L_m + sum_k sum_{e in partial_exits[k]} w_e l_e(P_k)], M = len(full)."""
    m = num_micro or len(full)
    total, finals, exits = 0.0, 0.0, {}
    for mb in full:
        t, ex, fin = reference_losses(sd, cfg, mb["tokens"], mb["labels"], mb["loss_mask"])
        total = total + t / m
        finals = finals + fin.item() / m
        for k, v in ex.items():
            exits[k] = exits.get(k, 0.0) + v.item() / m
    for mb, layers in zip(partials, partial_exits):
        _, ex, _ = reference_losses(sd, cfg, mb["tokens"], mb["labels"], mb["loss_mask"])
        for layer in layers:
            k = cfg.exits.exit_layer_nums.index(layer)
            total = total + cfg.exits.exit_layer_weight[k] * ex[layer] / m
    return total, finals, exits


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()
