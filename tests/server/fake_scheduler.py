"""A stand-in with the Scheduler's API for developing the HTTP layer (tests only).

Deterministic tokens: a request's i-th token is a lowercase letter that depends on its prompt
and i only; exit layers cycle 1..num_layers. ``step_s`` sleeps per step to mimic compute.
"""

from __future__ import annotations

import time
from collections import deque
from types import SimpleNamespace

from megatron.early_exit.inference.requests import QueueFull, RequestUpdate, validate_request


def fake_cfg(vocab=257, positions=256, layers=4, exits=(1, 2, 3)):
    model = SimpleNamespace(num_tokens=vocab, vocab_size=vocab, max_position_embeddings=positions,
                            num_layers=layers)
    return SimpleNamespace(model=model, exits=SimpleNamespace(exit_layer_nums=list(exits)))


def fake_token(prompt, i):
    return 97 + (sum(prompt) * 31 + i * 7) % 26


class FakeScheduler:
    def __init__(self, cfg, max_rows=8, max_queue=64, step_s=0.0, detokenize=None):
        self.cfg, self.max_rows, self.max_queue, self.step_s = cfg, max_rows, max_queue, step_s
        self.waiting, self.running, self.cancelled = deque(), {}, []

    def add(self, req):
        validate_request(req, self.cfg)
        if len(self.waiting) >= self.max_queue:
            raise QueueFull("full")
        self.waiting.append(req)
        return req.request_id

    def cancel(self, rid):
        if rid in self.running:
            del self.running[rid]
        elif any(r.request_id == rid for r in self.waiting):
            self.waiting = deque(r for r in self.waiting if r.request_id != rid)
        else:
            return False
        self.cancelled.append(rid)
        return True

    @property
    def has_work(self):
        return bool(self.waiting or self.running or self.cancelled)

    @property
    def num_running(self):
        return len(self.running)

    @property
    def num_waiting(self):
        return len(self.waiting)

    def step(self):
        if self.step_s:
            time.sleep(self.step_s)
        out = [RequestUpdate(rid, finished=True, finish_reason="cancelled") for rid in self.cancelled]
        self.cancelled = []
        while self.waiting and len(self.running) < self.max_rows:
            req = self.waiting.popleft()
            self.running[req.request_id] = [req, 0]
        L = self.cfg.model.num_layers
        for rid, state in list(self.running.items()):
            req, i = state
            tok = fake_token(req.prompt, i)
            state[1] += 1
            u = RequestUpdate(rid, [tok], [1 + i % L], [0.5], [-1.0] if req.logprobs else None,
                              prompt_len=len(req.prompt))
            if tok in req.stop.stop_token_ids or state[1] >= req.max_new_tokens:
                u.finished, u.finish_reason = True, "length"
                del self.running[rid]
            out.append(u)
        return out
