"""Rematerialisation: which intermediates of a function the backward pass keeps, by policy name.

One table serves every place Titanax recomputes: each layer of a ``tx.nn.LayerStack``
(``LayerStack(remat=)``) and each pipeline stage (``tx.PP(remat=)``). A policy trades memory for
compute: what it does not keep is recomputed from the function's inputs in the backward pass.

"Batch dimensions" below are ``dot_general``'s: a projection ``x_BTD @ w_DF`` has none (its output
is kept by ``save_dots_no_batch``), attention's per-head ``QK^T`` and ``AV`` have them (recomputed).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax

from titanax.exceptions import PlanError

__all__ = ["OFFLOAD_BACKENDS", "REMAT_POLICIES", "check_policy", "remat", "without_remat"]

REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims(offload_src="device",
                                                                      offload_dst="pinned_host"),
}
"""Policy name -> ``jax.checkpoint`` policy.

- ``none``: keep every intermediate (most memory, no recomputation).
- ``full``: keep only the function's inputs; recompute everything else (least memory, about one
  extra forward pass).
- ``save_dots``: keep every matmul output; recompute the elementwise work between them.
- ``save_dots_no_batch``: keep matmul outputs without batch dimensions (the projections); also
  recompute attention's batched matmuls.
- ``offload``: keep what ``save_dots_no_batch`` keeps, in pinned host memory instead of the
  accelerator's (copied out in the forward pass, back in the backward); GPU and TPU only.
"""

OFFLOAD_BACKENDS = ("gpu", "tpu")
"""Backends whose lowering moves values to host memory inside a jitted program. Elsewhere (CPU)
JAX lowers the transfer to nothing, so ``offload`` would silently keep the values on the device."""


def check_policy(policy: Any, where: str = "remat") -> str:
    """``policy`` if it names a policy of :data:`REMAT_POLICIES`.

    Args:
      policy: the name to check.
      where: how the caller names the setting in the error, e.g. ``"LayerStack(remat=...)"``.

    Raises:
      PlanError: naming the bad value and listing the valid names.
    """
    if not isinstance(policy, str) or policy not in REMAT_POLICIES:
        raise PlanError(f"{where}: {policy!r} is not a remat policy",
                        suggestion=f"use one of {', '.join(REMAT_POLICIES)}")
    return policy


def remat(fn: Callable[..., Any], policy: str, *, backend: str | None = None) -> Callable[..., Any]:
    """``fn`` under the named policy: ``jax.checkpoint(fn, policy=...)``, or ``fn`` itself for ``none``.

    Args:
      fn: the function whose intermediates the policy decides (a layer, a pipeline stage).
      policy: a key of :data:`REMAT_POLICIES`.
      backend: the platform the program will run on (``jax.default_backend()`` if ``None``); only
        ``offload`` depends on it.

    Raises:
      PlanError: an unknown policy, or ``offload`` on a backend that cannot offload (see
        :data:`OFFLOAD_BACKENDS`), before anything is lowered.
    """
    check_policy(policy)
    if policy == "none" or _DISABLED.depth:
        return fn
    if policy == "offload":
        backend = backend or jax.default_backend()
        if backend not in OFFLOAD_BACKENDS:
            raise PlanError(
                f"remat policy 'offload' needs host offloading, which the {backend!r} backend does not do "
                f"(it runs on {', '.join(OFFLOAD_BACKENDS)})",
                suggestion="use 'save_dots_no_batch' (the same values, kept in device memory) or 'full' "
                "(nothing kept, least memory)",
            )
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy])


class _Disabled(threading.local):
    depth = 0


_DISABLED = _Disabled()


@contextlib.contextmanager
def without_remat() -> Iterator[None]:
    """Trace model code as if every policy were ``none`` (what the backward pass would keep with no
    recomputation); ``titanax describe`` uses it to size one layer's recomputed intermediates."""
    _DISABLED.depth += 1
    try:
        yield
    finally:
        _DISABLED.depth -= 1
