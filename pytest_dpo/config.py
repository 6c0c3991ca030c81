"""The plugin's configuration: every option of `options.ALL_OPTIONS` read into a `RunConfig`.

No pytest import here: the plugin turns `ConfigError` into `pytest.UsageError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .eval_sets import EvalSetSpec, EvalSetSpecError, with_options
from .gates import Gate
from .options import (
    ALL_OPTIONS,
    PUBLISH_OPTIONS,
    SETTING_OPTIONS,
    ConfigError,
    Given,
    OptionSpec,
    option_spec,
    setting_error,
)
from .run_settings import COMMAND_LINE, INI
from .samples import GenerationSettings
from .settings import DPOSettings, SettingsError


@dataclass(frozen=True)
class PublishConfig:
    """Where passing checkpoints go: a local folder, a Hub repo, both, or (dry run) nowhere.

    One field per option of `options.PUBLISH_OPTIONS`, named as the option.
    """

    save_dir: str | None = None
    push_to: str | None = None
    push_revision: str = option_spec("push_revision").default
    push_which: str = option_spec("push_which").default
    push_timeout: float = option_spec("push_timeout").default
    private: bool = False
    push_pr: bool = False
    no_tag: bool = False
    dry_run: bool = False

    @property
    def active(self) -> bool:
        return self.save_dir is not None or self.push_to is not None


@dataclass(frozen=True)
class RunConfig:
    """Everything the plugin was told: what to test, on what, with which settings and gates."""

    checkpoints: tuple[str, ...]
    reference: str | None
    eval_sets: tuple[EvalSetSpec, ...]
    settings: DPOSettings
    gates: tuple[Gate, ...]
    # The settings given on the command line or in the ini file, each with where: they win over the run's own.
    explicit_settings: Mapping[str, str] = field(default_factory=dict)
    publish: PublishConfig = PublishConfig()
    cache_dir: str | None = None
    use_cache: bool = True
    report_dir: str | None = None
    baseline: str | None = None
    lock: str | None = option_spec("lock").default
    update_lock: bool = False
    samples: int = option_spec("samples").default
    generation: GenerationSettings = option_spec("generation").default
    subset_column: str | None = None

    @property
    def active(self) -> bool:
        """The plugin has work to do: at least one checkpoint was given."""
        return bool(self.checkpoints)


def read_run_config(
    option: Callable[[str], Any],
    ini: Callable[[str], Any],
    ini_dir: Path | None,
) -> RunConfig:
    """Read the plugin's options; the command line wins over the ini file, and an empty value counts as not given.

    Args:
        option: the command-line value of an option by its dest (`dpo_beta`), None when not given.
        ini: the ini value by its key (`dpo_beta`), as pytest's `getini` returns it.
        ini_dir: the ini file's folder, against which relative ini paths are resolved.

    Raises:
        ConfigError: a value is malformed or out of range; the message names the option.
    """

    def given(spec: OptionSpec) -> Given | None:
        if value := option(spec.dest):
            return Given(value, COMMAND_LINE, spec.flag)
        older = ini(spec.ini_alias) if spec.ini_alias else None
        if older and (value := ini(spec.ini)):
            return Given([*older, *value], INI, f"{spec.ini_alias} / {spec.ini}", ini_dir)
        if older:
            return Given(older, INI, spec.ini_alias, ini_dir)
        if value := ini(spec.ini):
            return Given(value, INI, spec.ini, ini_dir)
        return None

    found = {spec.name: value for spec in ALL_OPTIONS if (value := given(spec)) is not None}
    values = {spec.name: spec.read(spec, found[spec.name]) if spec.name in found else spec.default for spec in ALL_OPTIONS}
    # Settings are checked together: one may rule out another (exo_pair needs label_smoothing > 0).
    explicit_settings = {spec.name: found[spec.name].source for spec in SETTING_OPTIONS if spec.name in found}
    try:
        settings = DPOSettings.from_text({name: values[name] for name in explicit_settings})
    except SettingsError as error:
        raise setting_error(error) from None
    eval_sets = _with_options(values["eval_set"], values["eval_set_options"], found.get("eval_set_options"))
    config = RunConfig(
        checkpoints=values["checkpoint"],
        reference=values["reference"],
        eval_sets=eval_sets,
        settings=settings,
        explicit_settings=explicit_settings,
        gates=_gates_per_set(values["gate"], [spec.name for spec in eval_sets], _replaced_sets_hint(found)),
        publish=PublishConfig(**{spec.name: values[spec.name] for spec in PUBLISH_OPTIONS}),
        cache_dir=values["cache_dir"],
        use_cache=not values["no_cache"],
        report_dir=values["report"],
        baseline=values["baseline"],
        lock=values["lock"],
        update_lock=values["update_lock"],
        samples=values["samples"],
        generation=values["generation"],
        subset_column=values["subset_column"],
    )
    if config.active and not config.eval_sets:
        raise ConfigError(
            f"{option_spec('eval_set').both}: no eval set given. Pass the frozen preference eval set the checkpoints "
            "are scored on (several as NAME=PATH)."
        )
    return config


def _with_options(
    specs: tuple[EvalSetSpec, ...], options: Mapping[str, Mapping[str, str]], given: Given | None
) -> tuple[EvalSetSpec, ...]:
    try:
        return with_options(specs, options, given.where if given else "")
    except EvalSetSpecError as error:
        raise ConfigError(str(error)) from None


def _replaced_sets_hint(found: Mapping[str, Given]) -> str:
    """Why an ini gate may name a set the run lacks: the command line's sets replaced the ini file's."""
    sets, gates = found.get("eval_set"), found.get("gate")
    if sets is None or gates is None or sets.source != COMMAND_LINE or gates.source != INI:
        return ""
    return f" ({sets.where} on the command line replaces the ini file's eval sets.)"


def _gates_per_set(gates: tuple[Gate, ...], names: list[str], hint: str = "") -> tuple[Gate, ...]:
    """Every gate with its eval set checked; in a run with several sets, a gate without a prefix becomes one per set."""
    per_set: list[Gate] = []
    for gate in gates:
        if gate.eval_set is not None and names and gate.eval_set not in names:
            raise ConfigError(
                f"{gate.where}: gate {str(gate)!r} names eval set {gate.eval_set!r}, which this run does not have. "
                f"Known eval sets: {', '.join(names)}.{hint}"
            )
        if gate.eval_set is None and len(names) > 1:
            per_set += [dataclasses.replace(gate, eval_set=name) for name in names]
        else:
            per_set.append(gate)
    return tuple(dict.fromkeys(per_set))
