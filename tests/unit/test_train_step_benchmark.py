"""Smoke test of benchmarks/train_step.py at its tiny CPU shape (the same code as on a GPU).

Checks what does not depend on timing: every variant ran and reported; megatron-core's
GPTModel (a) and ours without exits (c) on the same weights and data give the same first-step LM
loss, and so does the final head of ours with exits (b, d): an independent check of our model
against megatron-core's; the chunked exit losses (b) peak below materialised logits (d) at the
allocator. Timings are printed, never asserted.
"""

import importlib.util
import math
import os

import torch

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "train_step.py")


def _load():
    spec = importlib.util.spec_from_file_location("train_step_benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_step_benchmark_tiny(single_rank_parallel, capsys):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU path needs a CPU-only machine
    out = _load().main(["--device", device, "--variants", "a,b,c,d", "--repeats", "2", "--warmup", "0"])
    res, ratios = out["results"], out["ratios"]
    assert set(res) == set("abcd")
    for r in res.values():
        assert r["ms"] > 0 and r["tokens_per_s"] > 0 and r["peak_bytes"] > r["static"] > 0
        assert r["flops"] > 0
    loss_c = res["c"]["step1_loss"]
    for key in "abd":
        assert math.isclose(res[key]["step1_loss"], loss_c, rel_tol=1e-5), (key, res[key], loss_c)
    assert res["b"]["peak_bytes"] < res["d"]["peak_bytes"]
    assert ratios["FLOP-predicted b/a"] > 1.0 and "time b/a" in ratios
    printed = capsys.readouterr().out
    assert "megatron-core GPTModel" in printed and "peak memory b/c" in printed
