"""``titanax plot`` draws the metrics CSV a real (short) training run wrote: loss (train and held-out),
throughput and MFU as PNG files that open as images with curves in them."""

from __future__ import annotations

import struct
import sys

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

import titanax as tx
from models import regression_step
from titanax.cli import app
from titanax.logging.plot import read_metrics

STEPS = 8


def eval_step(state, batch):
    return {"loss": jnp.mean((state.apply(state.params, batch["x"]) - batch["y"]) ** 2)}


@pytest.fixture(scope="module")
def metrics_csv(tmp_path_factory):
    """Eight steps of a linear regression on 8 devices, every step logged, evaluated every 2."""
    path = tmp_path_factory.mktemp("run") / "metrics.csv"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    batch = {"x": x, "y": x @ np.arange(1.0, 5.0, dtype=np.float32)[:, None]}
    engine = tx.Engine(mesh=tx.MeshSpec(axes=("data",)).build(), plan=tx.Plan(data_parallel=tx.DP()),
                       optimizer=tx.optim.sgd(0.05), loggers=[tx.logging.CSV(path)], log_every=1,
                       tokens_per_example=16, peak_flops=1e9)
    engine.fit(regression_step, data=[batch] * STEPS, steps=STEPS, state=engine.init(nn.Dense(1), example=x),
               eval_step=eval_step, eval_data=[batch], eval_every=2)
    return path


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_the_run_logged_what_is_plotted(metrics_csv):
    metrics = read_metrics(metrics_csv)
    assert {"loss", "eval/loss", "examples_per_s", "tokens_per_s", "mfu"} <= set(metrics)
    steps, losses = metrics["loss"]
    assert steps[-1] == STEPS and losses[-1] < losses[0]  # it trained
    assert metrics["eval/loss"][0] == [2, 4, 6, 8]


def test_plot_writes_a_png_per_curve(metrics_csv, tmp_path):
    from PIL import Image

    result = CliRunner().invoke(app, ["plot", str(metrics_csv), "--out", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    written = sorted((tmp_path / "plots").iterdir())
    assert [p.name for p in written] == ["loss.png", "mfu.png", "throughput.png"]
    assert result.stdout.splitlines() == [f"wrote {tmp_path / 'plots' / name}" for name in
                                          ("loss.png", "throughput.png", "mfu.png")]
    for path in written:
        assert path.stat().st_size > 5000 and png_size(path) == (700, 400)
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # axes, labels and a curve, not a blank
    # the loss figure holds two curves (train, held-out): matplotlib's first two line colours
    loss = np.asarray(Image.open(tmp_path / "plots" / "loss.png").convert("RGB")).astype(int)
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        assert int(np.all(np.abs(loss - colour) <= 8, axis=-1).sum()) > 100, colour


def test_plot_defaults_to_the_csvs_folder_and_examples_per_second(tmp_path):
    path = tmp_path / "metrics.csv"
    with tx.logging.CSV(path) as log:
        for step in range(1, 6):
            log.log(step, {"loss": 1.0 / step, "examples_per_s": 100.0 + step})
    written = tx.logging.plot_metrics(path)
    assert [p.name for p in written] == ["loss.png", "throughput.png"]
    assert all(p.parent == tmp_path and png_size(p) == (700, 400) for p in written)


def test_plot_of_a_file_without_curves_is_one_paragraph(tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("epoch,loss\n1,2.0\n")
    result = CliRunner().invoke(app, ["plot", str(other)])
    assert result.exit_code == 2 and "not a Titanax metrics CSV" in result.stderr
    assert "Traceback" not in result.output
    no_curves = tmp_path / "lr.csv"
    no_curves.write_text("step,lr\n1,0.1\n")
    with pytest.raises(tx.TitanaxError, match="has none of the columns plotted") as caught:
        tx.logging.plot_metrics(no_curves)
    assert "loss" in caught.value.suggestion
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "missing.csv")])
    assert result.exit_code == 2 and "cannot read the metrics file" in result.stderr


def test_plot_without_matplotlib_says_how_to_install_it(metrics_csv, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what Python does for a package not installed
    with pytest.raises(tx.TitanaxError, match="needs matplotlib") as caught:
        tx.logging.plot_metrics(metrics_csv, out_dir=tmp_path)
    assert 'pip install "titanax[plot]"' in caught.value.suggestion
    assert not list(tmp_path.iterdir())
