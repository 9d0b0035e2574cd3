"""An exit head: hidden states after (or before) a backbone layer -> vocab-parallel logits.

Structure, composable by flags (docs/design.md), applied in this order:

    h = x                                   # [s, b, h] (sequence-split under SP)
    if --use-exit-block: h = block(h)       # a whole transformer layer with its own KV cache
    if --use-exit-mlp:   h = h + mlp(h)     # a residual MLP branch
    if --use-exit-norm:  h = norm(h)
    logits = h @ W_out^T                    # [s, b, V/tp]

``W_out`` is the word embedding (tied, default) or the head's own ``output_layer.weight``
(``--untie-exit-output-weights``). Temperature is applied by the loss, not here.

With ``--use-exit-classifier`` the head also carries a *confidence classifier* (as CALM trains
one): ``score(h) = sigmoid(h . w + b)`` on the same ``h`` the projection reads, an estimate of
the probability that this exit's argmax equals the full model's. It costs ``hidden`` multiply-adds
instead of the projection's ``hidden x vocab``, so inference can decide to exit (confidence kind
``classifier``) before paying for the logits. Its parameters are frozen (``requires_grad``
False): no training loss reaches them; tools/fit_exit_classifier.py fits them on a tuned model.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron.early_exit.config import ExitConfig
from megatron.early_exit.model.layers import Norm, layer_spec, mlp_spec


class ExitHead(MegatronModule):
    """Exit head after layer ``layer_number`` (1-based, global)."""

    def __init__(self, config: TransformerConfig, exits: ExitConfig, layer_number: int,
                 vocab_size: int, full_config):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.tied = not exits.untie_exit_output_weights
        self.block = None
        self.mlp = None
        self.norm = None
        if exits.use_exit_block:
            spec = layer_spec(full_config)
            # megatron adds the stage offset to layer_number; the value only labels the layer.
            self.block = build_module(spec, config=config, layer_number=1)
        if exits.use_exit_mlp:
            self.mlp = build_module(mlp_spec(), config=config)
        if exits.use_exit_norm:
            self.norm = Norm(config, config.hidden_size, eps=config.layernorm_epsilon)
        self.classifier = None
        if exits.use_exit_classifier:  # replicated over TP: every rank scores the same h
            self.classifier = torch.nn.Linear(config.hidden_size, 1, dtype=config.params_dtype)
            self.classifier.requires_grad_(False)
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, vocab_size, config=config, init_method=config.init_method,
            bias=False, skip_bias_add=False, gather_output=False,
            skip_weight_param_allocation=self.tied, tp_group=parallel_state.get_tensor_model_parallel_group())

    def transform(self, hidden: torch.Tensor, rotary: Optional[torch.Tensor]) -> torch.Tensor:
        """Everything before the output projection. [s, b, h] -> [s, b, h]."""
        h = hidden
        if self.block is not None:
            h, _ = self.block(h, attention_mask=None, rotary_pos_emb=rotary)
        if self.mlp is not None:
            out, bias = self.mlp(h)
            h = h + out if bias is None else h + out + bias
        if self.norm is not None:
            h = self.norm(h)
        return h

    def score(self, h: torch.Tensor) -> torch.Tensor:
        """Classifier confidence of ``h`` [..., h] -> [...] in (0, 1), in float32 or wider."""
        if self.classifier is None:
            raise ValueError(f"exit {self.layer_number} has no confidence classifier "
                             "(tools/fit_exit_classifier.py fits one)")
        z = self.classifier(h).squeeze(-1)
        return torch.sigmoid(z.to(torch.promote_types(z.dtype, torch.float32)))

    def project(self, h: torch.Tensor, tied_weight: Optional[torch.Tensor]) -> torch.Tensor:
        """``h`` [..., h] (after ``transform``) -> logits [..., V/tp]."""
        logits, _ = self.output_layer(h, weight=tied_weight if self.tied else None)
        return logits

    def projection_weight(self, tied_weight: Optional[torch.Tensor]) -> torch.Tensor:
        """``W_out`` [V/tp, h]: the stage's word-embedding copy if tied, else the head's own."""
        return tied_weight if self.tied else self.output_layer.weight

    def forward(self, hidden: torch.Tensor, rotary: Optional[torch.Tensor],
                tied_weight: Optional[torch.Tensor]) -> torch.Tensor:
        """[s, b, h] -> logits [s, b, V/tp] (the sequence is gathered under SP)."""
        return self.project(self.transform(hidden, rotary), tied_weight)
