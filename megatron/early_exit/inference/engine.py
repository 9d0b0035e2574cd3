"""Token-ids-in, token-ids-out generation engine for early-exit GPT models (PP=1, any TP).

No tokenizer inside: prompts are lists of ids; stop strings need a ``detokenize(ids) -> str``
callable. Under tensor parallelism every TP rank runs the same engine on the same inputs and
seed (logits are gathered over TP, so every rank takes the same decisions).

    engine = Engine(model, cfg)                       # model: EarlyExitGPTModel (or [model])
    outs = engine.generate([[5, 7, 9], [3]], max_new_tokens=32,
                           sampling=SamplingParams(temperature=0.0),
                           stop=StopCriteria(stop_token_ids={0}),
                           mode=EarlyExit(threshold=0.8))
    outs[0].tokens, outs[0].exit_layers, outs[0].confidences, outs[0].finish_reason

    for new in engine.stream(prompts, 32, mode=SelfSpeculative(exit_layer=2)):
        ...                                           # {row: [new token ids]} per step

Modes (modes.py): ``FullDepth``, ``EarlyExit`` (confidence exits with KV recompute, see
early_exit.py), ``SelfSpeculative`` (speculative.py). Batches of prompts with different lengths
share one static KV cache (kv_cache.py) in which every row sits at its true positions; the
in-flight tensors of a pass are left-padded so every row's newest token is the last slot.
Rows that finish (stop id / string / length) drop out of later passes. An engine serves one
session at a time (sessions share its static cache).

Extension point, pipeline parallelism: a PP>1 engine provides a runner with the same
``prefill`` / ``run`` contract as ``early_exit.DepthRunner`` (stage 0 embeds and sends the exited
token back, later stages fill the deep KV) and reuses ``Session``'s sampling and stop handling.

Run the tests: ``python -m pytest -q tests/unit/test_engine_*.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch

from megatron.early_exit.inference.early_exit import DepthRunner, ExitPoint, RowState, exit_depth
from megatron.early_exit.inference.kv_cache import KVCache
from megatron.early_exit.inference.modes import (EarlyExit, FullDepth, GenerationOutput, Mode,
                                                 SelfSpeculative)
from megatron.early_exit.inference.sampling import (BatchSamplingParams, SamplingParams,
                                                    processed_probs, sample)
from megatron.early_exit.inference.stopping import StopChecker, StopCriteria

__all__ = ["Engine", "Session"]

Sampling = Union[SamplingParams, Sequence[SamplingParams]]
GREEDY = SamplingParams(temperature=0.0)


class Engine:
    """Generation on one EarlyExitGPTModel stage that holds the whole model (PP=1)."""

    def __init__(self, model, cfg, seed: Optional[int] = None, fast_decode: Optional[str] = None):
        """``fast_decode``: None (every step through the general pass), ``"static"`` (static
        shapes), ``"cuda_graph"`` (those steps replayed as CUDA graphs) or ``"compile"``
        (full-depth steps through torch.compile, then a CUDA graph). It applies to full-depth
        steps (static_decode.py, any batch) and to batch-1 early exit / self-speculative passes
        (static_early_exit.py)."""
        if isinstance(model, (list, tuple)):
            if len(model) != 1:
                raise NotImplementedError("the engine runs one model chunk (PP=1, no virtual PP)")
            model = model[0]
        if not (model.pre_process and model.post_process):
            raise NotImplementedError(
                "PP>1 needs the pipelined engine (see the extension point in this module)")
        if cfg.parallel.sequence_parallel:
            raise ValueError("build the inference model with sequence_parallel=False")
        self.model, self.cfg = model.eval(), cfg
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.attention = [layer.self_attention.core_attention for layer in model.decoder.layers]
        self.attention += [head.block.self_attention.core_attention
                           for head in model.exits.values() if head.block is not None]
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.seed if seed is None else seed)
        self._cache: Optional[KVCache] = None
        if fast_decode not in (None, "static", "cuda_graph", "compile"):
            raise ValueError("fast_decode must be None, 'static', 'cuda_graph' or 'compile', got "
                             f"{fast_decode!r}")
        self.fast_decode = fast_decode
        self._static = None  # StaticDecodeStep of the current cache
        self._static_ee = {}  # StaticRunner per (exits, slots, confidence) of the current cache

    def static_step(self, cache: KVCache):
        """The StaticDecodeStep for ``cache`` (built once per cache; None if fast_decode is off)."""
        if self.fast_decode is None:
            return None
        if self._static is None or self._static.cache is not cache:
            from megatron.early_exit.inference.static_decode import StaticDecodeStep

            self._static = None
            self._static = StaticDecodeStep(self.model, self.cfg, cache,
                                            cuda_graph=self.fast_decode == "cuda_graph",
                                            compile=self.fast_decode == "compile")
        return self._static

    def cache_for(self, batch: int, max_len: int) -> KVCache:
        """A static cache for this request shape (reused when the last one fits)."""
        m, tp = self.cfg.model, self.cfg.parallel.tensor_model_parallel_size
        shape = (self.attention, batch, max_len, m.num_query_groups // tp, m.head_dim, self.dtype)
        if self._cache is None or not self._cache.fits(*shape):
            self._cache = None
            self._cache = KVCache(self.attention, batch, max_len, m.num_query_groups // tp,
                                  m.head_dim, self.dtype, self.device)
        self._cache.reset()
        return self._cache

    def static_runner(self, session: "Session", runner: DepthRunner, in_flight: int):
        """A StaticRunner in place of ``runner`` for a batch-1 session with exits (early exit or
        self-speculative) when fast_decode is on, else ``runner``; graphs are kept for later
        sessions of the same cache, exits and slot count."""
        from megatron.early_exit.inference import static_early_exit as see

        if (self.fast_decode is None or not session.exits
                or not see.supports(self.model, session.exits, len(session.prompts))):
            return runner
        key = (tuple((e.depth, e.layer) for e in session.exits), in_flight, runner.confidence_kind)
        if any(v.cache is not session.cache for v in self._static_ee.values()):
            self._static_ee = {}  # a new cache: the old graphs wrote into the old buffers
        if key not in self._static_ee:
            self._static_ee[key] = see.StaticRunner(
                runner, self.cfg, session.cache, session.exits, in_flight,
                cuda_graph=self.fast_decode in ("cuda_graph", "compile"))
        static = self._static_ee[key]
        static.runner = runner  # this session's store of pending hidden states
        return static

    def session(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                sampling: Sampling = GREEDY, stop: Optional[StopCriteria] = None, mode=FullDepth(),
                detokenize: Optional[Callable[[List[int]], str]] = None) -> "Session":
        """A step-by-step generation (use ``with session.attached(): session.step()``)."""
        return Session(self, prompts, max_new_tokens, sampling, stop, mode, detokenize)

    def stream(self, prompts, max_new_tokens, sampling: Sampling = GREEDY, stop=None,
               mode=FullDepth(), detokenize=None) -> Iterator[Dict[int, List[int]]]:
        """Yield {row: kept new token ids} after every step (for exit layers and confidences
        drive a ``session`` directly and read its ``outputs``)."""
        sess = self.session(prompts, max_new_tokens, sampling, stop, mode, detokenize)
        with sess.attached():
            while not sess.done:
                yield sess.step()

    def generate(self, prompts, max_new_tokens, sampling: Sampling = GREEDY, stop=None,
                 mode=FullDepth(), detokenize=None) -> List[GenerationOutput]:
        """Generate for every prompt; one GenerationOutput per prompt, in order."""
        sess = self.session(prompts, max_new_tokens, sampling, stop, mode, detokenize)
        with sess.attached():
            while not sess.done:
                sess.step()
        return sess.outputs


class Session:
    """One batch of prompts being generated: cache, per-row state, sampling and stopping."""

    def __init__(self, engine: Engine, prompts, max_new_tokens, sampling, stop, mode, detokenize):
        self.engine, self.cfg, self.mode = engine, engine.cfg, mode
        self.prompts = _check_prompts(prompts, self.cfg.model.vocab_size)
        n = max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if not isinstance(mode, Mode):
            raise TypeError(f"mode must be FullDepth, EarlyExit or SelfSpeculative, got {mode!r}")
        B = len(self.prompts)
        self.params = _row_params(sampling, B)
        # One generator per batch: the first row's seed, else the engine's own (seeded once
        # with cfg.seed, so TP ranks that serve the same requests stay in step).
        first = self.params[0]
        self.generator = engine.generator
        if first.seed is not None:
            self.generator = first.make_generator(engine.device)
        stop = stop or StopCriteria()
        limit = min(max_new_tokens, stop.max_new_tokens or max_new_tokens)
        crit = dataclasses.replace(stop, max_new_tokens=limit)
        self.checkers = [StopChecker(crit, detokenize) for _ in range(B)]
        self.outputs = [GenerationOutput(prompt_len=len(p)) for p in self.prompts]
        self.exits, draft = self._exit_points(mode)
        # The newest position ever processed is prompt_len + limit - 2 (drafts included).
        max_len = max(len(p) for p in self.prompts) + limit
        _check_positions(self.cfg, max_len - 1)
        self.cache = engine.cache_for(B, max_len)
        slots = max(getattr(mode, "max_pending", 0), draft) + 2
        self.runner = DepthRunner(engine.model, self.cfg, self.cache, slots,
                                  getattr(mode, "confidence", "max_prob"))
        # full depth every step (no exit can fire): static shapes / CUDA graph if enabled
        self.static = None if self.exits else engine.static_step(self.cache)
        # batch 1 with exits: passes on static layer segments (StaticRunner) if enabled
        self.runner = engine.static_runner(self, self.runner, in_flight=slots - 1)
        self.states = {r: RowState(newest=len(p) - 1) for r, p in enumerate(self.prompts)}
        self.last = [p[-1] for p in self.prompts]  # newest token id per row
        self.live: List[int] = list(range(B))  # rows still generating, in batch order
        self.finished = [False] * B
        self.prefilled = False
        self.stats = {"passes": 0, "drafted": 0, "accepted": 0}
        self._batch_params: Dict[tuple, BatchSamplingParams] = {}

    # ------------------------------------------------------------------ driving
    @property
    def done(self) -> bool:
        return not self.live

    @contextlib.contextmanager
    def attached(self):
        """Inference mode with the cache hooks installed (removed afterwards)."""
        with torch.no_grad(), self.cache.attach():
            yield self

    def step(self) -> Dict[int, List[int]]:
        """Prefill, or one decoding step of every live row; returns the kept new tokens."""
        if self.done:
            return {}
        if not self.prefilled:
            self.prefilled = True
            rows = list(self.live)
            res = self.runner.prefill(rows, self.states, self.prompts, self.exits)
            self.stats["passes"] += 1
            return self._single_token_step(rows, res)
        if isinstance(self.mode, SelfSpeculative):
            from megatron.early_exit.inference.speculative import speculative_step

            return speculative_step(self)
        rows = list(self.live)
        if self.static is not None:
            res = self.static.decode(rows, self.states, self.last, self.runner.confidence)
            self.stats["passes"] += 1
            return self._single_token_step(rows, res)
        capped = []
        if isinstance(self.mode, EarlyExit):
            cap = self.mode.max_pending
            capped = [r for r in rows if len(self.states[r].pend) >= cap]
        res = self.runner.run(rows, self.states, self.token_ids(rows), self.exits, capped)
        self.stats["passes"] += 1
        return self._single_token_step(rows, res)

    def _single_token_step(self, rows, res) -> Dict[int, List[int]]:
        tokens = sample(res.logits, self.row_params(rows), self.generator).tolist()
        confs = res.confidence.tolist()
        new = {}
        for i, r in enumerate(rows):
            self.states[r].newest += 1
            self.last[r] = tokens[i]
            new[r] = self.emit(r, [tokens[i]], [res.exit_layer[i]], [confs[i]])
        self.drop_finished()
        return new

    # ------------------------------------------------------------------ helpers for modes
    def token_ids(self, rows: Sequence[int]) -> torch.Tensor:  # [b_u]
        ids = [self.last[r] for r in rows]
        return torch.tensor(ids, dtype=torch.int64, device=self.engine.device)

    def remaining(self, row: int) -> int:
        return self.checkers[row].criteria.max_new_tokens - self.checkers[row].num_generated

    def row_params(self, rows: Sequence[int], repeat: int = 1):
        """SamplingParams (all rows alike) or BatchSamplingParams for these rows."""
        first = self.params[rows[0]]
        if all(self.params[r] == first for r in rows):
            return first
        key = (tuple(rows), repeat)
        if key not in self._batch_params:
            per = [self.params[r] for r in rows for _ in range(repeat)]
            self._batch_params[key] = BatchSamplingParams.stack(per, self.engine.device)
        return self._batch_params[key]

    def all_greedy(self, rows) -> bool:
        return all(self.params[r].greedy for r in rows)

    def draw(self, logits: torch.Tensor, rows):
        """logits [b, V] -> (tokens [b], the distribution they were drawn from [b, V], or None
        when every row is greedy)."""
        params = self.row_params(rows)
        if self.all_greedy(rows):
            return logits.argmax(dim=-1), None
        probs = processed_probs(logits, params)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1), probs

    def emit(self, row: int, tokens, layers, confs) -> List[int]:
        """Feed the row's new tokens to its stop checker; keep those before the stop."""
        out = self.outputs[row]
        before = len(out.tokens)
        res = self.checkers[row].feed(tokens)
        n = res.num_tokens - before
        out.extend(tokens[:n], layers[:n], confs[:n])
        if res.stopped:
            out.finish_reason, out.text_len = res.finish_reason, res.text_len
            self.finished[row] = True
        return list(tokens[:n])

    def drop_finished(self) -> None:
        self.live = [r for r in self.live if not self.finished[r]]

    def _exit_points(self, mode):
        """(exit points of every pass, extra cache positions a cycle may use)."""
        cfg = self.cfg
        layers = cfg.exits.exit_layer_nums
        if isinstance(mode, SelfSpeculative):
            if mode.exit_layer not in layers:
                raise ValueError(f"exit_layer {mode.exit_layer} is not an exit ({layers})")
            depth = exit_depth(cfg, mode.exit_layer)
            if depth >= cfg.model.num_layers:
                raise ValueError(f"exit_layer {mode.exit_layer} reads the last layer's output: "
                                 "nothing would be left to verify the drafts with")
            return [ExitPoint(depth, mode.exit_layer, None)], mode.num_draft
        if not isinstance(mode, EarlyExit) or mode.threshold >= 1.0:
            return [], 0  # tau = 1.0 never exits: exactly the full-depth computation
        allowed = layers if mode.exit_layers is None else mode.exit_layers
        bad = [x for x in allowed if x not in layers]
        if bad:
            raise ValueError(f"exit_layers {bad} are not exits of this model ({layers})")
        return [ExitPoint(exit_depth(cfg, k), k, mode.threshold) for k in sorted(allowed)], 0


def _check_prompts(prompts, vocab: int) -> List[List[int]]:
    if not prompts:
        raise ValueError("prompts must hold at least one prompt")
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise ValueError(f"prompt {i} is empty")
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab})")
        out.append(p)
    return out


def _row_params(sampling: Sampling, batch: int) -> List[SamplingParams]:
    if isinstance(sampling, SamplingParams):
        return [sampling] * batch
    params = list(sampling)
    if len(params) != batch or not all(isinstance(p, SamplingParams) for p in params):
        raise ValueError(f"sampling must be one SamplingParams or one per prompt ({batch})")
    return params


def _check_positions(cfg, positions: int) -> None:
    m = cfg.model
    if m.position_embedding_type != "rope" and positions > m.max_position_embeddings:
        raise ValueError(f"prompt + max_new_tokens needs {positions} positions, the model has "
                         f"--max-position-embeddings={m.max_position_embeddings}")
