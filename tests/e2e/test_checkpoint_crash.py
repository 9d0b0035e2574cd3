"""pretrain_early_exit_gpt.py SIGKILLed while it writes a checkpoint, then resumed.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/e2e/test_checkpoint_crash.py``

The kills are real and triggered from outside: the training process runs under ``strace``,
which only makes chosen syscalls slow (``-e inject=...:delay_exit``, i.e. slow storage), and
this test watches the checkpoint directory and sends SIGKILL when it sees the moment it wants:

1. a save part-way: ``iter_0000004.tmp-*`` exists, holds some files, has no metadata.json
   (each fsync takes 0.15 s, so the save spends over a second writing its files);
2. between the directory rename and the tracker update: ``iter_0000004/`` is in place while
   ``latest_checkpointed_iteration.txt`` still says 2 (each rename takes 1 s to return).

After each kill the checkpoint that loads is iteration 2 (read here in-process, and by the
resumed run, whose first logged iteration is 3 and whose losses for iterations 3-4 equal those
the killed run logged before the kill); the final run's saves succeed, and the stale
``.tmp-`` directory the first kill left is removed at its first committed save.
Needs ``strace`` (Debian package; .ci/run installs it); skipped where it is absent or
where ptrace is not permitted.
"""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from megatron.early_exit.checkpoint import format as fmt
from megatron.early_exit.checkpoint.cleanup import remove_stale_saves
from tests.e2e.test_pretrain_cli import ENV, corpus, launch, train_args  # noqa: F401 (fixture)

SLOW_FSYNC_US, SLOW_RENAME_US = 150_000, 1_000_000
RENAMES = "rename,renameat,renameat2"
CHILD_ENV = {**ENV, "PYTHONDONTWRITEBYTECODE": "1"}


def strace_prefix(syscalls: str, delay_us: int) -> list:
    """``strace`` that delays the return of ``syscalls`` (comma list) and stops only at them."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (apt-get install strace; .ci/run does)")
    probe = subprocess.run(["strace", "-f", "--seccomp-bpf", "-qq", "-o", "/dev/null", "-e",
                            "trace=fsync", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here (ptrace not permitted?): {probe.stderr.strip()[-200:]}")
    return ["strace", "-f", "--seccomp-bpf", "-qq", "-o", "/dev/null", "-e", f"trace={syscalls}",
            "-e", f"inject={syscalls}:delay_exit={delay_us}"]


def log_records(path: Path) -> list:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(records: list) -> dict:
    return {r["iteration"]: (r["lm_loss"], r["exit_losses"]) for r in records if r.get("kind") != "eval"}


def run_until(cmd: list, seen, what: str, stderr: Path, timeout: float = 240.0):
    """Start ``cmd`` in its own process group; SIGKILL the group once ``seen()`` returns a
    truthy value (returned with the exit status); fail if the run ends first."""
    with open(stderr, "w") as err:
        proc = subprocess.Popen(cmd, env=CHILD_ENV, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            state = seen()
            if state:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return state, proc.returncode
            time.sleep(0.01)
        raise AssertionError(f"never saw {what}; rc={proc.poll()}; stderr: {stderr.read_text()[-2000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def mid_save(ckpt: Path):
    """Names in an iteration-4 temporary save that has files but no metadata yet, else None."""
    for tmp in ckpt.glob(fmt.iteration_name(4) + ".tmp-*"):
        names = sorted(os.listdir(tmp))
        if names and fmt.METADATA not in names:
            return tmp, names
    return None


def renamed_not_tracked(ckpt: Path):
    final, tracker = ckpt / fmt.iteration_name(4), ckpt / fmt.TRACKER
    if final.is_dir() and tracker.read_text().strip() == "2":
        return True
    return None


def committed_iteration(ckpt: Path) -> int:
    from megatron.early_exit.checkpoint.load import read_checkpoint_metadata

    return read_checkpoint_metadata(str(ckpt))["iteration"]


def test_kill_during_save_and_before_tracker_update(corpus, tmp_path):  # noqa: F811
    ckpt = tmp_path / "ckpt"
    logs = {name: tmp_path / f"{name}.jsonl" for name in ("a", "b", "c")}

    def args(name):
        return train_args(corpus, logs[name], 6, ["--make-vocab-size-divisible-by", "16",
                                                  "--save", str(ckpt), "--load", str(ckpt),
                                                  "--save-interval", "2"])

    # 1. killed while the iteration-4 save writes its files
    cmd = strace_prefix("fsync", SLOW_FSYNC_US) + launch(args("a"))
    (tmp, names), rc = run_until(cmd, lambda: mid_save(ckpt), "a save part-way", tmp_path / "a.err")
    assert rc == -signal.SIGKILL
    assert tmp.is_dir(), names  # never renamed: seen with files but no metadata.json
    assert (ckpt / fmt.TRACKER).read_text().strip() == "2"
    assert not (ckpt / fmt.iteration_name(4)).exists()
    assert committed_iteration(ckpt) == 2
    ref = losses(log_records(logs["a"]))
    assert sorted(ref) == [1, 2, 3, 4]  # logged before the save at 4

    # 2. resumed, then killed after iter_0000004/ is renamed into place, before the tracker says so
    cmd = strace_prefix(RENAMES, SLOW_RENAME_US) + launch(args("b"))
    _, rc = run_until(cmd, lambda: renamed_not_tracked(ckpt), "the rename before the tracker update",
                      tmp_path / "b.err")
    assert rc == -signal.SIGKILL
    assert (ckpt / fmt.iteration_name(4) / fmt.METADATA).is_file()
    assert committed_iteration(ckpt) == 2, "the tracker still names the previous checkpoint"
    got = losses(log_records(logs["b"]))
    assert sorted(got) == [3, 4] and all(got[i] == ref[i] for i in (3, 4)), (got, ref)

    # 3. resumed without interference: loads 2 again, saves 4 (over the untracked copy) and 6
    done = subprocess.run(launch(args("c")), env=CHILD_ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    got = losses(log_records(logs["c"]))
    assert sorted(got) == [3, 4, 5, 6] and all(got[i] == ref[i] for i in (3, 4)), (got, ref)
    assert committed_iteration(ckpt) == 6
    assert not tmp.exists(), "the stale temporary save was not removed"
    assert f"removed {tmp}" in done.stderr
    assert sorted(p.name for p in ckpt.glob("iter_*")) == [fmt.iteration_name(i) for i in (2, 4, 6)]
    for it in (4, 6):  # both complete and intact (every file hashed)
        d = ckpt / fmt.iteration_name(it)
        fmt.check_manifest(str(d), fmt.read_metadata(str(d))["files"], hash_all=True)


def test_cleanup_removes_leftovers_and_keeps_a_sole_old_copy(tmp_path):
    for name in ("iter_0000002", "iter_0000004", "iter_0000004.tmp-ab12", "iter_0000006.tmp-cd34",
                 "iter_0000002.old-ef56", "iter_0000008.old-aa00", ".tokenizer"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_tp00_pp000.pt").write_bytes(b"x")
    (tmp_path / fmt.TRACKER).write_text("4\n")
    (tmp_path / f"{fmt.TRACKER}.tmp-0001").write_text("6\n")
    removed = remove_stale_saves(str(tmp_path))
    assert sorted(removed) == ["iter_0000002.old-ef56", "iter_0000004.tmp-ab12",
                               "iter_0000006.tmp-cd34", f"{fmt.TRACKER}.tmp-0001"]
    # iter_0000008.old-* is the only copy of iteration 8: kept (locate_iteration_dir uses it)
    assert sorted(os.listdir(tmp_path)) == [".tokenizer", "iter_0000002", "iter_0000004",
                                            "iter_0000008.old-aa00", fmt.TRACKER]
