"""Simulated pipeline timelines: 1F1B makespan and bubble formulas, bubble filling that adds
exit-loss work without lengthening the iteration, measured-record round trips, ASCII output.

Run: ``python -m pytest -q tests/unit/test_schedule_timeline.py``.
"""

import math

import pytest

from megatron.early_exit.parallel.schedule_plan import fill_depths
from megatron.early_exit.parallel.schedule_timeline import (
    one_f_one_b_plans,
    render_ascii,
    simulate_timeline,
    summary,
    timeline_from_records,
)


@pytest.mark.parametrize("ratio", [1.0, 2.0])
def test_1f1b_makespan_and_bubble(ratio):
    for p in range(1, 9):
        for m in range(1, 17):
            tl = simulate_timeline(one_f_one_b_plans(p, m), 1.0, ratio)
            assert tl.makespan == pytest.approx((m + p - 1) * (1 + ratio))
            for s in range(p):
                assert tl.busy(s) == pytest.approx(m * (1 + ratio))
                assert tl.bubble_fraction(s) == pytest.approx((p - 1) / (m + p - 1))
            assert tl.total_bubble_fraction == pytest.approx((p - 1) / (m + p - 1))


@pytest.mark.parametrize("p", range(2, 9))
def test_filling_adds_work_but_not_time(p):
    for ratio in (0.5, 1.0, 2.0, 3.0):
        for last in sorted({0, p // 2, p - 1}):
            depths = fill_depths(p, last, ratio)
            for m in sorted({1, p - 1, p, 2 * p, 16}):
                tl = simulate_timeline(one_f_one_b_plans(p, m, depths), 1.0, ratio)
                assert tl.makespan == pytest.approx((m + p - 1) * (1 + ratio))
                extra = sum(tl.busy(s, partial=True) for s in range(p))
                assert extra == pytest.approx(sum(d + 1 for d in depths) * (1 + ratio))
                if depths:
                    assert tl.total_bubble_fraction < (p - 1) / (m + p - 1)


def test_filling_past_the_limit_costs_time():
    p, m, ratio = 4, 8, 2.0
    base = (m + p - 1) * (1 + ratio)
    assert fill_depths(p, p - 1, ratio) == [1, 0]
    for too_many in ([1, 1, 0], [2, 1], [2, 2, 1, 0]):
        tl = simulate_timeline(one_f_one_b_plans(p, m, too_many), 1.0, ratio)
        assert tl.makespan > base


def test_interleaved_shrinks_the_bubble():
    p, m, ratio, chunks = 4, 8, 2.0, 2
    tl = simulate_timeline(one_f_one_b_plans(p, m, chunks=chunks), 1 / chunks, ratio / chunks)
    assert tl.makespan == pytest.approx(m * (1 + ratio) + (p - 1) * (1 + ratio) / chunks)


def test_records_round_trip_and_ascii():
    tl = simulate_timeline(one_f_one_b_plans(4, 8, fill_depths(4, 3, 2.0)), 1.0, 2.0)
    records = [s.to_record() for s in tl.spans]
    for r in records[::2]:
        r["kind"] = {"F": "forward", "B": "backward"}[r["kind"]]
    back = timeline_from_records(records)
    assert back.makespan == tl.makespan and back.num_stages == 4
    assert math.isclose(back.total_bubble_fraction, tl.total_bubble_fraction)
    text = render_ascii(tl)
    rows = [line for line in text.splitlines() if line.startswith("stage")]
    assert len(rows) == 4 and all(len(r) == len(rows[0]) for r in rows)
    assert rows[0].split("|")[1].startswith("0-1-2-3-A~B~B###A###0===")
    assert "total bubble" in summary(tl)
    with pytest.raises(ValueError):
        timeline_from_records([{"stage": 0, "kind": "X", "microbatch": 0, "start": 0, "end": 1}])


def test_plot_tool_cli(tmp_path, capsys):
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "tools" / "plot_pipeline_schedule.py"
    spec = importlib.util.spec_from_file_location("plot_pipeline_schedule", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--pp", "4", "--microbatches", "8", "--fill-explicit-bubbles",
                      "--last-exit-stage", "2"]) == 0
    out = capsys.readouterr().out
    assert "makespan 33" in out and "2 partial micro-batches" in out
    measured = tmp_path / "t.json"
    measured.write_text(json.dumps([
        {"stage": 0, "kind": "forward", "microbatch": 0, "start": 0.0, "end": 0.5,
         "partial": False},
        {"stage": 1, "kind": "forward", "microbatch": 0, "start": 0.5, "end": 1.0},
        {"stage": 1, "kind": "backward", "microbatch": 0, "start": 1.0, "end": 2.0},
        {"stage": 0, "kind": "backward", "microbatch": 0, "start": 2.0, "end": 3.0},
    ]))
    assert tool.main(["--measured", str(measured)]) == 0
    assert "makespan 3" in capsys.readouterr().out
