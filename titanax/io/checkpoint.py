"""Checkpoints with Orbax: the whole TrainState, the data position and a JSON record per step.

Saves are asynchronous (training continues while the arrays are written), atomic (Orbax writes a
temporary directory and renames it when complete, so a crash mid-save never hides the previous
step) and restore onto whatever layout the *current* plan and mesh give the state: a checkpoint
written under TP 2 restores under FSDP 8 or on fewer devices. Nothing in a checkpoint is executed:
arrays, JSON and no pickle.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

from titanax.exceptions import CheckpointError, TitanaxWarning

__all__ = ["CheckpointStrategy", "OrbaxCheckpoint"]

_ITEMS = ("state", "data", "meta")


@runtime_checkable
class CheckpointStrategy(Protocol):
    """What ``tx.Engine`` asks of a checkpointer."""

    def restore_latest(self, state: Any) -> tuple[Any, Any] | None:
        """The newest saved ``(state, data_state)`` laid out like ``state``, or ``None``."""

    def maybe_save(self, step: int, state: Any, *, data_state: Any, force: bool = False,
                   metrics: Mapping[str, float] | None = None,
                   meta: Mapping[str, Any] | None = None) -> bool:
        """Save if ``step`` is due (or ``force``); return whether a save started."""

    def wait(self) -> None:
        """Block until pending saves are on disk."""


def _arrays_of(state: Any) -> dict[str, Any]:
    """The array part of a TrainState; PRNG keys as their raw data (Orbax stores plain arrays)."""
    return {
        "step": state.step,
        "params": state.params,
        "opt_state": state.opt_state,
        "rng": jax.random.key_data(state.rng),
        "model_state": state.model_state,
        "loss_scale": state.loss_scale,
    }


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


@dataclasses.dataclass(frozen=True)
class _Best:
    metric: str
    mode: str


class OrbaxCheckpoint:
    """Orbax-backed checkpoints for ``tx.Engine`` (or your own loop).

    Example:
      >>> ckpt = tx.io.OrbaxCheckpoint("runs/x", every=500, keep=3)              # doctest: +SKIP
      >>> engine = tx.Engine(mesh=mesh, plan=plan, optimizer=opt, checkpoint=ckpt)
      >>> state = engine.fit(train_step, loader, steps=10_000)   # resumes from runs/x if it has a step
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        every: int = 1000,
        keep: int | None = 3,
        async_save: bool = True,
        keep_best: str | tuple[str, str] | None = None,
        fallback: bool = False,
    ) -> None:
        """
        Args:
          directory: where step directories (``<directory>/<step>/``) go; created if missing.
          every: save every this many steps (the engine also saves at the end and on preemption).
          keep: how many steps to hold on disk (``None``: all).
          async_save: write in the background while training continues.
          keep_best: keep the best steps by a logged metric instead of the newest: a name
            (``"eval/loss"``, lower is better) or ``(name, "min" | "max")``.
          fallback: when the newest step is corrupt, restore the newest intact one (with a
            warning) instead of raising :class:`CheckpointError`.
        """
        import orbax.checkpoint as ocp

        if not isinstance(every, int) or every < 1:
            raise CheckpointError(f"OrbaxCheckpoint(every={every!r}) must be a positive integer",
                                  suggestion="save e.g. every=500 steps")
        if keep is not None and (not isinstance(keep, int) or keep < 1):
            raise CheckpointError(f"OrbaxCheckpoint(keep={keep!r}) must be a positive integer or None",
                                  suggestion="keep e.g. the newest 3 steps: keep=3")
        best = None
        if keep_best is not None:
            name, mode = (keep_best, "min") if isinstance(keep_best, str) else tuple(keep_best)
            if mode not in ("min", "max"):
                raise CheckpointError(f"keep_best mode {mode!r} is not 'min' or 'max'",
                                      suggestion="write keep_best=('eval/accuracy', 'max')")
            best = _Best(name, mode)
        self.directory = os.path.abspath(os.fspath(directory))
        self.every = every
        self.keep = keep
        self.async_save = async_save
        self.best = best
        self.fallback = fallback
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=1,  # the engine decides when; see maybe_save
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            best_fn=(lambda metrics: float(metrics[best.metric])) if best else None,
            best_mode=best.mode if best else "max",
            keep_checkpoints_without_metrics=best is None,
        )
        self._ocp = ocp
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    # ------------------------------------------------------------------------------- saving
    def save(self, step: int, state: Any, *, data_state: Any = None,
             metrics: Mapping[str, float] | None = None, meta: Mapping[str, Any] | None = None) -> None:
        """Start saving ``state`` (and the data position) as ``step``; returns before the write ends
        when ``async_save``.

        Args:
          step: the step number (the directory name).
          state: the TrainState.
          data_state: the data iterator's position (JSON), e.g. ``ArrayLoader.state()``.
          metrics: logged metrics (needed for ``keep_best``).
          meta: more JSON for the step's record (the engine adds the plan).
        """
        ocp = self._ocp
        record = {"step": int(step), "mesh": {k: int(v) for k, v in state.mesh.shape.items()},
                  "rules": repr(state.rules), "versions": _versions(), **(meta or {})}
        if self.best is not None and (metrics is None or self.best.metric not in metrics):
            raise CheckpointError(
                f"keep_best={self.best.metric!r} but step {step} was saved without that metric",
                suggestion="save at steps where it is logged (eval_every a multiple of every) or "
                "pass metrics=",
            )
        self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(_arrays_of(state)),
                                    data=ocp.args.JsonSave(data_state if data_state is not None else {}),
                                    meta=ocp.args.JsonSave(record)),
            metrics=dict(metrics) if metrics is not None else None,
            force=True,
        )

    def maybe_save(self, step: int, state: Any, *, data_state: Any = None, force: bool = False,
                   metrics: Mapping[str, float] | None = None,
                   meta: Mapping[str, Any] | None = None) -> bool:
        """Save when ``step`` is a multiple of ``every`` (or ``force``); return whether it did."""
        if not force and step % self.every:
            return False
        if step in self.all_steps():
            return False
        if self.best is not None and (metrics is None or self.best.metric not in metrics):
            return False  # ranked checkpoints need the metric; the next due step that has it saves
        self.save(step, state, data_state=data_state, metrics=metrics, meta=meta)
        return True

    def wait(self) -> None:
        """Block until every started save is committed to disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    # ----------------------------------------------------------------------------- restoring
    def record(self, step: int | None = None) -> dict[str, Any]:
        """The JSON record saved with ``step`` (default: the newest): step, mesh, plan, versions."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}", suggestion="train first")
        ocp = self._ocp
        return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

    def all_steps(self) -> list[int]:
        """Committed steps on disk, oldest first (in-progress and crashed saves are not listed)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, state: Any, step: int | None = None) -> tuple[Any, Any]:
        """Restore ``step`` (default: the newest) into the layout of ``state``.

        Args:
          state: a TrainState built for the *current* mesh and plan (e.g. ``engine.init(...)``);
            its shardings are the restore targets, its values are not used.
          step: the step to restore; ``None`` for the newest.

        Returns:
          ``(state, data_state)``.

        Raises:
          CheckpointError: no checkpoint, or the step's files are missing or corrupt (with
            ``fallback=True`` older intact steps are tried first).
        """
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}",
                                  suggestion="train first, or point OrbaxCheckpoint at the run's directory")
        if step is not None and step not in steps:
            raise CheckpointError(f"step {step} is not in {self.directory} (steps: {steps})",
                                  suggestion=f"restore one of {steps}")
        candidates = [step] if step is not None else list(reversed(steps))
        first_error: CheckpointError | None = None
        for candidate in candidates:
            try:
                return self._restore_step(state, candidate)
            except CheckpointError as err:
                if not self.fallback:
                    raise
                first_error = first_error or err
                warnings.warn(f"{err.message}; trying an older step", TitanaxWarning, stacklevel=2)
        assert first_error is not None
        raise first_error

    def restore_latest(self, state: Any) -> tuple[Any, Any] | None:
        """:meth:`restore` of the newest step, or ``None`` when the directory has none."""
        if not self.all_steps():
            return None
        return self.restore(state)

    def _restore_step(self, state: Any, step: int) -> tuple[Any, Any]:
        ocp = self._ocp
        target = _abstract(_arrays_of(state))
        step_dir = os.path.join(self.directory, str(step))
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                              data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        except Exception as err:  # Orbax/TensorStore raise many types for missing or bad files
            files = _listing(step_dir)
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} cannot be read ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:300]}); its files: {files}",
                suggestion="restore an older step (OrbaxCheckpoint(..., fallback=True) does this), or "
                "delete the damaged step directory",
            ) from err
        arrays = restored.state
        meta = restored.meta or {}
        if meta.get("step", step) != step:
            raise CheckpointError(f"checkpoint step {step} records step {meta.get('step')}",
                                  suggestion="delete the inconsistent step directory")
        new_state = state.replace(
            step=arrays["step"], params=arrays["params"], opt_state=arrays["opt_state"],
            rng=jax.random.wrap_key_data(arrays["rng"], impl=jax.random.key_impl(state.rng)),
            model_state=arrays["model_state"], loss_scale=arrays["loss_scale"])
        data = restored.data or None
        return new_state, data


def _listing(step_dir: str) -> list[str]:
    out = []
    for root, _, files in os.walk(step_dir):
        out.extend(os.path.relpath(os.path.join(root, f), step_dir) for f in files)
    return sorted(out)[:20]


def _versions() -> dict[str, str]:
    import flax
    import optax
    import orbax.checkpoint as ocp

    import titanax

    return {"titanax": titanax.__version__, "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "orbax": getattr(ocp, "__version__", "?"),
            "numpy": np.__version__}

