"""Optimizers (typed factories over optax) and learning-rate schedules.

Every factory returns a plain ``optax.GradientTransformation``; any optax optimizer works wherever
Titanax takes one (:func:`as_optimizer` checks it). :data:`OPTIMIZERS` and :data:`LR_SCHEDULES`
name the factories and the learning-rate schedules (as a run configuration does).

Example:
  >>> import titanax as tx
  >>> lr = tx.optim.warmup_cosine(3e-4, warmup_steps=100, total_steps=10_000)
  >>> opt = tx.optim.adamw(lr, weight_decay=0.1, clip_norm=1.0)   # no decay on biases/norms
"""

from titanax.optim.arguments import DecayMask, LearningRate, default_decay_mask
from titanax.optim.factories import (
    OPTIMIZERS,
    adafactor,
    adam,
    adamw,
    as_optimizer,
    lion,
    sgd,
)
from titanax.optim.learning_rate import learning_rate
from titanax.optim.schedules import LR_SCHEDULES, constant, warmup_cosine, warmup_linear

__all__ = [
    "adamw", "adam", "sgd", "lion", "adafactor", "as_optimizer", "default_decay_mask",
    "warmup_cosine", "warmup_linear", "constant", "LearningRate", "DecayMask", "OPTIMIZERS", "LR_SCHEDULES",
    "learning_rate",
]
