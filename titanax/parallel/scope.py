"""The thread-local stack behind every Titanax scope: active rules and meshes (``with rules:``,
``tx.sharding_context``), the axes ``tx.constrain`` records, and the pipelined stack's split.

It sits below :mod:`titanax.parallel.rules` and :mod:`titanax.parallel.context` so that a
``Rules`` value can enter itself without the rules module importing the context built on it.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from jax.sharding import Mesh

__all__ = ["Frame", "STACK", "push_rules", "pop_rules"]


@dataclasses.dataclass(frozen=True)
class Frame:
    """One scope: its rules (a :class:`~titanax.parallel.rules.Rules`) and optional mesh."""

    rules: Any
    mesh: Mesh | None


class _Stack(threading.local):
    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.records: list[set[str]] = []
        self.splits: list[Any] = []


STACK = _Stack()


def push_rules(rules: Any, mesh: Mesh | None = None) -> None:
    """Make ``rules`` (and ``mesh``) the innermost scope of this thread."""
    STACK.frames.append(Frame(rules, mesh))


def pop_rules(rules: Any) -> None:
    """Leave the innermost scope, which must be ``rules``'."""
    if not STACK.frames or STACK.frames[-1].rules is not rules:
        raise RuntimeError("sharding contexts were exited out of order")
    STACK.frames.pop()
