"""Random SIGKILLs during scoring, saving and pushing leave nothing half-done that anyone would trust.

One Hub test server lives through 20 killed runs of the plugin on the bundled fixture run, with one save
dir and one score cache, so their state accumulates as it does where runs keep getting killed. After every
kill: no partial checkpoint sits in the save dir under its final name, every cache entry under its final
name is whole, and the Hub repo holds only whole commits of passing checkpoints. At the end a clean run
over that state gives the numbers of a run without cache and completes the release.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from .fixture_paths import BASE, EVAL_STANDARD, FULL_RUN, ROOT
from .hub_server import HubServer, hub_environment

pytestmark = pytest.mark.slow  # about a minute on an idle machine; CI runs it

SEED = 8
KILLS = 20
# The first kills land between 0.5 s and the end of scoring, while the score cache is still filling; the
# others after the last verdict, half in [verdict, first Hub request] (building the card, saving) and half
# in [first, last Hub request] (pushing), as measured in a full run without cache.
SCORING_KILLS = 8
MAX_ATTEMPTS = 32
RUN_TIMEOUT = 300.0
TOKEN = "hf_kill_test_token"
REPO = "tester/dpo-killed"
SCRATCH_REPO = "tester/dpo-measured"
PASSING = ("checkpoint-4", "checkpoint-6")
FAILING = "checkpoint-2"
EVAL_ROWS = 24
GENERATED = {"README.md", "dpo_eval.json", ".eval_results/dpo.yaml"}
INI = f"""
[pytest]
dpo_eval_set = {EVAL_STANDARD}
dpo_reference = {BASE}
dpo_gates =
    rewards/accuracies >= 0.6
    rewards/margins > 0
    loss <= 0.75
"""
# A team's conftest announcing verdicts; its last line marks the moment publishing starts.
ANNOUNCER = """
def pytest_dpo_checkpoint_verdict(checkpoint, verdict, result):
    print(f"verdict {checkpoint.name}: {verdict.summary}", flush=True)
"""
LAST_VERDICT = f"verdict {PASSING[-1]}: "


class TimedHub(HubServer):
    """The Hub test server, noting when each request arrived."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrivals: list[float] = []

    def _handle(self, request: Any) -> Any:
        self.arrivals.append(time.monotonic())
        return super()._handle(request)


class PluginRun:
    """pytest with the plugin in a subprocess, noting from its output when the last verdict was announced."""

    def __init__(self, project: Path, args: list[str]) -> None:
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
            cwd=project,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self.judged_at: float | None = None
        self._judged_or_ended = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if LAST_VERDICT in line:
                self.judged_at = time.monotonic()
                self._judged_or_ended.set()
        self._judged_or_ended.set()

    def kill_after(self, delay: float, *, from_verdict: bool) -> bool:
        """SIGKILL the run `delay` s after its last verdict, or `delay` s after its start but no later than its last
        verdict (scoring is over by then). False if the run ended first."""
        if from_verdict:
            self._judged_or_ended.wait(RUN_TIMEOUT)
            if self.judged_at is None:
                self.finish()
                return False
            deadline = self.judged_at + delay
        else:
            self._judged_or_ended.wait(max(self.started + delay - time.monotonic(), 0.0))
            deadline = time.monotonic()
        try:
            self.process.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGKILL)
        self.finish()
        return self.process.returncode == -signal.SIGKILL

    def finish(self) -> str:
        self.process.wait(timeout=RUN_TIMEOUT)
        self._reader.join(timeout=RUN_TIMEOUT)
        return "".join(self.lines)


def files_under(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


Releases = dict[str, dict[str, bytes]]


def assert_whole_release(files: dict[str, bytes], checkpoint: str, expected: Releases, where: str) -> None:
    """`files` hold a passing checkpoint's whole release: its own files unchanged, card and report naming it."""
    assert checkpoint in PASSING, f"{where}: {checkpoint} did not pass its tests, yet it was published"
    missing = expected[checkpoint].keys() - files.keys()
    assert not missing, f"{where}: {sorted(missing)} missing"
    for name, content in expected[checkpoint].items():
        if name not in GENERATED:
            assert files[name] == content, f"{where}: {name} differs from {checkpoint}'s"
    report = json.loads(files["dpo_eval.json"])
    truth = json.loads(expected[checkpoint]["dpo_eval.json"])
    assert (report["checkpoint"], report["verdict"]["passed"]) == (checkpoint, True), where
    assert report["metrics"] == truth["metrics"], f"{where}: metrics differ from a run without cache"


def assert_save_dir_holds_only_whole_checkpoints(save_dir: Path, expected: Releases, when: str) -> None:
    """(a) Catches a checkpoint written in place, or renamed into place before its last file was written."""
    for folder in save_dir.iterdir() if save_dir.exists() else []:
        if not folder.name.startswith("."):  # hidden staging folders are never taken for a release
            assert_whole_release(files_under(folder), folder.name, expected, f"{when}: saved {folder.name}")


def assert_cache_entries_are_whole(cache_dir: Path, when: str) -> None:
    """(b) Catches an entry written in place: a kill leaves it truncated under the name the next run reads."""
    for entry in cache_dir.glob("*.safetensors") if cache_dir.exists() else []:
        with safe_open(str(entry), framework="pt") as handle:
            rows = {len(handle.get_tensor(name)) for name in handle.keys()}
        assert rows == {EVAL_ROWS}, f"{when}: cache entry {entry.name} holds {rows} rows"


def assert_remote_holds_only_whole_passing_commits(hub: HubServer, expected: Releases, when: str) -> None:
    """(c) Catches a push of a failing checkpoint, a release split over commits, a tag on a wrong commit."""
    if not any(repo.repo_id == REPO for repo in hub.repos.values()):
        return
    repo = hub.repo(REPO)
    for commit in repo.commits:
        if commit.parent is not None:  # not the empty commit that created the repo
            checkpoint = commit.summary.split(" ")[1]
            assert_whole_release(dict(commit.files), checkpoint, expected, f"{when}: commit '{commit.summary}'")
    for tag, oid in repo.tags.items():
        assert_whole_release(dict(repo.commit(oid).files), tag, expected, f"{when}: tag {tag}")


def staging_folders(save_dir: Path) -> set[str]:
    return {path.name for path in save_dir.glob(".*")} if save_dir.exists() else set()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[TimedHub]:
    with TimedHub(tmp_path / "hub-storage", tokens={TOKEN: "tester"}) as server:
        with hub_environment(server, tmp_path / "hf-home", TOKEN):
            yield server


def test_random_kills_leave_no_partial_save_no_bad_cache_entry_and_only_whole_passing_commits(
    tmp_path: Path, hub: TimedHub
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text(INI)
    (project / "conftest.py").write_text(ANNOUNCER)
    shutil.copy(ROOT / "examples" / "test_release.py", project / "test_release.py")
    checkpoints = f"--dpo-checkpoint={FULL_RUN}"
    state = [checkpoints, "--dpo-save-dir=released", "--dpo-cache-dir=scores", f"--dpo-push-to={REPO}"]
    save_dir = project / "released"

    # A full run without cache, into a scratch folder and repo: the timeline the delays are drawn in, and the truth.
    first_request = len(hub.arrivals)
    scratch = ["--dpo-save-dir=measured", f"--dpo-push-to={SCRATCH_REPO}", "--dpo-report=truth"]
    measured = PluginRun(project, [checkpoints, "--dpo-no-cache", *scratch])
    output = measured.finish()
    assert measured.process.returncode == pytest.ExitCode.TESTS_FAILED and measured.judged_at, output
    assert len(hub.arrivals) > first_request, output
    scoring_ends = measured.judged_at - measured.started
    saving_ends = hub.arrivals[first_request] - measured.judged_at
    pushing_ends = hub.arrivals[-1] - measured.judged_at
    expected = {name: files_under(project / "measured" / name) for name in PASSING}

    rng = random.Random(SEED)
    kills, attempts, log = 0, 0, []
    while kills < KILLS and attempts < MAX_ATTEMPTS:
        attempts += 1
        if kills < SCORING_KILLS:
            stratum, (low, high), part, parts = "scoring", (0.5, scoring_ends), kills, SCORING_KILLS
        else:
            stratum = ("saving", "pushing")[kills % 2]
            low, high = (0.0, saving_ends) if stratum == "saving" else (saving_ends, pushing_ends)
            part, parts = (kills - SCORING_KILLS) // 2, (KILLS - SCORING_KILLS) // 2
        # Each kill in the next slice of its window, so the kills sweep it (the state moves on as they do).
        delay = low + (part + rng.random()) * (high - low) / parts
        requests, staged = len(hub.arrivals), staging_folders(save_dir)
        run = PluginRun(project, state)
        killed = run.kill_after(delay, from_verdict=stratum != "scoring")
        if run.judged_at is not None:
            scoring_ends = run.judged_at - run.started  # the cache has filled: scoring takes less time now
        requests = len(hub.arrivals) - requests
        if not killed:
            landed = "the run ended first"
        elif "= DPO publishing =" in "".join(run.lines):
            landed = "killed after publishing"
        elif requests:
            landed = f"killed while pushing, after {requests} Hub requests"
        elif staging_folders(save_dir) - staged:
            landed = "killed while saving"
        else:
            landed = "killed before saving" if run.judged_at else "killed during start-up or scoring"
        log.append(f"{stratum} kill at {delay:.2f}s: {landed}")
        when = f"after attempt {attempts} ({log[-1]})"
        assert_save_dir_holds_only_whole_checkpoints(save_dir, expected, when)
        assert_cache_entries_are_whole(project / "scores", when)
        assert_remote_holds_only_whole_passing_commits(hub, expected, when)
        kills += killed
    print("\n".join(log))
    assert kills == KILLS, log

    # A clean run over what the kills left: cached scores equal fresh ones, and the release completes.
    final = PluginRun(project, [*state, "--dpo-report=final"])
    output = final.finish()
    assert final.process.returncode == pytest.ExitCode.TESTS_FAILED, output  # checkpoint-2 fails, nothing else
    assert "error:" not in output, output
    assert re.search(r"score cache: \d+ hits, \d+ misses, 0 rebuilt", output), output
    truth = json.loads((project / "truth" / "dpo_per_example.json").read_text())
    assert json.loads((project / "final" / "dpo_per_example.json").read_text()) == truth
    assert sorted(path.name for path in save_dir.iterdir() if not path.name.startswith(".")) == list(PASSING)
    assert_save_dir_holds_only_whole_checkpoints(save_dir, expected, "after the clean run")
    assert_remote_holds_only_whole_passing_commits(hub, expected, "after the clean run")
    assert_whole_release(hub.files_at(REPO, "main"), PASSING[-1], expected, "main after the clean run")
    assert sorted(hub.repo(REPO).tags) == list(PASSING)
    # No failing checkpoint ever left the machine, not even in a request the Hub refused.
    failing_weights = hashlib.sha256((FULL_RUN / FAILING / "model.safetensors").read_bytes()).hexdigest()
    assert failing_weights not in hub.lfs_objects
    failing_release = f"Release {FAILING}".encode()
    assert not [body for body in hub.request_bodies if failing_weights.encode() in body or failing_release in body]
