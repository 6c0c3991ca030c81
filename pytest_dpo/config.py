"""The plugin's configuration: one table of options, each with its ini twin, read into a `RunConfig`.

The `--dpo-*` options for the evaluation settings are generated from
`DPOSettings`' fields, so the command line, the ini file and `evaluate()`
cannot disagree. No pytest import here: the plugin turns `ConfigError` into
`pytest.UsageError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .gates import Gate, GateError, parse_gates
from .settings import DPOSettings, SettingsError


class ConfigError(ValueError):
    """An option or ini value cannot be used; the message names the option and the fix."""


@dataclass(frozen=True)
class OptionSpec:
    """One plugin option: `--dpo-<name>` on the command line, `dpo_<name>` in the ini file.

    `ini_type` is pytest's `addini` type (`string`, `paths`, `linelist`);
    `repeatable` options may be given several times on the command line.
    """

    name: str
    help: str
    ini_type: str = "string"
    repeatable: bool = False
    ini_key: str | None = None

    @property
    def flag(self) -> str:
        return "--dpo-" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        """The attribute name of the command-line value."""
        return "dpo_" + self.name

    @property
    def ini(self) -> str:
        return self.ini_key or self.dest

    @property
    def both(self) -> str:
        return f"{self.flag} / {self.ini}"


RUN_OPTIONS = (
    OptionSpec(
        "checkpoint",
        "checkpoint to test: a model or adapter folder, a glob, or a TRL output_dir (expands to its checkpoint-N); "
        "repeatable",
        ini_type="paths",
        repeatable=True,
    ),
    OptionSpec("reference", "reference model or adapter (default: the adapter's base / the model card's base_model)"),
    OptionSpec("eval_set", "preference eval set: .jsonl, .json, .parquet, .csv or a datasets save_to_disk folder"),
    OptionSpec(
        "gate",
        "a gate such as 'rewards/accuracies >= 0.6', one per line in the ini file; on the command line "
        "repeatable, replacing the ini gates",
        ini_type="linelist",
        repeatable=True,
        ini_key="dpo_gates",
    ),
)
SETTING_OPTIONS = tuple(OptionSpec(f.name, f.metadata["help"]) for f in fields(DPOSettings))
ALL_OPTIONS = RUN_OPTIONS + SETTING_OPTIONS


@dataclass(frozen=True)
class RunConfig:
    """Everything the plugin was told: what to test, on what, with which settings and gates."""

    checkpoints: tuple[str, ...]
    reference: str | None
    eval_set: str | None
    settings: DPOSettings
    gates: tuple[Gate, ...]

    @property
    def active(self) -> bool:
        """The plugin has work to do: at least one checkpoint was given."""
        return bool(self.checkpoints)


def read_run_config(
    option: Callable[[str], Any],
    ini: Callable[[str], Any],
    ini_dir: Path | None,
) -> RunConfig:
    """Read the plugin's options; the command line wins over the ini file.

    Args:
        option: the command-line value of an option by its dest (`dpo_beta`), None when not given.
        ini: the ini value by its key (`dpo_beta`), as pytest's `getini` returns it.
        ini_dir: the ini file's folder, against which relative ini paths are resolved.

    Raises:
        ConfigError: a value is malformed or out of range; the message names the option.
    """

    def text(spec: OptionSpec) -> str | None:
        value = option(spec.dest)
        if value is None:
            value = ini(spec.ini) or None
        return None if value is None else str(value)

    checkpoints = option("dpo_checkpoint") or [str(path) for path in ini("dpo_checkpoint")]
    settings_text = {spec.name: value for spec in SETTING_OPTIONS if (value := text(spec)) is not None}
    try:
        settings = DPOSettings.from_text(settings_text)
    except SettingsError as error:
        spec = next(s for s in SETTING_OPTIONS if s.name == error.field)
        raise ConfigError(f"{spec.both}: {error}") from None
    gate_lines, gate_source = (option("dpo_gate"), "--dpo-gate") if option("dpo_gate") else (ini("dpo_gates"), "dpo_gates")
    try:
        gates = parse_gates(gate_lines or [], gate_source)
    except GateError as error:
        raise ConfigError(str(error)) from None
    config = RunConfig(
        checkpoints=tuple(str(path) for path in checkpoints),
        reference=_ini_relative(option("dpo_reference"), ini("dpo_reference"), ini_dir),
        eval_set=_ini_relative(option("dpo_eval_set"), ini("dpo_eval_set"), ini_dir),
        settings=settings,
        gates=gates,
    )
    if config.active and config.eval_set is None:
        spec = next(s for s in RUN_OPTIONS if s.name == "eval_set")
        raise ConfigError(f"{spec.both}: no eval set given. Pass the frozen preference eval set the checkpoints are scored on.")
    return config


def _ini_relative(command_line: str | None, ini_value: str, ini_dir: Path | None) -> str | None:
    """A command-line path as given; an ini path relative to the ini file's folder when it exists there."""
    if command_line:
        return command_line
    if not ini_value:
        return None
    if ini_dir is not None and not Path(ini_value).is_absolute() and (ini_dir / ini_value).exists():
        return str(ini_dir / ini_value)
    return ini_value
