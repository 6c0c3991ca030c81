"""torchrun scale-out: shard and reassembly helpers, and real 2-rank runs on CPU (gloo).

The torchrun runs are subprocesses (`python -m torch.distributed.run --standalone`,
which picks a free port); each rank's output goes to its own log file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import huggingface_hub  # noqa: F401
import peft  # noqa: F401
import pytest
import torch
import transformers  # noqa: F401
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_dpo import evaluate
from pytest_dpo.distributed import (
    RankFailed,
    World,
    reassemble,
    shard_positions,
    world_from_env,
)
from pytest_dpo.options import ConfigError
from pytest_dpo.results import PerExample, SequenceScores

from .fixture_paths import BASE, EVAL_STANDARD, FULL_RUN

pytest_plugins = ["pytester"]
# The heavy libraries above are imported before any in-process pytester run (see tests/test_plugin.py).

TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def scores_of(values: torch.Tensor) -> SequenceScores:
    """A `SequenceScores` whose every column is derived from `values`, so misplaced rows show."""
    columns = {}
    for offset, column in enumerate(fields(SequenceScores)):
        integer = column.name.endswith(("tokens", "top1"))
        columns[column.name] = (values * 10 + offset).to(torch.int64 if integer else torch.float32)
    return SequenceScores(**columns)


def take(scores: SequenceScores, positions: list[int]) -> SequenceScores:
    index = torch.tensor(positions, dtype=torch.long)
    return SequenceScores(**{column.name: getattr(scores, column.name)[index] for column in fields(scores)})


@settings(deadline=None, max_examples=60)
@given(lengths=st.lists(st.integers(1, 4096), max_size=60), world_size=st.integers(1, 9))
def test_shards_cover_every_row_once_and_reassemble_in_eval_set_order(lengths: list[int], world_size: int) -> None:
    shards = [shard_positions(lengths, rank, world_size) for rank in range(world_size)]
    assert sorted(position for shard in shards for position in shard) == list(range(len(lengths)))
    assert all(shard == sorted(shard) for shard in shards)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    # Dealt out by length: no rank's longest row is shorter than the next rank's.
    longest = [max((lengths[p] for p in shard), default=0) for shard in shards]
    assert longest == sorted(longest, reverse=True)

    whole = scores_of(torch.arange(len(lengths)))
    merged = reassemble([(shard, take(whole, shard)) for shard in shards], len(lengths))
    for column in fields(SequenceScores):
        assert torch.equal(getattr(merged, column.name), getattr(whole, column.name)), column.name


def test_reassembly_refuses_shards_that_overlap() -> None:
    whole = scores_of(torch.arange(5))
    with pytest.raises(RankFailed, match="read different eval sets or tokenizers"):
        reassemble([([0, 1, 2], take(whole, [0, 1, 2])), ([2, 3, 4], take(whole, [2, 3, 4]))], 5)


def test_world_comes_from_torchruns_environment() -> None:
    assert world_from_env({}) is None
    assert world_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    env = {"WORLD_SIZE": "4", "RANK": "5", "LOCAL_RANK": "1", "MASTER_ADDR": "node-1", "MASTER_PORT": "29500"}
    world = world_from_env(env)
    assert world == World(rank=5, world_size=4, local_rank=1) and not world.is_main
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=2 is set but not LOCAL_RANK, MASTER_PORT: launch pytest with `torchrun"):
        world_from_env({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "localhost"})
    with pytest.raises(ConfigError, match="RANK='first' is not a whole number"):
        world_from_env({**env, "RANK": "first"})


def test_xdist_under_torchrun_is_a_usage_error(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    pytester.makepyfile(test_x="def test_x(dpo_result):\n    pass\n")
    result = pytester.runpytest("-n", "2", f"--dpo-checkpoint={FULL_RUN}/checkpoint-2", f"--dpo-eval-set={EVAL_STANDARD}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: pytest-xdist (-n / --dist) cannot run under torchrun (WORLD_SIZE=2)*Drop -n*"])


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `args` (a module and its arguments) on 2 local ranks; each rank's output lands in cwd/logs."""
    env = {name: value for name, value in os.environ.items() if name not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["--redirects", "3", "--log-dir", "logs", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def rank_output(cwd: Path, rank: int) -> str:
    (log,) = (cwd / "logs").glob(f"*/attempt_0/{rank}/stdout.log")
    return log.read_text()


COLLECTIVES = """
    import json, os
    import torch
    from pytest_dpo.distributed import RankFailed, world_from_env
    from dataclasses import fields
    from pytest_dpo.results import SequenceScores, TokenStatistics

    world = world_from_env()
    world.start()
    out = {"main": world.on_main(lambda: f"rank {world.rank} computed this")}

    def fail_on_rank_1(positions):
        if world.rank == 1:
            raise ValueError("out of memory, say")
        values = torch.tensor(positions["eval"], dtype=torch.float32)
        statistics = {field.name: values for field in fields(TokenStatistics)}
        return {"eval": {"policy": SequenceScores(values, values, **statistics)}}

    try:
        world.score_parts({"eval": [3, 1, 2, 5, 4]}, fail_on_rank_1)
    except Exception as error:
        out["shards"] = f"{type(error).__name__}: {error}"

    def refuse():
        raise RuntimeError("lock drift")

    try:
        world.on_main(refuse)
    except RuntimeError as error:
        out["on_main"] = str(error)
    world.stop()
    with open(f"rank-{world.rank}.json", "w") as handle:
        json.dump(out, handle)
"""


def test_a_failing_rank_fails_every_rank_instead_of_leaving_them_waiting(tmp_path: Path) -> None:
    (tmp_path / "collectives.py").write_text(textwrap.dedent(COLLECTIVES))
    ran = torchrun(["collectives.py"], tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["main"] for rank in ranks] == ["rank 0 computed this"] * 2
    assert ranks[0]["shards"] == "RankFailed: scoring failed on rank 1: ValueError: out of memory, say"
    assert ranks[1]["shards"] == "ValueError: out of memory, say"
    assert [rank["on_main"] for rank in ranks] == ["lock drift"] * 2


RELEASE_TESTS = """
    from pytest_dpo import assert_margin_positive

    def test_margin(dpo_result):
        assert_margin_positive(dpo_result)
"""

# Each rank writes the verdicts it announces and its own exit status into files named after its rank.
RANK_RECORDER = """
    import json, os, pathlib
    import pytest

    RANK = os.environ["RANK"]

    def pytest_dpo_checkpoint_verdict(checkpoint, verdict, result):
        with pathlib.Path(f"verdicts-{RANK}.jsonl").open("a") as handle:
            handle.write(json.dumps({"checkpoint": checkpoint.name, "passed": verdict.passed, "summary": verdict.summary}) + "\\n")

    @pytest.hookimpl(wrapper=True)
    def pytest_sessionfinish(session):
        yield
        pathlib.Path(f"exit-{RANK}").write_text(str(int(session.exitstatus)))
"""


def test_two_ranks_score_halves_and_agree_with_a_single_process(tmp_path: Path) -> None:
    rows = EVAL_STANDARD.read_text().splitlines()[:23]
    (tmp_path / "eval.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "test_release.py").write_text(textwrap.dedent(RELEASE_TESTS))
    (tmp_path / "conftest.py").write_text(textwrap.dedent(RANK_RECORDER))
    options = [
        f"--dpo-checkpoint={FULL_RUN}", f"--dpo-reference={BASE}", "--dpo-eval-set=eval.jsonl",
        "--dpo-report=report", "--dpo-save-dir=released", "--dpo-cache-dir=cache",
    ]
    ran = torchrun(["-m", "pytest", "-p", "no:cacheprovider", *options], tmp_path)

    # checkpoint-2's margin is negative: rank 0 (and so torchrun) fails; rank 1 leaves the verdict to rank 0.
    assert ran.returncode == 1, ran.stderr[-3000:]
    assert [(tmp_path / f"exit-{rank}").read_text() for rank in (0, 1)] == ["1", "0"]
    verdicts = [(tmp_path / f"verdicts-{rank}.jsonl").read_text() for rank in (0, 1)]
    assert verdicts[0] == verdicts[1]
    assert [json.loads(line)["passed"] for line in verdicts[0].splitlines()] == [False, True, True]

    main, other = rank_output(tmp_path, 0), rank_output(tmp_path, 1)
    assert "1 failed, 2 passed" in main and "1 failed, 2 passed" in other
    assert "saved checkpoint-4 into released/checkpoint-4" in main and "DPO checkpoints" in main
    assert "saved" not in other and "DPO checkpoints" not in other and "wrote" not in other
    assert sorted(path.name for path in (tmp_path / "released").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert (tmp_path / "dpo.lock").exists()

    # Rank 0 cached the gathered arrays of all 23 rows: three policies and the shared reference.
    entries = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(entries) == 4
    from safetensors.torch import load_file

    assert {len(load_file(entry)["chosen_logps"]) for entry in entries} == {23}

    report = json.loads((tmp_path / "report" / "dpo_report.json").read_text())
    per_example = json.loads((tmp_path / "report" / "dpo_per_example.json").read_text())
    assert report["eval_set"]["rows"] == 23
    for entry in report["checkpoints"]:
        single = evaluate(FULL_RUN / entry["id"], tmp_path / "eval.jsonl", reference=BASE, cache_dir=tmp_path / "single")
        for name, value in single.metrics.items():
            assert entry["metrics"][name] == pytest.approx(value, abs=1e-5), name
        gathered = PerExample.from_dict(per_example[entry["id"]])
        for column in fields(PerExample):
            assert torch.allclose(getattr(gathered, column.name).double(), getattr(single.per_example, column.name).double(), atol=1e-5), column.name
