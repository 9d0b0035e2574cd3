"""Bad command lines end in one readable line and exit code 2, never a traceback.

A table of bad invocations of every entry point we own (pretrain_early_exit_gpt.py and the
tools): each must exit with code 2 and print exactly one stderr line ``error: --flag: ...``
naming the flag at fault (argparse's own errors: its usage line, then ``error: argument --flag``;
preprocess_data.py's progress bar may come first).
Each case calls the script's own ``run_cli(main)`` in this process (the bad inputs are caught
before torch.distributed starts, so a case takes milliseconds), and one case per script also runs
as a real process, to see its exit status and stderr. Below the table, run_cli's contract:
bugs keep their traceback, ``--debug`` shows it for input errors too.

Run: ``python -m pytest -q tests/e2e/test_cli_errors.py`` (about 10 s on 2 cores).
"""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.early_exit.cli import UsageError, check_requires, error_line, run_cli

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16"]
PRETRAIN = "pretrain_early_exit_gpt.py"

# (script, argv, flag named in the error); {tmp} is a fresh directory
CASES = [
    (PRETRAIN, MODEL + ["--use-exit-norm"], "--use-exit-norm"),  # ignored without exits
    (PRETRAIN, MODEL + ["--exit-layer-weight", "0.5"], "--exit-layer-weight"),
    (PRETRAIN, MODEL + ["--num-fill-warmup-microbatches", "1"], "--num-fill-warmup-microbatches"),
    (PRETRAIN, MODEL + ["--fill-explicit-bubbles", "--exit-layer-nums", "1"], "--fill-explicit-bubbles"),
    (PRETRAIN, MODEL + ["--load-iteration", "3"], "--load-iteration"),
    (PRETRAIN, MODEL + ["--lr-decay-style", "constant", "--lr-decay-iters", "10"], "--lr-decay-iters"),
    (PRETRAIN, MODEL + ["--use-checkpoint-args"], "--use-checkpoint-args"),
    (PRETRAIN, MODEL + ["--load", "{tmp}/typo", "--save", "{tmp}/ckpt"], "--load"),
    (PRETRAIN, MODEL[:-2], "--seq-length"),  # required
    (PRETRAIN, ["--num-layers", "2", "--hidden-size", "30", "--num-attention-heads", "4",
                "--seq-length", "16"], "--hidden-size"),
    (PRETRAIN, MODEL + ["--tokenizer-type", "GPT2BPETokenizer"], "--tokenizer-type"),  # needs files
    (PRETRAIN, MODEL + ["--global-batch-size", "6", "--micro-batch-size", "4"], "--global-batch-size"),
    (PRETRAIN, MODEL + ["--num-layers", "two"], "--num-layers"),  # argparse's own error
    ("tools/checkpoint/reshard.py", ["--load", "{tmp}/none", "--save", "{tmp}/out",
                                     "--tensor-model-parallel-size", "1",
                                     "--pipeline-model-parallel-size", "1"], "--load"),
    ("tools/checkpoint/reshard.py", ["--load", "{tmp}/a", "--save", "{tmp}/a",
                                     "--tensor-model-parallel-size", "1",
                                     "--pipeline-model-parallel-size", "1"], "--save"),
    ("tools/preprocess_data.py", ["--input", "{tmp}/none.jsonl", "--output-prefix", "{tmp}/o",
                                  "--tokenizer-type", "ByteTokenizer"], "--input"),
    ("tools/preprocess_data.py", ["--input", "{tmp}/c.jsonl", "--output-prefix", "{tmp}/o",
                                  "--tokenizer-type", "ByteTokenizer", "--workers", "0"], "--workers"),
    ("tools/preprocess_data.py", ["--input", "{tmp}/bad.jsonl", "--output-prefix", "{tmp}/o",
                                  "--tokenizer-type", "ByteTokenizer"], "--input"),  # not JSON
    ("tools/text_to_jsonl.py", ["--output", "{tmp}/x.jsonl", "--input", "{tmp}/c.jsonl",
                                "--works", "hamlet"], "--works"),
    ("tools/text_to_jsonl.py", ["--output", "{tmp}/x.jsonl", "--input", "{tmp}/none.txt"], "--input"),
    ("tools/plot_training.py", ["{tmp}/none.jsonl", "{tmp}/loss.png"], "LOG"),
    ("tools/plot_pipeline_schedule.py", ["--pp", "4", "--microbatches", "8",
                                         "--num-fill-microbatches", "2"], "--num-fill-microbatches"),
    ("tools/plot_pipeline_schedule.py", ["--pp", "4", "--microbatches", "8", "--fill-explicit-bubbles",
                                         "--last-exit-stage", "1", "--backward-forward-ratio", "0"],
     "--backward-forward-ratio"),
]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "c.jsonl").write_text('{"text": "hello"}\n')
    (tmp / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    return tmp


def check_outcome(script, flag, code, err):
    lines = err.strip().splitlines()
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    if flag == "--num-layers":  # argparse: usage line(s), then its error line
        assert lines[-1].endswith(f"error: argument {flag}: invalid int value: 'two'"), err
        return
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == lines[-1:], err  # one error line, the last (a progress bar may precede it)
    assert lines[-1].startswith(f"error: {flag}: "), lines[-1]
    assert len(lines) == 1 or script == "tools/preprocess_data.py", err


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{Path(s).stem}:{f}" for s, _, f in CASES])
def test_bad_invocation_exits_2_naming_the_flag(tmp, capsys, monkeypatch, i):
    """The script's own ``run_cli(main)``, called in this process (each is cheap: the bad input
    is caught before torch.distributed starts)."""
    script, argv, flag = CASES[i]
    monkeypatch.chdir(tmp)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the scripts prepend the repository root
    entry = runpy.run_path(str(ROOT / script), run_name="cli_table")
    with pytest.raises(SystemExit) as info:
        entry["run_cli"](entry["main"], [a.format(tmp=tmp) for a in argv])
    check_outcome(script, flag, info.value.code, capsys.readouterr().err)


def test_each_entry_point_as_a_process(tmp):
    """One bad invocation per script as a real process (exit status, stderr), all at once."""
    first = {}
    for script, argv, flag in CASES:
        first.setdefault(script, (argv, flag))
    procs = {script: subprocess.Popen([sys.executable, str(ROOT / script), *[a.format(tmp=tmp) for a in argv]],
                                      cwd=tmp, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for script, (argv, _) in first.items()}
    for script, proc in procs.items():
        code = proc.wait(timeout=120)
        check_outcome(script, first[script][1], code, proc.communicate()[1])


def test_run_cli_keeps_tracebacks_for_bugs_and_with_debug(capsys):
    def bug(argv):
        raise KeyError("a genuine bug")

    with pytest.raises(KeyError):
        run_cli(bug, [])

    def bad_input(argv):
        assert "--debug" not in argv  # run_cli takes it off the command line
        raise UsageError("--load", "x does not exist")

    with pytest.raises(SystemExit) as info:
        run_cli(bad_input, [])
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: --load: x does not exist\n"
    with pytest.raises(UsageError):
        run_cli(bad_input, ["--debug"])
    with pytest.raises(ValueError):  # a ValueError that names no flag is a bug
        run_cli(lambda argv: int("x"), [])


def test_error_lines_name_the_flag_not_the_field():
    from megatron.early_exit.config import ConfigError

    assert error_line(ValueError("top_p must be in (0, 1], got 2.0")) == "error: --top-p: must be in (0, 1], got 2.0"
    assert error_line(ConfigError("--seq-length is required")) == "error: --seq-length: is required"
    assert error_line(ConfigError("saving failed on\nrank 1")) == "error: saving failed on rank 1"


def test_check_requires_names_the_ignored_flag():
    """The helper tools/generate.py uses for its pairs (--exit-layers / --early-exit-thres, ...)."""
    from argparse import Namespace

    pairs = [("exit_layers", "early_exit_thres"), ("draft_exit", "self_speculative")]
    check_requires(Namespace(exit_layers=[2], early_exit_thres=0.8, draft_exit=None,
                             self_speculative=False), pairs)
    with pytest.raises(UsageError, match="--exit-layers: has no effect without --early-exit-thres"):
        check_requires(Namespace(exit_layers=[2], early_exit_thres=None, draft_exit=None,
                                 self_speculative=False), pairs)
    with pytest.raises(UsageError, match="--draft-exit: has no effect without --self-speculative"):
        check_requires(Namespace(exit_layers=[], early_exit_thres=None, draft_exit=2,
                                 self_speculative=False), pairs)


def test_use_checkpoint_args_rebuilds_the_saved_model_config():
    """--use-checkpoint-args: the model and exit structure come from the saved config (the
    reference is that config itself), training flags stay as given, the caller's Namespace is
    left alone."""
    import dataclasses

    from megatron.early_exit.arguments import configs_from_args, parse_args, with_checkpoint_args

    saved_args = parse_args(["--num-layers", "4", "--hidden-size", "48", "--num-attention-heads", "6",
                             "--num-query-groups", "2", "--seq-length", "24", "--architecture", "gpt2",
                             "--disable-bias-linear", "--exit-layer-nums", "1", "3", "--use-exit-mlp",
                             "--untie-exit-output-weights", "--make-vocab-size-divisible-by", "64",
                             "--tokenizer-type", "ByteTokenizer", "--lr", "1e-3"])
    saved = configs_from_args(saved_args, 1, 320)
    meta = {"config": dataclasses.asdict(saved.model), "args": dataclasses.asdict(saved.run)}
    given = parse_args(["--use-checkpoint-args", "--load", "ckpt", "--lr", "5e-4", "--num-layers", "9"])
    args = with_checkpoint_args(given, meta)
    assert given.num_layers == 9 and given.hidden_size is None  # not edited in place
    again = configs_from_args(args, 1, 320)
    assert again.model.model == saved.model.model
    for name in ("exit_layer_nums", "pre_exit", "use_exit_norm", "use_exit_mlp", "use_exit_block",
                 "untie_exit_output_weights"):
        assert getattr(again.model.exits, name) == getattr(saved.model.exits, name), name
    assert again.run.make_vocab_size_divisible_by == 64 and again.train.lr == 5e-4
    short = parse_args(["--use-checkpoint-args", "--load", "ckpt", "--seq-length", "12"])
    assert configs_from_args(with_checkpoint_args(short, meta), 1, 320).model.model.seq_length == 12
