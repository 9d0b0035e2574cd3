"""Our EarlyExitGPTModel (TP=PP=1, float64) against the plain-PyTorch reference in the test suite.

Each case builds the model, reads its full canonical state dict, and checks the total loss,
every exit's loss and the final LM loss against tests/reference_model.py to 1e-6, plus
logits and one parameter gradient.
"""

import pytest
import torch

from megatron.early_exit.config import EarlyExitGPTConfig, ExitConfig, ModelConfig
from megatron.early_exit.model.sharding import gathered_tensors
from tests.reference_model import reference_logits, reference_losses

CASES = {
    "llama-plain": dict(arch="llama", exits=dict(exit_layer_nums=[1, 2])),
    "llama-norm-mlp": dict(arch="llama", exits=dict(exit_layer_nums=[2, 3], use_exit_norm=True,
                                                    use_exit_mlp=True)),
    "llama-block-untied": dict(arch="llama", exits=dict(exit_layer_nums=[1, 3], use_exit_block=True,
                                                        use_exit_norm=True, untie_exit_output_weights=True)),
    "gpt2-pre-exit-temp": dict(arch="gpt2", exits=dict(exit_layer_nums=[1, 2, 4], pre_exit=True,
                                                       use_exit_norm=True, exit_layer_temperature=[2.0, 0.5, 1.5])),
    "gpt2-dynamic-all": dict(arch="gpt2", exits=dict(exit_layer_nums=[2, 3], use_exit_block=True,
                                                     use_exit_mlp=True, use_exit_norm=True,
                                                     use_dynamic_exit_layer_weight=True,
                                                     exit_layer_weight=[0.3, 0.7], final_layer_weight=0.5)),
}


def make_cfg(arch, exits, recompute=None):
    model = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=48, vocab_size=48, seq_length=12, architecture=arch)
    return EarlyExitGPTConfig(model=model, exits=ExitConfig(**exits), params_dtype="float64", seed=7,
                              recompute_granularity=recompute)


@pytest.mark.parametrize("name, recompute", [(n, None) for n in sorted(CASES)]
                         + [("llama-block-untied", "full"), ("gpt2-pre-exit-temp", "full"),
                            ("llama-norm-mlp", "selective")])
def test_losses_match_reference(name, recompute, single_rank_parallel):
    """Also with activation recompute: exits between recomputed layers keep their gradients."""
    case = CASES[name]
    cfg = make_cfg(case["arch"], case["exits"], recompute)
    from megatron.early_exit.parallel.state import build_model, initialize_parallel

    ctx = initialize_parallel(cfg, torch.device("cpu"))
    (model,) = build_model(cfg, ctx)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 48, (3, 12), generator=gen)
    labels = torch.randint(0, 48, (3, 12), generator=gen)
    mask = (torch.rand(3, 12, generator=gen) > 0.3).double()
    weights = [0.25 * (k + 1) for k in range(len(cfg.exits.exit_layer_nums))]

    out = model(input_ids=ids, labels=labels, loss_mask=mask, exit_weights=weights, return_logits=True)
    out.loss.backward()

    sd = {k: v.clone().requires_grad_(True) for k, v in gathered_tensors([model], ctx.tp_group, cfg.model.swiglu).items()}
    ref_total, ref_exits, ref_final = reference_losses(sd, cfg, ids, labels, mask, weights)
    ref_total.backward()

    torch.testing.assert_close(out.loss, ref_total.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.final_loss, ref_final.detach(), rtol=1e-6, atol=0)
    assert sorted(out.exit_losses) == cfg.exits.exit_layer_nums
    for layer, loss in out.exit_losses.items():
        torch.testing.assert_close(loss, ref_exits[layer].detach(), rtol=1e-6, atol=0)
    ref_exit_logits, ref_final_logits = reference_logits(sd, cfg, ids)
    torch.testing.assert_close(out.final_logits.transpose(0, 1), ref_final_logits.detach(), rtol=1e-6, atol=1e-9)
    for layer, logits in out.exit_logits.items():
        torch.testing.assert_close(logits.transpose(0, 1), ref_exit_logits[layer].detach(), rtol=1e-6, atol=1e-9)
    grads = gathered_tensors([model], ctx.tp_group, cfg.model.swiglu, grads=True)
    assert set(grads) == set(sd), "every parameter of the model must receive a gradient"
    for key, ref in sd.items():
        torch.testing.assert_close(grads[key], ref.grad, rtol=1e-6, atol=1e-10, msg=key)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_explicit_position_ids_match_default_and_matter(arch, single_rank_parallel):
    cfg = make_cfg(arch, dict(exit_layer_nums=[1]))
    from megatron.early_exit.parallel.state import build_model, initialize_parallel

    ctx = initialize_parallel(cfg, torch.device("cpu"))
    (model,) = build_model(cfg, ctx)
    ids = torch.randint(0, 48, (2, 12), generator=torch.Generator().manual_seed(1))
    default = model(input_ids=ids, return_logits=True).final_logits
    pos = torch.arange(12)[None, :].expand(2, 12)
    same = model(input_ids=ids, position_ids=pos, return_logits=True).final_logits
    # row 1 repeats position 0 (changes relative distances; RoPE ignores a constant shift)
    other = torch.stack([torch.arange(12), torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(11)])])
    changed = model(input_ids=ids, position_ids=other, return_logits=True).final_logits  # [s, b, V]
    torch.testing.assert_close(same, default, rtol=0, atol=0)
    torch.testing.assert_close(changed[:, 0], default[:, 0], rtol=0, atol=0)  # row 0 unchanged
    assert not torch.allclose(changed[2:, 1], default[2:, 1])
