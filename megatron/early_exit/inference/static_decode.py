"""Full-depth decoding with static shapes, optionally replayed as one CUDA graph.

The engine's general pass (early_exit.DepthRunner) builds a new layout per step: rows that
exit leave the pass, pending tokens join it, the attention reads as many keys as the longest row
holds. That flexibility costs Python work and kernel launches per layer, which dominates decoding
at small batch. When no exit can fire (``FullDepth``, or ``EarlyExit`` with threshold 1.0),
every step has the same shape: each of the cache's ``B`` rows feeds one token at its own
position through every layer. ``StaticDecodeStep`` runs exactly that, on fixed buffers:

- inputs ``tokens [B]`` and ``pos [B]`` are copied into static tensors;
- the pass layout is built once over those tensors (write slot = ``pos``, one query per row,
  attention over all ``max_len`` cache slots with the mask ``key <= pos`` recomputed in place),
  so the KV hook of kv_cache.py writes and reads the same cache as the general pass;
- rows that already finished keep feeding their last token at their last position (an
  idempotent rewrite of one cache slot); the caller ignores their logits.

With ``compile=True`` the step is first compiled by ``torch.compile`` (Inductor fuses the
small element-wise kernels around the matrix products: norms, RoPE, residual adds), then
captured like below. With ``cuda_graph=True`` the step is captured into a ``torch.cuda.CUDAGraph`` at its first call
(after two eager warm-up runs on a side stream, which rewrite the same slots with the same
values) and every later step is one graph replay: a few microseconds of launch work instead of
hundreds of kernel launches. The graph holds the cache's buffers, so it is tied to one cache.

    step = StaticDecodeStep(model, cfg, cache, cuda_graph=True)
    logits = step(tokens, pos)        # [B, V] next-token logits (a view of a static buffer)

With ``fused=True`` the layers are not megatron-core's ``TransformerLayer`` calls but a few
fused torch ops per layer on the same weights and cache (fused_decode.py; TP=1, refuses by name
what it does not cover): on CPU at batch 1 that removes the per-op overhead of megatron-core's
layer wrappers (benchmarks/cpu_decode_peer.py measures it against transformers' ``generate``).

The engine uses it with ``Engine(model, cfg, fast_decode="static" | "cuda_graph" | "compile")``.
Tests: tests/unit/test_static_decode.py (CPU, eager), tests/unit/test_fused_decode.py (fused) and
tests/gpu/test_gpu_decode.py (graph).
"""

from __future__ import annotations

from typing import Dict

import torch
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron.early_exit.inference.exit_points import confidence, token_logits
from megatron.early_exit.inference.runner import PassResult, RowState
from megatron.early_exit.inference.kv_cache import KVCache, PassLayout

__all__ = ["StaticDecodeStep", "StaticFullDepthRunner", "capture_graph"]


def capture_graph(run, device: torch.device, warmups: int, reset=lambda: None) -> "torch.cuda.CUDAGraph":
    """Capture ``run()`` as a CUDA graph after ``warmups`` eager runs on a side stream (they
    compile, allocate and create library handles). ``reset()`` restores the inputs before each
    run and after the capture, so warm-ups rewrite the same cache slots with the same values."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmups):
            reset()
            run()
    torch.cuda.current_stream(device).wait_stream(side)
    reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    reset()
    return graph


class StaticDecodeStep:
    """One full-depth decode step over every row of ``cache`` with static shapes."""

    def __init__(self, model, cfg, cache: KVCache, cuda_graph: bool = False, compile: bool = False,
                 fused: bool = False):
        """``fused``: run the layers as direct fused torch ops on the megatron-core weights
        (fused_decode.py; TP=1, raises NotImplementedError naming what it does not cover) instead
        of calling the megatron-core layers; same cache, same logits within rounding."""
        if (cuda_graph or compile) and cache.device.type != "cuda":
            raise ValueError("fast_decode='cuda_graph' / 'compile' needs a CUDA device; use "
                             "'static' on CPU")
        cuda_graph = cuda_graph or compile
        self.model, self.cfg, self.cache = model, cfg, cache
        self.num_layers = cfg.model.num_layers
        self.cuda_graph = cuda_graph
        self.graph = None
        B, dev = cache.batch, cache.device
        self.tokens = torch.zeros(B, dtype=torch.int64, device=dev)  # [B]
        self.pos = torch.zeros(B, dtype=torch.int64, device=dev)  # [B]
        self.end = torch.ones(B, dtype=torch.int64, device=dev)  # [B] pos + 1
        self.key_pos = torch.arange(cache.max_len, device=dev)  # [S]
        self.mask = torch.ones(B, 1, 1, cache.max_len, dtype=torch.bool, device=dev)
        pos_row = self.pos.view(1, B)  # [1, B], aliases self.pos
        self.layout = PassLayout(
            rows=torch.arange(B, device=dev), rows_list=list(range(B)), starts=[0] * B,
            ends=[1] * B, s=1, pos=pos_row, valid=torch.ones(1, B, dtype=torch.bool, device=dev),
            write_idx=pos_row, mask=self.mask, start_t=self.pos, end_t=self.end, full_batch=True)
        self.logits = None  # [B, V] static output buffer, allocated by the first run
        self._forward = self._logits
        self.fused = None
        if fused:
            from megatron.early_exit.inference.fused_decode import FusedDecoder

            self.fused = FusedDecoder(model, cfg, cache)
            self._forward = self._fused_logits
        if compile:
            # Dynamo specialises run_layer on the layer index (each layer is its own module):
            # allow one compiled variant per layer instead of falling back to eager after 8.
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, 2 * self.num_layers + 8)
            self._forward = torch.compile(self._forward, dynamic=False)

    def _run(self) -> None:
        """The step on the static buffers (this is what the graph captures)."""
        torch.le(self.key_pos.view(1, 1, 1, -1), self.pos.view(-1, 1, 1, 1), out=self.mask)
        torch.add(self.pos, 1, out=self.end)
        self.cache.layout = self.layout
        logits = self._forward(self.tokens, self.pos)
        if self.logits is None:
            self.logits = torch.empty_like(logits)
        self.logits.copy_(logits)

    def _logits(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Every layer for one token per row -> next-token logits [B, V] (cache written)."""
        model = self.model
        x = model.embed(tokens.view(-1, 1), pos.view(-1, 1))  # [1, B, h]
        rotary = model.rotary(pos.view(1, -1))  # [1, B, 1, hn] or None
        for d in range(self.num_layers):
            x = model.run_layer(d, x, rotary)
        return gather_from_tensor_model_parallel_region(model.final_logits(x))[-1]  # [B, V]

    def _fused_logits(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.fused.logits(tokens, pos, self.mask)  # [B, V]

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens [B], pos [B] (each row's newest token and its position) -> logits [B, V]."""
        self.tokens.copy_(tokens)
        self.pos.copy_(pos)
        if not self.cuda_graph:
            self._run()
        elif self.graph is None:
            self.graph = capture_graph(self._run, self.cache.device, warmups=3)
            self.graph.replay()
        else:
            self.cache.layout = self.layout
            self.graph.replay()
        return self.logits


class StaticFullDepthRunner:
    """The runner contract (runner.py) over a StaticDecodeStep: decode passes without exits go
    through the static step (every cache row computed: the session must own the whole cache);
    prefill and anything with exits or ``all_final`` go to the general runner."""

    supports_all_final = True

    def __init__(self, general, step: StaticDecodeStep):
        self.general, self.step = general, step
        self.cfg, self.cache = general.cfg, step.cache
        self.confidence_kind = general.confidence_kind
        self.num_layers = general.num_layers
        self.tokens = torch.zeros(step.cache.batch, dtype=torch.int64, device=step.cache.device)

    def prefill(self, rows, states, prompts, exits=()) -> PassResult:
        return self.general.prefill(rows, states, prompts, exits)

    def run(self, rows, states: Dict[int, RowState], token_ids: torch.Tensor, exits=(),
            capped=(), all_final: bool = False) -> PassResult:
        if exits or all_final:
            return self.general.run(rows, states, token_ids, exits, capped, all_final)
        dev, L = self.cache.device, self.num_layers
        rows_t = torch.tensor(list(rows), dtype=torch.int64, device=dev)
        self.tokens.index_copy_(0, rows_t, token_ids)  # other rows re-feed their last token
        newest = [states[r].newest if r in states else 0 for r in range(self.cache.batch)]
        logits = self.step(self.tokens, torch.tensor(newest, dtype=torch.int64, device=dev))
        picked = token_logits(logits.index_select(0, rows_t), self.cfg)  # [b_u, V]
        for r in rows:
            states[r].advance(L, L)
        return PassResult(picked, confidence(picked, self.confidence_kind), [L] * len(rows))
