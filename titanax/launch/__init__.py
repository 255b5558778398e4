"""Launchers: start a multi-process Titanax job.

:func:`launch` runs N processes on this machine (like ``torchrun --standalone``), giving each the
``TITANAX_*`` variables :func:`titanax.runtime.initialize` reads; on a cluster, SLURM, Open MPI,
torchrun / Kubeflow and Kubernetes Indexed Jobs start the processes instead and ``initialize`` reads
their variables.

Example:
  >>> import sys
  >>> from titanax.launch import launch
  >>> code = launch([sys.executable, "train.py"], nprocs=2, cpu_devices_per_proc=4)  # doctest: +SKIP
"""

from titanax.launch.local import child_environment, exit_code, free_port, launch

__all__ = ["child_environment", "exit_code", "free_port", "launch"]
