"""The README's main command, run as a new user types it, prints what the README shows."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest

from .fixture_paths import FIXTURES, ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def main_command() -> list[str]:
    """The pytest part of the README's first command (after the install steps)."""
    section = README[README.index("Run the main job") :]
    block = re.search(r"```bash\n(.+?)\n```", section, re.DOTALL)
    assert block is not None
    return shlex.split(block.group(1).split("&& ")[-1])


def shown_output() -> list[str]:
    """The lines of the README's output block, from the verdict table to the end."""
    section = README[README.index("The first command ends like this") :]
    block = re.search(r"```\n(.+?)\n```", section, re.DOTALL)
    assert block is not None
    return block.group(1).splitlines()


@pytest.fixture
def fresh_clone(tmp_path: Path) -> Path:
    """The files the main command reads, as a fresh clone has them: examples/ and the bundled fixtures."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples", ignore=shutil.ignore_patterns("released", "report", ".pytest_cache"))
    (tmp_path / "fixtures").symlink_to(FIXTURES)
    return tmp_path


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    assert command[0] == "pytest"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    environment.pop("PYTEST_ADDOPTS", None)
    return subprocess.run([sys.executable, "-m", "pytest", *command[1:]], cwd=cwd, capture_output=True, text=True, env=environment)


def test_the_main_command_prints_what_the_readme_shows(fresh_clone: Path) -> None:
    command = main_command()
    assert command[:2] == ["pytest", "examples"] and "--dpo-checkpoint" in command
    first = run(command, fresh_clone)
    assert first.returncode == 1, first.stdout + first.stderr
    printed = first.stdout.splitlines()
    expected = [line.replace("…", "*").replace("[", "[[]") for line in shown_output()]
    start = next(index for index, line in enumerate(printed) if line == expected[0])
    assert all(fnmatch(line, pattern) for line, pattern in zip(printed[start:], expected, strict=False)), (
        "\n".join(printed[start:])
    )
    assert len(printed) - start >= len(expected)
    assert sorted(path.name for path in (fresh_clone / "examples" / "released").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    again = run(command, fresh_clone)
    assert "score cache: 12 hits, 0 misses" in again.stdout
