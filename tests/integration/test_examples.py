"""The README's main job runs end to end."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

import titanax as tx

ROOT = pathlib.Path(__file__).parent.parent.parent


def test_shard_layout_example_runs_and_matches_one_device():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "shard_layout.py")],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-5000:]
    out = result.stdout
    for title in ("data parallel 8", "FSDP 8", "DP 4 x TP 2", "FSDP 4 x TP 2"):
        assert f"=== {title}" in out
    assert "up/kernel" in out and "P(None, 'tensor')" in out
    assert "all layouts match the single-device forward" in out


def test_mnist_dp_main_job_reaches_95_percent_held_out():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "mnist_dp" / "train.py")],
                            capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-5000:]
    out = result.stdout
    assert "step 400/400" in out and "eta" in out and "examples/s" in out
    accuracy = float(out.split("held-out accuracy ")[1].split()[0])
    assert accuracy >= 0.95, out[-2000:]


def test_every_gpt_config_builds_its_mesh_and_plan():
    from examples.gpt_small_tp.config import load_config
    from examples.gpt_small_tp.train import model_config

    configs = sorted((ROOT / "examples" / "configs").glob("gpt_*.yaml"))
    assert len(configs) >= 7
    for path in configs:
        run = load_config(str(path))
        mesh = run.build_mesh()
        plan = run.build_plan()
        plan.validate(mesh)
        cfg = model_config(run, vocab_size=257)
        for part in plan.axes:  # every axis the plan splits over divides the model's split dimensions
            size = mesh.shape[part]
            if plan.tensor_parallel is not None and part == plan.tensor_parallel.axis:
                assert cfg.num_heads % size == 0 and cfg.mlp_dim % size == 0 and cfg.vocab_size % size == 0


def test_gpt_config_errors_name_the_key():
    from examples.gpt_small_tp.config import load_config

    with pytest.raises(tx.TitanaxError, match=r"unknown config key optimizer\.lrr") as error:
        load_config(None, ["optimizer.lrr=1e-3"])
    assert error.value.suggestion == "did you mean optimizer.lr?"
    with pytest.raises(tx.TitanaxError, match=r"data\.seq_len='long' has the wrong type"):
        load_config(None, ["data.seq_len=long"])


def test_gpt_example_trains_under_sequence_parallel_tp():
    from examples.gpt_small_tp.train import main

    config = str(ROOT / "examples" / "configs" / "gpt_tiny_tp4_sp.yaml")
    result = main(["--config", config, "--set", "steps=40", "--set", "log_every=20", "--set", "eval_every=40",
                   "--set", "data.max_bytes=600000", "--set", "cpu_devices=0"])
    assert result["eval/perplexity"] <= 0.6 * result["first_perplexity"], result
