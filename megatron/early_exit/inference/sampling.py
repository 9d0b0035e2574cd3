"""Token sampling for the inference engines: greedy, temperature, top-k, top-p, and the
acceptance rule of (self-)speculative decoding.

Pure PyTorch and device-agnostic: every tensor is created on the device of the logits or
probabilities passed in, and nothing here synchronises with the device except where noted.

Usage::

    params = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, seed=1234)
    gen = params.make_generator(logits.device)          # None when seed is None
    tokens = sample(logits, params, gen)                 # logits [b, V] -> tokens [b]

    # a batch that mixes requests: one SamplingParams per row
    rows = BatchSamplingParams.stack([p0, p1, p2], device=logits.device)
    probs = processed_probs(logits, rows)                # [b, V], what `sample` draws from

    # speculative decoding (lossless): q = draft distributions, p = target distributions
    n_acc, nxt = speculative_accept(draft_tokens, q, p, gen, draft_lengths)

Temperature 0 means greedy. A greedy row's processed distribution is the one-hot vector of
its argmax, so the same code serves greedy and sampled rows, including speculative acceptance
(a one-hot target accepts a draft token exactly when it equals the target argmax).

Randomness: one ``torch.Generator`` (on the logits' device) serves a whole batch; rows are
independent draws from it. Per-request seeds therefore reproduce exactly when the request is
sampled with its own generator (e.g. batch of one, or an engine that groups by seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "SamplingParams",
    "BatchSamplingParams",
    "processed_probs",
    "sample",
    "speculative_accept",
    "speculative_accept_greedy",
]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. temperature 0 = greedy, top_k 0 = off, top_p 1.0 = off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 < p <= 1.0):
            raise ValueError(f"top_p must be a number in (0, 1] (1 = off), got {p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be None or an int in [0, 2**64), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generator(self, device: Union[str, torch.device] = "cpu") -> Optional[torch.Generator]:
        """A generator on `device` seeded with `seed`, or None (global RNG) when unseeded."""
        if self.seed is None:
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed)
        return gen


@dataclass(frozen=True)
class BatchSamplingParams:
    """Per-row sampling parameters of a mixed batch; each field is a [b] tensor.

    Build it with :meth:`stack` (no device sync). Direct construction from tensors validates
    the values, which synchronises once with the device. The ``needs_*`` / ``*_greedy`` flags
    let the hot path skip the sort and the greedy merge without inspecting tensors.
    """

    temperature: torch.Tensor  # [b] float, 0 = greedy
    top_k: torch.Tensor  # [b] int64, 0 = off
    top_p: torch.Tensor  # [b] float in (0, 1], 1 = off
    needs_top_k: Optional[bool] = None
    needs_top_p: Optional[bool] = None
    any_greedy: Optional[bool] = None
    all_greedy: Optional[bool] = None

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if not (t.dim() == k.dim() == p.dim() == 1 and t.shape == k.shape == p.shape):
            raise ValueError("temperature, top_k and top_p must be [b] tensors of one shape")
        if None in (self.needs_top_k, self.needs_top_p, self.any_greedy, self.all_greedy):
            if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                raise ValueError("temperature must be finite and >= 0 in every row")
            if bool((k < 0).any()):
                raise ValueError("top_k must be >= 0 in every row")
            if bool(((p <= 0) | (p > 1)).any()):
                raise ValueError("top_p must be in (0, 1] in every row")
            greedy = t == 0
            object.__setattr__(self, "needs_top_k", bool((k > 0).any()))
            object.__setattr__(self, "needs_top_p", bool((p < 1).any()))
            object.__setattr__(self, "any_greedy", bool(greedy.any()))
            object.__setattr__(self, "all_greedy", bool(greedy.all()))

    @classmethod
    def stack(
        cls, params: Sequence[SamplingParams], device: Union[str, torch.device] = "cpu"
    ) -> "BatchSamplingParams":
        """One row per SamplingParams (already validated), flags computed on the host."""
        if len(params) == 0:
            raise ValueError("params must hold at least one SamplingParams")
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            needs_top_k=any(p.top_k > 0 for p in params),
            needs_top_p=any(p.top_p < 1 for p in params),
            any_greedy=any(p.greedy for p in params),
            all_greedy=all(p.greedy for p in params),
        )


Params = Union[SamplingParams, BatchSamplingParams]


class _Rows(NamedTuple):
    """Parameters as python scalars or [b, 1] tensors that broadcast against [b, V]."""

    temperature: Union[float, torch.Tensor]  # greedy rows replaced by 1.0
    top_k: Union[int, torch.Tensor, None]  # None = no row uses top-k
    top_p: Union[float, torch.Tensor, None]  # None = no row uses top-p
    greedy: Optional[torch.Tensor]  # [b, 1] bool, None when no row is greedy
    all_greedy: bool


def _rows(params: Params, device: torch.device) -> _Rows:
    if isinstance(params, SamplingParams):
        return _Rows(
            temperature=params.temperature if params.temperature > 0 else 1.0,
            top_k=params.top_k if params.top_k > 0 else None,
            top_p=params.top_p if params.top_p < 1 else None,
            greedy=None,
            all_greedy=params.greedy,
        )
    if not isinstance(params, BatchSamplingParams):
        raise TypeError(f"params must be SamplingParams or BatchSamplingParams, got {type(params)}")
    t = params.temperature.to(device=device, dtype=torch.float32).unsqueeze(-1)  # [b, 1]
    return _Rows(
        temperature=torch.where(t > 0, t, torch.ones_like(t)),
        top_k=params.top_k.to(device).unsqueeze(-1) if params.needs_top_k else None,
        top_p=params.top_p.to(device, torch.float32).unsqueeze(-1) if params.needs_top_p else None,
        greedy=(t == 0) if params.any_greedy else None,
        all_greedy=bool(params.all_greedy),
    )


def _one_hot_argmax(x: torch.Tensor) -> torch.Tensor:
    """[b, V] scores -> [b, V] float32 one-hot of the row argmax (first index on ties)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return out.scatter_(-1, x.argmax(-1, keepdim=True), 1.0)


def _top_k_top_p_mask(x: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """Boolean [b, V] mask of the tokens to drop from scaled logits x [b, V].

    Ranks come from one descending sort, so top-k keeps exactly k tokens even with ties.
    Top-p runs on the top-k-filtered distribution and keeps rank r when the probability mass
    strictly before r is < top_p: the smallest prefix reaching top_p, never empty.
    """
    vocab = x.shape[-1]
    vals, order = x.sort(dim=-1, descending=True)  # [b, V], [b, V]
    rank = torch.arange(vocab, device=x.device)  # [V]
    drop = torch.zeros_like(vals, dtype=torch.bool)  # [b, V] in sorted order
    if top_k is not None:
        k = top_k if not torch.is_tensor(top_k) else torch.where(top_k > 0, top_k, vocab)
        drop = rank >= k  # [b, V] (or [1, V] for a scalar k)
        drop = drop.expand_as(vals)
        vals = vals.masked_fill(drop, float("-inf"))
    if top_p is not None:
        probs = torch.softmax(vals, dim=-1)  # [b, V], sorted
        mass_before = probs.cumsum(dim=-1) - probs  # exclusive cumsum, exactly 0 at rank 0
        drop = drop | ((mass_before >= top_p) & (top_p < 1))
    return torch.empty_like(drop).scatter_(-1, order, drop)  # back to vocabulary order


def processed_probs(logits: torch.Tensor, params: Params) -> torch.Tensor:
    """The distribution `sample` draws from: logits [b, V] -> probs [b, V] (float32).

    Order: temperature, then top-k, then top-p, then softmax over the kept tokens. Greedy rows
    (temperature 0) get the one-hot vector of their argmax.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [b, V], got shape {tuple(logits.shape)}")
    rows = _rows(params, logits.device)
    x = logits.float()  # [b, V]
    if rows.all_greedy:
        return _one_hot_argmax(x)
    x = x / rows.temperature  # [b, V]
    if rows.top_k is not None or rows.top_p is not None:
        x = x.masked_fill(_top_k_top_p_mask(x, rows.top_k, rows.top_p), float("-inf"))
    probs = torch.softmax(x, dim=-1)  # [b, V]
    if rows.greedy is not None:
        probs = torch.where(rows.greedy, _one_hot_argmax(logits.float()), probs)
    return probs


def sample(
    logits: torch.Tensor, params: Params, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Draw one token per row: logits [b, V] -> tokens [b] (int64).

    Greedy (argmax) when every row has temperature 0, otherwise one multinomial draw per row
    from `processed_probs` using `generator` (on the logits' device; None = global RNG).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [b, V], got shape {tuple(logits.shape)}")
    all_greedy = params.greedy if isinstance(params, SamplingParams) else params.all_greedy
    if all_greedy:
        return logits.argmax(dim=-1)
    probs = processed_probs(logits, params)  # [b, V]
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _lengths_and_valid(
    draft_tokens: torch.Tensor, draft_lengths: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> lengths [b] int64, valid [b, k] bool (position i < the row's draft length)."""
    b, k = draft_tokens.shape
    dev = draft_tokens.device
    if draft_lengths is None:
        lengths = torch.full((b,), k, dtype=torch.int64, device=dev)
    else:
        lengths = draft_lengths.to(device=dev, dtype=torch.int64)
        if lengths.shape != (b,):
            raise ValueError(f"draft_lengths must be [b] = [{b}], got {tuple(lengths.shape)}")
    valid = torch.arange(k, device=dev) < lengths.unsqueeze(-1)  # [b, k]
    return lengths, valid


def speculative_accept(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    draft_lengths: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lossless speculative rejection sampling, batched over rows.

    draft_tokens [b, k]: token i of a row was drawn from draft_probs[:, i] (the distribution
    actually sampled, e.g. `processed_probs` of the drafter). target_probs [b, k+1, V]: the
    target's processed distribution at each draft position plus the bonus position.
    draft_lengths [b] (optional, <= k): a row uses only its first L drafts and its bonus
    distribution is target_probs[:, L]; the padding beyond L is ignored (any values).

    Draft token i is accepted with probability min(1, p(x_i) / q(x_i)), left to right. At the
    first rejection the next token is drawn from normalize(max(0, p - q)); if all L drafts are
    accepted it is drawn from target_probs[:, L]. The emitted tokens are then distributed
    exactly as sampling from the target alone.

    Returns num_accepted [b] (int64, in [0, L]) and next_token [b] (int64).
    """
    b, k = draft_tokens.shape
    if target_probs.shape[:2] != (b, k + 1) or draft_probs.shape[:2] != (b, k):
        raise ValueError(
            f"expected draft_probs [b, k, V] and target_probs [b, k+1, V] for b={b}, k={k}; got "
            f"{tuple(draft_probs.shape)} and {tuple(target_probs.shape)}"
        )
    dev = target_probs.device
    lengths, valid = _lengths_and_valid(draft_tokens, draft_lengths)  # [b], [b, k]
    tok = draft_tokens.long().clamp(0, target_probs.shape[-1] - 1).unsqueeze(-1)  # [b, k, 1]
    p_x = target_probs[:, :k].gather(-1, tok).squeeze(-1).float()  # [b, k]
    q_x = draft_probs.gather(-1, tok).squeeze(-1).float()  # [b, k]
    u = torch.rand((b, k), generator=generator, device=dev)  # [b, k] in [0, 1)
    accept = (u * q_x < p_x) & valid  # u < p/q without dividing; q = 0 < p accepts
    num_accepted = accept.long().cumprod(dim=-1).sum(dim=-1)  # [b]
    row = torch.arange(b, device=dev)
    p_n = target_probs[row, num_accepted].float()  # [b, V]
    if k > 0:
        q_n = draft_probs[row, num_accepted.clamp(max=k - 1)].float()  # [b, V]
        rejected = (num_accepted < lengths).unsqueeze(-1)  # [b, 1]
        dist = torch.where(rejected, (p_n - q_n).clamp_min(0.0), p_n)  # [b, V]
        # p == q up to rounding: the residual can vanish; p itself is then the right law.
        dist = torch.where(dist.sum(-1, keepdim=True) > 0, dist, p_n)
    else:
        dist = p_n
    next_token = torch.multinomial(dist, 1, generator=generator).squeeze(-1)  # [b]
    return num_accepted, next_token


def speculative_accept_greedy(
    draft_tokens: torch.Tensor,
    target_scores: torch.Tensor,
    draft_lengths: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification: accept drafts while they equal the target argmax.

    draft_tokens [b, k]; target_scores [b, k+1, V] (logits or probabilities, only the argmax
    matters); draft_lengths [b] as in `speculative_accept`. The next token is the target
    argmax at the first mismatch, or at the bonus position L when all L drafts match.

    Returns num_accepted [b] (int64) and next_token [b] (int64).
    """
    b, k = draft_tokens.shape
    if target_scores.shape[:2] != (b, k + 1):
        raise ValueError(f"target_scores must be [b, k+1, V] for b={b}, k={k}")
    _, valid = _lengths_and_valid(draft_tokens, draft_lengths)  # [b, k]
    target = target_scores.argmax(dim=-1)  # [b, k+1]
    match = (draft_tokens.long() == target[:, :k]) & valid  # [b, k]
    num_accepted = match.long().cumprod(dim=-1).sum(dim=-1)  # [b]
    next_token = target.gather(1, num_accepted.unsqueeze(-1)).squeeze(-1)  # [b]
    return num_accepted, next_token
