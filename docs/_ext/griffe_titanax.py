"""A griffe extension for the API reference: reads Titanax docstrings as mkdocstrings should.

Titanax docstrings are Google style with an ``Example:`` section of doctests; griffe's Google parser
knows only ``Examples:`` (anything else is an admonition of plain Markdown, where ``>>>`` lines are
quotes and ``x["key"]`` a link). Sphinx roles (``:class:`~titanax.exec.StepFunction```) become
code spans: Markdown has no roles.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.M)
_ROLE = re.compile(r":(?:class|func|meth|attr|mod|exc|data|obj|const):`(~?)([^`]+)`")


def _code(match: re.Match) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def rewrite(text: str) -> str:
    """The docstring ``text`` with ``Example:`` read as ``Examples:`` and roles as code spans."""
    return _ROLE.sub(_code, _EXAMPLE.sub(r"\1Examples:", text))


class TitanaxDocstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
