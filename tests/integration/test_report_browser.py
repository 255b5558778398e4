"""A real browser renders the HTML report: headless Chromium reads the page ``sm.describe()`` saves,
its DOM holds one layout row per parameter and one Gantt cell per stage and tick (forward,
backward and weight cells as many as the schedule table has), and its screenshot shows the chart's
colours.

Skips only when no Chromium or Chrome is installed (``.ci/run`` installs Debian's ``chromium``
when it can).
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import jax
import numpy as np
import pytest
from flax import nnx

import titanax as tx
import tiny_pipeline
from dom import select

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
BROWSER = next((path for path in map(shutil.which, BROWSERS) if path), None)
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason=f"no headless browser on PATH (looked for {', '.join(BROWSERS)}); "
    "apt-get install chromium (.ci/run does when it can)")

WIDTH, HEIGHT = 1200, 900
FORWARD_BLUE = (0x25, 0x63, 0xEB)  # td.tx-fwd in titanax/html.py's stylesheet
W_GREEN = (0x16, 0xA3, 0x4A)  # td.tx-w


def browse(page: pathlib.Path, profile: pathlib.Path, *args: str) -> str:
    command = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}", *args, page.as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    plan = tx.Plan(pipeline_parallel=tx.PP(stages=4, microbatches=8, schedule="zbh1"), data_parallel=tx.DP())
    mesh = tx.MeshSpec(axes=("pipe", "data"), shape=(4, 2)).build()
    sm = tx.shard(lambda: tiny_pipeline.TinyStack(rngs=nnx.Rngs(0)), plan, mesh, abstract=True)
    page = sm.describe().save(folder / "model.html")
    dom = browse(page, folder / "profile", "--dump-dom")
    shot = folder / "model.png"
    browse(page, folder / "profile", f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}")
    return sm, plan.pipeline_parallel.schedule_table(), dom, shot


def test_the_browser_reads_a_row_per_parameter(rendered):
    sm, _, dom, _ = rendered
    assert dom.lstrip().lower().startswith("<!doctype html>"), dom[:200]
    assert "&times;" not in dom and "stages \u00d7 8 microbatches" in dom  # the browser's own serialization
    assert len(select(dom, "tr", "tx-param")) == len(jax.tree.leaves(sm.params)) == len(sm.layout) == 4
    assert len(select(dom, "section")) == 4  # plan, schedule, memory, parameters


def test_the_browser_reads_a_gantt_cell_per_stage_and_tick(rendered):
    _, table, dom, _ = rendered
    cells = select(dom, "td", "tx-tick")
    assert len(cells) == table.stages * table.ticks == 4 * 27
    assert len(select(dom, "td", "tx-tick", "tx-fwd")) == int((table.forward_mb >= 0).sum()) == 32
    assert len(select(dom, "td", "tx-tick", "tx-bwd")) == int((table.backward_mb >= 0).sum()) == 32
    assert len(select(dom, "td", "tx-tick", "tx-w")) == int((table.weight_mb >= 0).sum()) == 32
    assert len(select(dom, "td", "tx-tick", "tx-idle")) == 4 * 27 - 3 * 32


def test_the_screenshot_shows_the_chart(rendered):
    from PIL import Image

    _, _, _, shot = rendered
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape == (HEIGHT, WIDTH, 3)
    for colour, cells in ((FORWARD_BLUE, 32), (W_GREEN, 32)):
        pixels = int(np.all(np.abs(image.astype(int) - colour) <= 2, axis=-1).sum())
        assert pixels >= cells * 100, (colour, pixels)  # each ~20x20 cell, drawn in its colour
