"""Metric loggers and throughput measurement for training runs.

Every logger writes only on process 0 of a multi-process run, and takes ``every=N`` to write every
N-th step. Give the engine a list of them::

    engine = tx.Engine(..., loggers=[tx.logging.Basic(), tx.logging.CSV("runs/x/metrics.csv"),
                                     tx.logging.TensorBoard("runs/x/tb")])

:func:`plot_metrics` (``titanax plot``) needs matplotlib (``pip install "titanax[plot]"``) and
:class:`WandB` needs wandb (``pip install "titanax[wandb]"``); everything else here needs only
Titanax's own dependencies.
"""

from titanax.logging.base import Logger, MultiLogger, NullLogger
from titanax.logging.basic import Basic, format_metrics
from titanax.logging.csv_logger import CSV
from titanax.logging.plot import plot_metrics
from titanax.logging.tensorboard import TensorBoard
from titanax.logging.throughput import ThroughputMeter, mfu, peak_flops_per_device
from titanax.logging.wandb_logger import WandB

__all__ = [
    "Logger", "NullLogger", "MultiLogger", "Basic", "CSV", "TensorBoard", "ThroughputMeter",
    "format_metrics", "mfu", "peak_flops_per_device", "plot_metrics", "WandB",
]
