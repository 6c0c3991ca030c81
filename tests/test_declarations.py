"""Facts written once: `evaluate()`'s keywords, the CLI, the plugin's options and the README follow the declarations."""

from __future__ import annotations

import argparse
import inspect
import re
from dataclasses import fields
from typing import Any

from pytest_dpo import evaluate
from pytest_dpo.__main__ import _parser
from pytest_dpo.config import RunConfig, read_run_config
from pytest_dpo.options import ALL_OPTIONS, SETTING_OPTIONS, Given, option_spec
from pytest_dpo.run_settings import FROM_RUN, INI
from pytest_dpo.settings import SETTINGS, DPOSettings
from pytest_dpo.spelling import option, spelled_for
from pytest_dpo.training_args import TRAINING_SETTING_FIELDS

from .fixture_paths import ROOT

# A row of a README option table: | `--dpo-x ARG` | `dpo_x` | default | meaning |
README_ROW = re.compile(r"^\| `(?P<flag>--dpo-[a-z-]+)[^`]*` \| `(?P<ini>\w+)` \| (?P<default>[^|]+?) \| .+ \|$")
NO_DEFAULT = "—"


def test_evaluate_takes_every_setting_with_its_declared_default() -> None:
    parameters = inspect.signature(evaluate).parameters
    for setting in fields(DPOSettings):
        assert setting.name in parameters, setting.name
        parameter = parameters[setting.name]
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, setting.name
        if setting.name in TRAINING_SETTING_FIELDS:
            assert parameter.default is FROM_RUN, setting.name
        else:
            assert parameter.default == setting.default, setting.name


def test_every_setting_declares_its_help_and_parser() -> None:
    for setting in fields(DPOSettings):
        assert setting.metadata["help"].strip(), setting.name
        assert callable(setting.metadata["parse"]), setting.name
        assert set(setting.metadata) <= {"help", "parse", "flag", "default_text"}, setting.name


def test_a_typed_default_text_reads_back_as_the_default() -> None:
    """The default the help and the README show is the text that gives the default: `none`, `sigmoid`, `off`."""
    for setting in SETTINGS:
        if "default_text" in DPOSettings.__dataclass_fields__[setting.name].metadata:
            continue  # chosen at run time, told in words
        read = DPOSettings.from_text({setting.name: setting.default_text})
        assert getattr(read, setting.name) == getattr(DPOSettings(), setting.name), setting.name
    for spec in ALL_OPTIONS:
        if spec not in SETTING_OPTIONS and spec.default_words is None and spec.default_text is not None and not spec.is_flag:
            assert spec.read(spec, Given(spec.default_text, INI, spec.ini)) == spec.default, spec.name


def test_the_plugin_reads_the_declared_defaults_when_nothing_is_given() -> None:
    defaults = {key: [] if spec.ini_type in ("paths", "linelist") else (False if spec.ini_type == "bool" else "")
                for spec in ALL_OPTIONS for key in spec.ini_keys}
    nothing = read_run_config(lambda dest: None, defaults.__getitem__, None)
    assert nothing == RunConfig(checkpoints=(), reference=None, eval_sets=(), settings=DPOSettings(), gates=())
    assert (nothing.lock, nothing.samples, nothing.generation) == tuple(
        option_spec(name).default for name in ("lock", "samples", "generation")
    )
    publish = nothing.publish
    assert (publish.push_revision, publish.push_which, publish.push_timeout) == tuple(
        option_spec(name).default for name in ("push_revision", "push_which", "push_timeout")
    )


def _cli_actions() -> dict[str, argparse.Action]:
    with spelled_for("cli"):
        parser = _parser()
    evaluate_parser = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    ).choices["evaluate"]
    return {action.dest: action for action in evaluate_parser._actions}


def test_the_command_line_and_the_plugin_declare_each_setting_alike() -> None:
    actions = _cli_actions()
    for spec in (*SETTING_OPTIONS, option_spec("eval_set"), option_spec("reference")):
        action = actions[spec.name]
        with spelled_for("cli"):
            assert action.option_strings == [option(spec.name)], spec.name
        assert action.help == spec.help, spec.name
        assert (action.nargs == 0) == spec.is_flag, spec.name
    assert {setting.name for setting in SETTINGS} <= set(actions)


def test_a_help_shows_its_declared_default_once() -> None:
    assert option_spec("push_timeout").help.endswith("before the push fails (default: 60)")
    assert option_spec("lock").help.endswith("(default: dpo.lock)")
    assert option_spec("truncation_mode").help == "keep_start (TRL default) or keep_end."
    assert option_spec("dtype").help.endswith("(default: bfloat16 on CUDA devices that support it, else float32)")
    for spec in ALL_OPTIONS:
        assert "{default}" not in spec.help, spec.name
        assert "(default:" not in spec.help or spec.help.endswith(f"(default: {spec.default_text})"), spec.name
        if spec.is_flag:
            assert "(default:" not in spec.help, spec.name


def _readme_option_rows() -> dict[str, dict[str, Any]]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return {match["flag"]: match.groupdict() for line in readme.splitlines() if (match := README_ROW.match(line))}


def test_the_readme_lists_every_option_with_its_ini_key_and_default() -> None:
    rows = _readme_option_rows()
    assert set(rows) == {spec.flag for spec in ALL_OPTIONS}
    for spec in ALL_OPTIONS:
        row = rows[spec.flag]
        assert row["ini"] == spec.ini, spec.flag
        assert row["default"].replace("`", "") == (spec.default_text or NO_DEFAULT), spec.flag
