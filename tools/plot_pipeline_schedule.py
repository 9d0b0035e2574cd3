"""Draw a pipeline schedule: simulated from our plans, or measured spans from a JSON file.

Simulated (forward time 1, backward time R, free communication; the plans are replayed with
the same blocking semantics as schedule_sim.verify_plans)::

    python tools/plot_pipeline_schedule.py --pp 4 --microbatches 8 --backward-forward-ratio 2 \
        --out docs/pipeline_1f1b_p4_m8.png
    python tools/plot_pipeline_schedule.py --pp 4 --microbatches 8 --fill-explicit-bubbles \
        --last-exit-stage 2 --out docs/pipeline_1f1b_p4_m8_filled.png
    python tools/plot_pipeline_schedule.py --pp 4 --microbatches 8 --num-model-chunks 2

Measured: ``--measured TIMINGS.json`` with a list of records
``{"stage", "kind" ("F"/"B"/"forward"/"backward"), "microbatch", "start", "end", "partial"}``.

Prints the ASCII timeline (one row per stage), each stage's bubble fraction and the total;
``--out FILE.png`` also saves a matplotlib figure (matplotlib is imported only then).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.early_exit.cli import UsageError, check_requires, flag_name, given, run_cli  # noqa: E402
from megatron.early_exit.parallel.schedule_plan import fill_depths  # noqa: E402
from megatron.early_exit.parallel.schedule_timeline import (  # noqa: E402
    Timeline,
    one_f_one_b_plans,
    render_ascii,
    simulate_timeline,
    span_label,
    summary,
    timeline_from_records,
)

COLORS = {("F", False): "#4C72B0", ("B", False): "#55A868",
          ("F", True): "#DD8452", ("B", True): "#C44E52"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pp", type=int, help="pipeline-model-parallel size")
    p.add_argument("--microbatches", type=int, help="micro-batches per iteration")
    p.add_argument("--backward-forward-ratio", type=float, default=2.0)
    p.add_argument("--num-model-chunks", type=int, default=1,
                   help="virtual pipeline chunks per rank (interleaved schedule)")
    p.add_argument("--fill-explicit-bubbles", action="store_true")
    p.add_argument("--last-exit-stage", type=int, help="deepest stage with an early exit")
    p.add_argument("--num-fill-microbatches", type=int,
                   help="partial micro-batches (default: as many as fit)")
    p.add_argument("--measured", help="JSON list of measured span records")
    p.add_argument("--out", help="save a PNG here")
    p.add_argument("--width", type=int, help="ASCII width in characters")
    args = p.parse_args(argv)
    if not args.measured and (args.pp is None or args.microbatches is None):
        p.error("--pp and --microbatches are required unless --measured is given")
    if args.fill_explicit_bubbles and args.last_exit_stage is None:
        p.error("--fill-explicit-bubbles needs --last-exit-stage")
    check_requires(args, [("num_fill_microbatches", "fill_explicit_bubbles"),
                          ("last_exit_stage", "fill_explicit_bubbles")])
    if args.measured:
        for dest in ("pp", "microbatches", "fill_explicit_bubbles"):
            if given(args, dest):
                raise UsageError(flag_name(dest), "is not used with --measured (the records give the schedule)")
        if not os.path.isfile(args.measured):
            raise UsageError("--measured", f"{args.measured} does not exist")
    return args


def build_timeline(args: argparse.Namespace) -> tuple[Timeline, str]:
    if args.measured:
        with open(args.measured) as f:
            return timeline_from_records(json.load(f)), f"measured: {args.measured}"
    fill = []
    if args.fill_explicit_bubbles:
        fill = fill_depths(args.pp, args.last_exit_stage, args.backward_forward_ratio,
                           args.num_fill_microbatches)
    chunks = args.num_model_chunks
    plans = one_f_one_b_plans(args.pp, args.microbatches, fill, chunks)
    tl = simulate_timeline(plans, 1.0 / chunks, args.backward_forward_ratio / chunks)
    title = (f"{'interleaved x' + str(chunks) if chunks > 1 else '1F1B'} "
             f"P={args.pp} M={args.microbatches} B/F={args.backward_forward_ratio:g}")
    if fill:
        title += f", {len(fill)} partial micro-batches (depths {fill})"
    return tl, title


def save_png(tl: Timeline, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(max(8.0, tl.makespan * 0.3), 0.6 * tl.num_stages + 1.6))
    t0 = tl.start
    for s in tl.spans:
        color = COLORS[(s.kind, s.partial)]
        ax.broken_barh([(s.start - t0, s.end - s.start)], (s.stage - 0.4, 0.8),
                       facecolors=color, edgecolors="white", linewidth=0.6)
        if (s.end - s.start) / max(tl.makespan, 1e-12) > 0.012:
            ax.text((s.start + s.end) / 2 - t0, s.stage, span_label(s), ha="center",
                    va="center", fontsize=7, color="white")
    ax.set_yticks(range(tl.num_stages), [f"stage {i}" for i in range(tl.num_stages)])
    ax.invert_yaxis()
    ax.set_xlim(0, tl.makespan)
    ax.set_xlabel("time (forward = 1)" if "measured" not in title else "time")
    ax.set_title(f"{title}\nmakespan {tl.makespan:g}, bubble "
                 f"{100 * tl.total_bubble_fraction:.1f}%", fontsize=9)
    names = {("F", False): "forward", ("B", False): "backward",
             ("F", True): "partial forward", ("B", True): "partial backward"}
    present = {(s.kind, s.partial) for s in tl.spans}
    ax.legend(handles=[Patch(color=COLORS[k], label=names[k]) for k in COLORS if k in present],
              loc="upper center", bbox_to_anchor=(0.5, -0.38), ncol=4, fontsize=8,
              frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    tl, title = build_timeline(args)
    print(title)
    print(render_ascii(tl, args.width))
    print(summary(tl))
    if args.out:
        save_png(tl, title, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
