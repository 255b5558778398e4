"""Mixed precision: float32 master weights, reduced-precision compute, dynamic loss scaling."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from titanax.exceptions import ConfigError

__all__ = ["Precision", "LossScale"]

_DTYPES = ("float32", "bfloat16", "float16")


def _check_dtype(field: str, value: str) -> None:
    if value not in _DTYPES:
        raise ConfigError(
            f"Precision({field}={value!r}) is not one of {_DTYPES}",
            suggestion=f"use {field}='float32' (default) or {field}='bfloat16'",
            owner="Precision", field=field, value=value,
        )


@dataclasses.dataclass(kw_only=True, frozen=True)
class Precision:
    """Which dtypes parameters are kept and computed in.

    Example:
      >>> Precision(compute="bfloat16")            # fp32 master weights, bf16 matmuls
      Precision(params='float32', compute='bfloat16', loss_scale=None, initial_scale=32768.0, growth_interval=2000)
    """

    params: str = "float32"
    """Dtype of the stored (master) parameters and optimizer state."""

    compute: str = "float32"
    """Dtype the forward and backward run in: parameters and floating inputs are cast to it inside
    the differentiated function, so gradients arrive in the ``params`` dtype."""

    loss_scale: None | str | float = None
    """``None``; ``"dynamic"`` (grow every ``growth_interval`` finite steps, halve and skip the step on
    overflow); or a fixed float. Needed for float16, whose small range underflows gradients."""

    initial_scale: float = 2.0**15
    """Starting scale for ``loss_scale="dynamic"``."""

    growth_interval: int = 2000
    """Finite steps between doublings of a dynamic scale."""

    def __post_init__(self) -> None:
        _check_dtype("params", self.params)
        _check_dtype("compute", self.compute)
        if self.params != "float32" and self.compute == "float32":
            raise ConfigError(
                f"Precision(params={self.params!r}) with compute='float32' stores weights in less "
                "precision than it computes with",
                suggestion="keep params='float32' (master weights) and set compute='bfloat16'",
                owner="Precision", field=("params", "compute"), value=(self.params, self.compute),
            )
        if isinstance(self.loss_scale, str) and self.loss_scale != "dynamic":
            raise ConfigError(f"Precision(loss_scale={self.loss_scale!r}) is not 'dynamic', a float or None",
                              suggestion="use loss_scale='dynamic' for float16",
                              owner="Precision", field="loss_scale", value=self.loss_scale)
        if isinstance(self.loss_scale, (int, float)) and not self.loss_scale > 0:
            raise ConfigError(f"Precision(loss_scale={self.loss_scale!r}) must be positive",
                              suggestion="use e.g. loss_scale=1024.0, or 'dynamic'",
                              owner="Precision", field="loss_scale", value=self.loss_scale)
        if self.compute == "float16" and self.loss_scale is None:
            raise ConfigError(
                "Precision(compute='float16') without loss scaling: float16 gradients underflow",
                suggestion="add loss_scale='dynamic' (or use compute='bfloat16', which needs none)",
                owner="Precision", field=("compute", "loss_scale"), value=(self.compute, self.loss_scale),
            )
        if self.growth_interval < 1 or self.initial_scale <= 0:
            raise ConfigError("Precision: growth_interval must be >= 1 and initial_scale > 0",
                              suggestion="keep the defaults (2**15, 2000)", owner="Precision",
                              field=("growth_interval", "initial_scale"),
                              value=(self.growth_interval, self.initial_scale))

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.compute)

    @property
    def param_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.params)

    @property
    def dynamic(self) -> bool:
        return self.loss_scale == "dynamic"

    def cast_to_compute(self, tree: Any) -> Any:
        """Cast floating leaves to the compute dtype (integers, keys and booleans untouched)."""
        return _cast_floating(tree, self.compute_dtype)

    def cast_to_params(self, tree: Any) -> Any:
        """Cast floating leaves to the parameter dtype."""
        return _cast_floating(tree, self.param_dtype)

    def initial_loss_scale(self) -> LossScale | None:
        if self.loss_scale is None:
            return None
        scale = self.initial_scale if self.dynamic else float(self.loss_scale)
        return LossScale(scale=jnp.asarray(scale, jnp.float32), good_steps=jnp.zeros((), jnp.int32),
                         skipped=jnp.zeros((), jnp.int32))


def _cast_floating(tree: Any, dtype: jnp.dtype) -> Any:
    def cast(x: Any) -> Any:
        if isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    return jax.tree.map(cast, tree)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LossScale:
    """The loss-scaling state carried in :class:`~titanax.TrainState` (float16 training)."""

    scale: jax.Array
    """Current scale; gradients are computed scaled by it and divided by it before the update."""
    good_steps: jax.Array
    """Finite steps since the scale last changed."""
    skipped: jax.Array
    """Total steps skipped because their gradients overflowed."""

    def adjust(self, finite: jax.Array, precision: Precision) -> LossScale:
        """The next state: grow after ``growth_interval`` finite steps, halve on overflow."""
        if not precision.dynamic:
            return dataclasses.replace(self, skipped=self.skipped + (~finite).astype(jnp.int32))
        grow = finite & (self.good_steps + 1 >= precision.growth_interval)
        scale = jnp.where(finite, jnp.where(grow, self.scale * 2, self.scale),
                          jnp.maximum(self.scale / 2, 1.0))
        good = jnp.where(finite & ~grow, self.good_steps + 1, 0)
        return LossScale(scale=scale, good_steps=good.astype(jnp.int32),
                         skipped=self.skipped + (~finite).astype(jnp.int32))


@jax.custom_vjp
def scale_cotangent(x: jax.Array, scale: jax.Array) -> jax.Array:
    """Identity forward; multiplies the incoming cotangent by ``scale`` backward.

    Put on a model's output, it scales every parameter gradient by ``scale`` — loss scaling
    without touching the user's loss function.
    """
    return x


def _scale_fwd(x, scale):
    return x, scale


def _scale_bwd(scale, g):
    return jax.tree.map(lambda t: t * scale.astype(t.dtype), g), jnp.zeros_like(scale)


scale_cotangent.defvjp(_scale_fwd, _scale_bwd)
