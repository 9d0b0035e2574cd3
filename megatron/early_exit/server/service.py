"""The engine loop: one thread owns the continuous-batching Scheduler; HTTP handlers reach it
only through ``submit`` / ``cancel`` (thread-safe) and the per-request ``sink`` they pass.

    service = GenerationService(scheduler, max_queue=64)
    service.start()
    rid = service.submit(request, sink)     # sink(update_or_error) is called on the loop thread
    service.cancel(rid)                     # frees the row at the next step boundary
    service.stop()

Each iteration of the loop takes a *plan* (the requests submitted and cancelled since the last
step, and whether to shut down), applies it to the Scheduler (``add`` / ``cancel``), runs one
``step()`` when there is work and hands every RequestUpdate to its request's sink. A sink gets
RequestUpdates, then exactly one final thing: the update with ``finished=True``, or an
exception (``QueueFull``, ``RequestError``, ``ServerFault``).

Under tensor / pipeline parallelism (``control=ControlGroup(...)``) global rank 0 runs this
loop and broadcasts each plan over a gloo group of the pipeline-stage-0 ranks, which run
``follow(scheduler, control)``: the same add / cancel / step calls in the same order, so every
rank's Scheduler takes the same decisions (its results are dropped there). When idle, rank 0
still broadcasts an empty plan every ``heartbeat_s`` so the followers never sit in a collective
long enough to time out. Ranks of later pipeline stages run ``engine.serve()`` instead.

Request ids are assigned here (``req-<n>``), so every rank's Scheduler uses the same ids.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from megatron.early_exit.inference.requests import QueueFull, RequestError

__all__ = ["GenerationService", "ControlGroup", "Plan", "ServerFault", "ServerUnavailable",
           "follow"]

log = logging.getLogger(__name__)


class ServerFault(RuntimeError):
    """The engine failed while running a request (a genuine server error, HTTP 500)."""


class ServerUnavailable(ServerFault):
    """The engine loop is stopping or stopped (HTTP 503)."""


@dataclass
class Plan:
    """What every stage-0 rank applies before its next step."""

    adds: list = field(default_factory=list)  # GenerationRequest with request_id set
    cancels: List[str] = field(default_factory=list)
    shutdown: bool = False

    def empty(self) -> bool:
        return not (self.adds or self.cancels or self.shutdown)


class ControlGroup:
    """Broadcast plans from global rank ``src`` to the other stage-0 ranks (gloo)."""

    def __init__(self, group, src: int = 0):
        self.group, self.src = group, src

    def exchange(self, plan: Optional[Plan]) -> Plan:
        import torch.distributed as dist

        box = [plan]
        dist.broadcast_object_list(box, src=self.src, group=self.group)
        return box[0]


def apply_plan(scheduler, plan: Plan) -> Dict[str, Exception]:
    """add / cancel on ``scheduler``; the requests it refused, by id, with the reason."""
    refused = {}
    for rid in plan.cancels:
        scheduler.cancel(rid)
    for req in plan.adds:
        try:
            scheduler.add(req)
        except (QueueFull, RequestError) as e:
            refused[req.request_id] = e
    return refused


def follow(scheduler, control: ControlGroup, on_shutdown: Optional[Callable] = None) -> None:
    """A stage-0 rank other than the driver: apply rank 0's plans and step, until shutdown."""
    while True:
        plan = control.exchange(None)
        if plan.shutdown:
            break
        apply_plan(scheduler, plan)
        if scheduler.has_work:
            scheduler.step()
    if on_shutdown is not None:
        on_shutdown()


class GenerationService:
    """Owns the Scheduler on its own thread; see the module docstring."""

    def __init__(self, scheduler, control: Optional[ControlGroup] = None, heartbeat_s: float = 1.0,
                 max_queue: int = 64, max_rows: int = 8, on_step: Optional[Callable] = None):
        self.scheduler, self.control, self.heartbeat_s = scheduler, control, heartbeat_s
        self.max_queue, self.max_rows = max_queue, max_rows
        self.on_step = on_step  # called on the loop thread after each step: (updates, seconds)
        self._lock = threading.Condition()
        self._adds: deque = deque()
        self._cancels: List[str] = []
        self._sinks: Dict[str, Callable] = {}
        self._next_id = 0
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.num_running = 0  # mirrors of the Scheduler's counts (read from any thread)
        self.num_waiting = 0
        self.alive = False

    # ------------------------------------------------------------------ any thread
    def start(self) -> "GenerationService":
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.alive = True
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request, sink: Callable) -> str:
        """Queue ``request`` (already validated); returns its id. Raises QueueFull at once when
        every row is taken and the waiting queue is full (else the Scheduler's ``add`` decides at
        the next step and the sink gets its QueueFull), ServerFault when the loop is not running."""
        with self._lock:
            if self._stopping or not self.alive:
                raise ServerUnavailable("the engine loop is not running")
            queued = len(self._adds) + self.num_waiting + self.num_running
            if queued >= self.max_queue + self.max_rows:  # the Scheduler's own check is exact
                raise QueueFull(f"the queue holds {self.max_queue} waiting requests")
            rid = f"req-{self._next_id}"
            self._next_id += 1
            self._adds.append(dataclasses.replace(request, request_id=rid))
            self._sinks[rid] = sink
            self._lock.notify_all()
        return rid

    def cancel(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._sinks:
                self._cancels.append(request_id)
                self._lock.notify_all()

    # ------------------------------------------------------------------ loop thread
    def _take_plan(self) -> Plan:
        with self._lock:
            idle = not self.scheduler.has_work
            if idle and not (self._adds or self._cancels or self._stopping):
                self._lock.wait(self.heartbeat_s)
            plan = Plan(adds=list(self._adds), cancels=self._cancels, shutdown=self._stopping)
            self._adds.clear()
            self._cancels = []
        return plan

    def _run(self) -> None:
        try:
            while True:
                plan = self._take_plan()
                if self.control is not None:
                    self.control.exchange(plan)
                if plan.shutdown:
                    break
                for rid, err in apply_plan(self.scheduler, plan).items():
                    self._finish(rid, err)
                if self.scheduler.has_work:
                    self._step()
                self._mirror()
        except Exception:  # noqa: BLE001 - a fault of the loop itself: fail everything, stop
            log.error("engine loop failed:\n%s", traceback.format_exc())
        finally:
            self.alive = False
            with self._lock:
                sinks, self._sinks = self._sinks, {}
            for sink in sinks.values():
                sink(ServerUnavailable("the server is shutting down") if self._stopping
                     else ServerFault("the engine loop stopped"))

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            updates = self.scheduler.step()
        except Exception:  # noqa: BLE001 - fail the running requests, keep serving
            log.error("scheduler step failed:\n%s", traceback.format_exc())
            with self._lock:
                ids = list(self._sinks)
            for rid in ids:
                self.scheduler.cancel(rid)
                self._finish(rid, ServerFault("the engine failed while running this request"))
            if self.scheduler.has_work:  # drain the cancellations' final updates
                self.scheduler.step()
            return
        if self.on_step is not None:
            self.on_step(updates, time.perf_counter() - start)
        self._mirror()  # before the sinks: a finished request's client sees its row free
        for update in updates:
            with self._lock:
                sink = self._sinks.get(update.request_id)
            if sink is not None:
                if update.finished:
                    self._finish(update.request_id, update)
                else:
                    sink(update)

    def _mirror(self) -> None:
        self.num_running = self.scheduler.num_running
        self.num_waiting = self.scheduler.num_waiting

    def _finish(self, rid: str, final) -> None:
        with self._lock:
            sink = self._sinks.pop(rid, None)
        if sink is not None:
            sink(final)
