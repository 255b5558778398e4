"""The package version, in one place (read by the checkpoint metadata and ``titanax.__version__``)."""

__version__ = "0.1.0"
"""The version of this Titanax package (checkpoints record it in their metadata)."""
