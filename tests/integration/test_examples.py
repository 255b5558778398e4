"""The README's main job runs end to end."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

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
