"""The HTML reports' parts, without a model: the Gantt chart of every schedule cell by cell against
its table, the text/HTML report object, the stacked bar, the collectives tables, and the plan's
``describe()`` (text unchanged, a Gantt chart added)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import titanax as tx
from dom import elements, select
from titanax.html import Report, bar, escape, table
from titanax.parallel.gantt import schedule_html
from titanax.profiling import CollectiveStats, CompiledStats
from titanax.profiling.report import collectives_html

CASES = [("gpipe", 4, 8, 1), ("circular", 4, 8, 2), ("1f1b", 4, 8, 1), ("interleaved", 2, 4, 2), ("zbh1", 4, 8, 1)]


@pytest.mark.parametrize("name, p, m, v", CASES, ids=[c[0] for c in CASES])
def test_gantt_draws_every_slot_of_the_table(name, p, m, v):
    schedule = tx.parallel.build_schedule(name, p, m, v)
    cells = select(schedule_html(schedule), "td", "tx-tick")
    assert len(cells) == p * schedule.ticks
    assert sorted((int(c["data-stage"]), int(c["data-tick"])) for c in cells) == \
        sorted((s, t) for s in range(p) for t in range(schedule.ticks))
    slots = {"tx-fwd": (schedule.forward_mb, schedule.forward_repeat),
             "tx-bwd": (schedule.backward_mb, schedule.backward_repeat),
             "tx-w": (schedule.weight_mb, schedule.weight_repeat)}
    for cls, (mb, _) in slots.items():
        assert sum(cls in c.classes for c in cells) == int((mb >= 0).sum()), cls
    idle = (schedule.forward_mb < 0) & (schedule.backward_mb < 0) & (schedule.weight_mb < 0)
    assert sum("tx-idle" in c.classes for c in cells) == int(idle.sum())
    for c in cells:  # each cell names the microbatches (and repeats) of its busy slots, in slot order
        s, t = int(c["data-stage"]), int(c["data-tick"])
        busy = [(cls, int(mb[t, s]), int(rep[t, s])) for cls, (mb, rep) in slots.items() if mb[t, s] >= 0]
        assert {cls for cls, _, _ in busy} == c.classes & set(slots)
        assert c["data-mb"] == "+".join(str(mb) for _, mb, _ in busy)
        assert c.text == "/".join(str(mb) for _, mb, _ in busy)
        if busy:
            assert c["data-repeat"] == "+".join(str(rep) for *_, rep in busy)
    if name == "zbh1":
        assert int((schedule.weight_mb >= 0).sum()) == p * m  # the chart has W cells to count


def test_one_f_one_b_steady_state_cells_hold_a_forward_and_a_backward():
    schedule = tx.parallel.build_schedule("1f1b", 2, 4)
    both = [c for c in select(schedule_html(schedule), "td", "tx-fwd", "tx-bwd")]
    expected = int(((schedule.forward_mb >= 0) & (schedule.backward_mb >= 0)).sum())
    assert expected > 0 and len(both) == expected


def test_schedule_describe_is_its_text_and_draws_in_a_notebook():
    schedule = tx.parallel.build_schedule("gpipe", 2, 2)
    text = schedule.describe()
    assert text.splitlines()[1] == "stage 0: F0 F1 .  .  B1 B0" and str(schedule) == text
    assert type(str(schedule)) is str
    shown = schedule._repr_html_()
    assert shown.startswith('<div class="tx-report"><style>') and len(select(shown, "td", "tx-tick")) == 12


def test_report_is_its_text_and_a_self_contained_page(tmp_path):
    report = Report("line 1\nline 2", "<p>body</p>", title="A <title>")
    assert report == "line 1\nline 2" and "line 2" in report and report.splitlines() == ["line 1", "line 2"]
    page = report.html()
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page and "<h1>A &lt;title&gt;</h1>" in page
    for outside in ("<script", "http://", "https://", "<link", "@import", "url("):
        assert outside not in page, outside  # nothing to fetch, nothing to run
    again = pickle.loads(pickle.dumps(report))
    assert again == report and again.body == report.body and again.title == report.title
    path = report.save(tmp_path / "deep" / "report.html")
    assert path.read_text(encoding="utf-8") == page
    with pytest.raises(tx.TitanaxError, match="is a directory") as caught:
        report.save(tmp_path)
    assert caught.value.suggestion and "report.html" in caught.value.suggestion


def test_table_escapes_every_cell_and_classes_every_row():
    html = table(("path", "spec"), [("a/<script>", "P('x')"), ("b", "P(None)")], row_class="tx-param",
                 row_attrs=[{"n": 1}, {"n": 2}])
    rows = select(html, "tr", "tx-param")
    assert [r["data-n"] for r in rows] == ["1", "2"]
    assert "<script>" not in html and escape("a/<script>") in html


def test_bar_draws_segments_to_scale_and_marks_an_overflowing_capacity():
    fits = bar("one device", [("parameters", 1 << 20), ("optimizer state", 2 << 20), ("empty", 0)], capacity=8 << 20)
    segs = select(fits, "div", "tx-seg")
    assert [int(s["data-bytes"]) for s in segs] == [1 << 20, 2 << 20]  # the empty one is left out
    widths = [float(s["style"].split("width:")[1].split("%")[0]) for s in segs]
    assert widths == pytest.approx([12.5, 25.0])
    assert not select(fits, "div", "tx-cap") and "38%" in fits
    over = bar("one device", [("parameters", 6 << 20), ("temporaries", 10 << 20)], capacity=8 << 20,
               capacity_label="h100")
    cap = select(over, "div", "tx-cap")
    assert len(cap) == 1 and cap[0]["style"] == "left:50.000%" and "does not fit" in over
    with pytest.raises(tx.TitanaxError, match="negative"):
        bar("x", [("parameters", -1)])


def test_collectives_tables_carry_the_counts_per_kind_and_axis():
    stats = CompiledStats(collectives={"all-reduce": CollectiveStats(5, 5000, 2, 2000),
                                       "all-gather": CollectiveStats(3, 300, 3, 300)})
    by_axis = {("data",): {"all-reduce": CollectiveStats(4, 4000, 1, 1000), "all-gather": CollectiveStats()},
               ("data", "tensor"): {"all-reduce": CollectiveStats(1, 1000, 1, 1000),
                                    "all-gather": CollectiveStats(3, 300, 3, 300)}}
    html = collectives_html(stats, by_axis)
    kinds = {r["data-kind"]: (int(r["data-count"]), int(r["data-bytes"])) for r in select(html, "tr", "tx-coll")}
    assert kinds == {"all-reduce": (5, 5000), "all-gather": (3, 300)}
    axes = [(r["data-axes"], r["data-kind"], int(r["data-count"])) for r in select(html, "tr", "tx-coll-axis")]
    assert axes == [("data", "all-reduce", 4), ("data,tensor", "all-reduce", 1), ("data,tensor", "all-gather", 3)]
    assert "no collectives" in collectives_html(CompiledStats())


def test_plan_describe_keeps_its_text_and_draws_the_pipeline():
    plan = tx.Plan(pipeline_parallel=tx.PP(stages=4, microbatches=8, schedule="zbh1"), data_parallel=tx.DP())
    report = plan.describe({"pipe": 4, "data": 2})
    assert isinstance(report, str) and report.splitlines()[0] == "Plan"
    assert "  schedule zbh1: 4 stages x 8 microbatches x 1 repeat(s)" in report
    html = report.html()
    table_ = plan.pipeline_parallel.schedule_table()
    assert len(select(html, "td", "tx-tick")) == 4 * table_.ticks
    assert len(select(html, "td", "tx-w")) == int((table_.weight_mb >= 0).sum()) == 32
    assert [el["data-part"] for el in elements(html) if el.tag == "section"] == ["schedule"]
    flat = tx.Plan(data_parallel=tx.DP()).describe({"data": 8})
    assert not select(flat.html(), "td", "tx-tick") and "DP    over 'data' (8 devices)" in flat


def test_memory_bar_of_a_layout_counts_parameters_and_state_apart():
    # A layout table alone (no model to build): shapes and shardings of a tree.
    mesh = tx.MeshSpec(axes=("data",)).build()
    tree = {"kernel": np.zeros((64, 32), np.float32), "bias": np.zeros((32,), np.float32)}
    layout = tx.tree_layout(tree, tx.Plan(fsdp=tx.FSDP(axis="data")), mesh)
    from titanax.parallel.report import layout_html, model_memory_html

    rows = select(layout_html(layout), "tr", "tx-param")
    assert len(rows) == 2
    segs = select(model_memory_html(layout), "div", "tx-seg")
    assert [(s["data-name"], int(s["data-bytes"])) for s in segs] == [("parameters", layout.bytes_per_device())]
