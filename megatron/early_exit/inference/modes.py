"""Decoding modes of the inference engine and what a generation returns.

A mode object travels with each ``Engine.generate`` call::

    FullDepth()                                          # every token through every layer
    EarlyExit(threshold=0.8, exit_layers=[2, 4])        # confidence-based early exit
    SelfSpeculative(exit_layer=2, num_draft=4)          # lossless draft-and-verify

Confidence is the max softmax probability of an exit's logits over the full vocabulary at
temperature 1 (``confidence="margin"``: top-1 minus top-2 probability; ``"classifier"``: the
exit's fitted confidence classifier, scored before the exit's vocabulary projection, which only
tokens that leave there pay for; model/exit_head.py). A token exits at the
first allowed exit with ``c >= threshold``, and only when ``threshold < 1``: ``threshold = 1.0``
never exits (float32 softmax can round to exactly 1.0), so it reproduces ``FullDepth`` token for
token. The first generated token always comes from the final head (the prompt runs at full
depth anyway). ``max_pending`` caps the tokens a row may hold without deep KV; a row at the
cap runs its next token to full depth, which fills every pending token's KV, but still takes
that token from the first confident exit: the cap changes speed, never the output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class FullDepth:
    """No early exit: prefill, then one full-depth pass per token."""


@dataclass(frozen=True)
class EarlyExit:
    threshold: float = 0.8  # tau (EE-LLM's early_exit_thres)
    exit_layers: Optional[Tuple[int, ...]] = None  # allowed exits (None: all)
    max_pending: int = 16  # pending tokens per row before a forced full-depth pass
    confidence: str = "max_prob"  # or "margin", "classifier"

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"early_exit_thres must be in [0, 1], got {self.threshold!r}")
        if self.exit_layers is not None:
            object.__setattr__(self, "exit_layers", tuple(int(x) for x in self.exit_layers))
        if not isinstance(self.max_pending, int) or self.max_pending < 0:
            raise ValueError(f"max_pending must be an int >= 0, got {self.max_pending!r}")
        if self.confidence not in ("max_prob", "margin", "classifier"):
            raise ValueError("confidence must be max_prob, margin or classifier, got "
                             f"{self.confidence!r}")


@dataclass(frozen=True)
class SelfSpeculative:
    exit_layer: int  # the drafting exit
    num_draft: int = 4  # k: draft at most k tokens per cycle
    draft_threshold: float = 0.0  # stop drafting after a draft whose confidence < this

    def __post_init__(self):
        if not isinstance(self.num_draft, int) or self.num_draft < 1:
            raise ValueError(f"num_draft must be an int >= 1, got {self.num_draft!r}")
        if not 0.0 <= self.draft_threshold <= 1.0:
            raise ValueError(f"draft_threshold must be in [0, 1], got {self.draft_threshold!r}")


Mode = (FullDepth, EarlyExit, SelfSpeculative)


@dataclass
class GenerationOutput:
    """One prompt's result. Lists are aligned: one entry per generated token.

    exit_layers: the exit layer that produced the token, or num_layers for the final head.
      Self-speculative: accepted drafts report the drafting exit, the verifier's token
      num_layers. confidences: that head's confidence (max softmax prob, temperature 1).
    finish_reason: "stop" (stop id or string) or "length". text_len: characters of
      ``detokenize(tokens)`` to keep (set when a detokenize callable was given).
    """

    prompt_len: int
    tokens: List[int] = field(default_factory=list)
    exit_layers: List[int] = field(default_factory=list)
    confidences: List[float] = field(default_factory=list)
    finish_reason: Optional[str] = None
    text_len: Optional[int] = None
    logprobs: Optional[List[float]] = None  # log p(token) at temperature 1, when requested

    def extend(self, tokens: Sequence[int], layers: Sequence[int], confs: Sequence[float]) -> None:
        self.tokens.extend(tokens)
        self.exit_layers.extend(layers)
        self.confidences.extend(confs)
