"""Checkpoints: ``tx.io.OrbaxCheckpoint`` and the protocol the engine uses."""

from titanax.io.checkpoint import CheckpointStrategy, OrbaxCheckpoint

__all__ = ["CheckpointStrategy", "OrbaxCheckpoint"]
