"""Checkpoints with Orbax: the whole TrainState, the data position and a JSON record per step.

Saves are asynchronous (training continues while the arrays are written), atomic (Orbax writes a
temporary directory and renames it when complete, so a crash mid-save never hides the previous
step) and restore onto whatever layout the *current* plan and mesh give the state: a checkpoint
written under TP 2 restores under FSDP 8 or on fewer devices. Before any array is read, the saved
tree (paths, shapes, dtypes, from Orbax's metadata) is compared with the state it restores into: a
checkpoint of another model or optimizer is refused naming the first array that differs, and a
dtype change (saved float32, restored as bfloat16) is a warning. A layer stack kept in pipeline
order (``PP(repeats>1)``, ``TrainState.layer_order``) is written in natural order and put back in
the order of the state it restores into, so such steps move between plans too. Nothing in a
checkpoint is executed: arrays, JSON and no pickle.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Collection, Mapping
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

from titanax.exceptions import CheckpointError, TitanaxWarning, user_stacklevel
from titanax.io.checkpoint_dir import check_directory, listing
from titanax.io.retention import KeepBestAndNewest, parse_keep_best
from titanax.io.saved_tree import check_fits, key_path, target_layout

__all__ = ["CheckpointStrategy", "OrbaxCheckpoint"]

_ITEMS = ("state", "data", "meta")

@runtime_checkable
class CheckpointStrategy(Protocol):
    """What ``tx.Engine`` asks of a checkpointer.

    The engine also uses these methods when a checkpointer has them (``OrbaxCheckpoint`` does):
    ``due(step, *, force)`` — whether ``maybe_save`` would save now, so that the engine checks the
    steps still in flight for non-finite values before a save and never syncs otherwise (without
    it, every step counts as due); ``check_run(*, evaluates)`` before training and
    ``check_metrics(names)`` after a logged step, to refuse a run whose saves can never be ranked.
    """

    def restore_latest(self, state: Any) -> tuple[Any, Any] | None:
        """The newest saved ``(state, data_state)`` laid out like ``state``, or ``None``."""

    def maybe_save(self, step: int, state: Any, *, data_state: Any, force: bool = False,
                   metrics: Mapping[str, float] | None = None,
                   meta: Mapping[str, Any] | None = None) -> bool:
        """Save if ``step`` is due (or ``force``); return whether a save started."""

    def wait(self) -> None:
        """Block until pending saves are on disk."""


def _arrays_of(state: Any) -> dict[str, Any]:
    """The array part of a TrainState. ``rng`` goes as its raw key data (the on-disk format since
    the first release); typed keys elsewhere (an NNX module's ``RngKey`` in ``model_state``) are
    stored by Orbax as their data with the key implementation alongside, and come back as keys."""
    return {
        "step": state.step,
        "params": state.params,
        "opt_state": state.opt_state,
        "rng": jax.random.key_data(state.rng),
        "model_state": state.model_state,
        "loss_scale": state.loss_scale,
    }


def _in_layer_order(state: Any, arrays: dict[str, Any], to: str) -> dict[str, Any]:
    """``arrays`` (as :func:`_arrays_of` gives them) with the layer stack moved between
    ``state``'s order and natural order (``to``: ``"natural"`` or ``"pipeline"``).

    Checkpoints hold natural order whatever plan wrote them, so a step saved under
    ``PP(repeats>1)`` (stack stored in pipeline order, see ``TrainState.layer_order``) restores
    under any other plan and vice versa. Each array keeps its sharding; on save the converted
    stack (parameters, their optimizer slots, stacked model state) is a second copy until written.
    """
    order = getattr(state, "layer_order", None)
    if order is None or order.is_identity:
        return arrays
    convert = order.to_natural if to == "natural" else order.to_pipeline
    params, opt_state = convert(arrays["params"], arrays["opt_state"], state.optimizer)
    return {**arrays, "params": params, "opt_state": opt_state,
            "model_state": convert(arrays["model_state"])[0]}


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class OrbaxCheckpoint:
    """Orbax-backed checkpoints for ``tx.Engine`` (or your own loop).

    Example:
      >>> import tempfile
      >>> mesh = tx.MeshSpec(axes=("data",)).build()
      >>> sm = tx.shard(nn.Dense(4), tx.Plan(data_parallel=tx.DP()), mesh, example=jnp.ones((8, 2)))
      >>> state = tx.create_train_state(sm, tx.optim.adamw(3e-4))
      >>> ckpt = tx.io.OrbaxCheckpoint(tempfile.mkdtemp(), every=500, keep=3)
      >>> ckpt.save(0, state, data_state={"epoch": 0, "position": 7})
      >>> ckpt.wait()
      >>> restored, data_state = ckpt.restore(state)     # laid out like `state`, on this mesh
      >>> data_state
      {'epoch': 0, 'position': 7}
      >>> ckpt.close()

      With ``tx.Engine(..., checkpoint=ckpt)`` the engine saves every ``every`` steps and a run
      resumes from the newest step in the directory.
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
            (``"eval/loss"``, lower is better) or ``(name, "min" | "max")``. Saves still happen
            every ``every`` steps, at the end and on preemption; the ``keep`` best of those that
            carry the metric stay, and so does the newest save (a resume needs it) even without it.
          fallback: when the newest step is corrupt, restore the newest intact one (with a
            warning) instead of raising :class:`CheckpointError`.

        Raises:
          CheckpointError: a bad ``every``, ``keep`` or ``keep_best``; ``directory`` is a file,
            or holds numbered folders that are not Titanax checkpoints.
        """
        import orbax.checkpoint as ocp

        if not isinstance(every, int) or every < 1:
            raise CheckpointError(f"OrbaxCheckpoint(every={every!r}) must be a positive integer",
                                  suggestion="save e.g. every=500 steps",
                                  owner="OrbaxCheckpoint", field="every", value=every)
        if keep is not None and (not isinstance(keep, int) or keep < 1):
            raise CheckpointError(f"OrbaxCheckpoint(keep={keep!r}) must be a positive integer or None",
                                  suggestion="keep e.g. the newest 3 steps: keep=3",
                                  owner="OrbaxCheckpoint", field="keep", value=keep)
        best = parse_keep_best(keep_best)
        self.directory = os.path.abspath(os.fspath(directory))
        check_directory(self.directory, keep)
        self.every = every
        self.keep = keep
        self.async_save = async_save
        self.best = best
        self.fallback = fallback
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if best is None else None,
            save_interval_steps=1,  # the engine decides when; see maybe_save
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            # Orbax writes a step's metrics (and reads them back after a restart) only when
            # best_fn is set; which steps stay is KeepBestAndNewest's decision.
            best_fn=best.orbax_score if best else None,
            best_mode="max",
            preservation_policy=KeepBestAndNewest(best, keep) if best else None,
        )
        self._ocp = ocp
        # Handlers named up front, so that a fresh process can read a step's metadata before
        # its first restore (without them Orbax reports the items as unknown).
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    # ------------------------------------------------------------------------ run checks
    def check_run(self, *, evaluates: bool) -> None:
        """Refuse a run in which no save could carry the ``keep_best`` metric.

        Args:
          evaluates: whether the run evaluates (``Engine.fit`` with ``eval_step`` and
            ``eval_data``), i.e. whether ``eval/...`` metrics are ever logged.

        Raises:
          CheckpointError: ``keep_best`` names an ``eval/...`` metric and the run does not evaluate.
        """
        if self.best is None or evaluates or not self.best.metric.startswith("eval/"):
            return
        raise CheckpointError(
            f"OrbaxCheckpoint(keep_best={self.best.metric!r}) ranks saves by an evaluation metric, "
            "but this run does not evaluate: no save would ever carry it",
            suggestion="pass eval_step= and eval_data= to fit (with eval_every= a multiple of "
            f"every={self.every}), rank by a training metric (keep_best='loss'), or keep the newest "
            "steps (keep_best=None)",
        )

    def check_metrics(self, names: Collection[str]) -> bool:
        """Refuse a ``keep_best`` metric that the run does not log (a typo, or a missing prefix).

        Args:
          names: the metric names one logged step carries. In a run that evaluates, pass those of
            a step that evaluated (training and ``eval/...`` names together).

        Returns:
          ``True`` when ``names`` settle the question (the metric is among them); ``False`` when
          they cannot: an ``eval/...`` metric checked against names without any ``eval/...``
          (a step that did not evaluate); call again with the names of one that did.

        Raises:
          CheckpointError: the metric is not among ``names``, with the closest logged name.
        """
        if self.best is None or self.best.metric in names:
            return True
        metric = self.best.metric
        if metric.startswith("eval/") and not any(name.startswith("eval/") for name in names):
            return False
        logged = sorted(names)
        close = difflib.get_close_matches(metric, logged, n=1)
        if not close:
            suggestion = f"rank by one of {logged}"
        elif self.best.mode == "min":
            suggestion = f"did you mean keep_best={close[0]!r}?"
        else:
            suggestion = f"did you mean keep_best=({close[0]!r}, 'max')?"
        raise CheckpointError(
            f"OrbaxCheckpoint(keep_best={metric!r}) names a metric the run does not log "
            f"(it logs {logged})", suggestion=suggestion)

    # ------------------------------------------------------------------------------- saving
    def save(self, step: int, state: Any, *, data_state: Any = None,
             metrics: Mapping[str, float] | None = None, meta: Mapping[str, Any] | None = None) -> None:
        """Start saving ``state`` (and the data position) as ``step``; returns before the write ends
        when ``async_save``.

        Args:
          step: the step number (the directory name).
          state: the TrainState.
          data_state: the data iterator's position (JSON), e.g. ``ArrayLoader.state()``.
          metrics: logged metrics. With ``keep_best``, a save whose metrics carry its metric is
            ranked; one without is kept only while it is the newest step.
          meta: more JSON for the step's record (the engine adds the plan).
        """
        ocp = self._ocp
        record = {"step": int(step), "mesh": {k: int(v) for k, v in state.mesh.shape.items()},
                  "rules": repr(state.rules), "versions": _versions(), **(meta or {})}
        ranked_metrics = None
        if self.best is not None:
            # {} rather than None for an unranked save: Orbax warns on every save without metrics.
            ranked_metrics = dict(metrics) if self.best.score(metrics) is not None else {}
        arrays = _in_layer_order(state, _arrays_of(state), "natural")  # whatever the plan
        self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                    data=ocp.args.JsonSave(data_state if data_state is not None else {}),
                                    meta=ocp.args.JsonSave(record)),
            metrics=ranked_metrics,
            force=True,
        )

    def due(self, step: int, *, force: bool = False) -> bool:
        """Whether :meth:`maybe_save` would save at ``step``: a multiple of ``every`` (or
        ``force``) that is not on disk yet. With ``keep_best`` the metrics do not matter: it
        decides which saves stay, not when the run saves (see :meth:`save`).

        Args:
          step: the step just taken.
          force: a save the run needs whatever the step (the end of training, preemption).

        Returns:
          Whether a save would start.
        """
        if not force and step % self.every:
            return False
        return step not in self.all_steps()

    def maybe_save(self, step: int, state: Any, *, data_state: Any = None, force: bool = False,
                   metrics: Mapping[str, float] | None = None,
                   meta: Mapping[str, Any] | None = None) -> bool:
        """Save when :meth:`due` (``step`` a multiple of ``every``, or ``force``); return whether
        it did."""
        if not self.due(step, force=force):
            return False
        self.save(step, state, data_state=data_state, metrics=metrics, meta=meta)
        return True

    def wait(self) -> None:
        """Block until every started save is committed to disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release Orbax's threads."""
        # Orbax removes unfinished saves of earlier runs in a background thread that only a save
        # waits for; a process that exits before it ends prints a RuntimeError traceback.
        getattr(self._manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
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
            its shardings and dtypes are the restore targets, its values are not used.
          step: the step to restore; ``None`` for the newest.

        Returns:
          ``(state, data_state)``.

        Raises:
          CheckpointError: no checkpoint; the step was written for another model, optimizer or
            loss scaling (its arrays' paths or shapes differ from ``state``'s); or its files are
            missing or corrupt (with ``fallback=True`` older intact steps are tried first).

        Warns:
          TitanaxWarning: saved arrays whose dtype differs from ``state``'s are cast to it.
        """
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}",
                                  suggestion="train first, or point OrbaxCheckpoint at the run's directory")
        if step is not None and step not in steps:
            raise CheckpointError(f"step {step} is not in {self.directory} (steps: {steps})",
                                  suggestion=f"restore one of {steps}")
        target = _abstract(_arrays_of(state))
        wanted = target_layout(target)
        candidates = [step] if step is not None else list(reversed(steps))
        first_error: CheckpointError | None = None
        for candidate in candidates:
            try:
                saved = self._saved_layout(candidate)
            except CheckpointError as err:
                first_error = self._fall_back(err, first_error)
                continue
            # Not damage: an older step of the same directory would not fit either.
            check_fits(f"checkpoint step {candidate} in {self.directory}", saved, wanted)
            try:
                return self._read_step(state, target, candidate)
            except CheckpointError as err:
                first_error = self._fall_back(err, first_error)
        assert first_error is not None
        raise first_error

    def restore_latest(self, state: Any) -> tuple[Any, Any] | None:
        """:meth:`restore` of the newest step, or ``None`` when the directory has none."""
        if not self.all_steps():
            return None
        return self.restore(state)

    def _fall_back(self, err: CheckpointError, first_error: CheckpointError | None) -> CheckpointError:
        """Re-raise ``err`` unless ``fallback``; else warn and return the error to raise if no
        older step can be read either."""
        if not self.fallback:
            raise err
        warnings.warn(f"{err.message}; trying an older step", TitanaxWarning, stacklevel=user_stacklevel())
        return first_error or err

    def _damaged(self, step: int, err: BaseException) -> CheckpointError:
        return CheckpointError(
            f"checkpoint step {step} in {self.directory} cannot be read ({type(err).__name__}: "
            f"{(str(err).splitlines() or [''])[0][:300]}); its files: "
            f"{listing(os.path.join(self.directory, str(step)))}",
            suggestion="restore an older step (OrbaxCheckpoint(..., fallback=True) does this), or "
            "delete the damaged step directory",
        )

    def _saved_layout(self, step: int) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype | None]]:
        """Path -> (shape, dtype) of every array saved in ``step``, from Orbax's metadata."""
        try:
            metadata = self._manager.item_metadata(step).state
        except Exception as err:  # Orbax raises JSON, file and value errors for unreadable metadata
            raise self._damaged(step, err) from err
        if metadata is None:
            raise self._damaged(step, FileNotFoundError("the step has no 'state' item"))
        tree = getattr(metadata, "tree", metadata)
        return {key_path(path): (tuple(getattr(leaf, "shape", ())),
                                  None if getattr(leaf, "dtype", None) is None else np.dtype(leaf.dtype))
                for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    def _read_step(self, state: Any, target: Any, step: int) -> tuple[Any, Any]:
        ocp = self._ocp
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                              data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        except Exception as err:  # Orbax/TensorStore raise many types for missing or bad files
            raise self._damaged(step, err) from err
        # Read in natural order into the target's shardings, then put in the target's order.
        arrays = _in_layer_order(state, restored.state, "pipeline")
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


def _versions() -> dict[str, str]:
    import flax
    import optax
    import orbax.checkpoint as ocp

    from titanax.version import __version__

    return {"titanax": __version__, "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "orbax": getattr(ocp, "__version__", "?"),
            "numpy": np.__version__}
