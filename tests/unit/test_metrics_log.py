"""TrainingLogger: --log-json records, FLOP accounting, and the progress bar on a terminal only."""

import io
import json
from types import SimpleNamespace

import pytest
import torch

from megatron.early_exit.config import EarlyExitGPTConfig, ExitConfig, ModelConfig, TrainConfig
from megatron.early_exit.trainer.metrics_log import TrainingLogger, forward_flops_per_token


class Terminal(io.StringIO):
    def isatty(self):
        return True


def _setup(iteration=1):
    cfg = EarlyExitGPTConfig(model=ModelConfig(num_layers=2, hidden_size=8, num_attention_heads=2,
                                               vocab_size=16, seq_length=4, ffn_hidden_size=8),
                             exits=ExitConfig(exit_layer_nums=[1]))
    return SimpleNamespace(cfg=cfg, train=TrainConfig(train_iters=3), iteration=iteration,
                           ctx=SimpleNamespace(device=torch.device("cpu")))


def _record(it):
    return {"iteration": it, "lm_loss": 2.0, "exit_losses": {"1": 2.5}, "exit_weights": {"1": 1.0},
            "grad_norm": 1.0, "lr": 1e-3, "tokens_per_sec": 100.0, "step_time": 0.1}


def test_flops_count_layers_heads_and_exits():
    cfg = _setup().cfg
    m = cfg.model  # llama: SwiGLU, GQA off; per layer 2*(qkv+proj+mlp) + 2*s*h; heads 2*h*V each
    layer = 2 * (8 * 24 + 8 * 8 + 8 * 8 * 3) + 2 * 4 * 8
    assert forward_flops_per_token(cfg) == m.num_layers * layer + 2 * (2 * 8 * 16)


@pytest.mark.parametrize("stream_cls, bar", [(io.StringIO, False), (Terminal, True)])
def test_json_records_and_progress_bar(tmp_path, stream_cls, bar):
    pytest.importorskip("tqdm")
    stream = stream_cls()
    logger = TrainingLogger(log_json=str(tmp_path / "log.jsonl"), stream=stream)
    for it in (1, 2, 3):
        setup = _setup(it)
        logger.on_step(setup)
        logger.log_train(_record(it), setup)
    logger.close()
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [1, 2, 3]
    assert all(json.loads(x)["tflops_per_gpu"] > 0 for x in lines)
    out = stream.getvalue()
    assert out.count("iter ") >= 3
    assert ("3/3" in out and "it/s" in out or "s/it" in out) == bar
