"""tools/plot_training.py: a synthetic --log-json file becomes a PNG with every head's curve;
missing, empty and malformed logs fail with a message naming the file (and line)."""

import importlib.util
import json
import math
import pathlib

import pytest

TOOL = pathlib.Path(__file__).resolve().parents[2] / "tools" / "plot_training.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("plot_training", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_log(path, iters=40, exits=(2, 4, 6)):
    """Records shaped like trainer/loop.py's and evaluate.py's, with a resumed stretch that
    logs iterations 25..30 twice (the second copy must win)."""
    lines = []

    def train_record(it, shift=0.0):
        base = 5.5 * math.exp(-it / 15) + 1.5 + shift
        return {"iteration": it, "lm_loss": base,
                "exit_losses": {str(k): base + 1.0 / k for k in exits},
                "exit_weights": {str(k): 0.5 for k in exits}, "grad_norm": 1.0, "lr": 1e-3,
                "tokens_per_sec": 1000.0, "step_time": 0.1, "tflops_per_gpu": 0.01,
                "memory_gb": 0.5}

    for it in range(1, 31):
        lines.append(train_record(it, shift=10.0 if it >= 25 else 0.0))  # "killed" after 30
    for it in range(25, iters + 1):
        lines.append(train_record(it))
    for it in (10, 20, 30, 40):
        loss = 5.5 * math.exp(-it / 15) + 1.6
        lines.append({"kind": "eval", "iteration": it, "lm_loss": loss, "lm_ppl": math.exp(loss),
                      "exit_losses": {str(k): loss + 1.0 / k for k in exits},
                      "exit_ppl": {str(k): math.exp(loss + 1.0 / k) for k in exits}})
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return path


def test_read_log_dedupes_and_splits(tool, tmp_path):
    train, evals = tool.read_log(str(synthetic_log(tmp_path / "log.jsonl")))
    assert [r["iteration"] for r in train] == list(range(1, 41))
    assert train[26]["lm_loss"] < 5  # iteration 27: the resumed (second) record won
    assert [r["iteration"] for r in evals] == [10, 20, 30, 40]
    heads = tool.curves(train)
    assert list(heads) == ["2", "4", "6", "final"]
    assert heads["6"][0] == list(range(1, 41))


def test_final_head_left_out_when_never_computed(tool):
    records = [{"iteration": i, "lm_loss": 0.0, "exit_losses": {"3": 2.0 - i / 10}} for i in (1, 2)]
    assert list(tool.curves(records)) == ["3"]


def test_main_writes_png(tool, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    log = synthetic_log(tmp_path / "log.jsonl")
    out = tmp_path / "plots" / "loss.png"
    assert tool.main([str(log), str(out), "--eval", "--log-scale", "--dpi", "80"]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000, len(data)  # four curves, eval markers, legend: not a blank canvas
    import matplotlib.image

    image = matplotlib.image.imread(str(out))
    assert image.shape[:2] == (400, 640)  # 8 x 5 inches at 80 dpi
    assert image[..., :3].std() > 0.05  # something drawn
    printed = capsys.readouterr().out
    assert "exit @ layer 2" in printed and "final LM head" in printed and "4 evaluation" in printed


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("", "empty"),
    ("\n\n", "empty"),
    ('{"iteration": 1, "lm_loss": 2.0}\nnot json\n', "log.jsonl:2: not a JSON line"),
    ("[1, 2]\n", "expected a JSON object"),
    ('{"step": 1, "loss": 2.0}\n', "no 'iteration'"),
    ('{"iteration": 1, "lm_loss": 2.0, "exit_losses": {"x": 1.0}}\n', "not an integer"),
    ('{"kind": "eval", "iteration": 1, "lm_loss": 2.0}\n', "add --eval"),
])
def test_bad_logs_fail_clearly(tool, tmp_path, capsys, content, message):
    log = tmp_path / "log.jsonl"
    if content is not None:
        log.write_text(content)
    out = tmp_path / "loss.png"
    with pytest.raises(SystemExit) as exit_info:
        tool.run_cli(tool.main, [str(log), str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: LOG: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()
