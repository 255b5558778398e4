"""A process that ``titanax launch`` started dies with the launcher, even when it is SIGKILLed.

The launcher stops its processes on every exit it can see; a SIGKILL it cannot see would otherwise
leave them running, holding devices and the coordinator port. The launcher names itself in
``TITANAX_LAUNCHER_PID`` and :func:`titanax.runtime.initialize` calls :func:`follow_launcher`, so
this lives in the runtime, below ``titanax.launch``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Mapping

from titanax.runtime.env_vars import LAUNCHER_PID_VAR

__all__ = ["follow_launcher"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def follow_launcher(environ: Mapping[str, str] | None = None) -> bool:
    """In a process ``titanax launch`` started, have Linux SIGKILL it when the launcher dies.

    Args:
      environ: the environment to read ``TITANAX_LAUNCHER_PID`` from; ``os.environ`` if None.

    Returns:
      Whether it applies: this process's parent is the launcher named in the environment, on Linux.

    Example:
      >>> follow_launcher({})      # not started by the launcher
      False
    """
    pid = (os.environ if environ is None else environ).get(LAUNCHER_PID_VAR, "")
    if not sys.platform.startswith("linux") or not pid.isdigit() or os.getppid() != int(pid):
        return False  # a wrapper between the launcher and us (bash -c ...) is its own business
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() != int(pid):  # the launcher died before the prctl: nobody will signal us
        os.kill(os.getpid(), signal.SIGKILL)
    return True
