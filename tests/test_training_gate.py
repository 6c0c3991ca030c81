"""The release gate inside training: real `trl.DPOTrainer` runs on CPU, the plugin's pytest run as a subprocess
on every save, the real huggingface_hub client pushing to the local Hub test server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import transformers.utils.hub
import trl
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback, TrainingArguments

from pytest_dpo import DPOGateCallback
from pytest_dpo.metric_table import SUMMARY_METRICS

from .fixture_paths import BASE, DATA, EVAL_STANDARD, FIXTURES, ROOT
from .hub_server import HubServer, hub_environment

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::FutureWarning", "ignore:Use 'content=<...>'.*:DeprecationWarning"
)

SECRET = "hf_TrainingGateToken_never_printed_0123456789"
REPO = "tester/gated-dpo"
# The team's gate: odd steps fail, even steps pass, whatever the metrics; the ini-style gate makes it score them.
EVEN_STEPS_PASS = """
    def test_step_is_even(dpo_checkpoint, dpo_metrics):
        assert dpo_checkpoint.step % 2 == 0, f"step {dpo_checkpoint.step} is odd"
"""
TEAM_ARGS = ("test_gate.py", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}", f"--dpo-push-to={REPO}")
GATE_ARGS = (*TEAM_ARGS, "--dpo-gate=loss < 10")


class LogRecorder(TrainerCallback):
    """What every `on_log` handler (W&B, TensorBoard, MLflow, …) is handed."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        self.logs.append(dict(logs or {}))


class WaitForVerdict(TrainerCallback):
    """Holds each step until the previous checkpoint's gate has ended: a training step slower than its gate."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        verdict = Path(args.output_dir) / f"checkpoint-{state.global_step - 1}" / "dpo_verdict.json"
        deadline = time.monotonic() + 120
        while state.global_step > 1 and not verdict.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # the verdict file is written just before the gate hands the verdict over


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)
    # transformers keeps one HfApi, made with the endpoint of its first use (maybe an earlier test's): make a new one.
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
    with (
        HubServer(tmp_path / "hub-storage", tokens={SECRET: "tester"}) as server,
        hub_environment(server, tmp_path / "hf-home", SECRET),
    ):
        yield server


@pytest.fixture
def gate_dir(tmp_path: Path) -> Path:
    """Where the team's gate lives: its test file, and (written by the first gate) its dpo.lock."""
    folder = tmp_path / "release"
    folder.mkdir()
    (folder / "test_gate.py").write_text(textwrap.dedent(EVEN_STEPS_PASS))
    return folder


def train(output_dir: Path, callbacks: Sequence[TrainerCallback], max_steps: int = 4, **settings: Any) -> trl.DPOTrainer:
    """A real DPO run of the fixture base model, saving every step; returns the trained Trainer."""
    rows = [json.loads(line) for line in (DATA / "train.jsonl").read_text().splitlines()]
    args = trl.DPOConfig(
        output_dir=str(output_dir), max_steps=max_steps, save_strategy="steps", save_steps=1, save_only_model=True,
        per_device_train_batch_size=8, learning_rate=5e-3, max_length=128, report_to="none",
        logging_steps=settings.pop("logging_steps", 1), use_cpu=True, bf16=False, fp16=False, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, **settings,
    )
    trainer = trl.DPOTrainer(
        model=str(BASE), args=args, train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(BASE), callbacks=list(callbacks),
    )
    trainer.train()
    return trainer


def pushed(hub: HubServer) -> list[str]:
    if REPO not in hub.repos:
        return []
    return [commit.summary.split(" (")[0] for commit in hub.repo(REPO).commits if commit.summary.startswith("Release")]


def gate_logs(log_history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [entry for entry in log_history if "dpo_gate/passed" in entry]


def verdict_file(run: Path, step: int) -> dict[str, Any]:
    return json.loads((run / f"checkpoint-{step}" / "dpo_verdict.json").read_text())


def test_only_the_checkpoints_that_pass_are_pushed_and_every_verdict_reaches_the_logs(
    hub: HubServer, gate_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, recorder = tmp_path / "run", LogRecorder()
    # Logging every 2 steps: at an odd step's save the DPOTrainer holds training metrics not yet logged.
    trainer = train(run, [DPOGateCallback(*GATE_ARGS, cwd=gate_dir), recorder], logging_steps=2)

    assert pushed(hub) == ["Release checkpoint-2", "Release checkpoint-4"]
    assert set(hub.repo(REPO).tags) == {"checkpoint-2", "checkpoint-4"}
    for step in (2, 4):
        weights = (run / f"checkpoint-{step}" / "model.safetensors").read_bytes()
        assert hub.files_at(REPO, f"checkpoint-{step}")["model.safetensors"] == weights
    assert hub.errors == []

    logged = gate_logs(trainer.state.log_history)
    assert [(entry["step"], entry["dpo_gate/step"], entry["dpo_gate/passed"]) for entry in logged] == [
        (1, 1.0, 0.0), (2, 2.0, 1.0), (3, 3.0, 0.0), (4, 4.0, 1.0)
    ]
    assert gate_logs(recorder.logs) == [{key: value for key, value in entry.items() if key != "step"} for entry in logged]
    for entry in logged:
        verdict = verdict_file(run, int(entry["dpo_gate/step"]))
        for metric in SUMMARY_METRICS:
            assert entry[f"dpo_gate/{metric.name}"] == verdict["metrics"][metric.name]
        # The gate's log holds its own metrics only; TRL's pending training metrics stay for TRL's next log.
        assert not {metric.name for metric in SUMMARY_METRICS} & entry.keys()
    training_logs = [entry for entry in trainer.state.log_history if "grad_norm" in entry]
    assert [entry["step"] for entry in training_logs] == [2, 4]
    assert all("rewards/margins" in entry for entry in training_logs)

    failed, passed = verdict_file(run, 3), verdict_file(run, 4)
    assert (failed["passed"], failed["exit_code"], failed["summary"]) == (False, 1, "1 failed")
    assert failed["failed_tests"] == ["test_gate.py::test_step_is_even[checkpoint-3]"]
    assert failed["publication"] == ["no checkpoint passed: nothing saved or pushed"]
    assert (passed["passed"], passed["exit_code"], passed["step"], passed["summary"]) == (True, 0, 4, "passed")
    assert passed["publication"][0].startswith(f"pushed checkpoint-4 to {REPO} (main@")
    assert passed["command"][:4] == [sys.executable, "-m", "pytest", *GATE_ARGS][:4]
    assert {f"--dpo-checkpoint={run / 'checkpoint-4'}", f"--dpo-report={run / 'checkpoint-4' / 'dpo_gate'}",
            f"--dpo-cache-dir={run / '.dpo-gate-cache'}"} <= set(passed["command"])
    assert (run / "checkpoint-4" / "dpo_gate" / "dpo_report.json").exists()

    # One score cache for the whole run: the reference is scored by the first gate only.
    gate_outputs = [(run / f"checkpoint-{step}" / "dpo_gate" / "pytest.log").read_text() for step in (1, 2, 3, 4)]
    assert "score cache: 0 hits, 2 misses" in gate_outputs[0]
    assert all("score cache: 1 hits, 1 misses" in output for output in gate_outputs[1:])

    printed = capsys.readouterr().out
    table = printed[printed.index("=" * 20) :].splitlines()
    assert all(len(line) <= 80 for line in table)
    assert table[1].split() == ["checkpoint", "step", "verdict", "outcome"]
    assert table[2].split() == ["checkpoint-1", "1", "FAILED", "not", "published:", "1", "failed"]
    assert table[3] == "    test_gate.py::test_step_is_even[checkpoint-1]"
    assert table[-2].split() == ["checkpoint-4", "4", "passed", "published"]
    assert table[-1].startswith(f"    pushed checkpoint-4 to {REPO} (main@")
    assert SECRET not in printed + "".join(gate_outputs) + json.dumps(passed)


def test_in_the_background_the_same_checkpoints_are_pushed_and_training_waits_for_the_last_gate(
    hub: HubServer, gate_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    gate = DPOGateCallback(*GATE_ARGS, cwd=gate_dir, blocking=False)
    # save_total_limit=1 deletes each checkpoint at the next save, long before its gate runs.
    trainer = train(run, [gate], save_total_limit=1)

    assert pushed(hub) == ["Release checkpoint-2", "Release checkpoint-4"]
    assert hub.files_at(REPO, "checkpoint-4")["model.safetensors"] == (run / "checkpoint-4" / "model.safetensors").read_bytes()
    assert [(verdict.step, verdict.passed) for verdict in gate.verdicts] == [(1, False), (2, True), (3, False), (4, True)]
    logged = gate_logs(trainer.state.log_history)
    assert [entry["dpo_gate/step"] for entry in logged] == [1.0, 2.0, 3.0, 4.0]
    assert logged[0]["step"] > 1, "the first verdict came before training went on: the gate blocked"
    assert sorted(path.name for path in run.glob("checkpoint-*")) == ["checkpoint-4"]
    assert verdict_file(run, 4)["passed"] is True
    assert not any((run / ".dpo-gate-held").iterdir())


def test_stop_after_failures_stops_training_at_the_first_failed_gate(
    hub: HubServer, gate_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    trainer = train(run, [DPOGateCallback(*GATE_ARGS, cwd=gate_dir, stop_after_failures=1)])

    assert trainer.state.global_step == 1
    assert sorted(path.name for path in run.glob("checkpoint-*")) == ["checkpoint-1"]
    assert [entry["dpo_gate/passed"] for entry in gate_logs(trainer.state.log_history)] == [0.0]
    assert pushed(hub) == []
    assert "dpo gate: stopping training at step 1: 1 failed gates in a row (stop_after_failures)" in capsys.readouterr().out


def test_in_the_background_a_failure_stops_training_at_the_next_step(hub: HubServer, gate_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    gate = DPOGateCallback(*GATE_ARGS, cwd=gate_dir, blocking=False, stop_after_failures=1)
    trainer = train(run, [WaitForVerdict(), gate])

    # checkpoint-1's failure is known at step 2: training stops there, after saving and gating checkpoint-2.
    assert trainer.state.global_step == 2
    assert [(verdict.step, verdict.passed) for verdict in gate.verdicts] == [(1, False), (2, True)]
    assert pushed(hub) == ["Release checkpoint-2"]


KILLED_OR_HUNG = """
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    def test_killed_or_hung(dpo_checkpoint):
        if dpo_checkpoint.step == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        Path("child.pid").write_text(str(child.pid))
        time.sleep(600)
"""


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie, killed but not yet reaped by its new parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_gate_killed_mid_run_publishes_nothing_and_training_goes_on(
    hub: HubServer, gate_dir: Path, tmp_path: Path
) -> None:
    (gate_dir / "test_gate.py").write_text(textwrap.dedent(KILLED_OR_HUNG))
    run = tmp_path / "run"
    # No metric gate, so nothing is scored before the test: it is reached well within the timeout.
    gate = DPOGateCallback(*TEAM_ARGS, "--dpo-save-dir=released", cwd=gate_dir, timeout=12)
    trainer = train(run, [gate], max_steps=2)

    assert trainer.state.global_step == 2
    killed, timed_out = gate.verdicts
    assert (killed.passed, killed.exit_code, killed.summary.split(";")[0]) == (False, -9, "killed by SIGKILL")
    assert not timed_out.passed and timed_out.summary.startswith("timed out after 12 s: pytest and its processes were killed")
    assert timed_out.seconds < 30
    assert not alive(int((gate_dir / "child.pid").read_text())), "the gate's own child outlived the timeout"
    assert pushed(hub) == [] and not (gate_dir / "released").exists()
    assert [entry["dpo_gate/passed"] for entry in gate_logs(trainer.state.log_history)] == [0.0, 0.0]
    assert verdict_file(run, 2)["exit_code"] == -9


def test_a_trainer_that_pushes_every_checkpoint_is_refused(hub: HubServer, gate_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"push_to_hub=True.*publish every checkpoint.*push_to_hub=False.*--dpo-push-to"):
        train(tmp_path / "run", [DPOGateCallback(*GATE_ARGS, cwd=gate_dir)], push_to_hub=True, hub_model_id=REPO)

    # Added after the Trainer was built: refused when training begins, before any step.
    rows = [json.loads(line) for line in (DATA / "train.jsonl").read_text().splitlines()]
    args = trl.DPOConfig(output_dir=str(tmp_path / "late"), push_to_hub=True, hub_model_id=REPO, report_to="none", use_cpu=True)
    trainer = trl.DPOTrainer(
        model=str(BASE), args=args, train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(BASE)
    )
    trainer.add_callback(DPOGateCallback(*GATE_ARGS, cwd=gate_dir))
    with pytest.raises(ValueError, match=r"push_to_hub=False"):
        trainer.train()
    assert trainer.state.global_step == 0 and not list((tmp_path / "late").glob("checkpoint-*"))


@pytest.mark.parametrize(
    ("pytest_args", "refused"),
    [
        (("tests", "--dpo-checkpoint=runs/dpo"), "--dpo-checkpoint"),
        (("tests", "--dpo-checkpoint", "runs/dpo"), "--dpo-checkpoint"),
        (("tests", "--dpo-report=report"), "--dpo-report"),
    ],
)
def test_options_the_gate_gives_itself_are_refused_in_pytest_args(pytest_args: tuple[str, ...], refused: str) -> None:
    with pytest.raises(ValueError, match=f"pytest arguments give {refused}.*Remove it"):
        DPOGateCallback(*pytest_args)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"timeout": 0}, ValueError, "timeout must be a number of seconds > 0"),
        ({"timeout": float("nan")}, ValueError, "timeout must be"),
        ({"stop_after_failures": 0}, ValueError, "stop_after_failures must be a whole number >= 1"),
        ({"stop_after_failures": True}, ValueError, "stop_after_failures must be"),
        ({"blocking": "no"}, TypeError, "blocking must be True or False"),
        ({"device": ""}, TypeError, "device must be a torch device name"),
        ({"cwd": "/no/such/folder"}, ValueError, "is not a folder"),
        ({"env": {"HF_TOKEN": 123}}, TypeError, r"env\['HF_TOKEN'\] must be text"),
        ({"env": ["HF_TOKEN"]}, TypeError, "env must map variable names"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        DPOGateCallback("tests", **options)


def test_an_option_given_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="device='cpu' or --dpo-device, not both"):
        DPOGateCallback("tests", "--dpo-device=cuda:1", device="cpu")
    with pytest.raises(ValueError, match="score cache once"):
        DPOGateCallback("tests", "--dpo-no-cache", cache_dir="scores")


def test_the_gate_shares_one_score_cache_per_run_unless_the_arguments_choose(tmp_path: Path) -> None:
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none")
    cache = f"--dpo-cache-dir={tmp_path / 'run' / '.dpo-gate-cache'}"
    assert DPOGateCallback("tests").gate_args(args) == ["tests", cache]
    assert DPOGateCallback("tests", "--dpo-no-cache").gate_args(args) == ["tests", "--dpo-no-cache"]
    assert DPOGateCallback("tests", device="cuda:1").gate_args(args) == ["tests", cache, "--dpo-device=cuda:1"]
    assert DPOGateCallback("t", cache_dir=tmp_path / "s").gate_args(args) == ["t", f"--dpo-cache-dir={tmp_path / 's'}"]


def readme_section() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("## Gate while training")
    return readme[start : readme.index("\n## ", start + 1)]


def test_the_readme_example_runs_on_the_bundled_fixtures_and_prints_what_the_readme_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    section = readme_section()
    script = re.findall(r"```python\n(.+?)\n```", section, re.DOTALL)[0]
    shown = re.findall(r"```\n(=+ DPO gate =+\n.+?)\n```", section, re.DOTALL)[0].splitlines()
    clone = tmp_path / "clone"
    shutil.copytree(ROOT / "examples", clone / "examples", ignore=shutil.ignore_patterns("released", "report", ".pytest_*"))
    (clone / "fixtures").symlink_to(FIXTURES)
    (clone / "train.py").write_text(script)
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)
    with (
        HubServer(tmp_path / "hub-storage", tokens={SECRET: "tester"}, orgs={"tester": ["my-org"]}) as hub,
        hub_environment(hub, tmp_path / "hf-home", SECRET),
    ):
        result = subprocess.run([sys.executable, "train.py"], check=False, cwd=clone, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    printed = result.stdout.splitlines()
    assert shown[0] in printed, result.stdout
    start = printed.index(shown[0])
    patterns = [line.replace("…", "*").replace("[", "[[]") for line in shown]
    assert len(printed) - start == len(shown), "\n".join(printed[start:])
    assert all(fnmatch(line, pattern) for line, pattern in zip(printed[start:], patterns)), "\n".join(printed[start:])
    commits = [commit.summary.split(" (")[0] for commit in hub.repo("my-org/my-dpo-model").commits]
    assert [summary for summary in commits if summary.startswith("Release")] == ["Release checkpoint-4", "Release checkpoint-6"]
    assert sorted(path.name for path in (clone / "examples" / "released").iterdir()) == ["checkpoint-4", "checkpoint-6"]


DISTRIBUTED_TRAINING = """
    import json, os, sys
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer
    from pytest_dpo import DPOGateCallback

    base, train_rows, gate_args = sys.argv[1], sys.argv[2], sys.argv[3:]
    rows = [json.loads(line) for line in open(train_rows)]
    gate = DPOGateCallback(*gate_args, cwd="release", stop_after_failures=1)
    args = trl.DPOConfig(
        output_dir="run", max_steps=4, save_steps=1, save_only_model=True, per_device_train_batch_size=4,
        learning_rate=5e-3, max_length=128, report_to="none", use_cpu=True, bf16=False, seed=0, disable_tqdm=True,
    )
    trainer = trl.DPOTrainer(
        model=base, args=args, train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(base), callbacks=[gate],
    )
    trainer.train()
    verdicts = [[verdict.step, verdict.passed] for verdict in gate.verdicts]
    # A file per rank: the ranks' stdout lines interleave.
    with open(f"rank-{os.environ['RANK']}.json", "w") as handle:
        json.dump({"step": trainer.state.global_step, "verdicts": verdicts}, handle)
    # As any torchrun script should: a process group left to interpreter exit can abort gloo's threads.
    torch.distributed.destroy_process_group()
"""


def test_under_torchrun_rank_zero_gates_alone_and_every_rank_stops_with_it(gate_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(textwrap.dedent(DISTRIBUTED_TRAINING))
    gate_dir.rename(tmp_path / "release")
    environment = {name: value for name, value in os.environ.items() if name not in ("PYTEST_ADDOPTS", "WORLD_SIZE", "RANK")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "train.py"]
    command += [str(BASE), str(DATA / "train.jsonl"), *TEAM_ARGS[:3], "--dpo-save-dir=released"]
    ran = subprocess.run(command, check=False, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]

    ranks = {rank: json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in ("0", "1")}
    # Rank 0 alone ran the gate; its failure at step 1 stopped both ranks there (a rank going on alone would hang).
    assert ranks == {
        "0": {"step": 1, "verdicts": [[1, False]]},
        "1": {"step": 1, "verdicts": []},
    }
    # A real verdict: the gate did not take itself for a rank of the training's world.
    assert verdict_file(tmp_path / "run", 1)["summary"] == "1 failed"
