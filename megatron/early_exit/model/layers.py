"""Building blocks for the early-exit GPT: norms, SDPA core attention, RoPE, the layer spec.

Everything here plugs into megatron-core's ``TransformerLayer`` through a ``ModuleSpec``:

- ``Norm``: LayerNorm / RMSNorm that works under sequence parallelism (megatron-core's
  ``WrappedTorchNorm`` refuses it). Its parameters carry ``sequence_parallel`` so their
  gradients are all-reduced over the tensor-parallel group (see parallel/grads.py).
- ``SDPAttention``: core attention on ``torch.nn.functional.scaled_dot_product_attention``
  (causal, GQA, CPU and CUDA). At inference an engine may attach ``kv_hook`` to it, which then
  owns the key/value cache for this layer (see inference/kv_cache.py).
- ``rotary_freqs``: RoPE angles in megatron-core's layout ``[s, 1, 1, d]`` for given positions,
  computed on the requested device (megatron-core's RotaryEmbedding calls torch.cuda).
- ``layer_spec`` / ``transformer_config``: our spec and megatron-core TransformerConfig.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core import tensor_parallel
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron.early_exit.config import EarlyExitGPTConfig

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


class Norm(torch.nn.Module):
    """LayerNorm or RMSNorm (``config.normalization``) that supports sequence parallelism."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = None
        if not self.rms:
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for p in self.parameters():
            # Replicated across TP; under SP each rank sees a slice of the sequence, so the
            # gradient is a partial sum that must be all-reduced over the TP group.
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [s, b, h] -> [s, b, h]
        if self.rms:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class SDPAttention(MegatronModule):
    """Causal (GQA) core attention on ``scaled_dot_product_attention``.

    Inputs follow megatron-core: query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` with
    per-partition head counts; output ``[sq, b, np * hn]``.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type=None,
                 attention_type: str = "self", softmax_scale: Optional[float] = None, **_unused):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        self.checkpoint = getattr(config, "early_exit_selective_recompute", False)
        self.kv_hook = None  # set by the inference engine: (q, k, v) -> k_all, v_all, mask

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if self.checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._attend, query, key, value,
                                                     use_reentrant=False)
        return self._attend(query, key, value)

    def _attend(self, query, key, value):
        sq, b, np_, hn = query.shape
        mask, causal = None, True
        if self.kv_hook is not None:
            key, value, mask = self.kv_hook(self, key, value)
            causal = False
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
        v = value.permute(1, 2, 0, 3)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and sq > 1, scale=self.softmax_scale,
            enable_gqa=k.shape[1] != np_)
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)  # [sq, b, np*hn]


def rotary_freqs(positions: torch.Tensor, head_dim: int, base: float,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RoPE angles as megatron-core expects them: positions ``[s]`` -> ``[s, 1, 1, hn]``, or
    per-row positions ``[s, b]`` -> ``[s, b, 1, hn]`` (broadcast over heads).

    Uses the non-interleaved (rotate-half) convention, the same as HF Llama.
    """
    device = positions.device
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    angles = positions.to(torch.float64)[..., None] * inv_freq  # [s, (b,) hn/2]
    emb = torch.cat([angles, angles], dim=-1).to(dtype)  # [s, (b,) hn]
    return emb[:, None, None, :] if positions.dim() == 1 else emb[:, :, None, :]


def layer_spec(config: EarlyExitGPTConfig) -> ModuleSpec:
    """A megatron-core TransformerLayer spec with our norm and SDPA core attention."""
    norm = ModuleSpec(module=Norm)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=tensor_parallel.ColumnParallelLinear,
                    core_attention=SDPAttention,
                    linear_proj=tensor_parallel.RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp_spec(),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def mlp_spec() -> ModuleSpec:
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(
        linear_fc1=tensor_parallel.ColumnParallelLinear,
        linear_fc2=tensor_parallel.RowParallelLinear))


def transformer_config(cfg: EarlyExitGPTConfig) -> TransformerConfig:
    """megatron-core TransformerConfig for our model (dropout off, no fused kernels)."""
    m, p = cfg.model, cfg.parallel
    dtype = DTYPES[cfg.params_dtype]
    chunks = p.virtual_chunks(m)
    tc = TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=m.swiglu,
        activation_func=F.silu if m.swiglu else F.gelu,
        add_bias_linear=m.add_bias_linear,
        add_qkv_bias=m.add_qkv_bias,
        init_method_std=m.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=chunks if chunks > 1 else None,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )
    # Selective recompute is done inside SDPAttention with torch.utils.checkpoint (megatron's
    # own path needs the CUDA RNG tracker); full recompute is done by the model's layer loop.
    tc.early_exit_selective_recompute = cfg.recompute_granularity == "selective"
    return tc
