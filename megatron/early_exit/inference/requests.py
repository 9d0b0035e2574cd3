"""What a generation request is, what comes back from it, and the one place requests are checked.

This is the contract between the continuous-batching scheduler (scheduler.py), the thread that
drives it (service.py) and the HTTP server (megatron/early_exit/server/): token ids in, token
ids plus per-token exit information out. No tokenizer here; stop strings are matched by the
scheduler with the ``detokenize`` callable it is given.

    req = GenerationRequest(prompt=[5, 7, 9], max_new_tokens=32,
                            sampling=SamplingParams(temperature=0.7, seed=1),
                            mode=EarlyExit(threshold=0.8), stop=StopCriteria(stop_token_ids={0}))
    validate_request(req, cfg)                # RequestError(field, message) on bad input
    for update in ...:                        # RequestUpdate: the tokens produced this step
        update.tokens, update.exit_layers, update.confidences, update.finished

``validate_request`` runs on the rank that receives a request, before anything is sent to the
other ranks, so a bad request never reaches a model. Its errors name the field of
:class:`GenerationRequest` (``prompt``, ``max_new_tokens``, ``mode.threshold``, ...); front ends
map these names to their own (e.g. ``tokens_to_generate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

from megatron.early_exit.inference.modes import EarlyExit, FullDepth, Mode, SelfSpeculative
from megatron.early_exit.inference.sampling import SamplingParams
from megatron.early_exit.inference.stopping import StopCriteria

__all__ = ["GenerationRequest", "RequestUpdate", "RequestError", "QueueFull", "validate_request",
           "max_positions"]

GREEDY = SamplingParams(temperature=0.0)


class RequestError(ValueError):
    """A request is invalid; ``field`` names the offending GenerationRequest field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


class QueueFull(RuntimeError):
    """The scheduler's waiting queue is at its bound; retry later (HTTP 429)."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt: List[int]  # token ids, non-empty, each in [0, tokenizer vocabulary)
    max_new_tokens: int  # >= 1
    sampling: SamplingParams = GREEDY
    mode: object = FullDepth()  # FullDepth | EarlyExit | SelfSpeculative
    stop: StopCriteria = StopCriteria()
    logprobs: bool = False  # report log p(token) under the producing head (temperature 1)
    request_id: Optional[str] = None  # assigned by the scheduler when None


@dataclass
class RequestUpdate:
    """What one request produced in one scheduler step (lists aligned, one entry per token).

    ``finish_reason`` when finished: "stop" (stop id or string), "length", "cancelled".
    ``text_len``: characters of detokenize(all tokens) to keep, set when a stop string matched.
    """

    request_id: str
    tokens: List[int] = field(default_factory=list)
    exit_layers: List[int] = field(default_factory=list)
    confidences: List[float] = field(default_factory=list)
    logprobs: Optional[List[float]] = None
    finished: bool = False
    finish_reason: Optional[str] = None
    text_len: Optional[int] = None
    prompt_len: int = 0


def max_positions(cfg) -> int:
    """Positions a sequence may use: learned tables have max_position_embeddings rows; RoPE
    models are held to what they were built for (the same --max-position-embeddings, which
    defaults to --seq-length)."""
    return cfg.model.max_position_embeddings


def _bad_number(x) -> bool:
    return isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x)


def validate_request(req: GenerationRequest, cfg, pipeline: bool = False) -> None:
    """Raise RequestError naming the field if ``req`` cannot run on a model of config ``cfg``.
    ``pipeline``: the model runs over PP > 1 stages (self-speculative decoding is refused)."""
    vocab = cfg.model.num_tokens
    p = req.prompt
    if not isinstance(p, (list, tuple)) or not p:
        raise RequestError("prompt", "must be a non-empty list of token ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        raise RequestError("prompt", "token ids must be integers")
    if min(p) < 0 or max(p) >= vocab:
        raise RequestError("prompt", f"has token ids outside the vocabulary [0, {vocab})")
    n = req.max_new_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RequestError("max_new_tokens", f"must be an integer >= 1, got {n!r}")
    limit = max_positions(cfg)
    if len(p) + n > limit:
        raise RequestError("max_new_tokens", f"prompt ({len(p)} tokens) + max_new_tokens ({n}) "
                           f"exceeds the model's {limit} positions")
    if not isinstance(req.sampling, SamplingParams):
        raise RequestError("sampling", "must be a SamplingParams")
    _validate_mode(req.mode, cfg, pipeline)
    if not isinstance(req.stop, StopCriteria):
        raise RequestError("stop", "must be a StopCriteria")
    bad = [t for t in req.stop.stop_token_ids if not 0 <= t < cfg.model.vocab_size]
    if bad:
        raise RequestError("stop.stop_token_ids", f"ids {sorted(bad)[:5]} are outside [0, "
                           f"{cfg.model.vocab_size})")


def _validate_mode(mode, cfg, pipeline: bool) -> None:
    from megatron.early_exit.inference.exit_points import exit_depth

    layers = list(cfg.exits.exit_layer_nums)
    if not isinstance(mode, Mode):
        raise RequestError("mode", f"must be FullDepth, EarlyExit or SelfSpeculative, got {mode!r}")
    if isinstance(mode, EarlyExit):
        if _bad_number(mode.threshold) or not 0.0 <= mode.threshold <= 1.0:
            raise RequestError("mode.threshold", f"must be in [0, 1], got {mode.threshold!r}")
        if mode.exit_layers is not None:
            bad = [x for x in mode.exit_layers if x not in layers]
            if bad or not mode.exit_layers:
                raise RequestError("mode.exit_layers", f"{list(mode.exit_layers)} are not exits "
                                   f"of this model (its exits: {layers})")
        if mode.threshold < 1.0 and not layers:
            raise RequestError("mode", "this model has no exits: early exit needs exit layers")
        if mode.confidence == "classifier" and not cfg.exits.use_exit_classifier:
            raise RequestError("mode.confidence", "classifier: this model's exits have no "
                               "classifiers (tools/fit_exit_classifier.py fits them)")
    if isinstance(mode, SelfSpeculative):
        if pipeline:
            raise RequestError("mode", "self-speculative decoding is not supported with "
                               "pipeline parallelism (PP > 1): its rollback of rejected drafts "
                               "would have to cross every stage; serve it at PP = 1")
        if mode.exit_layer not in layers:
            raise RequestError("mode.exit_layer", f"{mode.exit_layer!r} is not an exit of this "
                               f"model (its exits: {layers})")
        if exit_depth(cfg, mode.exit_layer) >= cfg.model.num_layers:
            raise RequestError("mode.exit_layer", f"exit {mode.exit_layer} reads the last "
                               "layer's output: nothing would be left to verify the drafts with")
