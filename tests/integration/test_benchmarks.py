"""benchmarks/run_all.py: a section measures at the smallest size and renders, and the committed
results render again (the full run takes minutes: `python benchmarks/run_all.py`)."""

from __future__ import annotations

import json
import pathlib

import pytest

from benchmarks import run_all

RESULTS = pathlib.Path(run_all.HERE) / "results.json"


def test_collectives_and_memory_sections_measure_a_one_layer_gpt():
    section = run_all.run_section("collectives", plans=("DP",), layers=1, batch=8, seq_len=8)
    assert "error" not in section, section.get("error")
    (row,) = section["rows"]
    # the step all-reduces every gradient at least once, and its state is what the layout says
    assert row["collective_ratio"] >= 0.99, row
    assert row["memory"]["compiled_ratio"] == pytest.approx(1.0, abs=0.01), row["memory"]
    results = {"machine": run_all.machine(), "wall_s": section["seconds"],
               "sections": {"collectives": section, "memory": {"method": run_all.MEMORY_METHOD, "rows": section["rows"]}}}
    text = run_all.markdown(json.loads(json.dumps(results, default=str)))
    assert "## 1. Collective bytes against the analytic minimum" in text
    assert "## 2. Memory per device against the arithmetic" in text
    assert f"**{row['collective_ratio']:.3f}**" in text


@pytest.mark.skipif(not RESULTS.exists(), reason="no benchmarks/results.json")
def test_the_committed_results_render():
    results = json.loads(RESULTS.read_text())
    text = run_all.markdown(results)
    for key in results["sections"]:
        assert run_all.TITLES[key] in text
