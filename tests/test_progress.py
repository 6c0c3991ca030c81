"""Scoring progress: a bar per checkpoint on a terminal's stderr, nothing under -q or off a terminal."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from .fixture_paths import BASE, EVAL_STANDARD, FULL_RUN

OPTIONS = [f"--dpo-checkpoint={FULL_RUN}/checkpoint-4", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}", "-p", "no:cacheprovider"]


def run_pytest(folder: Path, *extra: str, terminal: bool) -> str:
    (folder / "test_m.py").write_text("def test_m(dpo_metrics):\n    pass\n")
    command = [sys.executable, "-m", "pytest", *OPTIONS, *extra]
    # The repository's conftest silences tqdm for the test suite itself; the user's run must not inherit that.
    env = {key: value for key, value in os.environ.items() if key != "TQDM_DISABLE"}
    if not terminal:
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=300, env=env)
        return done.stderr
    parent, child = os.openpty()
    # A new pty is 0 columns wide, and tqdm fits its bar into that: give it a terminal's 80x24.
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    process = subprocess.Popen(command, cwd=folder, stdout=subprocess.DEVNULL, stderr=child, env=env)
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(parent, 4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=300)
    os.close(parent)
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    stderr = run_pytest(tmp_path, terminal=True)
    assert "scoring checkpoint-4" in stderr and "rows/s" in stderr


@pytest.mark.parametrize(("extra", "terminal"), [((), False), (("-q",), True)], ids=["not-a-terminal", "quiet"])
def test_no_progress_bar_when_quiet_or_not_a_terminal(tmp_path: Path, extra: tuple[str, ...], terminal: bool) -> None:
    assert "scoring checkpoint-4" not in run_pytest(tmp_path, *extra, terminal=terminal)
