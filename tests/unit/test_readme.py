"""The README's shell commands run as written in the fresh shell its quickstart starts from: every
program is `python3` or lives in the `.venv` command 1 creates (a bare `titanax` is not on PATH)."""

from __future__ import annotations

import pathlib
import re
import shlex

README = pathlib.Path(__file__).parents[2] / "README.md"
BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.M | re.S)
# Inline commands meant to be run name a file (`titanax run examples/...`); bare mentions of a
# subcommand in prose (`titanax describe` compiles ...) are names, not commands.
INLINE = re.compile(r"`((?:\.venv/bin/|python3 |titanax )[^`]* [^`]*/[^`]*)`")


def commands() -> list[str]:
    text = README.read_text()
    lines = [line.split("#")[0].strip() for block in BASH_BLOCK.findall(text) for line in block.splitlines()]
    return [line for line in lines if line] + INLINE.findall(text)


def programs(command: str) -> list[str]:
    """The program of each command in a line: after `&&`, and the one `titanax launch` runs after `--`."""
    found = []
    for part in command.split("&&"):
        words = shlex.split(part)
        found.append(words[0])
        if "--" in words[:-1] and words[0].endswith("titanax") and "launch" in words:
            found.append(words[words.index("--") + 1])
    return found


def test_every_readme_command_names_a_program_a_fresh_shell_has():
    found = [(c, p) for c in commands() for p in programs(c)]
    assert len(found) >= 8, found  # the two quickstart lines, describe, launch and the GPT example
    bad = [(c, p) for c, p in found if p != "python3" and not p.startswith(".venv/bin/")]
    assert not bad, bad
