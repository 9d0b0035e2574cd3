"""tools/checkpoint/convert.py and add_exits.py from the command line (in-process).

hf -> ee -> hf gives back transformers' model exactly; add_exits.py adds an exit the engine
then uses; bad inputs (a missing or misplaced flag, an unsupported HF config key, an exit that
exists) end with one ``error: --flag: ...`` line and exit code 2.

Run: ``OMP_NUM_THREADS=1 python -m pytest -q tests/unit/test_convert_cli.py``.
"""

import importlib.util
import json
import os

import pytest
import torch

from tests.unit.test_convert_hf import IDS, tiny_hf

TOOLS = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "checkpoint")


def tool(name):
    spec = importlib.util.spec_from_file_location(f"ckpt_tool_{name}", os.path.join(TOOLS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name, argv, capsys):
    """(exit code, stderr) of the tool run through run_cli."""
    t = tool(name)
    capsys.readouterr()  # drop what came before (transformers' load reports)
    try:
        code = t.run_cli(t.main, argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_hf_to_ee_to_hf_and_add_exits(tmp_path, capsys, single_rank_parallel):
    import transformers

    model = tiny_hf("llama", tied=False)
    model.save_pretrained(str(tmp_path / "hf"))
    ee, back, ex = (str(tmp_path / n) for n in ("ee", "back", "ex"))
    assert run("convert", ["--source-format", "hf", "--load-dir", str(tmp_path / "hf"),
                           "--save-dir", ee, "--target-pipeline-parallel-size", "2"], capsys)[0] == 0
    assert run("add_exits", ["--load-dir", ee, "--save-dir", ex, "--exit-layer-nums", "2",
                             "--use-exit-norm"], capsys)[0] == 0
    assert run("convert", ["--source-format", "ee", "--target-format", "hf", "--load-dir", ex,
                           "--save-dir", back], capsys)[0] == 0
    with open(os.path.join(back, "config.json")) as f:
        assert json.load(f)["early_exit"]["exit_layer_nums"] == [2]
    again = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)
    code, err = run("add_exits", ["--load-dir", ex, "--save-dir", str(tmp_path / "x"),
                                  "--exit-layer-nums", "2", "--use-exit-norm"], capsys)
    assert code == 2 and err.startswith("error: --exit-layer-nums") and "already" in err, err
    before = sorted(os.listdir(back))
    for tool, argv in (("add_exits", ["--load-dir", ee, "--save-dir", back, "--exit-layer-nums", "1"]),
                       ("convert", ["--source-format", "ee", "--load-dir", ee, "--save-dir", back])):
        code, err = run(tool, argv, capsys)  # a non-empty --save-dir is never overwritten
        assert code == 2 and err.startswith("error: --save-dir") and "not empty" in err, err
    assert sorted(os.listdir(back)) == before


@pytest.mark.parametrize("argv,flag,words", [
    (["--source-format", "gguf", "--load-dir", "."], "--load-file", "give --load-file"),
    (["--source-format", "hf", "--load-dir", "/nonexistent"], "--load-dir", "does not exist"),
    (["--source-format", "ee", "--target-format", "hf", "--load-dir", ".",
      "--target-tensor-parallel-size", "2"], "--target-tensor-parallel-size", "not sharded"),
    (["--source-format", "hf", "--load-dir", ".", "--tokenizer-dir", "."], "--tokenizer-dir",
     "only used"),
])
def test_bad_flags(argv, flag, words, tmp_path, capsys):
    code, err = run("convert", argv + ["--save-dir", str(tmp_path / "out")], capsys)
    assert code == 2 and err.startswith(f"error: {flag}") and words in err, err
    assert err.count("\n") == 1


def test_unsupported_hf_config_names_the_key(tmp_path, capsys):
    model = tiny_hf("llama", tied=False)
    model.save_pretrained(str(tmp_path / "hf"))
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    path.write_text(json.dumps(config))
    code, err = run("convert", ["--source-format", "hf", "--load-dir", str(tmp_path / "hf"),
                                "--save-dir", str(tmp_path / "out")], capsys)
    assert code == 2 and err.startswith("error: --load-dir") and "rope_scaling" in err, err
    assert not os.path.exists(tmp_path / "out" / "latest_checkpointed_iteration.txt")
