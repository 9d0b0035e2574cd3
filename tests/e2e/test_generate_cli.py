"""tools/generate.py on a checkpoint written by pretrain_early_exit_gpt.py: `--load` alone,
`--json` records (text, tokens, exit_layers, confidences), the tokens equal the engine's on the
same loaded model, threshold 1.0 equals `--no-early-exit`, and `--fast-decode static` equals the
general pass; a CUDA-only fast decode on CPU is refused naming the flag."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from tests.distributed_harness import free_port

from tests.e2e.test_pretrain_cli import ENV, ROOT, corpus, launch, train_args  # noqa: F401


def _generate_module():
    spec = importlib.util.spec_from_file_location("generate_tool", ROOT / "tools/generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(corpus, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("ckpt")
    args = train_args(corpus, d / "log.jsonl", 8, ["--save", str(d / "ckpt")])
    subprocess.run(launch(args), check=True, env=ENV, capture_output=True)
    return str(d / "ckpt")


def test_generate_cli_json_and_modes(checkpoint, capsys, single_rank_parallel):
    from megatron.early_exit.inference.engine import Engine
    from megatron.early_exit.inference.loading import load_for_inference
    from megatron.early_exit.inference.modes import EarlyExit
    from megatron.early_exit.inference.stopping import StopCriteria
    from megatron.early_exit.parallel.state import destroy_parallel

    tool = _generate_module()
    base = ["--load", checkpoint, "--prompt", "ROMEO:", "--tokens-to-generate", "12", "--json",
            "--device", "cpu"]
    runs = {}
    for name, extra in (("tau", ["--early-exit-thres", "0.3"]), ("tau1", ["--early-exit-thres", "1.0"]),
                        ("full", ["--no-early-exit"]),
                        ("static", ["--no-early-exit", "--fast-decode", "static"])):
        capsys.readouterr()
        runs[name] = tool.main(base + extra)
        destroy_parallel()
        printed = capsys.readouterr().out.strip().splitlines()
        assert len(printed) == 1 and set(json.loads(printed[0])) >= {
            "text", "tokens", "exit_layers", "confidences"}
    (tau,) = runs["tau"]
    assert len(tau["tokens"]) == len(tau["exit_layers"]) == len(tau["confidences"]) > 0
    assert set(tau["exit_layers"]) <= {1, 3, 4}
    for name in ("tau1", "static"):
        assert runs[name][0]["tokens"] == runs["full"][0]["tokens"]
        assert runs[name][0]["exit_layers"] == [4] * len(runs["full"][0]["tokens"])

    model, cfg, tok = load_for_inference(checkpoint, torch.device("cpu"))
    want = Engine(model, cfg).generate([tok.tokenize("ROMEO:")], 12, mode=EarlyExit(threshold=0.3),
                                       stop=StopCriteria(stop_token_ids=frozenset({tok.eod})))
    assert want[0].tokens == tau["tokens"] and want[0].exit_layers == tau["exit_layers"]
    destroy_parallel()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--fast-decode: cuda_graph needs a CUDA device"):
            tool.main(base + ["--no-early-exit", "--fast-decode", "cuda_graph"])


def test_generate_uses_the_calibrated_default(checkpoint, tmp_path, capsys, single_rank_parallel):
    """No mode flag: the checkpoint's serving default (calibrate_threshold --write-default)
    applies; it equals passing the same --early-exit-thres."""
    import shutil

    from megatron.early_exit.checkpoint.serving import set_serving_defaults
    from megatron.early_exit.parallel.state import destroy_parallel

    tool = _generate_module()
    copy = str(tmp_path / "calibrated")
    shutil.copytree(checkpoint, copy)
    base = ["--load", copy, "--prompt", "ROMEO:", "--tokens-to-generate", "12", "--json",
            "--device", "cpu"]
    plain = tool.main(base)
    destroy_parallel()
    set_serving_defaults(copy, 0.0)
    calibrated = tool.main(base)
    destroy_parallel()
    explicit = tool.main(base + ["--early-exit-thres", "0.0"])
    assert "calibrated default tau=0.0" in capsys.readouterr().err
    assert calibrated == explicit
    assert set(plain[0]["exit_layers"]) == {4} and min(calibrated[0]["exit_layers"]) < 4


def _torchrun(checkpoint, layout_flag, extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), str(ROOT / "tools/generate.py"), "--load", checkpoint,
           "--device", "cpu", layout_flag, "2"] + extra
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_generate_under_torchrun_prints_what_one_process_prints(checkpoint, capsys,
                                                                 single_rank_parallel):
    """TP = 2 and PP = 2 (pipeline-based early exit) against the single process, two prompts
    (one batch), early exit with margin-free max-prob confidence and seeded sampling."""
    from megatron.early_exit.parallel.state import destroy_parallel

    extra = ["--prompt", "ROMEO:", "--tokens-to-generate", "10", "--early-exit-thres", "0.3",
             "--temperature", "0.8", "--seed", "7", "--json"]
    tool = _generate_module()
    capsys.readouterr()
    tool.main(["--load", checkpoint, "--device", "cpu"] + extra)
    destroy_parallel()
    want = capsys.readouterr().out
    assert want.strip()
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size"):
        assert _torchrun(checkpoint, flag, extra) == want, flag



def test_demo_showcase_fits_the_model_positions(checkpoint, capsys, single_rank_parallel):
    """make demo's generation step on a checkpoint whose positions (32) are fewer than the
    tokens it asks for: every prompt gets what is left of them, every mode runs."""
    from megatron.early_exit.inference.demo import early_exit_showcase

    early_exit_showcase(checkpoint, tokens=64, thresholds=(0.5, 0.3, 0.1), repeats=1)
    out = capsys.readouterr().out
    for row in ("full depth", "early exit tau=0.3", "self-speculative (exit 1)", "exit-layer histogram"):
        assert row in out, out
