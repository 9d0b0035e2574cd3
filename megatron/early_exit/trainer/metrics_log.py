"""Training logs: console line (or progress bar), ``--log-json`` records, TensorBoard scalars,
and FLOP accounting.

FLOPs (docs/training.md): a matmul of an [n, k] by [k, m] costs 2nkm. Per token, one layer's
forward costs 2 x (its matmul weights) + 2 x s x h for causal attention scores and values
(half of the 4 s h of full attention). An exit head costs its block/MLP like a layer's parts plus
2 h V for its output projection; the final head 2 h V. Training = 3 x forward (backward is two
matmuls per forward matmul), plus 1 x the layers' forward again under full recompute.

    logger = TrainingLogger(log_json="run.jsonl", tensorboard_dir=None, rank=0)
    logger.log_train(record, setup)
"""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, Optional


def layer_matmul_weights(m) -> int:
    kv = m.num_query_groups * m.head_dim
    attention = m.hidden_size * (m.hidden_size + 2 * kv) + m.hidden_size * m.hidden_size
    mlp = m.hidden_size * m.ffn_hidden_size * (3 if m.swiglu else 2)
    return attention + mlp


def forward_flops_per_token(cfg) -> float:
    m, ex = cfg.model, cfg.exits
    layer = 2 * layer_matmul_weights(m) + 2 * m.seq_length * m.hidden_size
    head = 2 * m.hidden_size * m.vocab_size
    exit_extra = 0
    if ex.use_exit_block:
        exit_extra += layer
    if ex.use_exit_mlp:
        exit_extra += 2 * m.hidden_size * m.ffn_hidden_size * (3 if m.swiglu else 2)
    exits = len(ex.exit_layer_nums) * (head + exit_extra)
    return m.num_layers * layer + head + exits


def train_flops_per_token(cfg) -> float:
    factor = 3.0
    flops = factor * forward_flops_per_token(cfg)
    if cfg.recompute_granularity == "full":
        m = cfg.model
        flops += m.num_layers * (2 * layer_matmul_weights(m) + 2 * m.seq_length * m.hidden_size)
    return flops


class TrainingLogger:
    """Writes each logged record to the console, ``--log-json`` and TensorBoard (rank 0 only)."""

    def __init__(self, log_json: Optional[str] = None, tensorboard_dir: Optional[str] = None,
                 rank: int = 0, world_size: int = 1, peak_tflops: Optional[float] = None,
                 stream=None):
        self.enabled = rank == 0
        self.world_size = world_size
        self.peak_tflops = peak_tflops
        self.stream = stream or sys.stdout
        self.log_json = log_json if self.enabled else None
        self.writer = None
        if self.enabled and tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # tensorboard is optional
                raise RuntimeError("--tensorboard-dir needs the tensorboard package "
                                   "(pip install tensorboard)") from err
            self.writer = SummaryWriter(tensorboard_dir)
        if self.log_json:
            os.makedirs(os.path.dirname(os.path.abspath(self.log_json)), exist_ok=True)
        self.bar = None  # a tqdm progress bar when writing to a terminal and tqdm is installed

    def on_step(self, setup) -> None:
        """Advance the progress bar (terminal only; logs and CI get plain lines)."""
        if not self.enabled or not getattr(self.stream, "isatty", lambda: False)():
            return
        if self.bar is None:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=setup.train.train_iters, initial=setup.iteration - 1, unit="it",
                            file=self.stream, dynamic_ncols=True)
        self.bar.update(1)

    def _emit(self, record: Dict) -> None:
        if self.log_json:
            with open(self.log_json, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            prefix = "valid" if record.get("kind") == "eval" else "train"
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iteration":
                    self.writer.add_scalar(f"{prefix}/{key}", value, record["iteration"])
                elif isinstance(value, dict):
                    for sub, v in value.items():
                        self.writer.add_scalar(f"{prefix}/{key}/{sub}", v, record["iteration"])
            self.writer.flush()

    def log_train(self, record: Dict, setup) -> None:
        if not self.enabled:
            return
        flops = train_flops_per_token(setup.cfg) * record["tokens_per_sec"]
        record["tflops_per_gpu"] = flops / 1e12 / self.world_size
        if self.peak_tflops:
            record["mfu"] = record["tflops_per_gpu"] / self.peak_tflops
        record["memory_gb"] = _memory_gb(setup.ctx.device)
        self._emit(record)
        exits = " ".join(f"exit{k}={v:.4f}(w={record['exit_weights'][k]:.2f})"
                         for k, v in record["exit_losses"].items())
        self._write(f"iter {record['iteration']:>6}/{setup.train.train_iters} | lm loss {record['lm_loss']:.4f} | "
              f"{exits} | grad norm {record['grad_norm']:.3f} | lr {record['lr']:.3e} | "
              f"{record['tokens_per_sec']:.0f} tok/s | {record['tflops_per_gpu']:.3f} TFLOP/s/rank")

    def log_eval(self, result: Dict, setup) -> None:
        if not self.enabled:
            return
        self._emit({"kind": "eval", **result})
        exits = " ".join(f"exit{k}={v:.4f}(ppl {result['exit_ppl'][k]:.2f})"
                         for k, v in result["exit_losses"].items())
        self._write(f"validation at iter {result['iteration']} | lm loss {result['lm_loss']:.4f} "
                    f"(ppl {result['lm_ppl']:.2f}) | {exits}")

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _memory_gb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**30
    except ImportError:
        return 0.0
