"""Token-ids-in, token-ids-out generation engine for early-exit GPT models (any TP, any PP).

No tokenizer inside: prompts are lists of ids; stop strings need a ``detokenize(ids) -> str``
callable. Under tensor parallelism every TP rank runs the same engine on the same inputs (logits
are gathered over TP, so every rank takes the same decisions). Under pipeline parallelism stage
0 runs the session and the later stages serve its passes (pipeline_runner.py); ``generate`` is
then collective: every rank calls it with the same arguments and gets the same outputs.

    engine = Engine(model, cfg)                       # model: EarlyExitGPTModel (or [model])
    outs = engine.generate([[5, 7, 9], [3]], max_new_tokens=32,
                           sampling=SamplingParams(temperature=0.0),
                           stop=StopCriteria(stop_token_ids={0}),
                           mode=EarlyExit(threshold=0.8))
    outs[0].tokens, outs[0].exit_layers, outs[0].confidences, outs[0].finish_reason

Modes (modes.py): ``FullDepth``, ``EarlyExit`` (confidence exits with KV recompute at PP = 1),
``SelfSpeculative`` (speculative.py; PP = 1). How the layers run is a *runner* (runner.py: the
eager DepthRunner, static / CUDA-graph runners, the PipelineRunner); ``Session`` does sampling,
stops, self-speculative cycles and per-row seeds for all of them. A session holds the rows of
one mode in a static KV cache; rows may be added and removed between steps, which is how the
continuous-batching scheduler (scheduler.py) shares one cache between many requests.

Seeds: every row samples from its own generator, seeded with its request's seed (or, unseeded,
with one the engine derives from its own seed and a request counter), so a row's tokens depend
only on its prompt, parameters and seed, never on its batch-mates or the layout.

Run the tests: ``python -m pytest -q tests/unit/test_engine_*.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from megatron.early_exit.inference.early_exit import DepthRunner
from megatron.early_exit.inference.exit_points import exit_points
from megatron.early_exit.inference.kv_cache import KVCache
from megatron.early_exit.inference.modes import (EarlyExit, FullDepth, GenerationOutput,
                                                 SelfSpeculative)
from megatron.early_exit.inference.requests import (GenerationRequest, RequestError,
                                                    validate_request)
from megatron.early_exit.inference.runner import PassResult, RowState
from megatron.early_exit.inference.sampling import SamplingParams, processed_probs, sample
from megatron.early_exit.inference.stopping import StopChecker, StopCriteria

__all__ = ["Engine", "Session"]

Sampling = Union[SamplingParams, Sequence[SamplingParams]]
GREEDY = SamplingParams(temperature=0.0)
FAST_DECODE = (None, "static", "fused", "cuda_graph", "compile")


class Engine:
    """Generation on an EarlyExitGPTModel stage (PP = 1: the whole model; PP > 1: pass ``ctx``)."""

    def __init__(self, model, cfg, seed: Optional[int] = None, fast_decode: Optional[str] = None,
                 ctx=None):
        """``fast_decode``: None (every step through the general pass), ``"static"`` (static
        shapes), ``"fused"`` (static shapes with the layers as fused torch ops on the same
        weights and cache, fused_decode.py; TP = 1, eager), ``"cuda_graph"`` (static steps
        replayed as CUDA graphs) or ``"compile"`` (full-depth steps through torch.compile, then
        a CUDA graph). It applies to sessions that own their whole cache (``generate``):
        full-depth steps at any batch (static_decode.py) and batch-1 early exit /
        self-speculative passes whose exits have no exit block, with any confidence kind
        (static_early_exit.py; for ``"fused"`` its segments run on the fused layer step); other
        sessions take the general pass."""
        if isinstance(model, (list, tuple)):
            if len(model) != 1:
                raise NotImplementedError("the engine runs one model chunk per rank (no virtual PP)")
            model = model[0]
        if cfg.parallel.sequence_parallel:
            raise ValueError("build the inference model with sequence_parallel=False")
        if fast_decode not in FAST_DECODE:
            raise ValueError(f"fast_decode must be one of {FAST_DECODE}, got {fast_decode!r}")
        if fast_decode == "fused":
            from megatron.early_exit.inference.fused_decode import check_supported

            try:
                check_supported(model, cfg)
            except NotImplementedError as e:
                raise ValueError(f"fast_decode='fused' does not cover this model: {e}") from None
        self.model, self.cfg = model.eval(), cfg
        self.pipelined = not (model.pre_process and model.post_process)
        self.drives = model.pre_process  # this rank runs sessions (stage 0)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.channel = None
        if self.pipelined:
            from megatron.early_exit.inference.pipeline_runner import PipelineChannel

            if ctx is None:
                raise ValueError("a pipeline stage (PP > 1) needs the parallel context (ctx=)")
            if fast_decode is not None:
                raise ValueError("fast_decode is not supported with pipeline parallelism (PP > 1)")
            self.channel = PipelineChannel(ctx, cfg.model.hidden_size, self.dtype)
        self.attention = [layer.self_attention.core_attention for layer in model.decoder.layers]
        self.attention += [head.block.self_attention.core_attention
                           for head in model.exits.values() if head.block is not None]
        self.seed = cfg.seed if seed is None else seed
        self.requests_seen = 0  # derives the seeds of unseeded requests (same on every rank)
        self._cache: Optional[KVCache] = None
        self.fast_decode = fast_decode
        self._static = None  # StaticDecodeStep of the current cache
        self._static_ee = {}  # StaticRunner per (exits, slots, confidence) of the current cache
        self._stage_runners = {}  # later stages: DepthRunner per (cache shape, confidence)

    # ------------------------------------------------------------------ caches and runners
    def new_cache(self, batch: int, max_len: int) -> KVCache:
        m, tp = self.cfg.model, self.cfg.parallel.tensor_model_parallel_size
        return KVCache(self.attention, batch, max_len, m.num_query_groups // tp, m.head_dim,
                       self.dtype, self.device)

    def cache_for(self, batch: int, max_len: int) -> KVCache:
        """A static cache for this request shape (reused when the last one fits), reset."""
        m, tp = self.cfg.model, self.cfg.parallel.tensor_model_parallel_size
        shape = (self.attention, batch, max_len, m.num_query_groups // tp, m.head_dim, self.dtype)
        if self._cache is None or not self._cache.fits(*shape):
            self._cache = None
            self._cache = self.new_cache(batch, max_len)
        self._cache.reset()
        return self._cache

    def make_runner(self, session: "Session", exclusive: bool):
        """The runner of a session: eager, pipelined, or (fast_decode, and the session owns its
        whole cache) a static / CUDA-graph one."""
        general = DepthRunner(self.model, self.cfg, session.cache, session.store_slots,
                              session.confidence_kind)
        if self.pipelined:
            from megatron.early_exit.inference.pipeline_runner import PipelineRunner

            return PipelineRunner(self.channel, general)
        if self.fast_decode is None or not exclusive:
            return general
        if not session.exits:
            from megatron.early_exit.inference.static_decode import StaticFullDepthRunner

            return StaticFullDepthRunner(general, self.static_step(session.cache))
        return self.static_runner(session, general, in_flight=session.store_slots - 1)

    def static_step(self, cache: KVCache):
        """The StaticDecodeStep for ``cache`` (built once per cache)."""
        if self._static is None or self._static.cache is not cache:
            from megatron.early_exit.inference.static_decode import StaticDecodeStep

            self._static = None
            self._static = StaticDecodeStep(self.model, self.cfg, cache,
                                            cuda_graph=self.fast_decode == "cuda_graph",
                                            compile=self.fast_decode == "compile",
                                            fused=self.fast_decode == "fused")
        return self._static

    def static_runner(self, session: "Session", runner: DepthRunner, in_flight: int):
        """A StaticRunner in place of ``runner`` for a batch-1 session with exits (its layers
        fused for ``"fused"``, CUDA graphs for ``"cuda_graph"`` / ``"compile"``); it is kept
        for later sessions of the same cache, exits and slot count."""
        from megatron.early_exit.inference import static_early_exit as see

        if not see.supports(self.model, session.exits, session.cache.batch):
            return runner
        key = (tuple((e.depth, e.layer) for e in session.exits), in_flight, runner.confidence_kind)
        if any(v.cache is not session.cache for v in self._static_ee.values()):
            self._static_ee = {}  # a new cache: the old graphs wrote into the old buffers
        if key not in self._static_ee:
            self._static_ee[key] = see.StaticRunner(
                runner, self.cfg, session.cache, session.exits, in_flight,
                cuda_graph=self.fast_decode in ("cuda_graph", "compile"),
                fused=self.fast_decode == "fused")
        static = self._static_ee[key]
        static.runner = runner  # this session's store of pending hidden states
        return static

    def next_seed(self) -> int:
        """A seed for an unseeded request: a function of the engine seed and a counter."""
        self.requests_seen += 1
        return (self.seed * 0x9E3779B1 + self.requests_seen * 0x85EBCA77) % (2 ** 63)

    # ------------------------------------------------------------------ pipeline stages
    def serve(self) -> None:
        """Later pipeline stages: serve stage 0's passes until it calls ``shutdown``."""
        from megatron.early_exit.inference.pipeline_runner import serve_stage

        if self.drives:
            raise RuntimeError("serve() runs on the later pipeline stages; stage 0 drives")
        with torch.no_grad():
            serve_stage(self.channel, self._stage_runner)

    def shutdown(self) -> None:
        """Stage 0: end the later stages' ``serve`` loops (no-op at PP = 1)."""
        from megatron.early_exit.inference.pipeline_runner import end_header

        if self.pipelined and self.drives:
            self.channel.send_pass(end_header(self.device), None)
            self.channel.drain()

    def _stage_runner(self, batch: int, max_len: int, confidence: str) -> DepthRunner:
        key = (batch, max_len, confidence)
        if key not in self._stage_runners:
            caches = {(r.cache.batch, r.cache.max_len): r.cache for r in self._stage_runners.values()}
            cache = caches.get((batch, max_len)) or self.new_cache(batch, max_len)
            self._stage_runners[key] = DepthRunner(self.model, self.cfg, cache, 1, confidence)
        return self._stage_runners[key]

    # ------------------------------------------------------------------ generation
    def session(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                sampling: Sampling = GREEDY, stop: Optional[StopCriteria] = None, mode=FullDepth(),
                detokenize: Optional[Callable[[List[int]], str]] = None) -> "Session":
        """A session owning a cache sized for these prompts, with row i = prompt i
        (use ``with session.attached(): session.step()``)."""
        return self._session(self.requests(prompts, max_new_tokens, sampling, stop, mode), mode,
                             detokenize)

    def _session(self, requests: List[GenerationRequest], mode, detokenize) -> "Session":
        max_len = max(len(r.prompt) + r.max_new_tokens for r in requests)
        sess = Session(self, self.cache_for(len(requests), max_len), mode, detokenize,
                       exclusive=True)
        for row, req in enumerate(requests):
            sess.add(row, req)
        return sess

    def requests(self, prompts, max_new_tokens, sampling=GREEDY, stop=None,
                 mode=FullDepth()) -> List[GenerationRequest]:
        """Validated requests (RequestError naming the field; the same on every rank)."""
        if not prompts:
            raise ValueError("prompts must hold at least one prompt")
        params = _row_params(sampling, len(prompts))
        stop = stop or StopCriteria()
        limit = max_new_tokens
        if _is_int(limit) and stop.max_new_tokens is not None:
            limit = min(limit, stop.max_new_tokens)
        out = []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            req = GenerationRequest(prompt=list(p), max_new_tokens=limit, sampling=sp, mode=mode,
                                    stop=stop)
            try:
                validate_request(req, self.cfg, pipeline=self.pipelined)
            except RequestError as e:
                where = f" (prompt {i})" if e.field == "prompt" else ""
                raise RequestError(e.field, e.message + where) from None
            out.append(req)
        return out

    def stream(self, prompts, max_new_tokens, sampling: Sampling = GREEDY, stop=None,
               mode=FullDepth(), detokenize=None) -> Iterator[Dict[int, List[int]]]:
        """Yield {row: kept new token ids} after every step (PP = 1)."""
        sess = self.session(prompts, max_new_tokens, sampling, stop, mode, detokenize)
        with sess.attached():
            while not sess.done:
                yield sess.step()

    def generate(self, prompts, max_new_tokens, sampling: Sampling = GREEDY, stop=None,
                 mode=FullDepth(), detokenize=None) -> List[GenerationOutput]:
        """Generate for every prompt; one GenerationOutput per prompt, in order. Collective at
        PP > 1 (every rank calls it with the same arguments and returns the same outputs)."""
        requests = self.requests(prompts, max_new_tokens, sampling, stop, mode)  # every rank
        if not self.drives:
            self.serve()
            outputs = None
        else:
            try:
                sess = self._session(requests, mode, detokenize)
                with sess.attached():
                    while not sess.done:
                        sess.step()
                outputs = sess.outputs
            finally:
                self.shutdown()
        if self.pipelined:
            shared = [outputs]
            dist.broadcast_object_list(shared, src=self.channel.stage_ranks[0],
                                       group=self.channel.group)
            outputs = shared[0]
        return outputs


@dataclasses.dataclass
class _Row:
    """One request's state inside a session."""

    request: GenerationRequest
    generator: torch.Generator
    checker: StopChecker
    output: GenerationOutput
    finished: bool = False


class Session:
    """The rows of one decoding mode in a static KV cache: sampling, stops, seeds, modes."""

    def __init__(self, engine: Engine, cache: KVCache, mode=FullDepth(), detokenize=None,
                 exclusive: bool = False):
        self.engine, self.cfg, self.mode, self.cache = engine, engine.cfg, mode, cache
        self.detokenize = detokenize
        self.exits, draft = exit_points(self.cfg, mode)
        self.store_slots = max(getattr(mode, "max_pending", 0), draft) + 2
        self.confidence_kind = getattr(mode, "confidence", "max_prob")
        self.runner = engine.make_runner(self, exclusive)
        self.rows: Dict[int, _Row] = {}
        self.states: Dict[int, RowState] = {}
        self.last: Dict[int, int] = {}  # newest token id per row
        self.live: List[int] = []  # prefilled rows still generating, in row order
        self.waiting: List[int] = []  # rows added since the last step (prefill next)
        self.stats = {"passes": 0, "drafted": 0, "accepted": 0}

    # ------------------------------------------------------------------ rows
    def add(self, row: int, request: GenerationRequest) -> None:
        """Take cache row ``row`` for ``request`` (validated); it is prefilled at the next step."""
        assert row not in self.rows and 0 <= row < self.cache.batch, row
        seed = request.sampling.seed
        gen = torch.Generator(device=self.engine.device)
        gen.manual_seed(self.engine.next_seed() if seed is None else seed)
        stop = dataclasses.replace(request.stop, max_new_tokens=request.max_new_tokens)
        out = GenerationOutput(prompt_len=len(request.prompt))
        if request.logprobs:
            out.logprobs = []
        self.rows[row] = _Row(request, gen, StopChecker(stop, self.detokenize), out)
        self.states[row] = RowState(newest=len(request.prompt) - 1)
        self.last[row] = request.prompt[-1]
        self.cache.truncate([row], [0])
        self.waiting.append(row)

    def remove(self, row: int) -> None:
        """Forget a row (finished or cancelled); its cache row is free for another request."""
        self.rows.pop(row, None)
        self.states.pop(row, None)
        self.last.pop(row, None)
        self.live = [r for r in self.live if r != row]
        self.waiting = [r for r in self.waiting if r != row]

    @property
    def done(self) -> bool:
        return not self.live and not self.waiting

    @property
    def prompts(self) -> List[List[int]]:
        return [self.rows[r].request.prompt for r in sorted(self.rows)]

    @property
    def outputs(self) -> List[GenerationOutput]:
        return [self.rows[r].output for r in sorted(self.rows)]

    @contextlib.contextmanager
    def attached(self):
        """Inference mode with the cache hooks installed (removed afterwards)."""
        with torch.no_grad(), self.cache.attach():
            yield self

    # ------------------------------------------------------------------ stepping
    def step(self) -> Dict[int, List[int]]:
        """Prefill the rows added since the last step (their first token), and one decoding
        step (one pass, or one self-speculative cycle) of the rows that were already live;
        returns {row: kept new tokens}."""
        old = list(self.live)
        new: Dict[int, List[int]] = {}
        if self.waiting:
            rows, self.waiting = sorted(self.waiting), []
            prompts = [self.rows[r].request.prompt for r in rows]
            res = self.runner.prefill(rows, self.states, prompts, self.exits)
            self.stats["passes"] += 1
            self.live = sorted(self.live + rows)
            new.update(self._single_token_step(rows, res))
        if old:
            new.update(self._decode(old))
        return new

    def _decode(self, rows: List[int]) -> Dict[int, List[int]]:
        if isinstance(self.mode, SelfSpeculative):
            from megatron.early_exit.inference.speculative import speculative_step

            return speculative_step(self, rows)
        capped = []
        if isinstance(self.mode, EarlyExit):
            capped = [r for r in rows if len(self.states[r].pend) >= self.mode.max_pending]
        res = self.runner.run(rows, self.states, self.token_ids(rows), self.exits, capped)
        self.stats["passes"] += 1
        return self._single_token_step(rows, res)

    def _single_token_step(self, rows, res: PassResult) -> Dict[int, List[int]]:
        tokens = self.sample(res.logits, rows)
        confs = res.confidence.tolist()
        logprobs = self.logprobs(res.logits, rows, tokens)
        new = {}
        for i, r in enumerate(rows):
            self.states[r].newest += 1
            self.last[r] = tokens[i]
            lp = None if logprobs[i] is None else [logprobs[i]]
            new[r] = self.emit(r, [tokens[i]], [res.exit_layer[i]], [confs[i]], lp)
        self.drop_finished()
        return new

    # ------------------------------------------------------------------ sampling (per row)
    def sample(self, logits: torch.Tensor, rows: Sequence[int]) -> List[int]:
        """One token per row, each sampled with the row's own generator."""
        return self.draw(logits, rows)[0].tolist()

    def draw(self, logits: torch.Tensor, rows: Sequence[int]):
        """logits [b, V] -> (tokens [b], the distributions they were drawn from [b, V], or None
        when every row is greedy). Row i draws from its own generator only."""
        if self.all_greedy(rows):
            return logits.argmax(dim=-1), None
        toks, probs = [], []
        for i, r in enumerate(rows):
            row = self.rows[r]
            p = processed_probs(logits[i:i + 1], row.request.sampling)  # [1, V]
            if row.request.sampling.greedy:
                toks.append(p.argmax(dim=-1))
            else:
                toks.append(torch.multinomial(p, 1, generator=row.generator).squeeze(-1))
            probs.append(p)
        return torch.cat(toks), torch.cat(probs)

    def logprobs(self, logits: torch.Tensor, rows, tokens: Sequence[int]) -> List[Optional[float]]:
        """log p(token) under the producing head at temperature 1, for rows that asked."""
        want = [i for i, r in enumerate(rows) if self.rows[r].output.logprobs is not None]
        out: List[Optional[float]] = [None] * len(rows)
        if want:
            idx = torch.tensor(want, device=logits.device)
            lp = torch.log_softmax(logits.index_select(0, idx).double(), dim=-1)
            tok = torch.tensor([tokens[i] for i in want], device=logits.device)
            for i, v in zip(want, lp.gather(1, tok[:, None])[:, 0].tolist()):
                out[i] = v
        return out

    def generator(self, row: int) -> torch.Generator:
        return self.rows[row].generator

    def params(self, row: int) -> SamplingParams:
        return self.rows[row].request.sampling

    def all_greedy(self, rows) -> bool:
        return all(self.rows[r].request.sampling.greedy for r in rows)

    # ------------------------------------------------------------------ helpers for modes
    def token_ids(self, rows: Sequence[int]) -> torch.Tensor:  # [b_u]
        ids = [self.last[r] for r in rows]
        return torch.tensor(ids, dtype=torch.int64, device=self.engine.device)

    def remaining(self, row: int) -> int:
        ch = self.rows[row].checker
        return ch.criteria.max_new_tokens - ch.num_generated

    def emit(self, row: int, tokens, layers, confs, logprobs=None) -> List[int]:
        """Feed the row's new tokens to its stop checker; keep those before the stop."""
        state = self.rows[row]
        out = state.output
        before = len(out.tokens)
        res = state.checker.feed(tokens)
        n = res.num_tokens - before
        out.extend(tokens[:n], layers[:n], confs[:n])
        if out.logprobs is not None and logprobs is not None:
            out.logprobs.extend(logprobs[:n])
        if res.stopped:
            out.finish_reason, out.text_len = res.finish_reason, res.text_len
            state.finished = True
        return list(tokens[:n])

    def drop_finished(self) -> None:
        self.live = [r for r in self.live if not self.rows[r].finished]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _row_params(sampling: Sampling, batch: int) -> List[SamplingParams]:
    if isinstance(sampling, SamplingParams):
        return [sampling] * batch
    params = list(sampling)
    if len(params) != batch or not all(isinstance(p, SamplingParams) for p in params):
        raise ValueError(f"sampling must be one SamplingParams or one per prompt ({batch})")
    return params
