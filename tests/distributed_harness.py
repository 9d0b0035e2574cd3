"""Multi-process test harness: run a function on N CPU ranks joined by torch.distributed/gloo.

    from tests.distributed_harness import run_distributed, init_model_parallel

    def _scenario(rank, world_size, scale):          # module level, so it pickles
        init_model_parallel(tp=2, pp=1)
        ...
        return some_picklable_value

    def test_it():
        results = run_distributed(_scenario, 2, 3.0)   # [rank0_value, rank1_value]

Each rank is a fresh ``spawn`` process with MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/
LOCAL_RANK set, OMP_NUM_THREADS=1, and a gloo process group initialised before ``fn`` runs.
Return values (or the full traceback of any exception) come back through a queue; if any rank
fails, dies or hangs past ``timeout`` the caller gets one AssertionError holding every failing
rank's traceback. Stragglers are killed. Hung ranks dump their Python stacks to stderr
(faulthandler) before being killed, so pytest's captured stderr shows where they were stuck.

Importing megatron.core costs several seconds per process: run a whole scenario per spawn.
Self-test: ``python -m pytest -q tests/unit/test_distributed_harness.py``.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import queue as queue_mod
import signal
import socket
import sys
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# After the first rank fails, the others get this long to finish or fail on their own
# (gloo peers usually notice a dead rank quickly) before they are killed.
FAILURE_GRACE_S = 20.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_model_parallel(tp: int = 1, pp: int = 1, vpp: int | None = None, **kwargs: Any) -> None:
    """Initialise megatron.core.parallel_state on the already-initialised (gloo) world."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        **kwargs,
    )


def destroy_model_parallel() -> None:
    """Undo init_model_parallel (no-op if megatron.core.parallel_state was never imported)."""
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None:
        ps.destroy_model_parallel()


def _worker(fn, rank, world_size, port, args, results, timeout, env) -> None:
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        dist.init_process_group(
            backend="gloo",
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        value = fn(rank, world_size, *args)
        payload = ("ok", pickle.dumps(value))  # pickle here so a failure is reported, not lost
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit
        payload = ("error", traceback.format_exc())
    results.put((rank,) + payload)
    try:
        destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - teardown after a failure may fail too; result is sent
        pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return values by rank.

    ``fn`` must be a module-level (picklable) function; ``args`` and return values must pickle.
    ``env`` adds environment variables in every rank. Raises AssertionError on any failure.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    base_env = {"OMP_NUM_THREADS": "1", **(env or {})}
    procs = []
    saved = {k: os.environ.get(k) for k in base_env}
    os.environ.update(base_env)  # so the spawned interpreters start with it, before torch loads
    try:
        for rank in range(world_size):
            p = ctx.Process(
                target=_worker,
                args=(fn, rank, world_size, port, args, results, timeout, base_env),
                name=f"rank{rank}",
            )
            p.start()  # pickles fn and args: fn must be module level
            procs.append(p)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    values: dict[int, Any] = {}
    errors: dict[int, str] = {}

    def record(msg) -> None:
        rank, status, data = msg
        if status == "ok":
            try:
                values[rank] = pickle.loads(data)
            except Exception:  # noqa: BLE001
                errors[rank] = "result could not be unpickled:\n" + traceback.format_exc()
        else:
            errors[rank] = data

    deadline = time.monotonic() + timeout
    timed_out = False
    while len(values) + len(errors) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        try:
            record(results.get(timeout=min(0.2, remaining)))
        except queue_mod.Empty:
            # a rank that died without reporting (segfault, os._exit, OOM kill)?
            dead = [
                r
                for r, p in enumerate(procs)
                if r not in values and r not in errors and not p.is_alive()
            ]
            if dead:
                try:  # it may have reported just before exiting
                    record(results.get(timeout=0.5))
                except queue_mod.Empty:
                    for r in dead:
                        errors[r] = f"process exited with code {procs[r].exitcode} without reporting"
        if errors:
            deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)

    stragglers = _reap(procs, set(values) | set(errors))
    if timed_out or errors:
        lines = [f"run_distributed({getattr(fn, '__qualname__', fn)}, world_size={world_size}) failed"]
        if timed_out:
            why = f"{FAILURE_GRACE_S:g}s after a failure" if errors else f"{timeout:g}s"
            lines.append(
                f"ranks {stragglers} still running after {why}: killed "
                "(their Python stacks are in the captured stderr)"
            )
        for r in sorted(errors):
            lines.append(f"----- rank {r} -----\n{errors[r].rstrip()}")
        raise AssertionError("\n".join(lines))
    return [values[r] for r in range(world_size)]


def _reap(procs, reported) -> list[int]:
    """Join ranks that reported; dump the stacks of and kill the rest. Returns killed ranks."""
    end = time.monotonic() + 5.0  # ranks that reported are only tearing down
    for r in sorted(reported):
        procs[r].join(timeout=max(0.0, end - time.monotonic()))
    alive = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in alive:
        try:
            os.kill(procs[r].pid, signal.SIGUSR1)
        except OSError:
            pass
    if alive:
        time.sleep(0.5)
    for r in alive:
        procs[r].kill()
    for r in alive:
        procs[r].join(timeout=5)
    return alive
