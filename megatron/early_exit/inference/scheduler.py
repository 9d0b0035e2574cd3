"""Continuous batching (iteration-level scheduling, as in Orca / vLLM) over one static KV cache.

Requests arrive at any time (``add``) and wait in a bounded queue; at every ``step`` the
scheduler admits waiting requests into free cache rows (first come, first served, within a
budget of cached tokens), runs one iteration of every running request, and returns what each
produced. A finished or cancelled request frees its row at once. Each request carries its own
mode, sampling parameters, seed, stop criteria and token budget.

What may share a forward pass: requests of the *same mode* (``FullDepth()``; ``EarlyExit`` with
the same threshold, allowed exits, pending cap and confidence kind; ``SelfSpeculative`` with the
same drafting exit, draft length and draft threshold) form one group (an engine ``Session``) and
run batched; different modes run as separate groups, one after another within a step, over
the same cache. Sampling parameters, seeds, stops and budgets are per row and never split a
group. A request's tokens depend only on its own prompt, parameters and seed.

    sched = Scheduler(engine, max_rows=8, max_queue=64, detokenize=tokenizer.detokenize)
    rid = sched.add(GenerationRequest(prompt=ids, max_new_tokens=64, mode=EarlyExit(0.8)))
    while sched.has_work:
        for update in sched.step():        # RequestUpdate: new tokens, exit layers, confidences
            ...
    sched.cancel(rid)                      # frees the row; its final update says "cancelled"

Not thread-safe: one thread owns a scheduler (the server's engine loop). Under TP every rank of
pipeline stage 0 runs the same calls in the same order and gets the same results; at PP > 1
the later stages run ``engine.serve()``. Tests: tests/unit/test_scheduler.py.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Deque, Dict, List, Optional

from megatron.early_exit.inference.engine import Engine, Session
from megatron.early_exit.inference.requests import (GenerationRequest, QueueFull, RequestError,
                                                    RequestUpdate, max_positions,
                                                    validate_request)

__all__ = ["Scheduler"]


@dataclasses.dataclass
class _Running:
    request: GenerationRequest
    session: Session
    row: int
    reserved: int  # cache positions reserved for it
    sent: int = 0  # tokens already returned in updates


class Scheduler:
    """Admits requests into free KV-cache rows at step boundaries and retires them."""

    def __init__(self, engine: Engine, max_rows: int = 8, max_cached_tokens: Optional[int] = None,
                 max_queue: int = 64, detokenize=None, max_len: Optional[int] = None):
        if not engine.drives:
            raise ValueError("the scheduler runs on pipeline stage 0 (later stages: engine.serve())")
        for name, v in (("max_rows", max_rows), ("max_queue", max_queue)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.engine, self.cfg = engine, engine.cfg
        self.max_len = min(max_len or max_positions(self.cfg), max_positions(self.cfg))
        self.max_cached_tokens = max_cached_tokens or max_rows * self.max_len
        self.max_queue = max_queue
        self.detokenize = detokenize
        self.cache = engine.new_cache(max_rows, self.max_len)
        self.free_rows: List[int] = list(range(max_rows))
        self.waiting: Deque[GenerationRequest] = collections.deque()
        self.running: Dict[str, _Running] = {}
        self.sessions: Dict[object, Session] = {}  # one per mode
        self.reserved = 0
        self._updates: List[RequestUpdate] = []  # cancellations to report at the next step
        self._ids = 0

    # ------------------------------------------------------------------ requests
    def add(self, request: GenerationRequest) -> str:
        """Validate and queue a request; returns its id. RequestError names a bad field;
        QueueFull when ``max_queue`` requests already wait."""
        validate_request(request, self.cfg, pipeline=self.engine.pipelined)
        need = len(request.prompt) + request.max_new_tokens
        if need > self.max_len:
            raise RequestError("max_new_tokens", f"prompt + max_new_tokens = {need} exceeds the "
                               f"{self.max_len} positions of a KV-cache row")
        if need > self.max_cached_tokens:
            raise RequestError("max_new_tokens", f"prompt + max_new_tokens = {need} exceeds the "
                               f"cached-token budget ({self.max_cached_tokens})")
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue={self.max_queue})")
        rid = request.request_id
        if rid is None:
            self._ids += 1
            rid = f"req-{self._ids}"
        elif rid in self.running or any(r.request_id == rid for r in self.waiting):
            raise RequestError("request_id", f"{rid!r} is already queued or running")
        self.waiting.append(dataclasses.replace(request, request_id=rid))
        return rid

    def cancel(self, request_id: str) -> bool:
        """Drop a waiting or running request at once (its row is free for the next step)."""
        for req in self.waiting:
            if req.request_id == request_id:
                self.waiting.remove(req)
                self._updates.append(self._final(request_id, "cancelled", len(req.prompt)))
                return True
        run = self.running.pop(request_id, None)
        if run is None:
            return False
        self._release(run)
        self._updates.append(self._final(request_id, "cancelled", len(run.request.prompt)))
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._updates)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------ one iteration
    def step(self) -> List[RequestUpdate]:
        """Admit, run every group once, retire; returns each request's new output."""
        updates, self._updates = self._updates, []
        self._admit()
        for session in list(self.sessions.values()):
            if session.done:
                continue
            with session.attached():
                session.step()
        for rid, run in list(self.running.items()):
            update = self._update(rid, run)
            if update.tokens or update.finished:
                updates.append(update)
            if update.finished:
                del self.running[rid]
                self._release(run)
        return updates

    def _admit(self) -> None:
        while self.waiting and self.free_rows:
            req = self.waiting[0]
            need = len(req.prompt) + req.max_new_tokens
            if self.reserved + need > self.max_cached_tokens:
                return  # first come, first served: wait for tokens to free up
            self.waiting.popleft()
            row = self.free_rows.pop(0)
            session = self.sessions.get(req.mode)
            if session is None:
                session = Session(self.engine, self.cache, req.mode, self.detokenize)
                self.sessions[req.mode] = session
            session.add(row, req)
            self.reserved += need
            self.running[req.request_id] = _Running(req, session, row, need)

    def _update(self, rid: str, run: _Running) -> RequestUpdate:
        state = run.session.rows[run.row]
        out = state.output
        n = len(out.tokens)
        update = RequestUpdate(
            request_id=rid, tokens=out.tokens[run.sent:n], exit_layers=out.exit_layers[run.sent:n],
            confidences=out.confidences[run.sent:n],
            logprobs=None if out.logprobs is None else out.logprobs[run.sent:n],
            finished=state.finished, finish_reason=out.finish_reason if state.finished else None,
            text_len=out.text_len, prompt_len=out.prompt_len)
        run.sent = n
        return update

    def _release(self, run: _Running) -> None:
        run.session.remove(run.row)
        self.free_rows.append(run.row)
        self.free_rows.sort()
        self.reserved -= run.reserved
        if not run.session.rows:
            self.sessions = {k: s for k, s in self.sessions.items() if s is not run.session}

    @staticmethod
    def _final(rid: str, reason: str, prompt_len: int) -> RequestUpdate:
        return RequestUpdate(request_id=rid, finished=True, finish_reason=reason,
                             prompt_len=prompt_len)
