"""Pipeline-based early-exit decoding (PP > 1): the runner contract across pipeline stages.

Every token crosses every stage, so every stage's KV cache (exit blocks included) stays
complete and no recomputation is needed; a token is *decided* at the first allowed exit whose
confidence reaches its threshold (or by the final head) — exactly the tokens of the PP = 1
recomputation runner for the same weights, seeds and thresholds. Stage 0 owns the session
(sampling, stops, seeds: engine.Session) and calls ``PipelineRunner.prefill`` / ``run``; the
later stages run ``serve`` over the same cache class (KVCache) and the same stage pass
(``DepthRunner.stage_pass`` over their own depths, every row going on to the stage's end).

Messages (all point to point on the pipeline group; sends are asynchronous, so stage 0 goes on
to the next token as soon as it has the decision, while the later stages still fill their KV):

- stage k -> k + 1, per pass: a length, a float64 header (kind, cache batch and length,
  confidence kind, rows, their in-flight positions, which rows are still open, the exit points
  with thresholds), then the hidden states ``[s, b, h]``. ``kind = END`` ends ``serve``.
- stage k > 0 -> stage 0: for every pass that reached stage k with open rows, a *verdict*: per
  open row ``[decided here, exit layer, confidence]``, then the logits ``[n, V]`` of the rows
  decided here. Stage 0 reads the verdicts of stages 1, 2, ... in order while rows are open
  (the last stage decides every row that is still open).

Under TP every TP rank of a stage talks to the same TP rank of its neighbours. Self-speculative
decoding is refused at PP > 1 (requests.validate_request): its rollback would cross every stage.

    runner = PipelineRunner(channel, DepthRunner(model, cfg, cache, 2, "margin"))  # stage 0
    engine.serve()                                                    # every later stage
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron.early_exit.inference.exit_points import CONFIDENCE_KINDS, ExitPoint, block_only
from megatron.early_exit.inference.kv_cache import make_layout
from megatron.early_exit.inference.runner import PassResult, RowState

__all__ = ["PipelineChannel", "PipelineRunner", "serve_stage"]

PASS, END = 0, 1


class PipelineChannel:
    """Point-to-point messages of pipeline inference for one rank (any stage)."""

    def __init__(self, ctx, hidden_size: int, dtype: torch.dtype):
        self.ctx, self.device = ctx, ctx.device
        self.group = ctx.pp_group
        self.stage_ranks = dist.get_process_group_ranks(ctx.pp_group)  # global rank per stage
        self.stage, self.num_stages = ctx.pp_rank, ctx.pp_size
        self.hidden_size, self.dtype = hidden_size, dtype
        self._pending = []  # (work, tensor) of sends in flight (their buffers are held)

    @property
    def last(self) -> bool:
        return self.stage == self.num_stages - 1

    def _isend(self, t: torch.Tensor, stage: int) -> None:
        t = t.contiguous()
        self._pending.append((dist.isend(t, dst=self.stage_ranks[stage], group=self.group), t))
        self._pending = [(w, b) for w, b in self._pending if not w.is_completed()]

    def _recv(self, shape, dtype, stage: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(t, src=self.stage_ranks[stage], group=self.group)
        return t

    def drain(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending = []

    # ------------------------------------------------------------------ passes
    def send_pass(self, header: torch.Tensor, x: Optional[torch.Tensor]) -> None:
        nxt = self.stage + 1
        self._isend(torch.tensor([header.numel()], dtype=torch.int64, device=self.device), nxt)
        self._isend(header, nxt)
        if x is not None:
            self._isend(x.to(self.dtype), nxt)

    def recv_pass(self):
        """(header dict, x [s, b, h] or None) from the previous stage."""
        n = int(self._recv((1,), torch.int64, self.stage - 1)[0])
        head = decode_header(self._recv((n,), torch.float64, self.stage - 1))
        if head["kind"] == END:
            return head, None
        shape = (head["s"], len(head["rows"]), self.hidden_size)
        return head, self._recv(shape, self.dtype, self.stage - 1)

    # ------------------------------------------------------------------ verdicts
    def send_verdict(self, flags: torch.Tensor, logits: Optional[torch.Tensor]) -> None:
        self._isend(flags, 0)
        if logits is not None:
            self._isend(logits.to(self.dtype), 0)

    def recv_verdict(self, stage: int, n_open: int, vocab: int):
        """(flags [n_open, 3], logits [n_decided, V] or None) from ``stage``."""
        flags = self._recv((n_open, 3), torch.float64, stage)
        n_dec = int(flags[:, 0].sum())
        logits = self._recv((n_dec, vocab), self.dtype, stage) if n_dec else None
        return flags, logits


def encode_header(kind: int, batch: int, max_len: int, confidence: str, lay, open_flags,
                  exits: Sequence[ExitPoint], device) -> torch.Tensor:
    """The float64 header of a pass (see the module docstring)."""
    vals = [kind, batch, max_len, CONFIDENCE_KINDS.index(confidence)]
    if lay is None:
        return torch.tensor(vals + [0, 0, 0], dtype=torch.float64, device=device)
    vals += [len(lay.rows_list), lay.s, len(exits)]
    vals += lay.rows_list + lay.starts + lay.ends + [float(f) for f in open_flags]
    for e in exits:
        vals += [e.depth, e.layer, -1.0 if e.threshold is None else e.threshold]
    return torch.tensor(vals, dtype=torch.float64, device=device)


def decode_header(t: torch.Tensor) -> Dict:
    v = t.tolist()
    kind, batch, max_len, conf, n, s, n_exits = v[:7]
    n = int(n)
    head = {"kind": int(kind), "batch": int(batch), "max_len": int(max_len),
            "confidence": CONFIDENCE_KINDS[int(conf)], "s": int(s)}
    rest = v[7:]
    head["rows"] = [int(r) for r in rest[:n]]
    head["starts"] = [int(r) for r in rest[n:2 * n]]
    head["ends"] = [int(r) for r in rest[2 * n:3 * n]]
    head["open"] = [bool(r) for r in rest[3 * n:4 * n]]
    ex = rest[4 * n:]
    head["exits"] = [ExitPoint(int(ex[3 * i]), int(ex[3 * i + 1]),
                               None if ex[3 * i + 2] < 0 else ex[3 * i + 2])
                     for i in range(int(n_exits))]
    return head


class PipelineRunner:
    """Stage 0's runner: its own layers and exits, then the later stages' verdicts."""

    supports_all_final = False

    def __init__(self, channel: PipelineChannel, local):
        self.channel, self.local = channel, local  # local: DepthRunner over stage 0's layers
        self.cfg, self.cache = local.cfg, local.cache
        self.confidence_kind = local.confidence_kind
        self.num_layers = local.num_layers

    def prefill(self, rows, states: Dict[int, RowState], prompts, exits=()) -> PassResult:
        x, lay = self.local.embed_prompts(rows, prompts)
        return self._pass(rows, states, x, lay, block_only(exits))

    def run(self, rows, states: Dict[int, RowState], token_ids, exits=(), capped=(),
            all_final: bool = False) -> PassResult:
        if all_final:
            raise NotImplementedError("pipeline inference does not verify drafts (PP > 1)")
        x, lay = self.local.embed_newest(rows, states, token_ids)
        return self._pass(rows, states, x, lay, exits)

    def _pass(self, rows, states, x, lay, exits) -> PassResult:
        out, x, lay = self.local.stage_pass(rows, None, x, lay, exits, set(rows), False)
        open_rows = [r for r in lay.rows_list if r not in out.decided]
        header = encode_header(PASS, self.cache.batch, self.cache.max_len, self.confidence_kind,
                               lay, [r in open_rows for r in lay.rows_list], exits,
                               self.channel.device)
        self.channel.send_pass(header, x)
        vocab = self.cfg.model.num_tokens
        for stage in range(1, self.channel.num_stages):
            if not open_rows:
                break
            flags, logits = self.channel.recv_verdict(stage, len(open_rows), vocab)
            decided = [i for i, f in enumerate(flags[:, 0].tolist()) if f]
            for j, i in enumerate(decided):
                conf_dtype = torch.promote_types(logits.dtype, torch.float32)
                layer, conf = int(flags[i, 1]), flags[i, 2:3].to(conf_dtype)
                out.record(open_rows, [i], logits[j:j + 1], conf, layer, {})
            gone = set(decided)
            open_rows = [r for i, r in enumerate(open_rows) if i not in gone]
        if open_rows:
            raise RuntimeError(f"no pipeline stage decided rows {open_rows} (the last stage must)")
        for r in rows:
            states[r].advance(self.num_layers, self.num_layers)
        return out.result()


def serve_stage(channel: PipelineChannel, make_local) -> None:
    """A later stage's loop: take each pass from the previous stage, run this stage's layers
    and exits, send the verdict to stage 0 and the pass on; returns at END (forwarded).
    ``make_local(batch, max_len, confidence) -> DepthRunner`` over this stage's cache."""
    while True:
        head, x = channel.recv_pass()
        if head["kind"] == END:
            if not channel.last:
                channel.send_pass(_end_header(head, channel.device), None)
            channel.drain()
            return
        local = make_local(head["batch"], head["max_len"], head["confidence"])
        rows = head["rows"]
        lay = make_layout(rows, head["starts"], head["ends"], local.cache.max_len,
                          channel.device, local.cache.batch)
        arrived_open = [r for r, o in zip(rows, head["open"]) if o]
        decided = [r for r, o in zip(rows, head["open"]) if not o]
        with local.cache.attach():
            out, x, lay = local.stage_pass(rows, None, x, lay, head["exits"], set(rows), False,
                                           decided=decided)
        if arrived_open:
            _send_verdict(channel, out, arrived_open)
        if not channel.last:
            still = [r not in out.decided for r in lay.rows_list]
            header = encode_header(PASS, head["batch"], head["max_len"], head["confidence"], lay,
                                   still, head["exits"], channel.device)
            channel.send_pass(header, x)


def _send_verdict(channel: PipelineChannel, out, arrived_open: List[int]) -> None:
    flags = torch.zeros(len(arrived_open), 3, dtype=torch.float64, device=channel.device)
    picked = []
    for i, r in enumerate(arrived_open):
        if r in out.decided:
            u = out.u[r]
            flags[i, 0], flags[i, 1] = 1.0, float(out.exit_layer[u])
            flags[i, 2] = out.conf[u].double()
            picked.append(u)
    logits = None
    if picked:
        logits = out.logits.index_select(0, torch.tensor(picked, device=out.logits.device))
    channel.send_verdict(flags, logits)


def _end_header(head, device) -> torch.Tensor:
    return encode_header(END, head["batch"], head["max_len"], head["confidence"], None, [], [],
                         device)


def end_header(device) -> torch.Tensor:
    return encode_header(END, 0, 0, CONFIDENCE_KINDS[0], None, [], [], device)
