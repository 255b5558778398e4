"""Every ```python block in docs/ runs, in order, one fresh interpreter per page."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

DOCS = pathlib.Path(__file__).parent.parent / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
# the README's notebook snippet runs as written, like every page's blocks
PAGES = sorted(p for p in DOCS.glob("*.md") if BLOCK.search(p.read_text())) + [DOCS.parent / "README.md"]


def test_docs_have_runnable_pages():
    assert {p.name for p in PAGES} >= {"quickstart.md", "concepts.md"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_code_blocks_run(page, tmp_path):
    blocks = BLOCK.findall(page.read_text())
    script = tmp_path / f"{page.stem}.py"
    script.write_text("\n\n".join(blocks))
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, f"{page.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
