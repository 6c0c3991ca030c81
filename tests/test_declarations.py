"""Facts written once: `evaluate()`'s keywords and the README's option table follow the declarations."""

from __future__ import annotations

import inspect
from dataclasses import fields

from pytest_dpo import evaluate
from pytest_dpo.config import ALL_OPTIONS
from pytest_dpo.run_settings import FROM_RUN
from pytest_dpo.settings import DPOSettings
from pytest_dpo.training_args import TRAINING_SETTING_FIELDS

from .fixture_paths import ROOT


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


def test_the_readme_lists_every_option_and_its_ini_key() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for spec in ALL_OPTIONS:
        assert f"`{spec.flag}" in readme, spec.flag
        assert f"`{spec.ini}`" in readme, spec.ini
