"""pretrain_early_exit_gpt.py end to end on CPU, through its command line.

- a run killed with SIGKILL mid-training (its exit status shows the kill) and resumed from its
  last checkpoint (its first logged iteration follows that checkpoint) logs exactly the losses
  of an uninterrupted run (--log-json, every iteration);
- runs with different layouts (single process, torchrun TP=2, torchrun PP=2) and the same seed
  log the same losses (float64, within 1e-5).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A byte-level indexed Shakespeare dataset (its --data-path prefix), built once per session:
    the modules that import this fixture share one directory under pytest's base temp."""
    d = tmp_path_factory.getbasetemp() / "shared_corpus"
    done = d / "c_text_document.done"
    if done.exists():
        return str(d / "c_text_document")
    d.mkdir(exist_ok=True)
    from megatron.early_exit.data.corpus import load_shakespeare

    text = load_shakespeare(max_chars=300_000)
    with open(d / "c.jsonl", "w") as f:
        for para in text.split("\n\n"):
            if para.strip():
                f.write(json.dumps({"text": para}) + "\n")
    subprocess.run([sys.executable, str(ROOT / "tools/preprocess_data.py"), "--input", str(d / "c.jsonl"),
                    "--json-keys", "text", "--output-prefix", str(d / "c"), "--tokenizer-type",
                    "ByteTokenizer", "--append-eod", "--workers", "1"], check=True, env=ENV,
                   capture_output=True)
    done.touch()
    return str(d / "c_text_document")


def train_args(data, log, iters, extra=()):
    return ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--exit-layer-nums", "1", "3", "--use-exit-norm", "--exit-layer-weight", "0.5", "0.8",
            "--exit-layer-weight-init", "0.1", "0.1", "--exit-layer-weight-warmup-iters", "6",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(iters),
            "--lr", "2e-3", "--lr-warmup-iters", "2", "--log-interval", "1", "--data-path", data,
            "--split", "98,2,0", "--eval-iters", "0", "--log-json", str(log), "--seed", "9", *extra]


def read_log(path):
    records = {}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") != "eval":
            records[rec["iteration"]] = rec  # a resumed run re-logs: the last one wins
    return records


def last_logged_iteration(path) -> int:
    """Highest training iteration in complete lines of a log that is still being written."""
    if not Path(path).exists():
        return 0
    lines = Path(path).read_text().split("\n")[:-1]  # the last piece may be a partial line
    return max((json.loads(line).get("iteration", 0) for line in lines if line.strip()), default=0)


def launch(args, nproc=1):
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "pretrain_early_exit_gpt.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(random.randint(20000, 40000)), str(ROOT / "pretrain_early_exit_gpt.py"), *args]
    return cmd


def test_sigkill_and_resume_reproduces_uninterrupted_run(corpus, tmp_path):
    iters = 12
    ref_log = tmp_path / "ref.jsonl"
    subprocess.run(launch(train_args(corpus, ref_log, iters, ["--make-vocab-size-divisible-by", "16"])), check=True, env=ENV, capture_output=True)
    log, ckpt = tmp_path / "run.jsonl", tmp_path / "ckpt"
    args = train_args(corpus, log, iters, ["--make-vocab-size-divisible-by", "16", "--save", str(ckpt), "--save-interval", "3", "--load", str(ckpt)])
    kill_after = random.Random(os.getpid()).randint(4, 8)
    proc = subprocess.Popen(launch(args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if last_logged_iteration(log) >= kill_after:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended on its own before it could be killed"
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    assert tracker.exists(), "no checkpoint before the kill"
    saved_at = int(tracker.read_text())
    logged_before = len(log.read_text().splitlines())
    assert 0 < saved_at < iters
    done = subprocess.run(launch(args), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = [json.loads(line) for line in log.read_text().splitlines()[logged_before:]]
    resumed = [rec["iteration"] for rec in resumed if rec.get("kind") != "eval"]
    # the second run resumed from the checkpoint the first one left (not from scratch, not done)
    assert resumed[0] == saved_at + 1 < iters, (saved_at, resumed)
    ref, got = read_log(ref_log), read_log(log)
    assert sorted(ref) == sorted(got) == list(range(1, iters + 1))
    for it in ref:
        for key in ("lm_loss", "exit_losses", "exit_weights", "lr", "grad_norm"):
            assert got[it][key] == ref[it][key], (it, key, got[it][key], ref[it][key])


def test_layouts_log_the_same_losses(corpus, tmp_path):
    logs = {}
    # the padded vocabulary is a multiple of divisor x TP (Megatron's rule): 288 in all three
    for name, nproc, extra in [("single", 1, ["--make-vocab-size-divisible-by", "32"]),
                               ("pp2", 2, ["--pipeline-model-parallel-size", "2", "--make-vocab-size-divisible-by", "32"]),
                               ("tp2", 2, ["--tensor-model-parallel-size", "2", "--make-vocab-size-divisible-by", "16"])]:
        log = tmp_path / f"{name}.jsonl"
        done = subprocess.run(launch(train_args(corpus, log, 4, ["--fp64", *extra]), nproc), env=ENV,
                              capture_output=True, text=True)
        assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"
        logs[name] = read_log(log)
    for name in ("pp2", "tp2"):
        for it, ref in logs["single"].items():
            got = logs[name][it]
            assert got["lm_loss"] == pytest.approx(ref["lm_loss"], rel=1e-5), (name, it)
            for layer, loss in ref["exit_losses"].items():
                assert got["exit_losses"][layer] == pytest.approx(loss, rel=1e-5), (name, it, layer)
