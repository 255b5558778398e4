"""Model-building blocks that stay parallelism-free but let a plan restructure them.

``LayerStack`` holds a repeated block as one module with a leading ``layers`` axis: it runs by
``jax.lax.scan`` (compile time flat in depth), and a pipeline plan can split the same stack into
stages without the model changing. ``titanax.nn.remat`` holds the rematerialisation policies
(``LayerStack(remat=)``, ``tx.PP(remat=)``): what a layer or stage keeps for the backward pass.
"""

from titanax.nn.remat import REMAT_POLICIES
from titanax.nn.stack import LayerStack

__all__ = ["REMAT_POLICIES", "LayerStack"]
