"""The example launch scripts, run for real on CPU (DEVICE=cpu, tiny shapes through EXTRA_ARGS).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/e2e/test_launch_scripts.py``

- ``examples/slurm_multinode.sbatch`` submitted with ``sbatch --wait`` to a Slurm cluster
  (PP=2, two CPU processes on one node) logs the losses of a plain single-process run;
- ``examples/pretrain_1.3b_torchrun.sh`` started twice as two "nodes" on this machine
  (NNODES=2, NODE_RANK 0 and 1, c10d rendezvous on 127.0.0.1, TP=2 inside a node, PP=2 across
  the nodes: 4 processes) logs the same losses as one process.

The reference is each script's own command (``DRY_RUN=1`` at TP=PP=1, one process) run as a
plain ``python pretrain_early_exit_gpt.py ...``, so the model, data and seed are the script's.
The Slurm test needs ``sbatch`` and running ``slurmctld`` + ``slurmd`` (.ci/run installs
Debian's slurm-wlm and munge, writes a one-node slurm.conf and starts the daemons); it is
skipped without them, unless EE_TEST_REQUIRE_SLURM=1 (set by .ci/run), which makes it fail.
"""

import os
import shlex
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.e2e.test_pretrain_cli import ENV, ROOT, corpus, read_log  # noqa: F401 (fixture)

TINY = ("--num-layers 4 --hidden-size 32 --num-attention-heads 4 --ffn-hidden-size 64 "
        "--seq-length 32 --max-position-embeddings 32 --exit-layer-nums 1 3 "
        "--micro-batch-size 2 --global-batch-size 4 --train-iters 3 --lr-warmup-iters 1 "
        "--log-interval 1 --eval-iters 0 --fp64 "
        # the same padded vocabulary (512) at TP=1 and TP=2
        "--make-vocab-size-divisible-by 256")


def script_env(corpus, out: Path, **extra) -> dict:
    # not the variables of a job this test may run inside (SLURM_CONF names the cluster)
    env = {k: v for k, v in ENV.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               DATA_PATH=corpus, CKPT_DIR=str(out / "ckpt"), LOG_JSON=str(out / "log.jsonl"),
               DEVICE="cpu", TOKENIZER="byte", EXTRA_ARGS=TINY, REPO=str(ROOT))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def reference_losses(script: str, corpus, out: Path, **extra) -> dict:
    """The script's pretrain flags at TP=PP=1 (DRY_RUN=1), run as one plain process."""
    env = script_env(corpus, out, DRY_RUN=1, TP=1, PP=1, **extra)
    printed = subprocess.run(["bash", str(ROOT / script)], env=env, capture_output=True,
                             text=True, check=True).stdout
    words = shlex.split(printed)
    start = next(i for i, w in enumerate(words) if w.endswith("pretrain_early_exit_gpt.py")) + 1
    cmd = [sys.executable, str(ROOT / "pretrain_early_exit_gpt.py"), *words[start:]]
    done = subprocess.run(cmd, env={**env, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return read_log(out / "log.jsonl")


def assert_same_losses(got: dict, ref: dict) -> None:
    assert sorted(got) == sorted(ref) == [1, 2, 3]
    for it, r in ref.items():
        assert got[it]["lm_loss"] == pytest.approx(r["lm_loss"], rel=1e-9), it
        assert got[it]["exit_losses"].keys() == r["exit_losses"].keys()
        for layer, loss in r["exit_losses"].items():
            assert got[it]["exit_losses"][layer] == pytest.approx(loss, rel=1e-9), (it, layer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm():
    """Skip (or fail, under EE_TEST_REQUIRE_SLURM=1) unless a Slurm cluster answers here."""
    def missing(reason):
        if os.environ.get("EE_TEST_REQUIRE_SLURM") == "1":
            pytest.fail(f"EE_TEST_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)

    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        missing("sbatch/scontrol not installed (Debian: slurm-wlm; .ci/run sets up a cluster)")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if ping.returncode != 0 or "UP" not in ping.stdout:
        missing(f"no slurmctld answers: {(ping.stdout + ping.stderr).strip()[-200:]}")
    states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                            timeout=30).stdout.split()
    if not any(s.rstrip("*") in ("idle", "mixed", "allocated") and not s.endswith("*")
               for s in states):
        missing(f"no slurmd node is up (sinfo states: {states})")


@pytest.mark.slow
def test_sbatch_example_on_a_local_slurm_cluster(slurm, corpus, tmp_path):  # noqa: F811
    common = dict(MODEL="1.3b", GPUS_PER_NODE=2)
    ref = reference_losses("examples/slurm_multinode.sbatch", corpus, tmp_path / "ref",
                           GPUS_PER_NODE=1, MODEL="1.3b")
    env = script_env(corpus, tmp_path / "job", PP=2, RDZV_PORT=free_port(), **common)
    name = f"ee-test-{uuid.uuid4().hex[:8]}"
    cpus = min(2, os.cpu_count() or 1)
    cmd = ["sbatch", "--wait", "--nodes=1", "--gpus-per-node=0", f"--cpus-per-task={cpus}",
           f"--job-name={name}", f"--output={tmp_path / 'job.out'}",
           str(ROOT / "examples/slurm_multinode.sbatch")]
    try:
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--name", name], check=False)
        raise
    out = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert done.returncode == 0, f"{done.stdout}{done.stderr}\n--- job output:\n{out[-3000:]}"
    assert "job " in out and "MODEL=1.3b TP=1 PP=2" in out, out[-3000:]
    assert_same_losses(read_log(tmp_path / "job" / "log.jsonl"), ref)


@pytest.mark.slow
def test_two_node_torchrun_rendezvous_on_one_machine(corpus, tmp_path):  # noqa: F811
    script = "examples/pretrain_1.3b_torchrun.sh"
    ref = reference_losses(script, corpus, tmp_path / "ref", NPROC=1)
    env = script_env(corpus, tmp_path / "run", NNODES=2, NPROC=2, TP=2, PP=2,
                     RDZV_ENDPOINT=f"127.0.0.1:{free_port()}", RDZV_ID=uuid.uuid4().hex[:8])
    logs = [open(tmp_path / f"node{r}.log", "w") for r in (0, 1)]
    nodes = [subprocess.Popen(["bash", str(ROOT / script)], env={**env, "NODE_RANK": str(r)},
                              stdout=logs[r], stderr=subprocess.STDOUT, start_new_session=True)
             for r in (0, 1)]
    try:
        codes = [p.wait(timeout=300) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
        for f in logs:
            f.close()
    text = [(tmp_path / f"node{r}.log").read_text()[-3000:] for r in (0, 1)]
    assert codes == [0, 0], text
    assert_same_losses(read_log(tmp_path / "run" / "log.jsonl"), ref)
