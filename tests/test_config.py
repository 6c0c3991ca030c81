"""`read_run_config`: each option read by its declaration, the command line over the ini file, errors naming both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_dpo.config import RunConfig, read_run_config
from pytest_dpo.options import ALL_OPTIONS, ConfigError, option_spec
from pytest_dpo.run_settings import COMMAND_LINE, INI

EMPTY_INI = {
    key: [] if spec.ini_type in ("paths", "linelist") else (False if spec.ini_type == "bool" else "")
    for spec in ALL_OPTIONS
    for key in spec.ini_keys
}


def read(options: dict[str, Any] | None = None, ini: dict[str, Any] | None = None, ini_dir: Path | None = None) -> RunConfig:
    """Options by field name, as pytest hands them over; ini values by key."""
    given = {option_spec(name).dest: value for name, value in (options or {}).items()}
    ini_values = {**EMPTY_INI, **(ini or {})}
    return read_run_config(given.get, ini_values.__getitem__, ini_dir)


def test_the_command_line_wins_over_the_ini_file() -> None:
    config = read({"push_timeout": "5", "beta": "0.2"}, {"dpo_push_timeout": "9", "dpo_beta": "0.3", "dpo_batch_size": "2"})
    assert config.publish.push_timeout == 5.0
    assert config.settings.beta == 0.2 and config.settings.batch_size == 2
    assert config.explicit_settings == {"beta": COMMAND_LINE, "batch_size": INI}


def test_an_empty_value_counts_as_not_given() -> None:
    config = read({"lock": "", "push_revision": "", "max_length": ""}, {"dpo_lock": "frozen.lock", "dpo_max_length": ""})
    assert config.lock == "frozen.lock"
    assert config.publish.push_revision == option_spec("push_revision").default
    assert config.settings.max_length == 1024 and config.explicit_settings == {}


def test_flags_come_from_either_place_and_turn_their_value_around_where_named_no() -> None:
    config = read({"no_cache": True, "push_pr": True}, {"dpo_no_tag": True, "dpo_update_lock": True, "dpo_allow_pickle": True})
    assert (config.use_cache, config.publish.push_pr, config.publish.no_tag, config.update_lock) == (False, True, True, True)
    assert config.settings.allow_pickle and config.explicit_settings == {"allow_pickle": INI}
    assert not read().publish.private


def test_ini_paths_are_relative_to_the_ini_file(tmp_path: Path) -> None:
    (tmp_path / "eval.jsonl").write_text("{}\n")
    (tmp_path / "safety.jsonl").write_text("{}\n")
    config = read(ini={"dpo_eval_set": ["eval.jsonl"], "dpo_eval_sets": ["safety = safety.jsonl"], "dpo_baseline": "gone", "dpo_report": "report", "dpo_save_dir": "out"},
                  ini_dir=tmp_path)
    assert [(spec.name, spec.source) for spec in config.eval_sets] == [
        ("default", str(tmp_path / "eval.jsonl")),
        ("safety", str(tmp_path / "safety.jsonl")),
    ]
    assert config.baseline == "gone"  # an input missing there is left as written, for its own error
    assert (config.report_dir, config.publish.save_dir) == (str(tmp_path / "report"), str(tmp_path / "out"))
    assert read({"eval_set": ["eval.jsonl"]}, ini_dir=tmp_path).eval_sets[0].source == "eval.jsonl"


def test_the_lock_turns_off_with_none() -> None:
    assert read().lock == "dpo.lock"
    assert read({"lock": "None"}).lock is None
    assert read(ini={"dpo_lock": "off"}).lock is None


def test_gates_and_generation_lines_name_the_place_they_came_from() -> None:
    assert [gate.metric for gate in read({"gate": ["loss < 1"]}, {"dpo_gates": ["rewards/margins > 0"]}).gates] == ["loss"]
    with pytest.raises(ConfigError, match=r"^--dpo-gate line 1: "):
        read({"gate": ["rewards/margins => 0"]})
    with pytest.raises(ConfigError, match=r"^dpo_gates line 2: "):
        read(ini={"dpo_gates": ["loss < 1", "rewards/margins => 0"]})
    assert read({"generation": ["max_new_tokens=8", "seed=3"]}).generation.seed == 3
    with pytest.raises(ConfigError, match=r"^dpo_generation: 'max_new_tokens' is not key=value"):
        read(ini={"dpo_generation": ["max_new_tokens"]})


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("samples", "-1", "'-1' is not a count. Give how many prompts to sample, e.g. 4."),
        ("samples", "four", "'four' is not a count."),
        ("push_which", "some", ("'some' is not one of all, last. Choose all (every passing checkpoint, in training-step "
         "order) or last (only the last passing one).")),
        ("push_to", "not a repo", "'not a repo' is not a Hub repo id. Write it as namespace/name, e.g. my-org/my-dpo-model."),
        ("push_timeout", "soon", "'soon' is not a number of seconds > 0. Give how long each Hub request may take, e.g. 60."),
        ("push_timeout", "0", "'0' is not a number of seconds > 0."),
        ("push_timeout", "inf", "'inf' is not a number of seconds > 0."),
        ("push_revision", "a..b", ("'a..b' is not a branch name. Use letters, digits, '-', '_', '.' and '/', e.g. release "
         "or releases/v2.")),
        ("push_revision", "v2.lock", "'v2.lock' is not a branch name."),
        ("beta", "lots", "cannot read 'lots' as a value for beta: give a number, e.g. 0.1."),
        ("max_length", "1", "max_length must be at least 2 tokens (or None), got 1."),
    ],
)
@pytest.mark.parametrize("form", ["command line", "ini"])
def test_a_bad_value_is_refused_naming_the_option_and_its_ini_key(name: str, value: str, message: str, form: str) -> None:
    spec = option_spec(name)
    with pytest.raises(ConfigError) as refused:
        read({name: value}) if form == "command line" else read(ini={spec.ini: value})
    assert str(refused.value).startswith(f"{spec.both}: {message}")


@pytest.mark.parametrize("name", ["report", "cache_dir", "save_dir"])
def test_an_output_folder_that_is_a_file_is_refused(name: str, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("in the way")
    with pytest.raises(ConfigError) as refused:
        read({name: str(tmp_path / "a-file")})
    assert str(refused.value) == (
        f"{option_spec(name).both}: {tmp_path / 'a-file'} is a file, not a folder. Give a folder path (it is created if missing)."
    )


def test_checkpoints_need_an_eval_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--dpo-eval-set / dpo_eval_sets: no eval set given\. Pass the frozen"):
        read({"checkpoint": [str(tmp_path)]})
    config = read(ini={"dpo_checkpoint": [tmp_path], "dpo_eval_set": ["eval.jsonl"]})
    assert config.checkpoints == (str(tmp_path),) and config.active


def test_valid_publish_values_are_taken() -> None:
    publish = read({"push_to": "my-org/model", "push_revision": "releases/v2", "push_which": "last", "push_timeout": "2.5",
                    "save_dir": "out", "dry_run": True}).publish
    assert (publish.push_to, publish.push_revision, publish.push_which, publish.push_timeout) == ("my-org/model", "releases/v2", "last", 2.5)
    assert publish.save_dir == "out" and publish.dry_run and publish.active
    assert read({"samples": "4"}).samples == 4
