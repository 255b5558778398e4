"""An analytic activation figure: what a model's forward saves for its backward pass.

A compiled program's temporaries depend on the backend that compiled it (the CPU backend keeps
bfloat16 activations in float32, so a plan checked on a laptop reads up to twice the memory a GPU
would use). The residuals JAX saves between the forward and the backward pass are read from the
traced program instead — in their own dtypes, after remat policies chose what to keep — and need
no compilation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

__all__ = ["ActivationEstimate", "saved_activations"]


@dataclasses.dataclass(frozen=True)
class ActivationEstimate:
    """Residuals a forward pass saves for its backward pass (its arguments, the weights and inputs,
    excluded: they are held anyway)."""

    total_bytes: int
    """All residuals, whole (every device together)."""
    per_device_bytes: int
    """One device's share: each residual divided over the devices its batch dimension and any
    tensor-split width dimension are split over (an estimate: sequence-parallel splits are not
    seen, so under sequence parallelism this is an upper bound)."""
    count: int
    """How many residual arrays."""
    recomputed_bytes: int = 0
    """Included in :attr:`per_device_bytes` where a remat policy applies (``titanax describe``):
    the intermediates one layer recomputes in the backward pass, held while its gradient is
    computed."""


def saved_activations(fn: Callable[..., Any], params: Any, *inputs: Any, batch_size: int | None = None,
                      batch_ways: int = 1, width_ways: Mapping[int, int] | None = None) -> ActivationEstimate:
    """What the backward pass of ``fn(params, *inputs)`` needs kept from its forward pass, read from
    the traced program (nothing is compiled or allocated).

    Args:
      fn: the forward.
      params: the parameters (arrays or ``jax.ShapeDtypeStruct``s).
      *inputs: the inputs (arrays or ``jax.ShapeDtypeStruct``s); like the parameters, they are
        held anyway and not counted.
      batch_size: the global batch size: a residual dimension of this size is taken to be the
        batch, split ``batch_ways`` ways.
      batch_ways: devices the batch is split over.
      width_ways: dimension size -> devices that width is split over (e.g. the MLP width or the
        head count under tensor parallelism), from the parameters' layout.

    Returns:
      An :class:`ActivationEstimate`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w, x = jnp.ones((8, 8)), jnp.ones((4, 8))
      >>> saved_activations(lambda w, x: jnp.tanh(x @ w).sum(), w, x).total_bytes  # two [4, 8] float32
      256
    """
    from jax._src.ad_checkpoint import saved_residuals  # the helper behind print_saved_residuals

    width_ways = dict(width_ways or {})
    # A scan over stacked layers hands each layer's weights to its backward as a scan output:
    # arrays shaped like a parameter are weights, held anyway, not activations.
    weights = {tuple(leaf.shape) for leaf in jax.tree.leaves(params) if hasattr(leaf, "shape")}
    total = per_device = count = 0
    for aval, source in saved_residuals(fn, params, *inputs):
        if source.startswith("from the argument") or not hasattr(aval, "shape") or tuple(aval.shape) in weights:
            continue
        shape = tuple(aval.shape)
        nbytes = math.prod(shape) * np.dtype(aval.dtype).itemsize
        total += nbytes
        count += 1
        ways, batch_seen = 1, False
        for size in shape:
            if not batch_seen and batch_size is not None and size == batch_size and batch_ways > 1:
                ways *= batch_ways
                batch_seen = True
            elif size in width_ways:
                ways *= width_ways[size]
        per_device += -(-nbytes // ways)
    return ActivationEstimate(total_bytes=total, per_device_bytes=per_device, count=count)
