"""Real multi-process training: `titanax launch --nprocs 2 --cpu-devices-per-proc 4` runs the same
YAML as one process with 8 devices, joined by jax.distributed over gloo CPU collectives.

Each launched process loads only its slice of every batch (tx.data.ArrayLoader), only process 0
logs, and Orbax writes checkpoints collectively; the per-step losses must equal the one-process
run's, and checkpoints must move between 2 processes and 1 in both directions.
"""

from __future__ import annotations

import csv
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from titanax.config import load, train

ROOT = pathlib.Path(__file__).parents[2]
MNIST = str(ROOT / "examples" / "configs" / "mnist_dp.yaml")
GPT = str(ROOT / "examples" / "configs" / "gpt_tiny_dp2_tp4.yaml")
STEPS = 20
QUIET = ["logging.every=1", "logging.progress=false", "optimizer.warmup_steps=2"]
MNIST_RUN = [f"train.steps={STEPS}", f"train.eval_every={STEPS}", *QUIET]
GPT_STEPS = 8  # compiling dominates; 8 steps of DP x TP across processes show the same losses as 20
GPT_RUN = [f"train.steps={GPT_STEPS}", "train.eval_every=null", "train.eval_at_start=false",
           "data.args.max_bytes=1000000", *QUIET]


def launch(config: str, overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """`.venv/bin/titanax launch --nprocs 2 --cpu-devices-per-proc 4 -- titanax run CONFIG --set ...`,
    as typed in a fresh shell that never activated the venv: the venv's bin is not on PATH, and the
    bare `titanax` after `--` must still start the venv's."""
    sets = [arg for o in overrides for arg in ("--set", o)]
    venv_bin = os.path.dirname(sys.executable)
    command = [os.path.join(venv_bin, "titanax"), "launch", "--nprocs", "2", "--cpu-devices-per-proc", "4",
               "--", "titanax", "run", config, *sets]
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and os.path.abspath(d) != os.path.abspath(venv_bin))
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"} | {"PATH": path or "/usr/bin:/bin"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def losses(path: pathlib.Path) -> dict[int, float]:
    with open(path, newline="") as f:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(f)}


def assert_same_losses(got: dict[int, float], want: dict[int, float], steps: range) -> None:
    assert sorted(got) == list(steps), f"logged steps {sorted(got)}"
    worst = max(abs(got[s] - want[s]) for s in steps)
    assert worst <= 1e-5, f"largest per-step loss difference {worst:.3g}"


def drop_steps_after(directory: pathlib.Path, step: int, copy_to: pathlib.Path) -> pathlib.Path:
    """A copy of a checkpoint directory that ends at ``step`` (as if the run had stopped there)."""
    shutil.copytree(directory, copy_to)
    for child in copy_to.iterdir():
        if child.name.isdigit() and int(child.name) > step:
            shutil.rmtree(child)
    return copy_to


@pytest.fixture(scope="module")
def one_process_mnist(tmp_path_factory) -> pathlib.Path:
    """The reference: this test process's 8 devices, checkpoints at steps 10 and 20."""
    out = tmp_path_factory.mktemp("mnist_1p")
    train(load(MNIST, [*MNIST_RUN, f"logging.csv={out / 'metrics.csv'}", f"checkpoint.dir={out / 'ckpt'}",
                       "checkpoint.every=10"]))
    return out


@pytest.fixture(scope="module")
def two_process_mnist(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("mnist_2p")
    launch(MNIST, [*MNIST_RUN, f"logging.csv={out / 'metrics.csv'}", f"checkpoint.dir={out / 'ckpt'}",
                   "checkpoint.every=10"])
    return out


def test_two_processes_match_one_process_on_mnist(one_process_mnist, two_process_mnist):
    assert_same_losses(losses(two_process_mnist / "metrics.csv"), losses(one_process_mnist / "metrics.csv"),
                       range(1, STEPS + 1))


def test_checkpoint_written_by_two_processes_resumes_in_one(one_process_mnist, two_process_mnist, tmp_path):
    ckpt = drop_steps_after(two_process_mnist / "ckpt", 10, tmp_path / "ckpt")
    train(load(MNIST, [*MNIST_RUN, f"logging.csv={tmp_path / 'metrics.csv'}", f"checkpoint.dir={ckpt}",
                       "checkpoint.every=10"]))
    assert_same_losses(losses(tmp_path / "metrics.csv"), losses(one_process_mnist / "metrics.csv"),
                       range(11, STEPS + 1))


def test_checkpoint_written_by_one_process_resumes_in_two(one_process_mnist, tmp_path):
    ckpt = drop_steps_after(one_process_mnist / "ckpt", 10, tmp_path / "ckpt")
    result = launch(MNIST, [*MNIST_RUN, f"logging.csv={tmp_path / 'metrics.csv'}", f"checkpoint.dir={ckpt}",
                            "checkpoint.every=10"])
    assert "[p0] step 11/20" in result.stdout and "[p0] step 10/20" not in result.stdout
    assert_same_losses(losses(tmp_path / "metrics.csv"), losses(one_process_mnist / "metrics.csv"),
                       range(11, STEPS + 1))


def test_two_processes_match_one_process_on_gpt_dp_tp(tmp_path):
    train(load(GPT, [*GPT_RUN, f"logging.csv={tmp_path / 'one.csv'}"]))
    result = launch(GPT, [*GPT_RUN, f"logging.csv={tmp_path / 'two.csv'}", f"output.root={tmp_path / 'runs'}"])
    assert_same_losses(losses(tmp_path / "two.csv"), losses(tmp_path / "one.csv"), range(1, GPT_STEPS + 1))
    # both processes wrote the same run directory (process 0 named it): its checkpoint is whole
    run_dir, = (tmp_path / "runs").iterdir()
    assert (run_dir / "checkpoints" / str(GPT_STEPS) / "commit_success.txt").exists()
    assert f"[p0] run directory: {run_dir}" in result.stdout
    assert "[Gloo]" not in result.stdout  # the runtime's per-rank chatter stays out (--debug shows it)


def test_killing_one_process_stops_the_launcher_and_names_it():
    # --grace 2: the survivor, stuck in a collective with the dead peer, is killed after 2 s.
    command = [sys.executable, "-m", "titanax.cli", "launch", "--nprocs", "2", "--cpu-devices-per-proc", "4",
               "--grace", "2", "--", sys.executable, "-m", "titanax.cli", "run", MNIST, "--set", "train.steps=100000",
               "--set", "logging.every=1", "--set", "logging.progress=false", "--set", "train.eval_every=null"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not any("[p0] step 3/" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.2)
        started = next(line for line in lines if "started process 1 of 2" in line)
        victim = int(started.rsplit("pid ", 1)[1].rstrip(")\n"))
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        code = proc.wait(timeout=60)
        elapsed = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(timeout=10)
    output = "".join(lines)
    assert code != 0 and elapsed < 60, (code, elapsed)
    assert f"process 1 (pid {victim}) was killed by SIGKILL" in output, output[-3000:]
