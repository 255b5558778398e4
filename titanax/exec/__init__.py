"""Execution: train state, precision, compiled steps, the engine, collectives for manual mode."""

from titanax.exec import collectives
from titanax.exec.compilation import RecompileWarning
from titanax.exec.engine import Engine
from titanax.exec.grad import value_and_grad
from titanax.exec.precision import LossScale, Precision
from titanax.exec.state import TrainState, create_train_state
from titanax.exec.step import StepFunction, step_fn

__all__ = ["collectives", "Engine", "LossScale", "Precision", "RecompileWarning", "TrainState",
           "create_train_state", "StepFunction", "step_fn", "value_and_grad"]
