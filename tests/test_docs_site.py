"""The documentation site (mkdocs.yml): every page of docs/ is in its nav, ``mkdocs build --strict``
passes, and the API reference generated from the docstrings documents every public name."""

from __future__ import annotations

import html.parser
import importlib
import importlib.util
import inspect
import os
import pathlib
import subprocess
import sys

import pytest
import yaml

import titanax

ROOT = pathlib.Path(__file__).parent.parent
DOCS = ROOT / "docs"
CONFIG = ROOT / "mkdocs.yml"
# One reference page per public package: docs/reference/<name>.md documents titanax.<name>.
PACKAGES = ("titanax", "runtime", "parallel", "nn", "exec", "optim", "data", "io", "logging",
            "profiling", "config", "planner", "exceptions", "cli")
NEEDS = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def _module(package: str):
    return importlib.import_module("titanax" if package == "titanax" else f"titanax.{package}")


def _nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _nav_pages(value)]
    return [page for item in nav for page in _nav_pages(item)]


def test_nav_lists_every_page_of_docs():
    nav = _nav_pages(yaml.safe_load(CONFIG.read_text())["nav"])
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if "_ext" not in p.parts}
    assert not pages - set(nav), f"docs pages missing from nav in mkdocs.yml: {sorted(pages - set(nav))}"
    assert not set(nav) - pages, f"mkdocs.yml nav names pages that do not exist: {sorted(set(nav) - pages)}"
    assert len(nav) == len(set(nav)), "mkdocs.yml nav lists a page twice"


def test_every_public_package_has_a_reference_page():
    exported = {name for name in titanax.__all__ if getattr(getattr(titanax, name), "__name__", "") == f"titanax.{name}"}
    assert exported <= set(PACKAGES), f"packages of titanax.__all__ without a page: {exported - set(PACKAGES)}"
    for package in PACKAGES:
        page = DOCS / "reference" / f"{package}.md"
        assert page.exists(), f"no API reference page {page.relative_to(ROOT)}"
        assert f"::: {_module(package).__name__}\n" in page.read_text(), f"{page.name} does not render its package"


class _Ids(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.ids.update(value for name, value in attrs if name == "id" and value)


def _ids(page: pathlib.Path) -> set[str]:
    parser = _Ids()
    parser.feed(page.read_text())
    return parser.ids


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"the docs site needs {', '.join(missing)}: pip install -e '.[docs]' (or '.[dev]')")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(CONFIG),
                             "--site-dir", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-3000:]}\n{result.stderr[-8000:]}"
    return out


@pytest.fixture(scope="module")
def reference_ids(site) -> dict[str, set[str]]:
    """The element ids of each built reference page, by package."""
    return {package: _ids(site / "reference" / package / "index.html") for package in PACKAGES}


def test_site_builds_strict(site):
    assert (site / "index.html").exists()
    for page in DOCS.glob("*.md"):
        built = site / ("index.html" if page.stem == "index" else f"{page.stem}/index.html")
        assert built.exists(), f"{page.name} was not built"


@pytest.mark.parametrize("package", PACKAGES)
def test_reference_documents_every_public_name(reference_ids, package):
    """Each name of the package's ``__all__`` is a heading (anchor ``titanax.<package>.<name>``) on its
    page; a package it exports is documented on its own page (anchor ``titanax.<package>``)."""
    module = _module(package)
    page_ids = reference_ids[package]
    all_ids = set().union(*reference_ids.values())
    missing = []
    for name in module.__all__:
        value = getattr(module, name)
        anchor, ids = (value.__name__, all_ids) if inspect.ismodule(value) else (f"{module.__name__}.{name}", page_ids)
        if anchor not in ids:
            missing.append(anchor)
    assert not missing, (f"the API reference lacks {missing}: a public name needs a docstring (a constant: a "
                         f"string literal on the line after it) to be documented")
