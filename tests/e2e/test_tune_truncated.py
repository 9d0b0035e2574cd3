"""Exit tuning on the first K of P pipeline stages (--tune-exit-pipeline-parallel-size), CPU.

A base model without exits is pretrained; exits after layers 1 and 2 are then tuned twice from
it with the same seed: on the whole model, and with --pipeline-model-parallel-size 2
--tune-exit-pipeline-parallel-size 1 (one process holding layers 1-2 only). Both log the same
exit losses (float64), and the truncated run's --save holds a whole checkpoint (4 layers, PP=2
layout) whose exits equal the full run's, whose backbone equals the base, and which generates
the same tokens as the full run's checkpoint.
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.e2e.test_pretrain_cli import ENV, corpus, launch  # noqa: F401

MODEL = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "2e-3", "--log-interval", "1",
         "--split", "98,2,0", "--eval-iters", "0", "--seed", "9", "--fp64"]
TUNE = ["--tune-exit", "--exit-layer-nums", "1", "2", "--use-exit-norm", "--use-exit-mlp",
        "--train-iters", "4"]


def _run(args):
    done = subprocess.run(launch(args), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def _exit_losses(log):
    return [json.loads(line)["exit_losses"] for line in Path(log).read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("tune")
    _run(MODEL + ["--data-path", corpus, "--train-iters", "6", "--save", str(d / "base")])
    common = MODEL + TUNE + ["--data-path", corpus, "--load", str(d / "base")]
    _run(common + ["--save", str(d / "full"), "--log-json", str(d / "full.jsonl")])
    _run(common + ["--pipeline-model-parallel-size", "2", "--tune-exit-pipeline-parallel-size", "1",
                   "--save", str(d / "trunc"), "--log-json", str(d / "trunc.jsonl")])
    return d


def test_truncated_tuning_logs_the_same_exit_losses(runs):
    full, trunc = _exit_losses(runs / "full.jsonl"), _exit_losses(runs / "trunc.jsonl")
    assert len(full) == len(trunc) == 4
    for a, b in zip(full, trunc):
        assert a.keys() == b.keys() == {"1", "2"}
        assert all(abs(a[k] - b[k]) <= 1e-9 * abs(a[k]) for k in a), (a, b)


def test_truncated_tuning_saves_the_whole_model(runs, single_rank_parallel):
    from megatron.early_exit.checkpoint.load import open_checkpoint
    from megatron.early_exit.inference.engine import Engine
    from megatron.early_exit.inference.loading import load_for_inference
    from megatron.early_exit.inference.modes import EarlyExit
    from megatron.early_exit.parallel.state import destroy_parallel

    _, meta, merged = open_checkpoint(str(runs / "trunc"))
    assert meta["config"]["model"]["num_layers"] == 4
    assert meta["config"]["parallel"]["pipeline_model_parallel_size"] == 2
    assert meta["config"]["exits"]["exit_layer_nums"] == [1, 2]
    _, _, full = open_checkpoint(str(runs / "full"))
    _, _, base = open_checkpoint(str(runs / "base"))
    names = set(meta["tensors"])
    assert any(n.startswith("decoder.layers.3.") for n in names)  # layer 4 came from the base
    for name in names:
        want = full.tensor(name) if name.startswith("exits.") else base.tensor(name)
        torch.testing.assert_close(merged.tensor(name), want, rtol=1e-9, atol=1e-12)

    outs = []
    for ckpt in ("full", "trunc"):
        model, cfg, tok = load_for_inference(str(runs / ckpt), torch.device("cpu"))
        outs.append(Engine(model, cfg).generate([tok.tokenize("ROMEO:")], 10,
                                                mode=EarlyExit(threshold=0.2))[0])
        destroy_parallel()
    assert outs[0].tokens == outs[1].tokens and outs[0].exit_layers == outs[1].exit_layers


def test_truncation_flags_are_checked():
    from megatron.early_exit.arguments import configs_from_args, parse_args
    from megatron.early_exit.config import ConfigError

    base = MODEL + ["--pipeline-model-parallel-size", "2", "--tune-exit-pipeline-parallel-size", "1"]
    for extra, message in ((TUNE[:1] + ["--exit-layer-nums", "1", "3", "--use-exit-norm"], "lie beyond"),
                           (["--exit-layer-nums", "1"], "needs --tune-exit"),
                           (TUNE[:1] + ["--exit-layer-nums", "1", "--use-exit-norm",
                                        "--tune-exit-pipeline-parallel-size", "3"], r"in \[1")):
        with pytest.raises(ConfigError, match=message):
            configs_from_args(parse_args(base + extra), 1, 256)
    cfgs = configs_from_args(parse_args(base + TUNE), 1, 256)
    assert cfgs.model.model.num_layers == 2 and cfgs.model.model.init_num_layers == 4
    assert cfgs.model.parallel.pipeline_model_parallel_size == 1
