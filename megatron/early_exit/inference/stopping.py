"""Stop conditions for one generated sequence: stop token ids, stop strings, max new tokens.

The engine knows token ids only; stop strings need text, so the checker takes a
``detokenize(ids) -> str`` callable from the caller (the tokenizer lives outside the engine).

Usage::

    criteria = StopCriteria(stop_token_ids={eos}, stop_strings=["\\nUser:"], max_new_tokens=256)
    checker = StopChecker(criteria, tokenizer.decode)
    for step_tokens in engine_steps:              # one id, or several (speculative decoding)
        res = checker.feed(step_tokens)
        if res.stopped:
            ids = generated[:res.num_tokens]
            text = tokenizer.decode(ids)[:res.text_len]
            break
        # streaming: hold back the last res.holdback_chars characters (a possible stop prefix)

Semantics (identical whether tokens arrive one at a time or several at once):

* a stop token id ends generation with finish_reason ``"stop"``; the stop token itself is not
  part of the kept tokens or text (``num_tokens`` counts the tokens before it);
* a stop string ends generation with ``"stop"`` at the token that completes it; that token is
  kept (``num_tokens`` includes it, its text may straddle the match) and the text is truncated
  right before the stop string. When several stop strings complete, the one that ends first
  wins, ties going to the one that starts first;
* reaching ``max_new_tokens`` ends generation with ``"length"`` (a stop on that same token
  takes precedence); tokens fed after the limit are ignored.

Efficiency and its assumption: each step decodes only a tail window of the ids, not the whole
sequence. The window keeps at least ``4 * longest_stop_string + 8`` tokens before the new ones
and is re-anchored (restarted closer to the end) once it doubles, so each step costs
O(window) and the full text is decoded once, when generation stops. This is exact when
(a) every run of 4 consecutive tokens decodes to at least one character (true for
character/word-piece vocabularies and for byte-level BPE, where a character is at most 4
bytes), and (b) decoding a window yields a suffix of the full text apart from its first few
characters (tokenizers that drop a leading space or show partial UTF-8 as U+FFFD at the start
of a decode); the 8 slack tokens keep those artifacts away from the searched region.
Tokens that decode to nothing (e.g. skipped special tokens) count against (a); raise
``window_tokens`` if a vocabulary has many of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, FrozenSet, Iterable, List, Optional, Tuple, Union

__all__ = ["StopCriteria", "StopResult", "StopChecker"]

_REPLACEMENT = "\ufffd"  # what a decoder shows for an incomplete UTF-8 sequence


@dataclass(frozen=True)
class StopCriteria:
    """When one sequence stops. Empty sets / None disable a criterion."""

    stop_token_ids: FrozenSet[int] = frozenset()
    stop_strings: Tuple[str, ...] = ()
    max_new_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        ids = frozenset(self.stop_token_ids)
        if any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
            raise ValueError(f"stop_token_ids must be ints, got {sorted(map(repr, ids))}")
        strings = tuple(self.stop_strings)
        if any(not isinstance(s, str) or s == "" for s in strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {strings!r}")
        m = self.max_new_tokens
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"max_new_tokens must be None or an int >= 1, got {m!r}")
        object.__setattr__(self, "stop_token_ids", ids)
        object.__setattr__(self, "stop_strings", strings)


@dataclass(frozen=True)
class StopResult:
    """What `StopChecker.feed` reports after a step.

    num_tokens: generated tokens to keep (all fed tokens so far while not stopped).
    text_len: characters of ``detokenize(ids[:num_tokens])`` to keep; set once stopped (None
      before, or when no detokenize callable was given).
    matched: the stop token id or stop string that fired, if any.
    holdback_chars: while running, trailing characters that may begin a stop string; a
      streaming server should not emit them yet.
    """

    stopped: bool
    finish_reason: Optional[str]  # "stop" | "length" | None while running
    num_tokens: int
    text_len: Optional[int] = None
    matched: Union[int, str, None] = None
    holdback_chars: int = 0


@dataclass
class _Match:
    tokens: int  # tokens of the window up to and including the completing token
    start: int  # window-text offset where the stop string starts
    window_chars: int  # len(window text) at that token
    string: str


@dataclass
class StopChecker:
    """Incremental stop checking for one sequence; feed it the generated ids in order."""

    criteria: StopCriteria
    detokenize: Optional[Callable[[List[int]], str]] = None
    window_tokens: Optional[int] = None  # tokens kept before new ones; default 4*L + 8
    _ids: List[int] = field(default_factory=list, init=False, repr=False)
    _win_start: int = field(default=0, init=False, repr=False)  # index of the window's 1st id
    _win_text: str = field(default="", init=False, repr=False)  # detokenize(ids[win_start:])
    _result: Optional[StopResult] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        longest = max((len(s) for s in self.criteria.stop_strings), default=0)
        if longest and self.detokenize is None:
            raise ValueError("stop_strings need a detokenize callable")
        if self.window_tokens is None:
            self.window_tokens = 4 * longest + 8
        elif self.window_tokens < longest + 1:
            raise ValueError(f"window_tokens must be > longest stop string ({longest})")

    @property
    def num_generated(self) -> int:
        return len(self._ids)

    @property
    def stopped(self) -> bool:
        return self._result is not None

    def feed(self, token_ids: Union[int, Iterable[int]]) -> StopResult:
        """Append one id or several (in order) and report whether the sequence stops."""
        if self._result is not None:
            raise RuntimeError("feed() after the sequence stopped")
        new = [int(token_ids)] if _is_scalar(token_ids) else [int(t) for t in token_ids]
        crit = self.criteria
        limit = len(new)
        if crit.max_new_tokens is not None:
            limit = min(limit, crit.max_new_tokens - len(self._ids))
        stop_at = next((i for i in range(limit) if new[i] in crit.stop_token_ids), None)
        text_new = new[: limit if stop_at is None else stop_at]  # ids that add text
        if crit.stop_strings and text_new:
            match, window_text = self._scan(text_new)
            if match is not None:
                return self._stop_on_string(text_new, match)
            self._win_text = window_text
        self._ids.extend(text_new)
        if stop_at is not None:
            return self._finish("stop", new[stop_at], self._full_text_len(0))
        if crit.max_new_tokens is not None and len(self._ids) >= crit.max_new_tokens:
            return self._finish("length", None, self._full_text_len(0))
        return StopResult(False, None, len(self._ids), holdback_chars=self._holdback())

    # -- internals ------------------------------------------------------------------------

    def _decode_window(self, extra: List[int] = ()) -> str:
        return self.detokenize(self._ids[self._win_start :] + list(extra))

    def _reanchor(self) -> None:
        """Restart the window `window_tokens` before the end once it has doubled."""
        if len(self._ids) - self._win_start > 2 * self.window_tokens:
            self._win_start = len(self._ids) - self.window_tokens
            self._win_text = self._decode_window()

    def _scan(self, new: List[int]) -> Tuple[Optional[_Match], str]:
        """Earliest stop-string completion among the new ids (or None), and the window text
        with all of them appended."""
        self._reanchor()
        old = self._win_text.rstrip(_REPLACEMENT)  # a trailing U+FFFD may still change
        text = self._decode_window(new)
        match = self._find(text, len(old))
        if match is None or len(new) == 1:
            return (None if match is None else _Match(len(new), *match)), text
        for j in range(1, len(new)):  # rare: find the token that completed it first
            earlier = self._find(self._decode_window(new[:j]), len(old))
            if earlier is not None:
                return _Match(j, *earlier), text
        return _Match(len(new), *match), text

    def _find(self, text: str, old_len: int) -> Optional[Tuple[int, int, str]]:
        """Stop string ending first (then starting first) past old_len in text.

        Returns (start, len(text), string) or None.
        """
        best = None
        for s in self.criteria.stop_strings:
            pos = text.find(s, max(0, old_len - len(s) + 1))
            if pos >= 0:
                key = (pos + len(s), pos)
                if best is None or key < best[0]:
                    best = (key, s)
        if best is None:
            return None
        return best[0][1], len(text), best[1]

    def _stop_on_string(self, new: List[int], match: _Match) -> StopResult:
        self._ids.extend(new[: match.tokens])
        drop_chars = match.window_chars - match.start  # chars from the stop string's start
        return self._finish("stop", match.string, self._full_text_len(drop_chars))

    def _full_text_len(self, drop_chars: int) -> Optional[int]:
        if self.detokenize is None:
            return None
        return max(0, len(self.detokenize(list(self._ids))) - drop_chars)

    def _finish(self, reason: str, matched, text_len: Optional[int]) -> StopResult:
        self._result = StopResult(True, reason, len(self._ids), text_len, matched)
        return self._result

    def _holdback(self) -> int:
        """Longest suffix of the current text that is a proper prefix of a stop string."""
        text, best = self._win_text, 0
        for s in self.criteria.stop_strings:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


def _is_scalar(x) -> bool:
    if isinstance(x, int):
        return True
    dim = getattr(x, "ndim", None)  # 0-d torch / numpy values
    return dim == 0
