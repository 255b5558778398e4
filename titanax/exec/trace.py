"""A profiler trace of chosen training steps.

The trace is JAX's (``jax.profiler``): an ``.xplane.pb`` that TensorBoard's profile plugin and
XProf read, and a ``perfetto_trace.json.gz`` for https://ui.perfetto.dev. Its device ops carry the
``jax.named_scope`` path they came from: the step (``jit(train_step)``), each Flax module
(``GPT/block_0/attn``), ``optimizer_update``, a pipeline's ``..._pipeline`` stack.

Example:
  >>> window = ProfileWindow.parse("5:8", "/tmp/profile")
  >>> window.first, window.stop, window.steps
  (5, 8, 3)
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from typing import Any

import jax

from titanax.exceptions import ConfigError

__all__ = ["ProfileWindow"]

_log = logging.getLogger("titanax.engine")


@dataclasses.dataclass(kw_only=True)
class ProfileWindow:
    """Trace the steps numbered ``first`` up to, not including, ``stop`` (a range, as ``5:8``
    traces steps 5, 6 and 7; step 1 is the first step of a run, which compiles)."""

    first: int
    """The first traced step."""

    stop: int
    """The step after the last traced one."""

    directory: str
    """Where the trace goes (``<directory>/plugins/profile/<time>/``, TensorBoard's layout)."""

    _active: bool = dataclasses.field(default=False, repr=False)

    def __post_init__(self) -> None:
        if (isinstance(self.first, bool) or isinstance(self.stop, bool) or not isinstance(self.first, int)
                or not isinstance(self.stop, int) or not 1 <= self.first < self.stop):
            raise ConfigError(f"profile steps {self.first!r}:{self.stop!r} are not a range of steps",
                              suggestion="give first:stop with 1 <= first < stop, e.g. 5:8 traces steps 5, 6 "
                              "and 7 (after the compile of step 1)",
                              owner="Engine", field="profile_steps", value=(self.first, self.stop))

    @classmethod
    def parse(cls, steps: str | tuple[int, int] | list[int], directory: str | os.PathLike[str]) -> ProfileWindow:
        """From ``"5:8"`` or ``(5, 8)``.

        Raises:
          ConfigError: not ``first:stop`` with ``1 <= first < stop``.
        """
        if isinstance(steps, str):
            parts = steps.split(":")
            try:
                first, stop = (int(p) for p in parts)
            except ValueError:
                raise ConfigError(f"profile steps {steps!r} are not first:stop",
                                  suggestion="e.g. --profile-steps 5:8 traces steps 5, 6 and 7",
                                  owner="Engine", field="profile_steps", value=steps) from None
        else:
            try:
                first, stop = steps
            except (TypeError, ValueError):
                raise ConfigError(f"profile_steps={steps!r} is not a (first, stop) pair",
                                  suggestion="e.g. profile_steps=(5, 8) traces steps 5, 6 and 7",
                                  owner="Engine", field="profile_steps", value=steps) from None
        return cls(first=first, stop=stop, directory=os.fspath(directory))

    @property
    def steps(self) -> int:
        """How many steps are traced."""
        return self.stop - self.first

    def before(self, step: int) -> None:
        """Call before dispatching step number ``step``: starts the trace at ``first``."""
        if step == self.first and not self._active:
            os.makedirs(self.directory, exist_ok=True)
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self._active = True

    def after(self, step: int, outputs: Any) -> None:
        """Call after dispatching step ``step``: at the last traced step, waits for ``outputs``
        (the trace must hold the device work, not only its dispatch) and stops."""
        if self._active and step >= self.stop - 1:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        """Stops a trace still running (a run that ended inside the window) and says where it is."""
        if self._active:
            jax.profiler.stop_trace()
            self._active = False
            runs = sorted(glob.glob(os.path.join(self.directory, "plugins", "profile", "*")))
            if jax.process_index() == 0:
                _log.info("profile of steps %d-%d written to %s (tensorboard --logdir %s, or "
                          "perfetto_trace.json.gz at ui.perfetto.dev)", self.first, self.stop - 1,
                          runs[-1] if runs else self.directory, self.directory)
