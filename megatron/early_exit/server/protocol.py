"""Request bodies of the generation server -> validated jobs (pure: no HTTP, no model).

Three front ends share one job type::

    job = parse_api(body, defaults)           # PUT /api (Megatron / EE-LLM field names)
    job = parse_completions(body, defaults)   # POST /v1/completions (OpenAI)
    job = parse_chat(body, defaults)          # POST /v1/chat/completions (OpenAI)
    reqs = build_requests(job, tokenizer, cfg, chat_template=None, pipeline=False)

``body`` is the raw request bytes. Every problem raises :class:`ProtocolError` naming the field
in the front end's own terms (``tokens_to_generate`` for /api, ``max_tokens`` for OpenAI); the
HTTP layer turns it into a 4xx JSON error. ``build_requests`` tokenizes the prompts and runs
``validate_request`` on each, mapping its GenerationRequest field names back to the front end's.

Early-exit controls (OpenAI extension fields, EE-LLM fields on /api): ``early_exit_thres``
(tau), ``exit_layers`` (allowed exits), ``self_speculative: {draft_exit, num_draft}``, and on
/api ``use_early_exit``. Without any of them a request uses the server's default mode
(``ServerDefaults.early_exit_thres``: early exit at that tau, or full depth when None).

Run the tests: ``python -m pytest -q tests/server/test_protocol.py``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

from megatron.early_exit.inference.modes import EarlyExit, FullDepth, SelfSpeculative
from megatron.early_exit.inference.requests import (GenerationRequest, RequestError, max_positions,
                                                    validate_request)
from megatron.early_exit.inference.sampling import SamplingParams
from megatron.early_exit.inference.stopping import StopCriteria

__all__ = ["ProtocolError", "ServerDefaults", "Job", "parse_json", "parse_api",
           "parse_completions", "parse_chat", "build_requests"]

MAX_PROMPTS = 64  # prompts (times n) per request
MAX_N = 8
MAX_STOP = 8  # stop strings per request
MAX_STOP_CHARS = 128
ROLES = ("system", "user", "assistant", "developer", "tool")


class ProtocolError(ValueError):
    """A request cannot be served; ``field`` names it in the front end's terms."""

    def __init__(self, field_name: str, message: str, status: int = 400):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message
        self.status = status


@dataclass(frozen=True)
class ServerDefaults:
    """Server-wide values a request may override."""

    max_tokens: int = 64
    early_exit_thres: Optional[float] = None  # None: full depth unless the request asks
    model_name: str = "early-exit-gpt"
    exit_layers: Optional[tuple] = None  # exits the default tau uses (None: all)
    confidence: str = "max_prob"  # what every early-exit tau thresholds (modes.EarlyExit)


@dataclass
class Job:
    """One HTTP request's work: one GenerationRequest per (prompt, choice)."""

    kind: str  # "api" | "completions" | "chat"
    prompts: list  # str, token-id lists, or (chat) one list of messages
    max_tokens: int
    sampling: SamplingParams
    mode: object
    stop_strings: Tuple[str, ...] = ()
    stop_token_ids: Tuple[int, ...] = ()
    logprobs: bool = False
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    model: Optional[str] = None
    max_tokens_given: bool = True  # False: the server default, capped to the free positions
    extra: Dict[str, object] = field(default_factory=dict)  # front-end flags (e.g. api echo)


# ------------------------------------------------------------------------------ field checks
def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> dict:
    """The JSON object in ``body``; NaN / Infinity literals and non-objects are refused."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("body", "is not UTF-8") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ProtocolError("body", f"is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(obj, dict):
        raise ProtocolError("body", f"must be a JSON object, got {type(obj).__name__}")
    try:
        where = _surrogate(obj, "")
    except RecursionError:
        raise ProtocolError("body", "is nested too deeply") from None
    if where is not None:
        raise ProtocolError(where or "body", "holds a lone UTF-16 surrogate (not a character)")
    return obj


def _surrogate(obj, path: str) -> Optional[str]:
    """The path of the first string holding a lone surrogate (json.loads lets them through)."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        if isinstance(key, str) and _surrogate(key, path) is not None:
            return path or "body"
        sub = f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]"
        found = _surrogate(value, sub.lstrip("."))
        if found is not None:
            return found
    return None


def _check_known(body: dict, known) -> None:
    unknown = sorted(k for k in body if k not in known)
    if unknown:
        raise ProtocolError(unknown[0], f"unknown field (known fields: {', '.join(sorted(known))})")


def _int(body, name, default, lo=None, hi=None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer() and math.isfinite(v):
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError(name, f"must be an integer, got {_show(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ProtocolError(name, f"must be in [{lo}, {hi if hi is not None else 'inf'}], got {v}")
    return v


def _num(body, name, default, lo, hi, lo_open=False):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ProtocolError(name, f"must be a finite number, got {_show(v)}")
    if v < lo or v > hi or (lo_open and v == lo):
        raise ProtocolError(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return float(v)


def _bool(body, name, default):
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ProtocolError(name, f"must be true or false, got {_show(v)}")
    return v


def _show(v) -> str:
    text = json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _str_list(v, name, max_len, max_chars, allow_empty_str=False) -> List[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ProtocolError(name, "must be a string or a list of strings")
    if len(v) > max_len:
        raise ProtocolError(name, f"at most {max_len} entries, got {len(v)}")
    for s in v:
        if (not s and not allow_empty_str) or len(s) > max_chars:
            raise ProtocolError(name, f"entries must be non-empty strings of at most {max_chars} "
                                      "characters")
    return v


def _int_list(v, name, max_len) -> List[int]:
    if not isinstance(v, list) or len(v) > max_len or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise ProtocolError(name, f"must be a list of at most {max_len} integers")
    return v


def _exit_layers(body):
    v = body.get("exit_layers")
    if v is None:
        return None
    if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool)
                                                    for x in v):
        raise ProtocolError("exit_layers", "must be a non-empty list of layer numbers")
    return tuple(v)


def _speculative(v) -> SelfSpeculative:
    if not isinstance(v, dict):
        raise ProtocolError("self_speculative", "must be an object {draft_exit, num_draft}")
    _check_known(v, ("draft_exit", "num_draft", "draft_threshold"))
    if "draft_exit" not in v:
        raise ProtocolError("self_speculative.draft_exit", "is required")
    layer = _int(v, "draft_exit", None, lo=1)
    num = _int(v, "num_draft", 4, lo=1, hi=16)
    thr = _num(v, "draft_threshold", 0.0, 0.0, 1.0)
    return SelfSpeculative(exit_layer=layer, num_draft=num, draft_threshold=thr)


def _mode(body, defaults: ServerDefaults, use_early_exit=None):
    """The decoding mode from the early-exit fields (``use_early_exit`` only on /api)."""
    spec = body.get("self_speculative")
    thres = _num(body, "early_exit_thres", None, 0.0, 1.0)
    layers = _exit_layers(body)
    if spec is not None:
        for other in ("early_exit_thres", "exit_layers"):
            if body.get(other) is not None:
                raise ProtocolError(other, "cannot be combined with self_speculative")
        if use_early_exit is False:
            raise ProtocolError("use_early_exit", "is false but self_speculative is given")
        try:
            return _speculative(spec)
        except ProtocolError as e:
            raise ProtocolError(e.field if "." in e.field else f"self_speculative.{e.field}",
                                e.message) from None
    if use_early_exit is False:
        return FullDepth()
    if thres is None and (use_early_exit or layers is not None):
        thres = defaults.early_exit_thres if defaults.early_exit_thres is not None else 0.8
    if thres is None and layers is None and defaults.early_exit_thres is not None:
        thres, layers = defaults.early_exit_thres, defaults.exit_layers  # the server's default
    if thres is None:
        return FullDepth()
    return EarlyExit(threshold=thres, exit_layers=layers, confidence=defaults.confidence)


def _sampling(body, seed_field: str, top_p_zero_off: bool = False) -> SamplingParams:
    temperature = _num(body, "temperature", 1.0, 0.0, 100.0)
    top_k = _int(body, "top_k", 0, lo=0, hi=1 << 20)
    top_p = _num(body, "top_p", 1.0, 0.0, 1.0, lo_open=not top_p_zero_off)
    if top_p == 0.0:  # Megatron's /api: top_p 0 means off
        top_p = 1.0
    seed = _int(body, seed_field, None, lo=0, hi=2**63 - 1)
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)


def _default_only(body, defaults: Dict[str, object]) -> None:
    """OpenAI fields we accept only at their neutral value (else 400 naming them)."""
    for name, neutral in defaults.items():
        v = body.get(name)
        if v is not None and v != neutral:
            raise ProtocolError(name, f"is not supported (only {json.dumps(neutral)} is)")


# ------------------------------------------------------------------------------ front ends
API_FIELDS = ("prompts", "tokens_to_generate", "temperature", "top_k", "top_p", "logprobs",
              "stop_sequences", "stop_token_ids", "random_seed", "use_early_exit",
              "early_exit_thres", "exit_layers", "self_speculative", "add_BOS", "echo_prompts")


def parse_api(body: bytes, defaults: ServerDefaults) -> Job:
    """PUT /api: Megatron / EE-LLM fields."""
    obj = parse_json(body)
    _check_known(obj, API_FIELDS)
    if "prompts" not in obj:
        raise ProtocolError("prompts", "is required (a list of strings)")
    prompts = obj["prompts"]
    if not isinstance(prompts, list) or not prompts:
        raise ProtocolError("prompts", "must be a non-empty list of strings")
    prompts = _str_list(prompts, "prompts", MAX_PROMPTS, 1 << 20)
    if _bool(obj, "add_BOS", False):
        raise ProtocolError("add_BOS", "is not supported (only false is)")
    use_ee = _bool(obj, "use_early_exit", None)
    stop_ids = tuple(_int_list(obj.get("stop_token_ids") or [], "stop_token_ids", 64))
    return Job(kind="api", prompts=prompts,
               max_tokens=_int(obj, "tokens_to_generate", defaults.max_tokens, lo=1, hi=1 << 20),
               sampling=_sampling(obj, "random_seed", top_p_zero_off=True),
               mode=_mode(obj, defaults, use_ee),
               stop_strings=tuple(_str_list(obj.get("stop_sequences") or [], "stop_sequences",
                                            MAX_STOP, MAX_STOP_CHARS)),
               stop_token_ids=stop_ids, logprobs=_bool(obj, "logprobs", False),
               max_tokens_given=obj.get("tokens_to_generate") is not None,
               extra={"echo_prompts": _bool(obj, "echo_prompts", True)})


OPENAI_COMMON = ("model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream",
                 "stream_options", "logprobs", "n", "user", "presence_penalty",
                 "frequency_penalty", "logit_bias", "early_exit_thres", "exit_layers",
                 "self_speculative", "stop_token_ids")
COMPLETION_FIELDS = OPENAI_COMMON + ("prompt", "echo", "best_of", "suffix")
CHAT_FIELDS = OPENAI_COMMON + ("messages", "top_logprobs", "max_completion_tokens",
                               "response_format", "tools", "tool_choice", "parallel_tool_calls")


def _openai_common(obj: dict, defaults: ServerDefaults, kind: str, prompts: list,
                   max_tokens_field: str = "max_tokens") -> Job:
    _default_only(obj, {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}})
    if obj.get("user") is not None and not isinstance(obj["user"], str):
        raise ProtocolError("user", "must be a string")
    model = obj.get("model")
    if model is not None and model != defaults.model_name:
        raise ProtocolError("model", f"unknown model {_show(model)}; this server serves "
                                     f"{defaults.model_name!r}", status=404)
    stream = _bool(obj, "stream", False)
    opts = obj.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise ProtocolError("stream_options", "must be an object {include_usage: bool}")
        if not stream:
            raise ProtocolError("stream_options", "is only allowed with stream: true")
        include_usage = _bool(opts, "include_usage", False)
    stop = obj.get("stop")
    stop = _str_list(stop, "stop", MAX_STOP, MAX_STOP_CHARS) if stop is not None else []
    stop_ids = tuple(_int_list(obj.get("stop_token_ids") or [], "stop_token_ids", 64))
    n = _int(obj, "n", 1, lo=1, hi=MAX_N)
    if n * len(prompts) > MAX_PROMPTS:
        raise ProtocolError("n", f"prompts x n must be at most {MAX_PROMPTS}")
    return Job(kind=kind, prompts=prompts,
               max_tokens=_int(obj, max_tokens_field, defaults.max_tokens, lo=1, hi=1 << 20),
               sampling=_sampling(obj, "seed"), mode=_mode(obj, defaults),
               stop_strings=tuple(stop), stop_token_ids=stop_ids, n=n, stream=stream,
               include_usage=include_usage, model=model)


def _completion_prompts(v) -> list:
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            return [v]
        if all(isinstance(s, str) for s in v):
            return _str_list(v, "prompt", MAX_PROMPTS, 1 << 20)
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                                 for t in p) for p in v):
            if len(v) > MAX_PROMPTS:
                raise ProtocolError("prompt", f"at most {MAX_PROMPTS} prompts, got {len(v)}")
            return v
    raise ProtocolError("prompt", "must be a string, a list of strings, a list of token ids or "
                                  "a list of token-id lists (non-empty)")


def parse_completions(body: bytes, defaults: ServerDefaults) -> Job:
    """POST /v1/completions."""
    obj = parse_json(body)
    _check_known(obj, COMPLETION_FIELDS)
    if "prompt" not in obj:
        raise ProtocolError("prompt", "is required")
    prompts = _completion_prompts(obj["prompt"])
    _default_only(obj, {"echo": False, "suffix": ""})
    job = _openai_common(obj, defaults, "completions", prompts)
    job.max_tokens_given = obj.get("max_tokens") is not None
    best_of = _int(obj, "best_of", job.n, lo=1, hi=MAX_N)
    if best_of != job.n:
        raise ProtocolError("best_of", "is not supported (only best_of == n)")
    lp = _int(obj, "logprobs", None, lo=0, hi=5)
    if lp is not None and lp > 0:
        raise ProtocolError("logprobs", "top alternatives are not available; use 0 for the "
                                        "sampled tokens' log probabilities")
    job.logprobs = lp is not None
    return job


def _messages(v) -> List[dict]:
    if not isinstance(v, list) or not v:
        raise ProtocolError("messages", "must be a non-empty list of {role, content} objects")
    if len(v) > 256:
        raise ProtocolError("messages", f"at most 256 messages, got {len(v)}")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ProtocolError(where, "must be an object {role, content}")
        unknown = sorted(set(m) - {"role", "content", "name"})
        if unknown:
            raise ProtocolError(f"{where}.{unknown[0]}", "unknown field")
        if m.get("role") not in ROLES:
            raise ProtocolError(f"{where}.role", f"must be one of {', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(
                    p.get("text"), str) and set(p) <= {"type", "text"} for p in content):
                raise ProtocolError(f"{where}.content", "parts must be {type: text, text}")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ProtocolError(f"{where}.content", "must be a string or a list of text parts")
        out.append({"role": m["role"], "content": content})
    return out


def parse_chat(body: bytes, defaults: ServerDefaults) -> Job:
    """POST /v1/chat/completions."""
    obj = parse_json(body)
    _check_known(obj, CHAT_FIELDS)
    if "messages" not in obj:
        raise ProtocolError("messages", "is required")
    messages = _messages(obj["messages"])
    for name in ("tools", "tool_choice", "parallel_tool_calls"):
        if obj.get(name) not in (None, [], "none"):
            raise ProtocolError(name, "tool calls are not supported")
    fmt = obj.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise ProtocolError("response_format", "only {\"type\": \"text\"} is supported")
    field_name = "max_completion_tokens" if obj.get("max_completion_tokens") is not None else "max_tokens"
    job = _openai_common(obj, defaults, "chat", [messages], field_name)
    job.max_tokens_given = obj.get(field_name) is not None
    job.logprobs = _bool(obj, "logprobs", False)
    if _int(obj, "top_logprobs", 0, lo=0, hi=20) > 0:
        raise ProtocolError("top_logprobs", "top alternatives are not available (only 0)")
    return job


# ------------------------------------------------------------------------------ to requests
def _field_names(kind: str) -> Dict[str, str]:
    """GenerationRequest field (validate_request's RequestError.field) -> front-end field."""
    prompt = {"api": "prompts", "completions": "prompt", "chat": "messages"}[kind]
    return {"prompt": prompt, "max_new_tokens": "tokens_to_generate" if kind == "api" else "max_tokens",
            "mode.threshold": "early_exit_thres", "mode.exit_layers": "exit_layers",
            "mode.exit_layer": "self_speculative.draft_exit", "stop.stop_token_ids": "stop_token_ids",
            "sampling": "temperature"}


def front_field(kind: str, name: str, mode=None) -> str:
    """A GenerationRequest field name (RequestError.field) in the terms of front end ``kind``."""
    if name == "mode":
        return _mode_field(mode)
    return _field_names(kind).get(name, name)


def _mode_field(mode) -> str:
    if isinstance(mode, SelfSpeculative):
        return "self_speculative"
    return "early_exit_thres"


def build_requests(job: Job, tokenizer, cfg, chat_template=None,
                   pipeline: bool = False) -> List[GenerationRequest]:
    """One validated GenerationRequest per (prompt, choice), in choice order (prompt-major).
    ``chat_template``: a ChatTemplate (``render(messages) -> str``, ``end_of_turn_ids``); chat
    jobs need one. Every request stops at the tokenizer's eod, chat replies also at the
    template's end-of-turn token."""
    prompt_field = front_field(job.kind, "prompt")
    texts = job.prompts
    if job.kind == "chat":
        if chat_template is None:
            raise ProtocolError("messages", "this model's tokenizer has no chat template "
                                "(tokenizer_config.json with chat_template); use /v1/completions")
        try:
            texts = [chat_template.render(m) for m in job.prompts]
        except Exception as e:  # noqa: BLE001 - a template may raise anything on odd input
            raise ProtocolError("messages", f"the chat template rejected them: {e}") from None
    ids = [p if isinstance(p, list) else tokenizer.tokenize(p) for p in texts]
    stop_ids = frozenset(job.stop_token_ids) | {tokenizer.eod}
    if job.kind == "chat":  # a reply also ends at the template's end-of-turn token
        stop_ids |= chat_template.end_of_turn_ids(tokenizer)
    stop = StopCriteria(stop_token_ids=stop_ids, stop_strings=job.stop_strings)
    reqs = []
    for i, prompt in enumerate(ids):
        if not prompt:
            raise ProtocolError(prompt_field, f"prompt {i} is empty (it has no tokens)")
        max_new = job.max_tokens
        if not job.max_tokens_given:
            max_new = max(1, min(max_new, max_positions(cfg) - len(prompt)))
        for c in range(job.n):
            sampling = job.sampling
            if c and sampling.seed is not None:
                sampling = replace(sampling, seed=(sampling.seed + c) % 2**63)
            req = GenerationRequest(prompt=list(prompt), max_new_tokens=max_new,
                                    sampling=sampling, mode=job.mode, stop=stop,
                                    logprobs=job.logprobs)
            try:
                validate_request(req, cfg, pipeline=pipeline)
            except RequestError as e:
                raise ProtocolError(front_field(job.kind, e.field, job.mode), e.message) from None
            reqs.append(req)
    return reqs
