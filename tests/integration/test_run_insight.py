"""What a run shows about itself: a profiler trace of chosen steps with the step's named scopes,
the compile time and persistent-cache hits at start, and a warning when the step compiles again."""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import pathlib
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from typer.testing import CliRunner

import titanax as tx
from titanax.cli import app

REPO = pathlib.Path(__file__).resolve().parents[2]
# GPT tiny (DP 2 x TP 4) cut to a few steps on a small corpus: what is tested is what the run leaves
SHORT = ["--set", "train.steps=8", "--set", "optimizer.warmup_steps=2", "--set", "logging.every=4", "--set", "train.eval_at_start=false",
         "--set", "train.eval_every=8", "--set", "data.args.max_bytes=800000", "--set", "data.args.eval_batches=1"]


@pytest.fixture(scope="module")
def compile_cache_restored():
    """The persistent cache is process-wide JAX configuration: put it back for the next tests."""
    from jax._src import compilation_cache

    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs,
              jax.config.jax_persistent_cache_min_entry_size_bytes)
    yield
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", before[2])
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def gpt_runs(tmp_path_factory, compile_cache_restored):
    """``titanax run`` of GPT tiny twice, in this process, sharing a compile cache; the first traces
    steps 5 to 7. Returns both runs' output (stdout + the ``titanax`` log lines); made once for the
    tests that read them."""
    tmp_path = tmp_path_factory.mktemp("gpt_runs")
    runner = CliRunner()
    outputs = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(REPO)
        monkeypatch.setenv("TITANAX_CPU_DEVICES", "8")
        for extra in (["--profile-steps", "5:8", "--profile-dir", str(tmp_path / "trace")], []):
            handler = _Capture()
            logger = logging.getLogger("titanax")
            logger.addHandler(handler)
            # setLevel, not `logger.level =`: only setLevel clears the enabled-for cache of the child
            # loggers (`titanax.engine`), which an earlier test in this worker may have filled at WARNING
            level = logger.level
            logger.setLevel(logging.INFO)
            try:
                result = runner.invoke(app, ["run", "examples/configs/gpt_tiny_dp2_tp4.yaml", *SHORT,
                                             "--set", f"output.root={tmp_path / 'runs'}",
                                             "--compile-cache", str(tmp_path / "cache"), *extra])
            finally:
                logger.removeHandler(handler)
                logger.setLevel(level)
            assert result.exit_code == 0, result.output
            outputs.append(result.output + "\n".join(handler.lines))
    return tmp_path, outputs


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_gpt_run_profile_compile_report_and_cache(gpt_runs):
    tmp_path, (first, second) = gpt_runs
    runs = glob.glob(str(tmp_path / "trace" / "plugins" / "profile" / "*"))
    assert len(runs) == 1, runs
    xplane = glob.glob(os.path.join(runs[0], "*.xplane.pb"))
    perfetto = os.path.join(runs[0], "perfetto_trace.json.gz")
    assert xplane and os.path.exists(perfetto)
    # the trace records the device ops with the named scopes they came from: the step, the model's
    # modules, the optimizer update
    data = pathlib.Path(xplane[0]).read_bytes()
    for scope in (b"jit(train_step)", b"optimizer_update", b"GPT"):
        assert scope in data, scope
    with gzip.open(perfetto, "rt") as f:
        events = json.load(f)["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert any("train_step" in name for name in names), sorted(names)[:50]
    # three steps traced: the step's executable ran three times inside the window (once per
    # launch; each of the 8 devices' runs is an event of its own, "[d] ...Execute (jit_train_step)")
    launches = [e for e in events if e.get("ph") == "X"
                and e.get("name") == "CommonPjRtLoadedExecutable::Execute (jit_train_step)"]
    per_device = [e for e in events if e.get("ph") == "X" and e.get("name", "").startswith("[")
                  and e["name"].endswith("Execute (jit_train_step)")]
    assert len(launches) == 3 and len(per_device) == 3 * 8, sorted({e["name"] for e in per_device})
    assert "profile of steps 5-7 written to" in first
    # the start line: compile time split, then the cache's verdict; the second run loads the step
    assert "step 'train_step' compiled in" in first and "(trace " in first and "XLA " in first, first
    assert "persistent cache: 0 hit(s)" in first, first
    assert "persistent cache: 1 hit(s)" in second or "persistent cache: 2 hit(s)" in second, second
    assert "RecompileWarning" not in first + second


def _number(text: str) -> float:
    """``22.3k`` -> 22300.0: the step lines' numbers."""
    scale = {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}.get(text[-1], 1.0)
    return float(text[:-1] if scale != 1.0 else text) * scale


def test_a_cli_run_leaves_a_run_directory_and_step_lines_people_can_trust(gpt_runs):
    import csv

    tmp_path, (_, output) = gpt_runs
    first_dir, second_dir = sorted(glob.glob(str(tmp_path / "runs" / "gpt_tiny_dp2_tp4-*")))  # one per run
    run_dir = pathlib.Path(second_dir)
    assert f"run directory: {run_dir} (config.yaml, metrics.csv, tensorboard/, checkpoints/)" in output, output
    # the resolved configuration, which runs as it is
    cfg = tx.config.load(str(run_dir / "config.yaml"))
    assert cfg.train.steps == 8 and cfg.checkpoint.dir == str(run_dir / "checkpoints")
    assert cfg.logging.csv == str(run_dir / "metrics.csv") and cfg.output.dir == str(run_dir)
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [4, 8]
    assert all(float(r["lr"]) > 0 and float(r["grad_norm"]) > 0 for r in rows)
    events = glob.glob(str(run_dir / "tensorboard" / "events.out.tfevents.*"))
    assert len(events) == 1 and b"grad_norm" in pathlib.Path(events[0]).read_bytes()
    assert (run_dir / "checkpoints" / "8").is_dir()
    assert "checkpoint of step 8 being written to " + str(run_dir / "checkpoints") in output
    # step lines: loss to 4 digits, learning rate, gradient norm; examples/s, tokens/s, steps/s and
    # the ETA from the same interval (batch 32 of 64 tokens)
    lines = [line for line in output.splitlines() if re.match(r"step \d+/", line)]
    assert [line.split(" |")[0] for line in lines] == ["step 4/8", "step 8/8"], output
    for line in lines:
        items = {}
        for item in line.split(" | ")[1:]:
            value, _, unit = item.partition(" ")
            key, _, number = item.partition(" ")
            if unit in ("examples/s", "tokens/s", "steps/s"):
                items[unit] = _number(value)
            else:
                items[key] = number
        assert len(items["loss"].replace(".", "").lstrip("0")) == 4, line  # 4 significant digits
        assert float(items["lr"]) > 0 and float(items["grad_norm"]) > 0, line
        steps_per_s = items["steps/s"]
        assert items["examples/s"] == pytest.approx(32 * steps_per_s, rel=0.01), line
        assert items["tokens/s"] == pytest.approx(64 * 32 * steps_per_s, rel=0.01), line
    step4 = lines[0]
    eta = step4.rsplit("eta ", 1)[1]
    h, m, sec = (int(x) for x in eta.split(":"))
    rate = _number(step4.split(" steps/s")[0].rsplit("| ", 1)[1])
    assert h * 3600 + m * 60 + sec == pytest.approx(4 / rate, abs=1.0), step4
    assert "training 133.38 k parameters on 8 devices from step 0 to 8" in output, output
    assert "trained steps 1-8 in " in output and "16.38 k tokens (256 examples)" in output, output


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1, name="head")(nn.relu(nn.Dense(8, name="hidden")(x)))


@tx.step_fn
def regression_step(state, batch):
    loss_fn = lambda params: jnp.mean((state.apply(params, batch["x"]) - batch["y"]) ** 2)  # noqa: E731
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), {"loss": loss}


class Recorder(tx.logging.Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    def write(self, step, metrics) -> None:
        self.rows.append((step, dict(metrics)))


def test_a_batch_shape_change_mid_run_warns_once_naming_the_argument():
    mesh = tx.MeshSpec(axes=("data",)).build()
    recorder = Recorder()
    engine = tx.Engine(mesh=mesh, plan=tx.Plan(data_parallel=tx.DP()), optimizer=tx.optim.sgd(0.1),
                       loggers=[recorder], log_every=2)
    engine.init(MLP(), example=jnp.ones((16, 3)))

    def batches():  # the last three batches are half as large: one recompile, then reuse
        for i in range(8):
            n = 16 if i < 5 else 8
            yield {"x": np.full((n, 3), 0.1 * i, np.float32), "y": np.zeros((n, 1), np.float32)}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.fit(regression_step, batches(), steps=8)
    recompiles = [w for w in caught if issubclass(w.category, tx.RecompileWarning)]
    assert len(recompiles) == 1, [str(w.message) for w in caught]
    message = str(recompiles[0].message)
    assert "batch['x']: shape (16, 3) -> (8, 3)" in message and "batch['y']: shape (16, 1) -> (8, 1)" in message
    assert recompiles[0].filename == __file__  # the user's line, not Titanax's
    logged = dict(recorder.rows)
    assert "recompiles" not in logged[4] and logged[6]["recompiles"] == 1 and logged[8]["recompiles"] == 1


def test_a_second_fit_past_the_end_says_so(caplog):
    mesh = tx.MeshSpec(axes=("data",)).build()
    engine = tx.Engine(mesh=mesh, plan=tx.Plan(data_parallel=tx.DP()), optimizer=tx.optim.sgd(0.1))
    engine.init(MLP(), example=jnp.ones((16, 3)))
    data = tx.data.ArrayLoader({"x": np.ones((64, 3), np.float32), "y": np.zeros((64, 1), np.float32)},
                               batch_size=16, epochs=None)
    state = engine.fit(regression_step, data, steps=3)
    with caplog.at_level(logging.WARNING, logger="titanax.engine"):
        again = engine.fit(regression_step, data, steps=2, state=state)
    assert int(again.step) == 3
    assert any("fit(steps=2) has nothing to train: the state is already at step 3" in r.getMessage()
               and "steps=int(state.step) + 2" in r.getMessage() for r in caplog.records), caplog.text


def test_a_cli_run_on_one_cpu_device_says_so():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TITANAX_CPU_DEVICES", "XLA_FLAGS", "JAX_PLATFORMS")}
    result = subprocess.run([sys.executable, "-m", "titanax.cli", "run", "examples/configs/mnist_dp.yaml",
                             "--set", "train.steps=2", "--set", "optimizer.warmup_steps=1", "--set", "logging.every=1",
                             "--set", "output.enabled=false"],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "titanax: training on 1 CPU device" in result.stderr and "--cpu-devices 8" in result.stderr, result.stderr
