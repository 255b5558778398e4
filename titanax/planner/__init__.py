"""Choosing a parallelism plan: compile candidate plans abstractly, rank them by a roofline
step-time estimate (``tx.autoplan``, ``titanax plan``).

``candidates`` enumerates and prunes the plans, ``search`` compiles and ranks them,
``device_spec`` holds the device constants and their presets, ``roofline`` the estimate,
``calibration`` measures the constants of the machine at hand.
"""

from titanax.planner.calibration import calibrate
from titanax.planner.candidates import Candidate, ModelFacts, Rejection, enumerate_candidates
from titanax.planner.device_spec import DEVICE_SPECS, DeviceSpec, device_spec
from titanax.planner.roofline import StepEstimate, axis_crosses_nodes, estimate_step, ring_bytes, ring_steps
from titanax.planner.search import PlanRow, PlanSearch, autoplan, measure_step_time, model_facts

__all__ = [
    # the search
    "autoplan", "PlanSearch", "PlanRow", "measure_step_time",
    # candidates
    "Candidate", "ModelFacts", "Rejection", "enumerate_candidates", "model_facts",
    # the estimate
    "DeviceSpec", "DEVICE_SPECS", "device_spec", "StepEstimate", "estimate_step", "axis_crosses_nodes",
    "ring_bytes", "ring_steps", "calibrate",
]
