"""Config validation (every error names its flag), exit-weight schedules, and the arg parser."""

import math

import pytest

from megatron.early_exit.arguments import configs_from_args, parse_args
from megatron.early_exit.config import (ConfigError, EarlyExitGPTConfig, ExitConfig, ModelConfig,
                                        ParallelConfig, TrainConfig)

BASE = dict(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=128)


def build(model=None, exits=None, parallel=None):
    return EarlyExitGPTConfig(model=ModelConfig(**{**BASE, **(model or {})}),
                              exits=ExitConfig(**(exits or {})),
                              parallel=ParallelConfig(**(parallel or {})))


@pytest.mark.parametrize("kwargs, flag", [
    (dict(exits=dict(exit_layer_nums=[0])), "--exit-layer-nums"),
    (dict(exits=dict(exit_layer_nums=[5])), "--exit-layer-nums"),
    (dict(exits=dict(exit_layer_nums=[2, 2])), "--exit-layer-nums"),
    (dict(exits=dict(exit_layer_nums=[3, 1])), "--exit-layer-nums"),
    (dict(exits=dict(exit_layer_nums=[1, 2], exit_layer_weight=[1, 2, 3])), "--exit-layer-weight"),
    (dict(exits=dict(exit_layer_nums=[1, 2], exit_layer_weight_init=[1, 2, 3])), "--exit-layer-weight-init"),
    (dict(exits=dict(exit_layer_nums=[1, 2], exit_layer_temperature=[1, 0])), "--exit-layer-temperature"),
    (dict(exits=dict(exit_layer_weight_warmup_style="exp")), "--exit-layer-weight-warmup-style"),
    (dict(model=dict(num_attention_heads=6)), "--num-attention-heads"),
    (dict(model=dict(num_query_groups=3)), "--num-query-groups"),
    (dict(model=dict(num_attention_heads=2, num_query_groups=2), parallel=dict(tensor_model_parallel_size=4, world_size=4)),
     "--tensor-model-parallel-size"),
    (dict(model=dict(vocab_size=130), parallel=dict(tensor_model_parallel_size=4, world_size=4)), "--make-vocab-size-divisible-by"),
    (dict(model=dict(num_layers=6), parallel=dict(pipeline_model_parallel_size=4, world_size=4)), "--pipeline-model-parallel-size"),
    (dict(parallel=dict(sequence_parallel=True)), "--sequence-parallel"),
    (dict(parallel=dict(tensor_model_parallel_size=2, world_size=3)), "world size"),
    (dict(parallel=dict(num_layers_per_virtual_pipeline_stage=1)), "--num-layers-per-virtual-pipeline-stage"),
    (dict(model=dict(architecture="bert")), "--architecture"),
])
def test_each_validation_error_names_its_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag.replace("-", r"\-")):
        build(**kwargs)


def test_train_config_errors_name_flags():
    with pytest.raises(ConfigError, match="--global-batch-size"):
        TrainConfig(micro_batch_size=4, global_batch_size=12).num_microbatches(2)
    with pytest.raises(ConfigError, match="--lr-decay-style"):
        TrainConfig(lr_decay_style="step")


def _expected(w0, w1, it, warmup, style):
    p = min(it / warmup, 1.0)
    if style == "cosine":
        p = (1 - math.cos(math.pi * p)) / 2
    return w0 + (w1 - w0) * p


@pytest.mark.parametrize("style", ["linear", "cosine"])
@pytest.mark.parametrize("init, target", [([0.0, 0.1], [1.0, 0.5]), ([1.0, 0.8], [0.2, 0.1])],
                         ids=["warmup", "cooldown"])
def test_exit_weight_schedule(style, init, target):
    ex = ExitConfig(exit_layer_nums=[1, 2], exit_layer_weight=target, exit_layer_weight_init=init,
                    exit_layer_weight_warmup_iters=10, exit_layer_weight_warmup_style=style)
    for it in (0, 1, 3, 5, 9, 10, 50):
        got = ex.weights_at(it)
        want = [_expected(a, b, it, 10, style) for a, b in zip(init, target)]
        assert got == pytest.approx(want, abs=1e-12), it
    assert ex.weights_at(0) == pytest.approx(init)
    assert ex.weights_at(10) == pytest.approx(target)
    if style == "cosine":  # cosine moves slower than linear at the start
        assert abs(ex.weights_at(2)[0] - init[0]) < abs(_expected(init[0], target[0], 2, 10, "linear") - init[0])


def test_one_value_broadcasts_to_every_exit():
    ex = ExitConfig(exit_layer_nums=[1, 2, 3], exit_layer_weight=[0.5], exit_layer_temperature=[2.0])
    assert ex.exit_layer_weight == [0.5] * 3 and ex.exit_layer_weight_init == [0.5] * 3
    assert ex.exit_layer_temperature == [2.0] * 3


def test_parser_round_trip_and_help_mentions_every_flag():
    argv = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--exit-layer-nums", "1", "3", "--exit-layer-weight", "0.2", "0.4", "--use-exit-norm",
            "--tensor-model-parallel-size", "2", "--global-batch-size", "8", "--micro-batch-size", "2"]
    c = configs_from_args(parse_args(argv), world_size=4, vocab_size=256)
    assert c.model.exits.exit_layer_nums == [1, 3] and c.model.exits.use_exit_norm
    assert c.model.parallel.data_parallel_size == 2 and c.train.num_microbatches(2) == 2
    with pytest.raises(ConfigError, match="--exit-layer-nums"):
        configs_from_args(parse_args(argv[:8] + ["--exit-layer-nums", "9"]), world_size=1, vocab_size=256)
