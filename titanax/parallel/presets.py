"""Rule presets over the standard logical names.

The logical vocabulary Titanax models use:

=========  ===========================================================
``batch``  examples in a batch
``seq``    positions in a sequence
``embed``  the model (residual stream) width
``mlp``    the feed-forward hidden width
``heads``  attention heads
``kv``     the per-head width of queries, keys and values
``vocab``  vocabulary entries (embedding rows, logits)
``layers`` the stacked-layer axis of a scanned block
=========  ===========================================================
"""

from __future__ import annotations

from titanax.parallel.rules import Rules

__all__ = ["LOGICAL_NAMES", "data_parallel", "fsdp", "pipeline_parallel", "tensor_parallel"]

LOGICAL_NAMES: tuple[str, ...] = ("batch", "seq", "embed", "mlp", "heads", "kv", "vocab", "layers")


def _replicated_except(*mapped: str) -> tuple[str, ...]:
    return tuple(n for n in LOGICAL_NAMES if n not in mapped)


def data_parallel(axis: str = "data") -> Rules:
    """Data parallelism: the batch split over ``axis``, every parameter replicated.

    Example:
      >>> data_parallel("data").spec(("batch", "embed"), (32, 64), {"data": 8})
      P('data', None)
    """
    return Rules([("batch", axis)], replicated=_replicated_except("batch"))


def fsdp(axis: str = "fsdp", *, shard_unnamed: bool = True) -> Rules:
    """Fully sharded data parallelism (ZeRO-3): the batch and every parameter split over ``axis``.

    Each parameter is sharded on its first dimension named ``embed``, ``mlp``, ``heads``, ``kv``
    or ``vocab`` (in that order of preference per dimension, one dimension per parameter since a
    mesh axis is used once per array). Parameters with no logical names are sharded on their
    largest dimension ``axis`` divides when ``shard_unnamed`` is true.

    Example:
      >>> fsdp("fsdp").spec(("embed", "mlp"), (64, 256), {"fsdp": 8})
      P('fsdp', None)
    """
    names = ("embed", "mlp", "heads", "kv", "vocab")
    return Rules(
        [("batch", axis)] + [(n, axis) for n in names],
        replicated=_replicated_except("batch", *names),
        unnamed=axis if shard_unnamed else None,
    )


def tensor_parallel(axis: str = "tensor", *, sequence_parallel: bool = False) -> Rules:
    """Megatron-style tensor parallelism over ``axis``.

    The MLP's hidden width, the attention heads and the vocabulary are split: the first matmul of
    a block is column-parallel, the second row-parallel, so each block needs one all-reduce
    forward. The batch is replicated over ``axis`` (combine with data parallelism to split it).

    With ``sequence_parallel``, activations the model names ``seq`` (the residual stream between
    attention and MLP: layer norms, residual adds) are also split over ``axis`` along the sequence,
    so each all-reduce becomes a reduce-scatter into the sequence shards and an all-gather before
    the next column-parallel matmul, and those activations take ``1/axis`` of the memory. The
    model leaves the sequence dimension unnamed (``None``) inside attention and the MLP, where the
    heads or hidden width take ``axis``.

    Example:
      >>> tensor_parallel("tensor").spec(("mlp", "embed"), (256, 64), {"tensor": 4})
      P('tensor', None)
    """
    names = ("mlp", "heads", "vocab") + (("seq",) if sequence_parallel else ())
    return Rules([(n, axis) for n in names], replicated=_replicated_except(*names))


def pipeline_parallel(axis: str = "pipe") -> Rules:
    """Pipeline parallelism: the stacked ``layers`` axis of a ``tx.nn.LayerStack`` split over ``axis``.

    Example:
      >>> pipeline_parallel("pipe").spec(("layers", "embed", "mlp"), (8, 64, 256), {"pipe": 4})
      P('pipe', None, None)
    """
    return Rules([("layers", axis)], replicated=_replicated_except("layers"))
