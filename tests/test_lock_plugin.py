"""The frozen eval set in a real pytest run: locked on first use, drift refused, accepted with --dpo-update-lock."""

from __future__ import annotations

import json

import huggingface_hub  # noqa: F401
import pandas as pd
import pandas.core.arrays.arrow.extension_types  # noqa: F401  (see test_the_same_rows_in_another_format_keep_the_lock)
import peft  # noqa: F401
import pytest
import torch  # noqa: F401
import transformers  # noqa: F401

from .fixture_paths import BASE, EVAL_STANDARD, FULL_RUN

pytest_plugins = ["pytester"]


def test_drifted_eval_set_is_caught_then_accepted_with_update_lock(pytester: pytest.Pytester) -> None:
    eval_set = pytester.path / "eval.jsonl"
    eval_set.write_text(EVAL_STANDARD.read_text())
    pytester.makepyfile(test_m="def test_m(dpo_metrics):\n    pass\n")
    options = [f"--dpo-checkpoint={FULL_RUN}/checkpoint-4", f"--dpo-reference={BASE}", "--dpo-eval-set=eval.jsonl"]

    first = pytester.runpytest(*options)
    first.assert_outcomes(passed=1)
    first.stdout.fnmatch_lines(["eval-set lock dpo.lock: created"])
    lock = json.loads((pytester.path / "dpo.lock").read_text())
    entry = lock["eval_sets"]["default"]
    assert entry["eval_set_path"] == "eval.jsonl" and entry["rows"] == 24

    pytester.runpytest(*options).stdout.fnmatch_lines(["eval-set lock dpo.lock: unchanged"])

    rows = eval_set.read_text().splitlines()
    edited = json.loads(rows[3])
    edited["chosen"] = "A different answer."
    rows[3] = json.dumps(edited)
    eval_set.write_text("\n".join(rows + rows[:2]) + "\n")
    drifted = pytester.runpytest(*options)
    assert drifted.ret == pytest.ExitCode.USAGE_ERROR
    drifted.stderr.fnmatch_lines(
        ["ERROR: *dpo.lock: the eval set drifted from the lock (2 rows added, 1 changed)*run again with --dpo-update-lock*"]
    )

    accepted = pytester.runpytest(*options, "--dpo-update-lock")
    accepted.assert_outcomes(passed=1)
    accepted.stdout.fnmatch_lines(["eval-set lock dpo.lock: updated"])
    pytester.runpytest(*options).stdout.fnmatch_lines(["eval-set lock dpo.lock: unchanged"])


def test_the_same_rows_in_another_format_keep_the_lock(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_m="def test_m(dpo_metrics):\n    pass\n")
    options = [f"--dpo-checkpoint={FULL_RUN}/checkpoint-4", f"--dpo-reference={BASE}"]
    pytester.runpytest(*options, f"--dpo-eval-set={EVAL_STANDARD}").stdout.fnmatch_lines(["*lock dpo.lock: created"])
    pd.read_json(EVAL_STANDARD, lines=True).to_parquet(pytester.path / "eval.parquet")
    # pandas registers its pyarrow extension types once per process; they are imported at the top of this
    # module so that pytester's module snapshot never removes and re-imports them.
    result = pytester.runpytest(*options, "--dpo-eval-set=eval.parquet")
    result.stdout.fnmatch_lines(["eval-set lock dpo.lock: unchanged"])


def test_lock_can_be_turned_off(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_m="def test_m(dpo_metrics):\n    pass\n")
    pytester.runpytest(f"--dpo-checkpoint={FULL_RUN}/checkpoint-4", f"--dpo-reference={BASE}", f"--dpo-eval-set={EVAL_STANDARD}", "--dpo-lock=none")
    assert not (pytester.path / "dpo.lock").exists()
