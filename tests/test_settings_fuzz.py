"""Random option strings never escape as anything but our own errors, each with a message."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_dpo.config import RunConfig, read_run_config
from pytest_dpo.options import ALL_OPTIONS, ConfigError
from pytest_dpo.settings import DPOSettings, SettingsError

SETTING_NAMES = [f.name for f in fields(DPOSettings)]
# Text a user might type: near-misses of real values, numbers of every shape, and arbitrary unicode.
TEXT = st.one_of(
    st.sampled_from(["", " ", "none", "None", "auto", "true", "0", "-1", "1e309", "nan", "inf", "-inf", "1,2", ",",
                     "sigmoid,", "keep_start ", "cuda", "float16", "a..b", "x/y", "0x10", "٣", "1_000"]),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.text(max_size=30),
)


@settings(max_examples=400, deadline=None)
@given(values=st.dictionaries(st.sampled_from(SETTING_NAMES), TEXT, max_size=4))
def test_settings_from_text_raises_only_settings_errors_with_a_message(values: dict[str, str]) -> None:
    try:
        accepted = DPOSettings.from_text(values)
    except SettingsError as error:
        assert error.field in values
        assert str(error).strip()
    else:
        numbers = [accepted.beta, accepted.label_smoothing, accepted.discopop_tau, *accepted.weights]
        assert all(math.isfinite(number) for number in numbers), accepted


def _option_value(spec: Any) -> st.SearchStrategy[Any]:
    if spec.is_flag:
        return st.booleans()
    if spec.repeatable:
        return st.lists(TEXT, min_size=1, max_size=3)
    return TEXT


def _ini_value(spec: Any) -> st.SearchStrategy[Any]:
    if spec.ini_type == "bool":
        return st.booleans()
    if spec.ini_type in ("paths", "linelist"):
        return st.lists(TEXT, max_size=3)
    return TEXT


@st.composite
def command_lines(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    chosen = draw(st.lists(st.sampled_from(ALL_OPTIONS), unique_by=lambda spec: spec.name, max_size=6))
    options = {spec.dest: draw(_option_value(spec)) for spec in chosen if draw(st.booleans())}
    ini = {spec.ini: draw(_ini_value(spec)) for spec in chosen if draw(st.booleans())}
    return options, ini


@settings(max_examples=400, deadline=None)
@given(given_values=command_lines())
def test_read_run_config_raises_only_config_errors_with_a_message(given_values: tuple[dict[str, Any], dict[str, Any]]) -> None:
    options, ini_values = given_values
    defaults = {key: [] if spec.ini_type in ("paths", "linelist") else (False if spec.ini_type == "bool" else "")
                for spec in ALL_OPTIONS for key in spec.ini_keys}
    try:
        config = read_run_config(options.get, lambda key: ini_values.get(key, defaults[key]), Path("/nonexistent-ini-dir"))
    except ConfigError as error:
        message = str(error)
        assert message.strip()
        assert "--dpo-" in message or "dpo_" in message, message
    else:
        assert isinstance(config, RunConfig)
