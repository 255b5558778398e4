"""The HTML reports of real models and a real compiled run: ``sm.describe()`` (text unchanged, the
layout table one row per array, memory per device) and ``titanax describe CONFIG --html`` (every
figure of the page equal to the printed report's, the Gantt chart the plan's schedule table)."""

from __future__ import annotations

import re

import jax
import pytest
import yaml
from flax import nnx
from typer.testing import CliRunner

import titanax as tx
import tiny_pipeline
from dom import elements, select
from models import NNXBatchNormNet, float_batch
from titanax.cli import app
from titanax.units import human_bytes


@pytest.fixture(scope="module")
def batchnorm_model():
    mesh = tx.MeshSpec(axes=("data",)).build()
    sm = tx.shard(lambda: NNXBatchNormNet(nnx.Rngs(0)), tx.Plan(data_parallel=tx.DP()), mesh)
    sm(float_batch(8))  # a real forward: the model is real, not only its shapes
    return sm


def test_model_report_is_the_text_and_a_row_per_array(batchnorm_model):
    sm = batchnorm_model
    report = sm.describe()
    assert report == sm.plan.describe(sm.mesh) + "\n\n" + sm.layout.describe()  # the text as before
    html = report.html()
    params = select(html, "tr", "tx-param")
    state = select(html, "tr", "tx-state")
    assert len(params) == len(jax.tree.leaves(sm.params)) == 6  # two kernels, two biases, scale, bias
    assert len(state) == len(jax.tree.leaves(sm.model_state)) > 0  # batch statistics, RNG state
    cells = [el.text for el in elements(html) if el.tag == "td" and el.classes == {"tx-mono"}]
    assert cells == [row[0] for row in sm.layout.rows()]  # the path column, "bn/mean <BatchStat>" too
    seg = {s["data-name"]: int(s["data-bytes"]) for s in select(html, "div", "tx-seg")}
    assert seg["parameters"] == sm.layout.bytes_per_device()
    assert seg["parameters"] + seg.get("model state", 0) == sm.layout.bytes_per_device(params_only=False)
    assert not select(html, "div", "tx-cap")  # a CPU reports no memory size: nothing to hold it against
    assert sm._repr_html_().startswith('<div class="tx-report">')


def test_an_abstract_pipelined_model_draws_its_schedule():
    plan = tx.Plan(pipeline_parallel=tx.PP(stages=2, microbatches=4, schedule="1f1b"), data_parallel=tx.DP())
    mesh = tx.MeshSpec(axes=("pipe", "data"), shape=(2, 4)).build()
    sm = tx.shard(lambda: tiny_pipeline.TinyStack(rngs=nnx.Rngs(0)), plan, mesh, abstract=True)
    html = sm.describe().html()
    table = plan.pipeline_parallel.schedule_table()
    assert len(select(html, "td", "tx-tick")) == 2 * table.ticks
    assert len(select(html, "td", "tx-bwd")) == int((table.backward_mb >= 0).sum())
    assert len(select(html, "tr", "tx-param")) == len(jax.tree.leaves(sm.params))


# ------------------------------------------------------------------- titanax describe --html


@pytest.fixture(scope="module")
def described(tmp_path_factory):
    """``titanax describe --html`` of the tiny PP x DP x TP run, in this process (8 CPU devices)."""
    folder = tmp_path_factory.mktemp("describe")
    config = folder / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_pipeline.CONFIG))
    page = folder / "out" / "report.html"
    result = CliRunner().invoke(app, ["describe", str(config), "--device-memory", "64KiB", "--html", str(page)])
    assert result.exit_code == 0, result.output
    return result.stdout, page.read_text(encoding="utf-8"), page


def _bytes_after(label: str, text: str) -> str:
    return re.search(rf"^  {re.escape(label)}\s+(\S+ \S+)", text, re.M).group(1)


def test_describe_prints_as_before_and_writes_the_page(described):
    text, html, page = described
    assert text.rstrip().endswith(f"wrote {page}")
    assert "Collectives per step" in text and "Memory per device" in text
    parts = [el["data-part"] for el in elements(html) if el.tag == "section"]
    assert parts == ["mesh", "plan", "schedule", "memory", "layout", "collectives"]
    for outside in ("<script", "http://", "https://"):
        assert outside not in html


def test_describe_page_layout_and_schedule_are_the_runs(described):
    text, html, _ = described
    layout_rows = re.search(r"^-+  -+.*?\n(.*?)\n\n", text, re.M | re.S).group(1).splitlines()
    params = select(html, "tr", "tx-param")
    assert len(params) == len(layout_rows) == 4  # embedding, up kernel and bias, down kernel
    pp = tx.PP(stages=2, microbatches=2, schedule="gpipe")
    table = pp.schedule_table()
    cells = select(html, "td", "tx-tick")
    assert len(cells) == 2 * table.ticks
    assert len(select(html, "td", "tx-fwd")) == int((table.forward_mb >= 0).sum()) == 4
    assert len(select(html, "td", "tx-bwd")) == int((table.backward_mb >= 0).sum()) == 4


def test_describe_page_memory_is_the_printed_memory(described):
    text, html, _ = described
    seg = {s["data-name"]: int(s["data-bytes"]) for s in select(html, "div", "tx-seg")}
    assert human_bytes(seg["parameters"]) == _bytes_after("parameters", text)
    assert human_bytes(seg["optimizer state"]) == _bytes_after("optimizer state", text)
    assert human_bytes(seg["activations/temporaries"]) == _bytes_after("activations/temp", text)
    bar_ = select(html, "div", "tx-bar")[0]
    assert int(bar_["data-capacity"]) == 64 << 10 and int(bar_["data-total"]) == sum(seg.values())
    # 64 KiB is less than the step needs: the mark of the capacity sits inside the bar
    assert len(select(html, "div", "tx-cap")) == 1 and "does NOT fit" in text


def test_describe_page_collectives_are_the_printed_ones_split_by_axis(described):
    text, html, _ = described
    printed = {m[0]: int(m[1]) for m in re.findall(r"^  ([a-z-]+)\s+(\d+) ops?", text, re.M)}
    kinds = {r["data-kind"]: int(r["data-count"]) for r in select(html, "tr", "tx-coll")}
    assert kinds == printed and kinds.get("collective-permute", 0) > 0  # the pipeline's transfers
    per_axis: dict[str, int] = {}
    axes = set()
    for row in select(html, "tr", "tx-coll-axis"):
        per_axis[row["data-kind"]] = per_axis.get(row["data-kind"], 0) + int(row["data-count"])
        axes.add(row["data-axes"])
    assert per_axis == kinds  # every collective is attributed to the axes it spans
    assert "pipe" in axes  # stage to stage
