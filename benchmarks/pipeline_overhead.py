"""Pipeline overhead of early exits and of bubble filling, measured on CPU ranks over gloo.

One run spawns gloo CPU ranks (torch.multiprocessing "spawn", OMP_NUM_THREADS=1 and one torch
thread per rank, as tests/distributed_harness.py does) and times full training steps (1F1B
forward/backward, gradient finalisation, clipping, AdamW) of a Llama-style model:

  * PP=2 (2 ranks) and PP=4 (4 ranks): the early-exit model vs the same backbone without exits;
    the ratio early-exit / no-exit is the cost of the exit heads, their losses and the larger
    tied-embedding all-reduce.
  * PP=4, exits on stages 0 and 1: bubble filling (``--fill-explicit-bubbles``) on vs off; the
    extra exit-loss tokens per step (partial micro-batches x micro-batch size x seq length x
    exits each reaches) and the step-time cost ratio filled / unfilled.

Every rank builds all cases of its world size up front, then times them in interleaved rounds
(one step of each case per round, order rotating), so background load hits all cases alike.
Reported per case: median and min wall time of a step (rank 0, between two barriers), median
CPU seconds of a step summed over ranks, and ratios: of the medians, the median of per-round
ratios ("paired") and of the CPU seconds. Each stage also records per-action timings (the
executor's ``timeline=``); the PP=4 filled step of median wall time goes to ``--timeline-json``
and is drawn by ``tools/plot_pipeline_schedule.py --measured`` into ``--png``. A table is
printed last.

More ranks than CPU cores oversubscribe the machine (PP=4 on a 2-core box: two ranks per core),
so idle pipeline slots are not idle CPU there; the output says when that happens.

    PYTHONPATH=. .venv/bin/python benchmarks/pipeline_overhead.py
    PYTHONPATH=. .venv/bin/python benchmarks/pipeline_overhead.py --pp 4 --steps 10 --no-plot
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# (name, pipeline size, exits on?, bubble filling?)
CASES = {2: [("no-exit", 2, False, False), ("early-exit", 2, True, False)],
         4: [("no-exit", 4, False, False), ("early-exit", 4, True, False),
             ("early-exit+fill", 4, True, True)]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=8, help="micro-batches per step")
    p.add_argument("--exits", default="2,4",
                   help="exit layers (1-based); default: end of stages 0 and 1 at PP=4")
    p.add_argument("--backward-forward-ratio", type=float, default=2.0,
                   help="r used to size bubble filling (DESIGN.md 4)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    p.add_argument("--steps", type=int, default=5, help="timed rounds")
    p.add_argument("--pp", default="2,4", help="pipeline sizes to run")
    p.add_argument("--timeline-json",
                   default=os.path.join(tempfile.gettempdir(), "pipeline_measured_p4.json"))
    p.add_argument("--png", default=os.path.join(ROOT, "docs", "pipeline_measured_p4.png"))
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = p.parse_args(argv)
    if not set(args.pp.split(",")) <= {str(k) for k in CASES}:
        p.error(f"--pp takes sizes from {sorted(CASES)}, got {args.pp}")
    return args


def make_cfg(a: dict, pp: int, with_exits: bool):
    from megatron.early_exit.config import EarlyExitGPTConfig, ExitConfig, ModelConfig, ParallelConfig

    model = ModelConfig(num_layers=a["layers"], hidden_size=a["hidden"], num_attention_heads=a["heads"],
                        vocab_size=a["vocab"], seq_length=a["seq"], architecture="llama")
    exits = [int(x) for x in a["exits"].split(",")] if with_exits else []
    ex = ExitConfig(exit_layer_nums=exits, use_exit_norm=True, exit_layer_weight=[0.5] * len(exits))
    parallel = ParallelConfig(pipeline_model_parallel_size=pp, world_size=pp)
    return EarlyExitGPTConfig(model=model, exits=ex, parallel=parallel, params_dtype="float32", seed=7)


def make_microbatches(a: dict, count: int, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, a["vocab"], (a["micro_batch_size"], a["seq"] + 1), generator=gen)
        out.append({"tokens": ids[:, :-1], "labels": ids[:, 1:],
                    "loss_mask": torch.ones(a["micro_batch_size"], a["seq"])})
    return out


def exits_reached(cfg, depths) -> list:
    """For each partial micro-batch (deepest stage d), how many exits its forward reaches."""
    from megatron.early_exit.model.placement import stage_placement

    per_stage = [len(stage_placement(cfg, s).exit_layers)
                 for s in range(cfg.parallel.pipeline_model_parallel_size)]
    return [sum(per_stage[:d + 1]) for d in depths]


def build_case(a: dict, name: str, pp: int, with_exits: bool, fill: bool) -> dict:
    """This rank's model, optimizer and data for one case. Each case keeps its own process
    groups in its ParallelContext; megatron's global parallel_state is left at the last case
    built, which is harmless here because TP=1 everywhere (its TP group is the same size-1 group)."""
    from megatron.early_exit.config import ScheduleConfig
    from megatron.early_exit.parallel.schedule_executor import fill_plan_depths
    from megatron.early_exit.parallel.state import build_model, initialize_parallel
    from megatron.early_exit.trainer.optimizer import build_optimizer

    cfg = make_cfg(a, pp, with_exits)
    schedule = ScheduleConfig(fill_explicit_bubbles=fill, backward_forward_ratio=a["backward_forward_ratio"])
    ctx = initialize_parallel(cfg, torch.device("cpu"))
    chunks = build_model(cfg, ctx)
    depths = fill_plan_depths(cfg, schedule, pp) if fill else []
    return {"name": name, "pp": pp, "cfg": cfg, "ctx": ctx, "chunks": chunks, "schedule": schedule,
            "opt": build_optimizer(chunks, lr=1e-4, weight_decay=0.01), "depths": depths,
            "full": make_microbatches(a, a["microbatches"], seed=11),
            "partials": make_microbatches(a, len(depths), seed=12), "times": [], "cpu": [], "timelines": []}


def step_once(case: dict, iteration: int) -> tuple:
    """One training step between two barriers: (wall seconds, this process's CPU seconds, this
    stage's per-action timeline)."""
    from megatron.early_exit.trainer.step import train_step

    timeline: list = []
    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    train_step(case["chunks"], case["opt"], case["full"], case["ctx"], case["cfg"], iteration=iteration,
               clip_grad=1.0, schedule=case["schedule"], partial_microbatches=case["partials"],
               timeline=timeline)
    cpu = time.process_time() - cpu
    dist.barrier()
    return time.perf_counter() - start, cpu, timeline


def stage_compute(timelines: list) -> dict:
    """Mean forward / backward seconds of full micro-batches and busy seconds per step."""
    spans = [r for tl in timelines for r in tl]
    fwd = [r["end"] - r["start"] for r in spans if r["kind"] == "F" and not r["partial"]]
    bwd = [r["end"] - r["start"] for r in spans if r["kind"] == "B" and not r["partial"]]
    busy = sum(r["end"] - r["start"] for r in spans) / max(len(timelines), 1)
    return {"fwd": statistics.mean(fwd), "bwd": statistics.mean(bwd), "busy": busy}


def summarize(a: dict, case: dict) -> dict:
    """Gather every stage's timings of one case (the parent uses rank 0's summary)."""
    per_rank = [None] * dist.get_world_size()
    mine = {"compute": stage_compute(case["timelines"]), "timelines": case["timelines"], "cpu": case["cpu"]}
    dist.all_gather_object(per_rank, mine)
    typical = sorted(  # the step with the median wall time (only rank 0's result is used)
        range(len(case["times"])), key=case["times"].__getitem__)[len(case["times"]) // 2]
    tokens = a["micro_batch_size"] * a["seq"]
    reached = exits_reached(case["cfg"], case["depths"])
    fill = case["schedule"].fill_explicit_bubbles
    return {"name": case["name"], "pp": case["pp"], "times": case["times"],
            "median": statistics.median(case["times"]), "stages": [r["compute"] for r in per_rank],
            "cpu": [sum(c) for c in zip(*(r["cpu"] for r in per_rank))], "depths": case["depths"], "reached": reached, "extra_exit_tokens": sum(reached) * tokens,
            "exit_tokens": a["microbatches"] * tokens * len(case["cfg"].exits.exit_layer_nums),
            "timeline": [rec for r in per_rank for rec in r["timelines"][typical]] if fill else None,
            "timeline_step": typical}


def _rank_main(a: dict, world: int) -> list:
    """Build every case of this world size, then time them in interleaved rounds (the case
    order rotates each round) so that background load drifts hit all cases alike."""
    from megatron.early_exit.parallel.state import destroy_parallel

    torch.manual_seed(0)
    cases = [build_case(a, *spec) for spec in CASES[world]]
    for it in range(a["warmup"] + a["steps"]):
        for k in range(len(cases)):
            case = cases[(k + it) % len(cases)]
            seconds, cpu, timeline = step_once(case, it)
            if it >= a["warmup"]:
                case["times"].append(seconds)
                case["cpu"].append(cpu)
                case["timelines"].append(timeline)
    out = [summarize(a, case) for case in cases]
    destroy_parallel()
    return out


def _worker(rank: int, world: int, port: int, a: dict, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
        value = _rank_main(a, world)
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, "error", traceback.format_exc()))
        return
    results.put((rank, "ok", value if rank == 0 else None))
    dist.destroy_process_group()


def spawn_ranks(a: dict, world: int, timeout: float) -> list:
    """Run ``_rank_main`` on ``world`` spawned gloo ranks; rank 0's result. Kills all on failure."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned interpreters
    procs = [ctx.Process(target=_worker, args=(r, world, port, a, results)) for r in range(world)]
    for p in procs:
        p.start()
    value, deadline = None, time.monotonic() + timeout
    try:
        for _ in range(world):
            rank, status, data = results.get(timeout=max(1.0, deadline - time.monotonic()))
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{data}")
            value = data if rank == 0 else value
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return value


def write_timeline(records: list, path: str) -> None:
    t0 = min(r["start"] for r in records)
    shifted = [{**r, "start": r["start"] - t0, "end": r["end"] - t0} for r in records]
    with open(path, "w") as f:
        json.dump(sorted(shifted, key=lambda r: (r["stage"], r["start"])), f, indent=1)


def plot_timeline(json_path: str, png: str) -> str:
    """Render with tools/plot_pipeline_schedule.py --measured; returns its summary lines."""
    tool = os.path.join(ROOT, "tools", "plot_pipeline_schedule.py")
    proc = subprocess.run([sys.executable, tool, "--measured", json_path, "--out", png, "--width", "100"],
                          capture_output=True, text=True, check=True)
    return proc.stdout.rstrip()


def spawn(a: dict, world: int) -> list:
    cores = os.cpu_count() or 1
    note = f"OVERSUBSCRIBED: {world} ranks on {cores} cores" if world > cores else f"{cores} cores"
    print(f"[spawn] {world} gloo ranks, OMP_NUM_THREADS=1 ({note}) ...", flush=True)
    start = time.perf_counter()
    rounds = a["warmup"] + a["steps"]
    results = spawn_ranks(a, world, timeout=180 + 30 * rounds * len(CASES[world]))
    print(f"[spawn] {world} ranks done in {time.perf_counter() - start:.1f}s", flush=True)
    for r in results:
        r["ranks"], r["oversubscribed"] = world, world > cores
        print(f"  {r['name']:<16} PP={r['pp']} steps(s): " + " ".join(f"{t:.3f}" for t in r["times"]))
    return results


def describe_stages(r: dict) -> str:
    parts = [f"s{i}: F {s['fwd'] * 1e3:.0f}ms B {s['bwd'] * 1e3:.0f}ms (B/F {s['bwd'] / s['fwd']:.2f}) "
             f"busy {s['busy']:.2f}s" for i, s in enumerate(r["stages"])]
    return f"{r['name']} PP={r['pp']}: " + "; ".join(parts)


def fill_sizing_note(a: dict, unfilled: dict) -> str:
    """Compare the measured backward/forward ratio with the r that sized the bubble filling."""
    from megatron.early_exit.parallel.schedule_plan import max_fill_microbatches

    stages = unfilled["stages"]
    r = statistics.mean(s["bwd"] for s in stages) / statistics.mean(s["fwd"] for s in stages)
    return (f"\nPP=4 early-exit: measured B/F = {r:.2f} (mean over stages) -> "
            f"floor(3r/(1+r)) = {max_fill_microbatches(4, 0, r)} partials would fit; "
            f"--backward-forward-ratio {a['backward_forward_ratio']:g} schedules "
            f"{max_fill_microbatches(4, 0, a['backward_forward_ratio'])}")


def ratios(r: dict, base: dict) -> dict:
    """Wall-time ratio of medians, median of per-round ratios (rounds time every case back to
    back, so slow drifts in background load cancel) and ratio of median CPU seconds."""
    return {"ratio": r["median"] / base["median"],
            "paired": statistics.median(t / b for t, b in zip(r["times"], base["times"])),
            "cpu": statistics.median(r["cpu"]) / statistics.median(base["cpu"])}


def print_table(a: dict, results: list, load: tuple) -> None:
    by = {(r["name"], r["pp"]): r for r in results}
    bases = {"early-exit": "no-exit", "early-exit+fill": "early-exit"}
    print(f"\nmodel: llama {a['layers']} layers, hidden {a['hidden']}, heads {a['heads']}, seq {a['seq']}, "
          f"vocab {a['vocab']}, micro-batch {a['micro_batch_size']} x {a['microbatches']} micro-batches, "
          f"fp32, exits at layers {a['exits']}; {a['steps']} timed steps after {a['warmup']} warm-up")
    print(f"machine: {os.cpu_count()} CPU cores, 1 thread per rank; load average before/after "
          f"{load[0]:.1f}/{load[1]:.1f}")
    print("step s = median wall time, cpu s = median CPU seconds of all ranks; ratios vs the row named")
    print(f"{'case':<16}{'PP':>3}{'ranks':>6}{'step s':>8}{'min s':>7}{'cpu s':>7}{'ratio':>7}"
          f"{'paired':>8}{'cpu':>7}  vs")
    for r in results:
        base = by.get((bases.get(r["name"]), r["pp"]))
        q = ratios(r, base) if base is not None else {"ratio": 1.0, "paired": 1.0, "cpu": 1.0}
        note = bases.get(r["name"], "-") + (" (oversubscribed)" if r["oversubscribed"] else "")
        print(f"{r['name']:<16}{r['pp']:>3}{r['ranks']:>6}{r['median']:>8.3f}{min(r['times']):>7.3f}"
              f"{statistics.median(r['cpu']):>7.2f}{q['ratio']:>7.3f}{q['paired']:>8.3f}{q['cpu']:>7.3f}  {note}")
    fill, base = by.get(("early-exit+fill", 4)), by.get(("early-exit", 4))
    if fill is not None and base is not None:
        pct = 100.0 * fill["extra_exit_tokens"] / max(fill["exit_tokens"], 1)
        q = ratios(fill, base)
        print(f"bubble filling PP=4: {len(fill['depths'])} partial micro-batches (depths {fill['depths']}, "
              f"exits reached {fill['reached']}) -> +{fill['extra_exit_tokens']} exit-loss tokens/step "
              f"(+{pct:.1f}% over {fill['exit_tokens']}); step-time cost ratio {q['ratio']:.3f} "
              f"(paired {q['paired']:.3f}, CPU {q['cpu']:.3f})")


def main(argv=None) -> int:
    args = parse_args(argv)
    a = vars(args)
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    results = []
    for pp in (int(x) for x in args.pp.split(",")):
        results += spawn(a, pp)
    print()
    for r in results:
        print(describe_stages(r))
    fill = next((r for r in results if r["timeline"]), None)
    if fill is not None:
        print(fill_sizing_note(a, next(r for r in results if (r["name"], r["pp"]) == ("early-exit", 4))))
        write_timeline(fill["timeline"], args.timeline_json)
        print(f"\nmeasured PP=4 filled step (timed step {fill['timeline_step']}, median wall time): "
              f"{args.timeline_json}")
        if not args.no_plot:
            print(plot_timeline(args.timeline_json, args.png))
    print(f"\ntotal wall time {time.perf_counter() - start:.0f}s")
    print_table(a, results, (load0, os.getloadavg()[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
