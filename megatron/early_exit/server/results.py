"""What a request produced, as text, and the JSON shapes the endpoints return (pure).

    choice = Choice(index=0, prompt_len=5, detokenize=tok.detokenize, holdback=len("\\nUser:") - 1)
    for update in updates:                       # RequestUpdates of one request, in order
        deltas = choice.feed(update)             # [(text delta, token, exit layer, conf, logprob)]
    choice.text, choice.finish_reason            # after the finished update

Streaming text is cut per token: each token's delta is the new text its id adds, minus
trailing characters that may still change (an incomplete UTF-8 sequence shows as U+FFFD, and
the last ``holdback`` characters may begin a stop string); what is held back comes out with a
later token or at the end. The concatenated deltas equal the non-streamed ``text``.

Shapes: ``completion_response`` / ``chat_response`` (OpenAI objects with the extension fields
``exit_layers``, ``confidences``, ``tokens`` in each choice and ``usage.mean_exit_layer``),
``completion_chunk`` / ``chat_chunk`` (one SSE chunk), ``api_response`` (Megatron's /api).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

__all__ = ["Choice", "usage", "completion_response", "chat_response", "completion_chunk",
           "chat_chunk", "api_response"]

_REPLACEMENT = "\ufffd"


@dataclass
class Choice:
    """One (prompt, choice) of a request: its tokens, exit information and text so far."""

    index: int
    prompt_len: int
    detokenize: Callable
    holdback: int = 0
    tokens: List[int] = field(default_factory=list)
    exit_layers: List[int] = field(default_factory=list)
    confidences: List[float] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    finish_reason: Optional[str] = None
    text: str = ""  # the text sent so far (all of it once finished)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def feed(self, update) -> list:
        """Per-token (delta, token, exit layer, confidence, logprob) of one RequestUpdate; on
        the finished update the remaining text joins the last entry (or one empty-token entry)."""
        out = []
        limit = update.text_len if update.finished else None  # a stop string cut the text
        lps = update.logprobs or [None] * len(update.tokens)
        for tok, layer, conf, lp in zip(update.tokens, update.exit_layers, update.confidences, lps):
            self.tokens.append(tok)
            self.exit_layers.append(layer)
            self.confidences.append(float(conf))
            if lp is not None:
                self.logprobs.append(float(lp))
            out.append([self._advance(limit), tok, layer, float(conf), lp])
        if update.finished:
            self.finish(update.finish_reason, update.text_len, out)
        return out

    def finish(self, reason: str, text_len: Optional[int] = None, out: Optional[list] = None) -> str:
        """Mark finished; returns (and appends to ``out``) the text not sent yet."""
        full = self.detokenize(self.tokens)
        if text_len is not None:
            full = full[:text_len]
        rest = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += rest
        self.finish_reason = reason
        if out is not None:
            if out:
                out[-1][0] += rest
            elif rest:
                out.append([rest, None, None, None, None])
        return rest

    def _advance(self, limit: Optional[int] = None) -> str:
        full = self.detokenize(self.tokens)
        safe = len(full) - self.holdback if limit is None else min(len(full), limit)
        while safe > 0 and full[safe - 1] == _REPLACEMENT:
            safe -= 1
        if safe <= len(self.text) or not full.startswith(self.text):
            return ""
        delta = full[len(self.text):safe]
        self.text += delta
        return delta

    def mean_exit_layer(self) -> Optional[float]:
        return sum(self.exit_layers) / len(self.exit_layers) if self.exit_layers else None

    def extension(self) -> dict:
        return {"tokens": self.tokens, "exit_layers": self.exit_layers,
                "confidences": [round(c, 6) for c in self.confidences]}


def usage(choices: List[Choice], prompt_lens: List[int]) -> dict:
    """OpenAI usage plus ``mean_exit_layer`` over every generated token (None when there are none)."""
    done = sum(len(c.tokens) for c in choices)
    layers = [layer for c in choices for layer in c.exit_layers]
    prompt = sum(prompt_lens)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
            "mean_exit_layer": round(sum(layers) / len(layers), 4) if layers else None}


def _completion_logprobs(c: Choice) -> Optional[dict]:
    if not c.logprobs:
        return None
    pieces = [c.detokenize([t]) for t in c.tokens]
    offsets, pos = [], 0
    for p in pieces:
        offsets.append(pos)
        pos += len(p)
    return {"tokens": pieces, "token_logprobs": c.logprobs, "top_logprobs": None,
            "text_offset": offsets}


def _chat_logprobs(c: Choice) -> Optional[dict]:
    if not c.logprobs:
        return None
    out = []
    for t, lp in zip(c.tokens, c.logprobs):
        piece = c.detokenize([t])
        out.append({"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8")),
                    "top_logprobs": []})
    return {"content": out}


def completion_response(rid: str, created: int, model: str, choices: List[Choice],
                        prompt_lens: List[int]) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": c.index, "text": c.text, "logprobs": _completion_logprobs(c),
                         "finish_reason": c.finish_reason, **c.extension()} for c in choices],
            "usage": usage(choices, prompt_lens)}


def chat_response(rid: str, created: int, model: str, choices: List[Choice],
                  prompt_lens: List[int]) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                         "logprobs": _chat_logprobs(c), "finish_reason": c.finish_reason,
                         **c.extension()} for c in choices],
            "usage": usage(choices, prompt_lens)}


def _chunk_ext(tok, layer, conf) -> dict:
    if tok is None:
        return {"tokens": [], "exit_layers": [], "confidences": []}
    return {"tokens": [tok], "exit_layers": [layer], "confidences": [round(conf, 6)]}


def completion_chunk(rid, created, model, index, delta, tok=None, layer=None, conf=None, lp=None,
                     finish_reason=None, detokenize=None) -> dict:
    logprobs = None
    if lp is not None:
        logprobs = {"tokens": [detokenize([tok])], "token_logprobs": [lp], "top_logprobs": None,
                    "text_offset": [0]}
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": delta, "logprobs": logprobs,
                         "finish_reason": finish_reason, **_chunk_ext(tok, layer, conf)}]}


def chat_chunk(rid, created, model, index, delta, tok=None, layer=None, conf=None, lp=None,
               finish_reason=None, detokenize=None, first=False) -> dict:
    d = {"role": "assistant", "content": delta} if first else {"content": delta}
    logprobs = None
    if lp is not None:
        piece = detokenize([tok])
        logprobs = {"content": [{"token": piece, "logprob": lp, "bytes": list(piece.encode()),
                                 "top_logprobs": []}]}
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": d, "logprobs": logprobs,
                         "finish_reason": finish_reason, **_chunk_ext(tok, layer, conf)}]}


def api_response(prompts: List[str], choices: List[Choice], echo: bool, with_logprobs: bool) -> dict:
    """Megatron's /api shape: ``text`` (prompt + generation when ``echo``), ``segments`` (the
    generated tokens' strings), plus ``tokens``, ``exit_layers``, ``confidences``,
    ``finish_reasons`` and ``logprobs`` (when asked) per prompt."""
    out = {"text": [(p if echo else "") + c.text for p, c in zip(prompts, choices)],
           "segments": [[c.detokenize([t]) for t in c.tokens] for c in choices],
           "tokens": [c.tokens for c in choices],
           "exit_layers": [c.exit_layers for c in choices],
           "confidences": [[round(x, 6) for x in c.confidences] for c in choices],
           "finish_reasons": [c.finish_reason for c in choices]}
    if with_logprobs:
        out["logprobs"] = [c.logprobs for c in choices]
    return out
