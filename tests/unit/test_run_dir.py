"""The run directory ``titanax run`` writes: unset outputs go into it, set ones stay put, a new one
per run, the resolved configuration beside them."""

from __future__ import annotations

import dataclasses
import pathlib
import time

import pytest

from titanax.config import load, resolve_run_directory
from titanax.exceptions import ConfigError

REPO = pathlib.Path(__file__).parents[2]
MNIST = "examples/configs/mnist_dp.yaml"


def test_unset_outputs_go_into_a_new_directory_per_run(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load(MNIST, [f"output.root={tmp_path}"])
    monkeypatch.setattr(time, "time", lambda: 1_790_000_000.0)  # both runs start in the same second
    first = resolve_run_directory(cfg, name="mnist_dp")
    # reserved at once: a run started in the same second (a sweep) gets its own folder
    second = resolve_run_directory(cfg, name="mnist_dp")
    assert first.path.is_dir() and not any(first.path.iterdir())
    first.create()
    assert second.path.name == first.path.name + "-2"
    second.discard()  # a run that failed to build: its empty folder goes
    assert not second.path.exists() and first.path.exists()
    assert first.path.parent == tmp_path and first.path.name.startswith("mnist_dp-")
    resolved = first.config
    assert resolved.checkpoint.dir == str(first.path / "checkpoints")
    assert resolved.logging.csv == str(first.path / "metrics.csv")
    assert resolved.logging.tensorboard == str(first.path / "tensorboard")
    assert resolved.output.dir == str(first.path)
    # config.yaml is the resolved configuration, and loads back to it
    assert load(str(first.path / "config.yaml")) == resolved
    assert "config.yaml, metrics.csv, tensorboard/, checkpoints/" in first.describe()


def test_set_outputs_stay_and_a_given_directory_is_used(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load(MNIST, [f"output.dir={tmp_path / 'mine'}", f"checkpoint.dir={tmp_path / 'ckpt'}",
                       "output.name=ignored-with-dir"])
    where = resolve_run_directory(cfg, name="mnist_dp")
    where.create()
    assert where.path == tmp_path / "mine" and (where.path / "config.yaml").exists()
    assert where.config.checkpoint.dir == str(tmp_path / "ckpt")  # named in the configuration: kept
    assert "checkpoints/" not in where.describe()
    assert resolve_run_directory(dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, enabled=False)),
                                 name="x") is None


def test_output_name_is_a_name_not_a_path(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match="path separator") as caught:
        load(MNIST, ["output.name=a/b"])
    assert "output.root" in caught.value.suggestion


def test_a_run_that_fails_to_build_leaves_no_directory(tmp_path):
    from titanax.config import train
    from titanax.exceptions import TitanaxError

    cfg = load(MNIST, [f"output.root={tmp_path}", "mesh.shape=[3]"])  # 3 does not divide 8 devices
    where = resolve_run_directory(cfg, name="mnist_dp")
    assert where.path.is_dir()  # reserved when chosen
    with pytest.raises(TitanaxError):
        train(cfg, run_directory=where)
    assert not where.path.exists() and list(tmp_path.iterdir()) == []
