"""The run directory ``titanax run`` writes: ``runs/<name>-<time>/`` with the resolved
configuration, the metrics CSV, TensorBoard events, checkpoints and profiler traces.

Every output the configuration leaves unset goes into the run directory; a path it sets stays
where it says. The directory is new for each run (a second run in the same second gets ``-2``), so
nothing resumes by accident; to resume a run, point at its directory (``--run-dir``), whose
``checkpoints/`` the run continues from. The directory is reserved (created empty) when it is
chosen, so runs started together never share one; a run that fails to build removes it again. Under ``jax.distributed`` process 0 chooses the name and
every process uses it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import time
from typing import Any

import yaml

from titanax.config.schema import RunConfig

__all__ = ["RUNS_ENV", "RunDirectory", "config_values", "config_yaml", "resolve_run_directory"]

RUNS_ENV = "TITANAX_RUNS"
"""Environment variable: where run directories go when ``output.root`` is not set (default ``runs``)."""


@dataclasses.dataclass(frozen=True)
class RunDirectory:
    """Where a run writes, and the configuration with its outputs pointed there."""

    path: pathlib.Path
    """The run directory."""
    config: RunConfig
    """The configuration, every unset output inside :attr:`path`."""
    filled: tuple[str, ...]
    """The configuration keys this directory filled in (``logging.csv``, ``checkpoint.dir`` ...)."""

    def create(self) -> None:
        """Make the directory and write ``config.yaml`` (process 0; ``titanax run`` calls it once the
        run is built, so a misconfigured run leaves nothing behind)."""
        import jax

        if jax.process_index() == 0:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "config.yaml").write_text(config_yaml(self.config))

    def discard(self) -> None:
        """Remove the directory if the run wrote nothing into it (a run that failed to build)."""
        import jax

        if jax.process_index() == 0 and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    def describe(self) -> str:
        """One line: where the run writes, and what."""
        what = {"logging.csv": "metrics.csv", "logging.tensorboard": "tensorboard/",
                "checkpoint.dir": "checkpoints/", "logging.profile_dir": "profile/", "logging.wandb.dir": "wandb/"}
        if self.config.logging.profile_steps is None:
            del what["logging.profile_dir"]
        inside = ", ".join(["config.yaml"] + [name for key, name in what.items() if key in self.filled])
        return f"run directory: {self.path} ({inside})"


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_values(cfg: RunConfig) -> dict[str, Any]:
    """``cfg`` as plain values (dicts, lists, strings, numbers)."""
    return _plain(dataclasses.asdict(cfg))


def config_yaml(cfg: RunConfig) -> str:
    """``cfg`` as YAML that ``titanax run`` reads back to the same configuration."""
    return yaml.safe_dump(config_values(cfg), sort_keys=False)


def _agreed(stamp: int, suffix: int) -> tuple[int, int]:
    """Process 0's timestamp and suffix, on every process."""
    import jax

    if jax.process_count() == 1:
        return stamp, suffix
    import numpy as np
    from jax.experimental import multihost_utils

    agreed = multihost_utils.broadcast_one_to_all(np.array([stamp, suffix], np.int64))
    return int(agreed[0]), int(agreed[1])


def _new_directory(root: pathlib.Path, name: str) -> pathlib.Path:
    import jax

    stamp, suffix = int(time.time()), 1
    if jax.process_index() == 0:
        # Reserved by an exclusive mkdir: runs of a sweep started in the same second must never
        # share a directory (the second would resume from, or overwrite, the first's checkpoints).
        root.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                (root / _dirname(name, stamp, suffix)).mkdir()
                break
            except FileExistsError:
                suffix += 1
    stamp, suffix = _agreed(stamp, suffix)
    return root / _dirname(name, stamp, suffix)


def _dirname(name: str, stamp: int, suffix: int) -> str:
    text = f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(stamp))}"
    return text if suffix == 1 else f"{text}-{suffix}"


def resolve_run_directory(cfg: RunConfig, *, name: str) -> RunDirectory | None:
    """Choose (and reserve, empty) the run directory and point every unset output into it; the
    configuration is written by :meth:`RunDirectory.create`.

    Args:
      cfg: the configuration.
      name: the run's name when ``output.name`` is unset (``titanax run`` passes the configuration
        file's name).

    Returns:
      The :class:`RunDirectory`, or ``None`` with ``output.enabled: false``.
    """
    import jax

    output = cfg.output
    if not output.enabled:
        return None
    if output.dir is not None:
        path = pathlib.Path(output.dir)
    else:
        root = pathlib.Path(output.root if output.root is not None else os.environ.get(RUNS_ENV) or "runs")
        path = _new_directory(root, output.name or name)
    logging, checkpoint = cfg.logging, cfg.checkpoint
    filled: list[str] = []

    def inside(key: str, current: Any, default: str) -> Any:
        if current is not None:
            return current
        filled.append(key)
        return str(path / default)

    # An install older than tensorboardX as a dependency writes no events rather than failing.
    events = logging.tensorboard if importlib.util.find_spec("tensorboardX") is None else inside(
        "logging.tensorboard", logging.tensorboard, "tensorboard")
    logging = dataclasses.replace(
        logging, csv=inside("logging.csv", logging.csv, "metrics.csv"), tensorboard=events,
        profile_dir=inside("logging.profile_dir", logging.profile_dir, "profile"))
    checkpoint = dataclasses.replace(checkpoint, dir=inside("checkpoint.dir", checkpoint.dir, "checkpoints"))
    if logging.wandb is not None and "dir" not in logging.wandb:
        logging = dataclasses.replace(logging, wandb={**logging.wandb, "dir": str(path)})
        filled.append("logging.wandb.dir")
    resolved = dataclasses.replace(cfg, logging=logging, checkpoint=checkpoint,
                                   output=dataclasses.replace(output, dir=str(path)))
    return RunDirectory(path=path, config=resolved, filled=tuple(filled))
