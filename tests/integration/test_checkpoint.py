"""Checkpoints on disk with real processes: exact resume on the same and on other meshes, SIGTERM
and SIGKILL, corruption, retention, and asynchronous saves."""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

import titanax as tx

ROOT = pathlib.Path(__file__).parents[2]
WORKER = ROOT / "examples" / "checkpoint_reshard" / "train.py"
SAVE_WORKER = pathlib.Path(__file__).with_name("checkpoint_save_worker.py")
TOL = 1e-5


def worker(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    result = subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True,
                            timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(result: subprocess.CompletedProcess) -> dict[int, float]:
    out = {}
    for line in result.stdout.splitlines():
        if line.startswith("LOSS "):
            _, step, value = line.split()
            out[int(step)] = float(value)
    return out


@functools.cache
def uninterrupted(layout: str, scratch: str) -> tuple[dict[int, float], str]:
    """A 20-step run's per-step losses and its checkpoint directory (steps 10, 15 and 20)."""
    directory = os.path.join(scratch, f"ref_{layout}")
    run = worker("--dir", directory, "--layout", layout, "--steps", "20", "--every", "5")
    return losses(run), directory


def stopped_at(layout: str, scratch: str, step: int, copy_to: pathlib.Path) -> pathlib.Path:
    """A copy of the uninterrupted run's checkpoints as if it had stopped at ``step``: the state
    and data position a run stopped there leaves (one process of one run writes both)."""
    shutil.copytree(uninterrupted(layout, scratch)[1], copy_to)
    for child in copy_to.iterdir():
        if child.name.isdigit() and int(child.name) > step:
            shutil.rmtree(child)
    return copy_to


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return str(tmp_path_factory.mktemp("checkpoints"))


# TP 2 -> TP 4 is test_gpt.py::test_checkpoint_written_under_tp2_continues_under_tp4 (in process).
@pytest.mark.parametrize(
    ("source", "target", "devices", "exact"),
    [("dp", "dp", "8", True), ("fsdp", "dp_tp", "8", False), ("dp", "dp", "4", False)],
    ids=["same-mesh-bitwise", "fsdp8-to-dp4xtp2", "8-to-4-devices"],
)
def test_resume_in_a_new_process_matches_an_uninterrupted_run(scratch, tmp_path, source, target, devices, exact):
    reference, _ = uninterrupted(source, scratch)
    directory = stopped_at(source, scratch, 10, tmp_path / "run")
    run = worker("--dir", str(directory), "--layout", target, "--devices", devices, "--steps", "20", "--every", "5")
    assert f"resumed from the checkpoint of step 10 in {directory}" in run.stderr, run.stderr[-2000:]
    resumed = losses(run)
    assert sorted(resumed) == list(range(11, 21)), "resumes at step 11 with the next unseen batch"
    got = [resumed[s] for s in range(11, 21)]
    want = [reference[s] for s in range(11, 21)]
    if exact:
        assert got == want
    else:
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


def _state_for_restore():
    """A TrainState of the worker's model under DP 8 in this process: the restore target."""
    sys.path.insert(0, str(ROOT))
    from examples.mnist_dp.data import load_dataset
    from examples.mnist_dp.model import CNN

    x = load_dataset(None)[0]
    engine = tx.Engine(mesh=tx.MeshSpec(axes=("data",)).build(), plan=tx.Plan(data_parallel=tx.DP(axis="data")),
                       optimizer=tx.optim.sgd(0.05, momentum=0.9))
    return engine.init(CNN(), example=x[:64])


def test_sigterm_saves_the_current_step_and_exits_zero(tmp_path):
    directory = str(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.Popen([sys.executable, str(WORKER), "--dir", directory, "--steps", "1000",
                             "--every", "1000", "--sleep", "0.3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    for line in proc.stdout:
        if line.startswith("LOSS "):
            seen.append(int(line.split()[1]))
            if len(seen) == 3:
                proc.send_signal(signal.SIGTERM)
                break
    rest, err = proc.communicate(timeout=300)
    seen += [int(line.split()[1]) for line in rest.splitlines() if line.startswith("LOSS ")]
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM" in err and "resume" in err
    assert "DONE" not in rest
    checkpoint = tx.io.OrbaxCheckpoint(directory)
    assert checkpoint.all_steps() == [seen[-1]]  # the step it was on when the signal arrived
    # It resumes there, with the data position of that step (a new process resuming is
    # test_resume_in_a_new_process_matches_an_uninterrupted_run).
    restored, data_state = checkpoint.restore(_state_for_restore())
    assert int(restored.step) == seen[-1] and data_state["position"] == seen[-1]
    checkpoint.close()


def test_sigkill_during_an_async_save_keeps_the_previous_step(tmp_path):
    directory = str(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.Popen([sys.executable, str(SAVE_WORKER), "--dir", directory],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    timings = {}
    for line in proc.stdout:
        if line.startswith("SAVED 1"):
            parts = line.split()
            timings["sync_returned"], timings["written"] = float(parts[3]), float(parts[5])
        if line.startswith("SAVING 2"):
            timings["async_returned"] = float(line.split()[3])
            proc.kill()  # SIGKILL while step 2 is being written
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # The async save handed control back long before a full write takes.
    assert timings["async_returned"] < 0.5 * timings["written"], timings
    checkpoint = tx.io.OrbaxCheckpoint(directory)
    assert checkpoint.all_steps() == [1]  # the interrupted step 2 is not taken for a checkpoint
    assert checkpoint.latest_step() == 1
    # The next run restores step 1 and carries on saving.
    sys.path.insert(0, str(SAVE_WORKER.parent))
    from checkpoint_save_worker import big_state

    restored, _ = checkpoint.restore(big_state())
    assert int(restored.step) == 1
    checkpoint.save(2, restored.replace(step=restored.step + 1))
    checkpoint.wait()
    assert checkpoint.all_steps() == [1, 2]
    checkpoint.close()
    print("async save timings (s):", timings)


def test_corrupt_checkpoint_raises_naming_the_step_and_falls_back_when_asked(scratch, tmp_path):
    directory = str(stopped_at("dp", scratch, 15, tmp_path / "run"))
    state = _state_for_restore()
    checkpoint = tx.io.OrbaxCheckpoint(directory)
    assert checkpoint.all_steps() == [10, 15]
    record = checkpoint.record(10)
    assert record["step"] == 10 and record["mesh"] == {"data": 8} and "DP(axis='data'" in record["plan"]
    assert record["versions"]["jax"] == jax.__version__
    data_files = [p for p in pathlib.Path(directory, "15", "state").rglob("*")
                  if p.is_file() and p.parent.name == "d"]
    assert data_files, sorted(pathlib.Path(directory, "15").rglob("*"))
    for p in data_files:
        p.unlink()
    with pytest.raises(tx.CheckpointError, match="step 15") as err:
        checkpoint.restore(state)
    assert err.value.suggestion and "fallback" in err.value.suggestion
    fallback = tx.io.OrbaxCheckpoint(directory, fallback=True)
    with pytest.warns(tx.TitanaxWarning, match="step 15"):
        restored, data_state = fallback.restore(state)
    assert int(restored.step) == 10
    assert data_state["position"] == 10 and data_state["epoch"] == 0  # ten batches consumed
    checkpoint.close()
    fallback.close()


def test_truncated_metadata_raises_checkpoint_error(scratch, tmp_path):
    directory = stopped_at("dp", scratch, 10, tmp_path / "run")
    metadata = directory / "10" / "state" / "_METADATA"
    assert metadata.exists(), sorted(p.name for p in (directory / "10" / "state").iterdir())
    metadata.write_bytes(metadata.read_bytes()[:20])
    checkpoint = tx.io.OrbaxCheckpoint(directory)
    with pytest.raises(tx.CheckpointError, match="step 10"):
        checkpoint.restore(_state_for_restore())
    checkpoint.close()


def test_keep_holds_the_newest_steps(tmp_path):
    state = _nnx_state()
    keep = tx.io.OrbaxCheckpoint(str(tmp_path / "keep"), every=1, keep=2)
    for step in range(1, 6):
        keep.save(step, state.replace(step=state.step + step))
    keep.wait()
    assert keep.all_steps() == [4, 5]
    assert sorted(p.name for p in (tmp_path / "keep").iterdir() if p.name.isdigit()) == ["4", "5"]
    keep.close()


# ------------------------------------------------------------ small in-process states and runs
@functools.cache
def _mesh_and_plan():
    return tx.MeshSpec(axes=("data",)).build(), tx.Plan(data_parallel=tx.DP(axis="data"))


@functools.cache
def _nnx_state(model: str = "mlp", optimizer: str = "sgd", params_dtype: str = "float32"):
    """A TrainState of a tiny NNX model under DP 8, built once per kind (nothing here donates it).

    Args:
      model: "mlp" (NNXMLP), "mlp128" (its hidden layer twice as wide) or "bn" (NNXBatchNormNet:
        batch statistics and a dropout RNG stream in model_state).
      optimizer: "sgd" or "adam".
      params_dtype: the Precision's params (and compute) dtype.
    """
    import models

    make = {"mlp": lambda rngs: models.NNXMLP(rngs),
            "mlp128": lambda rngs: models.NNXMLP(rngs, hidden=128),
            "bn": lambda rngs: models.NNXBatchNormNet(rngs)}[model]
    mesh, plan = _mesh_and_plan()
    return tx.create_train_state(tx.shard(make, plan, mesh), {"sgd": optax.sgd, "adam": optax.adam}[optimizer](0.1),
                                 precision=tx.Precision(params=params_dtype, compute=params_dtype))


@functools.cache
def _saved_mlp(scratch: str) -> str:
    """A directory holding step 1 of the tiny NNX MLP (SGD, float32)."""
    directory = os.path.join(scratch, "mlp")
    checkpoint = tx.io.OrbaxCheckpoint(directory, async_save=False)
    checkpoint.save(1, _nnx_state())
    checkpoint.close()
    return directory


def test_keep_best_keeps_the_best_ranked_saves_and_the_newest_one(tmp_path):
    """Saves without the metric (forced at preemption or the end) are kept while they are the newest
    step and never push ranked ones out; the ranking survives a restart."""
    state = _nnx_state()
    directory = str(tmp_path / "best")
    best = tx.io.OrbaxCheckpoint(directory, every=2, keep=2, keep_best="eval/loss", async_save=False)
    # A forced save without the metric (SIGTERM before any evaluation) is on disk and restores.
    assert best.maybe_save(3, state.replace(step=state.step + 3), force=True, metrics={"loss": 0.5})
    assert best.all_steps() == [3]
    restored, _ = best.restore(state)
    assert int(restored.step) == 3
    for step, metrics in [(4, {"eval/loss": 3.0}), (6, {"eval/loss": 1.0}), (8, {"loss": 0.1}),
                          (10, {"eval/loss": 2.0}), (12, {"eval/loss": 5.0})]:
        assert best.maybe_save(step, state, metrics=metrics)
    # The best two ranked (6: 1.0, 10: 2.0) and the newest (12, ranked worse than both); 3 and 8
    # went when newer steps arrived.
    assert best.all_steps() == [6, 10, 12]
    best.close()
    reopened = tx.io.OrbaxCheckpoint(directory, every=2, keep=2, keep_best="eval/loss", async_save=False)
    assert reopened.maybe_save(13, state, force=True)  # e.g. preempted again, no evaluation
    assert reopened.all_steps() == [6, 10, 13]
    assert sorted(p.name for p in pathlib.Path(directory).iterdir() if p.name.isdigit()) == ["10", "13", "6"]
    reopened.close()

    maximize = tx.io.OrbaxCheckpoint(str(tmp_path / "max"), keep=1, keep_best=("eval/acc", "max"),
                                     async_save=False)
    for step, acc in [(1, 0.5), (2, 0.9), (3, float("nan")), (4, 0.7)]:
        maximize.save(step, state, metrics={"eval/acc": acc})
    assert maximize.all_steps() == [2, 4]  # a NaN evaluation ranks last
    maximize.close()


def test_keep_best_refuses_a_run_that_cannot_log_its_metric(tmp_path):
    checkpoint = tx.io.OrbaxCheckpoint(str(tmp_path / "run"), keep_best="eval/loss")
    with pytest.raises(tx.CheckpointError, match=r"keep_best='eval/loss'.*does not evaluate") as err:
        checkpoint.check_run(evaluates=False)
    assert "eval_step=" in err.value.suggestion
    checkpoint.check_run(evaluates=True)
    assert checkpoint.check_metrics({"loss", "eval/loss"}) is True
    assert checkpoint.check_metrics({"loss", "steps_per_sec"}) is False  # a step that did not evaluate
    with pytest.raises(tx.CheckpointError, match=r"'eval/los'.*does not log") as err:
        tx.io.OrbaxCheckpoint(str(tmp_path / "run"), keep_best="eval/los").check_metrics({"loss", "eval/loss"})
    assert err.value.suggestion == "did you mean keep_best='eval/loss'?"
    accuracy = tx.io.OrbaxCheckpoint(str(tmp_path / "run"), keep_best=("accuracy", "max"))
    accuracy.check_run(evaluates=False)  # a training metric needs no evaluation
    with pytest.raises(tx.CheckpointError, match="'accuracy'") as err:
        accuracy.check_metrics({"loss", "eval/accuracy"})
    assert err.value.suggestion == "did you mean keep_best=('eval/accuracy', 'max')?"
    with pytest.raises(tx.CheckpointError, match="keep_best"):
        tx.io.OrbaxCheckpoint(str(tmp_path / "run"), keep_best=("eval/loss", "min", "max"))
    checkpoint.close()
    accuracy.close()


def test_sigterm_during_a_keep_best_run_saves_and_resumes(tmp_path, caplog):
    """keep_best ranks by an evaluation that has not run yet: the due save at step 2 and the one
    SIGTERM forces are on disk anyway, and the run resumes."""
    import jax.numpy as jnp

    import models

    mesh, plan = _mesh_and_plan()
    x = np.asarray(models.float_batch(64))
    directory = str(tmp_path / "run")

    @tx.step_fn
    def train_step(state, batch):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(state.apply(p, batch["x"]) ** 2))(state.params)
        return state.apply_gradients(grads=grads), {"loss": loss}

    def eval_step(state, batch):
        return {"loss": jnp.mean(state.apply(state.params, batch["x"]) ** 2)}

    def engine():
        checkpoint = tx.io.OrbaxCheckpoint(directory, every=2, keep=1, keep_best="eval/loss", async_save=False)
        eng = tx.Engine(mesh=mesh, plan=plan, optimizer=tx.optim.sgd(0.1), checkpoint=checkpoint, log_every=1)
        eng.init(lambda rngs: models.NNXMLP(rngs))
        return eng

    def fit(eng, steps, hooks=()):
        return eng.fit(train_step, tx.data.ArrayLoader({"x": x}, batch_size=16, seed=0), steps=steps,
                       eval_step=eval_step, eval_data=[{"x": x[:16]}], eval_every=100, hooks=hooks)

    first = engine()
    on_disk_before_sigterm = []

    def preempt(step, state, metrics):
        if step == 3:
            on_disk_before_sigterm.extend(first.checkpoint.all_steps())
            os.kill(os.getpid(), signal.SIGTERM)

    with caplog.at_level(logging.INFO, logger="titanax"):
        stopped = fit(first, 50, hooks=[preempt])
    assert first.stopped_by == "SIGTERM" and int(stopped.step) == 4  # returned; the caller decides
    assert "stopped by SIGTERM at step 4" in caplog.text
    assert on_disk_before_sigterm == [2]  # saved when due, though it carries no eval/loss
    on_disk = tx.io.OrbaxCheckpoint(directory)
    assert on_disk.all_steps() == [4]  # the step the signal stopped at
    on_disk.close()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="titanax"):
        state = fit(engine(), 6)
    assert "resumed from the checkpoint of step 4" in caplog.text
    assert int(state.step) == 6


def test_restore_into_another_model_or_optimizer_names_the_first_differing_array(scratch):
    directory = _saved_mlp(scratch)
    cases = {
        "shape": (_nnx_state("mlp128"),
                  r"params/down/kernel is \(64, 32\) float32 in the checkpoint and \(128, 32\) float32 in "
                  r"the state \(3 arrays differ in shape\)", "another model"),
        "structure": (_nnx_state("bn"),
                      r"the state has model_state/bn/mean \(64,\) float32, which the checkpoint lacks",
                      "another model"),
        "optimizer": (_nnx_state(optimizer="adam"),
                      r"the state has opt_state/0/count \(\) int32, which the checkpoint lacks", "another optimizer"),
    }
    checkpoint = tx.io.OrbaxCheckpoint(directory, fallback=True)  # not damage: no older step is tried
    for name, (state, message, written_with) in cases.items():
        with pytest.raises(tx.CheckpointError, match=f"step 1 in {directory} does not fit the state to "
                           f"restore: {message}") as err:
            checkpoint.restore(state)
        assert written_with in err.value.suggestion, name
        assert "damaged" not in err.value.suggestion, name
    checkpoint.close()
    saved_adam = os.path.join(scratch, "adam")
    adam = tx.io.OrbaxCheckpoint(saved_adam, async_save=False)
    adam.save(1, _nnx_state(optimizer="adam"))
    with pytest.raises(tx.CheckpointError, match=r"the checkpoint has opt_state/0/count \(\) int32, which the "
                       r"state lacks \(9 such arrays\)"):
        adam.restore(_nnx_state())
    adam.close()


def test_a_file_or_a_folder_of_foreign_numbered_folders_is_refused(tmp_path):
    afile = tmp_path / "model.ckpt"
    afile.write_text("not a directory")
    with pytest.raises(tx.CheckpointError, match=f"{afile} is an existing file") as err:
        tx.io.OrbaxCheckpoint(afile)
    assert "directory of its own" in err.value.suggestion
    with pytest.raises(tx.CheckpointError, match=f"{afile}/run cannot be created: {afile} is a file"):
        tx.io.OrbaxCheckpoint(afile / "run")
    foreign = tmp_path / "data"
    for name in ("1", "2", "10"):
        (foreign / name).mkdir(parents=True)
        (foreign / name / "notes.txt").write_text("x")
    with pytest.raises(tx.CheckpointError, match=r"numbered folders that are not Titanax checkpoints: 1, 2, 10 "
                       r".*holds \['notes.txt'\]") as err:
        tx.io.OrbaxCheckpoint(foreign)
    assert "deleted to keep 3" in err.value.suggestion
    assert sorted(p.name for p in foreign.iterdir()) == ["1", "10", "2"]  # nothing touched
    # A directory that cannot be created fails here, not in a background thread mid-training.
    with pytest.raises(tx.CheckpointError, match="/proc/titanax/run cannot be created: No such file"):
        tx.io.OrbaxCheckpoint("/proc/titanax/run")


def test_restore_under_another_precision_warns_naming_the_cast(scratch):
    directory = _saved_mlp(scratch)
    checkpoint = tx.io.OrbaxCheckpoint(directory)
    bf16 = _nnx_state(params_dtype="bfloat16")
    with pytest.warns(tx.TitanaxWarning, match=r"step 1 .* stores params/down/bias as float32; it is restored "
                      r"as bfloat16.*\(4 of 6 arrays change dtype\)"):
        restored, _ = checkpoint.restore(bf16)
    assert {leaf.dtype for leaf in jax.tree.leaves(restored.params)} == {np.dtype(jax.numpy.bfloat16)}
    restored, _ = checkpoint.restore(_nnx_state())  # the saved precision: no warning (warnings are errors here)
    checkpoint.close()


def test_nnx_rng_key_and_counter_in_model_state_round_trip(tmp_path):
    """An NNX module's dropout stream (a typed key<fry> and a uint32 counter) and its batch
    statistics are restored with their values, as keys of the same implementation, on the
    target's layout."""
    state = _nnx_state("bn")
    # What a few training steps do to the model state: the stream advanced, the statistics moved.
    advanced = jax.tree.map(
        lambda v: jax.random.fold_in(v, 7) if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key) else v + 1,
        state.model_state)
    checkpoint = tx.io.OrbaxCheckpoint(str(tmp_path / "nnx"), async_save=False)
    checkpoint.save(1, state.replace(model_state=advanced))
    restored, _ = checkpoint.restore(state)
    key, want_key = restored.model_state["drop"]["rngs"]["key"][...], advanced["drop"]["rngs"]["key"][...]
    assert key.dtype == want_key.dtype and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    assert jax.random.key_impl(key) == jax.random.key_impl(state.model_state["drop"]["rngs"]["key"][...])
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(want_key))
    assert int(restored.model_state["drop"]["rngs"]["count"][...]) == 1
    np.testing.assert_array_equal(restored.model_state["bn"]["mean"][...], advanced["bn"]["mean"][...])
    for got, want in zip(jax.tree.leaves(restored.model_state), jax.tree.leaves(state.model_state)):
        assert got.dtype == want.dtype and got.sharding.is_equivalent_to(want.sharding, got.ndim)
    checkpoint.close()
