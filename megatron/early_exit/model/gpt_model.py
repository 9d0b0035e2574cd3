"""EarlyExitGPTModel: a megatron-core GPT (one pipeline stage / virtual chunk) with exit heads.

The backbone is megatron-core's ``LanguageModelEmbedding`` + ``TransformerBlock`` (built from
our spec, model/layers.py) + ``ColumnParallelLinear`` output layer. We run the block's layers
ourselves so that exits can read any layer's output (or input, ``--pre-exit``), full activation
recompute never swallows an exit's gradient (exits sit between checkpointed layers), and
inference can start and stop at any layer.

One instance is one pipeline stage (or one virtual-pipeline chunk). Its ``forward`` returns a
``StageOutput``: the hidden states for the next stage, and the weighted sum of the losses of
the heads this stage holds (exits here; the final head on the last stage), with every head's
unweighted loss for logging. Tied output weights: the first stage owns the word embedding;
any other stage that needs it (final head tied, or tied exits) holds a copy,
``word_embeddings_copy``, kept equal by the gradient all-reduce in parallel/grads.py.

    model = EarlyExitGPTModel(cfg, pp_rank=0)
    out = model(input_ids=tokens, labels=labels, loss_mask=mask, exit_weights=[0.5, 1.0])
    out.loss.backward()
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.utils.checkpoint
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

from megatron.early_exit.config import EarlyExitGPTConfig
from megatron.early_exit.model import losses
from megatron.early_exit.model.exit_head import ExitHead
from megatron.early_exit.model.layers import Norm, layer_spec, rotary_freqs, transformer_config
from megatron.early_exit.model.placement import StagePlacement, stage_placement


def mark_tensor_parallel_params(module: torch.nn.Module) -> None:
    """Tag TP-split weights with megatron's attributes (``tensor_model_parallel``,
    ``partition_dim``): megatron only sets them when it initialises the weights itself, and we
    initialise them (model/init.py)."""
    dims = ((tensor_parallel.VocabParallelEmbedding, 0), (tensor_parallel.ColumnParallelLinear, 0),
            (tensor_parallel.RowParallelLinear, 1))
    for sub in module.modules():
        for cls, dim in dims:
            weight = getattr(sub, "weight", None)
            if isinstance(sub, cls) and weight is not None and not hasattr(weight, "partition_dim"):
                tensor_parallel.set_tensor_model_parallel_attributes(weight, True, dim, 1)


@dataclass
class StageOutput:
    """What one stage's forward produces."""

    hidden: Optional[torch.Tensor] = None  # [s, b, h] for the next stage (None on the last)
    loss: Optional[torch.Tensor] = None  # weighted sum of this stage's head losses (scalar)
    exit_losses: Dict[int, torch.Tensor] = field(default_factory=dict)  # exit layer -> detached loss
    final_loss: Optional[torch.Tensor] = None  # detached LM loss of the final head (last stage)
    exit_logits: Dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [s, b, V/tp]
    exit_states: Dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [s, b, h]
    final_logits: Optional[torch.Tensor] = None  # [s, b, V/tp]


class EarlyExitGPTModel(MegatronModule):
    """One pipeline stage (or virtual chunk) of an early-exit GPT."""

    def __init__(self, cfg: EarlyExitGPTConfig, pp_rank: int = 0, vp_stage: Optional[int] = None):
        self.cfg = cfg
        config = transformer_config(cfg)
        super().__init__(config=config)
        m = cfg.model
        self.placement: StagePlacement = stage_placement(cfg, pp_rank, vp_stage or 0)
        self.pre_process = self.placement.pre_process
        self.post_process = self.placement.post_process
        self.vocab_size = m.vocab_size
        self.embedding = None
        if self.pre_process:
            self.embedding = LanguageModelEmbedding(
                config, m.vocab_size, m.max_position_embeddings,
                position_embedding_type=m.position_embedding_type,
                tp_group=parallel_state.get_tensor_model_parallel_group())
        spec = TransformerBlockSubmodules(
            layer_specs=[layer_spec(cfg)] * len(self.placement.layers),
            layer_norm=ModuleSpec(module=Norm))
        self.decoder = TransformerBlock(config, spec, post_layer_norm=True,
                                        pre_process=self.pre_process,
                                        post_process=self.post_process, vp_stage=vp_stage)
        got = [layer.layer_number for layer in self.decoder.layers]
        assert got == list(self.placement.layers), f"layer layout {got} != {self.placement.layers}"
        self.exits = torch.nn.ModuleDict({
            str(layer): ExitHead(config, cfg.exits, layer, m.vocab_size, cfg)
            for layer in self.placement.exit_layers})
        self.word_embeddings_copy = None
        if self.placement.holds_tied_weight and not self.pre_process:
            local_vocab = m.vocab_size // cfg.parallel.tensor_model_parallel_size
            self.word_embeddings_copy = torch.nn.Parameter(
                torch.empty(local_vocab, m.hidden_size, dtype=config.params_dtype))
            tensor_parallel.set_tensor_model_parallel_attributes(self.word_embeddings_copy, True, 0, 1)
            self.word_embeddings_copy.shared = True  # megatron-core's grad norm counts it once
        self.output_layer = None
        if self.post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                m.hidden_size, m.vocab_size, config=config, init_method=config.init_method,
                bias=False, gather_output=False,
                skip_weight_param_allocation=not m.untie_embeddings_and_output_weights,
                tp_group=parallel_state.get_tensor_model_parallel_group())
        self._exit_index = {layer: i for i, layer in enumerate(cfg.exits.exit_layer_nums)}
        mark_tensor_parallel_params(self)

    # ----------------------------------------------------------------------------- pieces
    def tied_weight(self) -> Optional[torch.Tensor]:
        """This stage's copy of the word embedding ([V/tp, h]) if it holds one."""
        if self.pre_process:
            return self.embedding.word_embeddings.weight
        return self.word_embeddings_copy

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [b, s] -> hidden [s, b, h] (sequence-split under SP)."""
        emb = self.embedding
        if emb.reduce_scatter_embeddings:  # SP without learned positions: [s/tp, b, h]
            return emb.word_embeddings(input_ids)
        h = emb.word_embeddings(input_ids)  # [b, s, h]
        if emb.add_position_embedding:
            h = h + emb.position_embeddings(position_ids)
        h = h.transpose(0, 1).contiguous()  # [s, b, h]
        if self.config.sequence_parallel:
            h = tensor_parallel.scatter_to_sequence_parallel_region(h)
        return h

    def rotary(self, positions: torch.Tensor) -> Optional[torch.Tensor]:
        """RoPE angles for positions [s] (or None for learned positions)."""
        m = self.cfg.model
        if m.position_embedding_type != "rope":
            return None
        dtype = torch.float64 if self.config.params_dtype == torch.float64 else torch.float32
        return rotary_freqs(positions, m.head_dim, m.rotary_base, dtype)

    def run_layer(self, index: int, hidden: torch.Tensor, rotary) -> torch.Tensor:
        """Apply local layer ``index`` ([s, b, h] -> [s, b, h]), recomputed if configured."""
        layer = self.decoder.layers[index]

        def fn(h):
            out, _ = layer(h, attention_mask=None, rotary_pos_emb=rotary)
            return out

        if self.cfg.recompute_granularity == "full" and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, hidden, use_reentrant=False)
        return fn(hidden)

    def exit_logits(self, layer: int, hidden: torch.Tensor, rotary) -> torch.Tensor:
        return self.exits[str(layer)](hidden, rotary, self.tied_weight())

    def exit_project(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Exit ``layer``'s projection of its transformed state ``h`` [..., h] -> [..., V/tp]."""
        return self.exits[str(layer)].project(h, self.tied_weight())

    def final_weight(self) -> torch.Tensor:
        """The final head's output weight [V/tp, h] (its own, or the tied word embedding)."""
        if self.cfg.model.untie_embeddings_and_output_weights:
            return self.output_layer.weight
        return self.tied_weight()

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits, _ = self.output_layer(self.decoder.final_layernorm(hidden), weight=self.final_weight())
        return logits

    def head_outputs(self, projection, h: torch.Tensor, weight: torch.Tensor, labels, loss_mask,
                     temperature: float, dynamic: bool, want_logits: bool):
        """(logits [s, b, V/tp] or None, loss or None) of a head from its projection input
        ``h`` [s, b, h]: the loss is fused with the projection in chunks of tokens unless
        ``--cross-entropy-chunk-size 0``, so no logits are kept unless asked for."""
        chunk = self.cfg.cross_entropy_chunk_size
        logits, loss = None, None
        if want_logits or (labels is not None and not chunk):
            logits, _ = projection(h, weight=weight)
        if labels is not None and chunk:
            loss = losses.head_loss(h, weight, labels, loss_mask, temperature, dynamic,
                                    self.cfg.model.num_tokens, chunk, self.config.sequence_parallel)
        elif labels is not None:
            loss = losses.exit_loss(logits, labels, loss_mask, temperature, dynamic,
                                    self.cfg.model.num_tokens)
        return logits, loss

    # ----------------------------------------------------------------------------- forward
    def forward(self, input_ids: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                hidden_states: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None,
                loss_mask: Optional[torch.Tensor] = None,
                exit_weights: Optional[List[float]] = None,
                return_logits: bool = False,
                return_exit_states: bool = False,
                skip_final_head: bool = False,
                frozen_backbone: bool = False) -> StageOutput:
        """Run this stage.

        input_ids [b, s] on the first stage, else hidden_states [s, b, h] from the previous one.
        position_ids [b, s] (default 0..s-1 per row) feed the position embedding or RoPE; with
        pipeline stages, pass the same position_ids to every stage.
        With labels [b, s], computes the losses of the heads here; ``exit_weights`` are the
        current w_i(t), one per exit of the whole model (default: the config's targets).
        ``skip_final_head``: exits only (partial micro-batches, exit tuning).
        ``frozen_backbone``: embedding and layers run without grad; only exit heads get gradients.
        ``return_exit_states``: keep each exit's projection input (``exit_states``, detached).
        """
        backbone_grad = torch.no_grad() if frozen_backbone else contextlib.nullcontext()
        if self.pre_process:
            positions = position_ids
            if positions is None:
                positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
            with backbone_grad:
                hidden = self.embed(input_ids, positions)
        else:
            hidden = hidden_states
        if position_ids is not None:  # [b, s] -> per-row RoPE angles [s, b, 1, hn]
            rotary = self.rotary(position_ids.transpose(0, 1))
        else:
            sp = self.cfg.parallel.tensor_model_parallel_size if self.config.sequence_parallel else 1
            rotary = self.rotary(torch.arange(hidden.shape[0] * sp, device=hidden.device))  # [s]
        out = StageOutput()
        terms: List[torch.Tensor] = []
        weights = exit_weights if exit_weights is not None else self.cfg.exits.exit_layer_weight

        ex = self.cfg.exits

        def exit_head(layer: int, hidden: torch.Tensor):
            k, head = self._exit_index[layer], self.exits[str(layer)]
            h = head.transform(hidden, rotary)
            if return_exit_states:
                out.exit_states[layer] = h.detach()
            logits, loss = self.head_outputs(
                head.output_layer, h,
                head.projection_weight(self.tied_weight()), labels, loss_mask,
                ex.exit_layer_temperature[k], ex.use_dynamic_exit_layer_weight, return_logits)
            if return_logits:
                out.exit_logits[layer] = logits
            if loss is not None:
                out.exit_losses[layer] = loss.detach()
                terms.append(weights[k] * loss)

        for i, layer in enumerate(self.placement.layers):
            if ex.pre_exit and str(layer) in self.exits:
                exit_head(layer, hidden)
            with backbone_grad:
                hidden = self.run_layer(i, hidden, rotary)
            if not ex.pre_exit and str(layer) in self.exits:
                exit_head(layer, hidden)
        if not self.post_process or skip_final_head:
            out.hidden = hidden
            return self._sum_terms(out, terms)
        logits, loss = self.head_outputs(self.output_layer, self.decoder.final_layernorm(hidden),
                                         self.final_weight(), labels, loss_mask, 1.0, False,
                                         return_logits)
        if return_logits:
            out.final_logits = logits
        if loss is not None:
            out.final_loss = loss.detach()
            terms.append(ex.final_layer_weight * loss)
        return self._sum_terms(out, terms)

    @staticmethod
    def _sum_terms(out: StageOutput, terms: List[torch.Tensor]) -> StageOutput:
        if terms:
            out.loss = torch.stack(terms).sum()
        return out
