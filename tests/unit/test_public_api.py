"""docs/api.md is the contract for the public surface: each package's ``__all__`` is exactly what
its section documents, and every ``tx.X`` the page names is exported by ``titanax``.

A section documents one package when its heading ends in ```titanax.<package>```; the names it
documents are the first code span(s) of each table row's first cell, read as ``tx.[<package>.]X``
or ``titanax.<package>.X`` (``X / Y / Z`` lists several names of the package).
"""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest

import titanax

API = (pathlib.Path(__file__).parents[2] / "docs" / "api.md").read_text()
PACKAGES = ("runtime", "parallel", "nn", "exec", "optim", "data", "io", "logging", "profiling",
            "config", "planner", "exceptions")


def _sections() -> dict[str, str]:
    out = {}
    for block in API.split("\n## ")[1:]:
        heading, _, body = block.partition("\n")
        found = re.search(r"`titanax\.(\w+)`\s*$", heading)
        if found:
            out[found.group(1)] = body
    return out


SECTIONS = _sections()


def documented_names(package: str, body: str) -> set[str]:
    names = set()
    for row in re.findall(r"^\|([^|\n]*)\|", body, re.MULTILINE):
        for span in re.findall(r"`([^`]+)`", row):
            text = span.lstrip("@")
            text = re.sub(r"^(?:tx|titanax)\.", "", text)
            text = re.sub(rf"^{package}\.", "", text)
            head = re.split(r"[(\s]", text, maxsplit=1)[0]
            pieces = [p.strip() for p in text.split("/")] if "." not in head and "/" in text else [text]
            for piece in pieces:
                match = re.match(r"(\w+)", piece)
                if match:
                    names.add(match.group(1))
    return names - {"name"}  # the header row


def test_reader_reads_a_row():
    body = ("| name | what |\n|---|---|\n| `tx.optim.adamw / adam`, `tx.optim.LR_SCHEDULES` | x |\n"
            "| `tx.collectives.psum / pmean` | y |\n| `@tx.step_fn` | z |\n")
    assert documented_names("optim", body) == {"adamw", "adam", "LR_SCHEDULES", "collectives", "step_fn"}


@pytest.mark.parametrize("package", PACKAGES)
def test_all_is_what_the_docs_list(package):
    module = importlib.import_module(f"titanax.{package}")
    assert package in SECTIONS, f"docs/api.md has no section ending in `titanax.{package}`"
    documented = documented_names(package, SECTIONS[package])
    exported = set(module.__all__)
    assert not documented - exported, f"documented but not in titanax.{package}.__all__: {sorted(documented - exported)}"
    assert not exported - documented, f"exported by titanax.{package} but not documented: {sorted(exported - documented)}"
    missing = [name for name in exported if not hasattr(module, name)]
    assert not missing, f"titanax.{package}.__all__ names what it lacks: {missing}"


def test_every_tx_name_on_the_page_is_exported_and_every_export_is_on_the_page():
    named = set(re.findall(r"\btx\.(\w+)", API))
    packages = set(re.findall(r"\btitanax\.(\w+)", API))
    exported = set(titanax.__all__) - {"__version__"}
    assert not named - exported, f"docs/api.md uses tx.X that titanax does not export: {sorted(named - exported)}"
    unnamed = exported - named - packages
    assert not unnamed, f"titanax exports what docs/api.md never names (tx.X or titanax.X): {sorted(unnamed)}"
