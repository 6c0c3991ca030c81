"""The plugin's configuration: one table of options, each with its ini twin, read into a `RunConfig`.

The `--dpo-*` options for the evaluation settings are generated from
`DPOSettings`' fields, so the command line, the ini file and `evaluate()`
cannot disagree. No pytest import here: the plugin turns `ConfigError` into
`pytest.UsageError`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .gates import Gate, GateError, parse_gates
from .run_settings import COMMAND_LINE, INI
from .samples import GenerationError, GenerationSettings
from .settings import FLAG_SETTINGS, DPOSettings, SettingsError


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
    is_flag: bool = False

    @property
    def flag(self) -> str:
        return "--dpo-" + self.name.replace("_", "-")

    @property
    def action(self) -> str:
        if self.is_flag:
            return "store_true"
        return "append" if self.repeatable else "store"

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
    OptionSpec("baseline", "the last release to compare with: a checkpoint folder, or a dpo_report.json (or its folder)"),
    OptionSpec(
        "gate",
        "a gate such as 'rewards/accuracies >= 0.6', one per line in the ini file; on the command line "
        "repeatable, replacing the ini gates",
        ini_type="linelist",
        repeatable=True,
        ini_key="dpo_gates",
    ),
)
SETTING_OPTIONS = tuple(
    OptionSpec(f.name, f.metadata["help"], ini_type="bool", is_flag=True)
    if f.name in FLAG_SETTINGS
    else OptionSpec(f.name, f.metadata["help"])
    for f in fields(DPOSettings)
)
LOCK_OPTIONS = (
    OptionSpec("lock", "eval-set lock file (default: dpo.lock in the rootdir; 'none' turns the lock off)"),
    OptionSpec("update_lock", "accept a changed eval set or tokenizer and rewrite the lock", ini_type="bool", is_flag=True),
)
REPORT_OPTIONS = (
    OptionSpec("report", "write dpo_report.json, dpo_per_example.json, dpo_summary.md and dpo_metrics.png here"),
    OptionSpec("samples", "generate completions of the policy and the reference for the first N eval prompts (default 0)"),
    OptionSpec(
        "generation",
        "a generation setting for --dpo-samples as key=value (GenerationConfig fields, e.g. max_new_tokens=32, "
        "do_sample=true, temperature=0.7, seed=1; default greedy, 64 new tokens), one per line in the ini file; "
        "repeatable",
        ini_type="linelist",
        repeatable=True,
    ),
)
CACHE_OPTIONS = (
    OptionSpec("cache_dir", "keep per-example scores here across runs (default: under pytest's cache dir, .pytest_cache)"),
    OptionSpec("no_cache", "do not read or write the on-disk score cache", ini_type="bool", is_flag=True),
)
PUBLISH_OPTIONS = (
    OptionSpec("save_dir", "save each passing checkpoint (weights or adapter, tokenizer, model card, dpo_eval.json) here"),
    OptionSpec("push_to", "push each passing checkpoint to this Hugging Face Hub model repo (ns/name), one commit each"),
    OptionSpec("push_revision", "branch to push to (default: main)"),
    OptionSpec("push_which", "'all' passing checkpoints in training-step order (default) or only the 'last' one"),
    OptionSpec("push_timeout", "seconds each Hub request may take to answer before the push fails (default 60)"),
    OptionSpec("private", "create the Hub repo as private", ini_type="bool", is_flag=True),
    OptionSpec("push_pr", "open a pull request per checkpoint instead of committing to the branch", ini_type="bool", is_flag=True),
    OptionSpec("no_tag", "do not tag each pushed commit with the checkpoint's name", ini_type="bool", is_flag=True),
    OptionSpec("dry_run", "print what would be saved and pushed, and do nothing", ini_type="bool", is_flag=True),
)
ALL_OPTIONS = RUN_OPTIONS + SETTING_OPTIONS + LOCK_OPTIONS + REPORT_OPTIONS + CACHE_OPTIONS + PUBLISH_OPTIONS
PUSH_WHICH = ("all", "last")
_BY_NAME = {spec.name: spec for spec in ALL_OPTIONS}


def option_spec(name: str) -> OptionSpec:
    """The plugin option for a setting or run option by its field name (`eval_set` → `--dpo-eval-set`)."""
    return _BY_NAME[name]
_GIT_BRANCH = re.compile(r"[A-Za-z0-9_][\w./-]*")


@dataclass(frozen=True)
class PublishConfig:
    """Where passing checkpoints go: a local folder, a Hub repo, both, or (dry run) nowhere."""

    save_dir: str | None = None
    push_to: str | None = None
    revision: str = "main"
    which: str = "all"
    private: bool = False
    create_pr: bool = False
    tag: bool = True
    dry_run: bool = False
    timeout: float = 60.0

    @property
    def active(self) -> bool:
        return self.save_dir is not None or self.push_to is not None


@dataclass(frozen=True)
class RunConfig:
    """Everything the plugin was told: what to test, on what, with which settings and gates."""

    checkpoints: tuple[str, ...]
    reference: str | None
    eval_set: str | None
    settings: DPOSettings
    gates: tuple[Gate, ...]
    # The settings given on the command line or in the ini file, each with where: they win over the run's own.
    explicit_settings: Mapping[str, str] = field(default_factory=dict)
    publish: PublishConfig = PublishConfig()
    cache_dir: str | None = None
    use_cache: bool = True
    report_dir: str | None = None
    baseline: str | None = None
    lock: str | None = "dpo.lock"
    update_lock: bool = False
    samples: int = 0
    generation: GenerationSettings = GenerationSettings()

    @property
    def active(self) -> bool:
        """The plugin has work to do: at least one checkpoint was given."""
        return bool(self.checkpoints)


def setting_error(error: SettingsError) -> ConfigError:
    """A settings error as the plugin says it: prefixed with the option and its ini key (`--dpo-beta / dpo_beta`)."""
    return ConfigError(f"{option_spec(error.field).both}: {error}")


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
    explicit_settings = {name: COMMAND_LINE if option(f"dpo_{name}") is not None else INI for name in settings_text}
    try:
        settings = DPOSettings.from_text(settings_text)
    except SettingsError as error:
        raise setting_error(error) from None
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
        explicit_settings=explicit_settings,
        gates=gates,
        publish=_read_publish(option, ini, ini_dir),
        cache_dir=_ini_relative(option("dpo_cache_dir"), ini("dpo_cache_dir"), ini_dir, must_exist=False),
        use_cache=not (option("dpo_no_cache") or ini("dpo_no_cache")),
        report_dir=_ini_relative(option("dpo_report"), ini("dpo_report"), ini_dir, must_exist=False),
        baseline=_ini_relative(option("dpo_baseline"), ini("dpo_baseline"), ini_dir),
        lock=_lock_path(option("dpo_lock") or ini("dpo_lock") or "dpo.lock"),
        update_lock=bool(option("dpo_update_lock") or ini("dpo_update_lock")),
        samples=_sample_count(option("dpo_samples") or ini("dpo_samples") or "0"),
        generation=_generation(option, ini),
    )
    for spec_name, folder in (("report", config.report_dir), ("cache_dir", config.cache_dir), ("save_dir", config.publish.save_dir)):
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            raise ConfigError(f"{option_spec(spec_name).both}: {folder} is a file, not a folder. Give a folder path (it is created if missing).")
    if config.active and config.eval_set is None:
        raise ConfigError(f"{option_spec('eval_set').both}: no eval set given. Pass the frozen preference eval set the checkpoints are scored on.")
    return config


def _sample_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise ConfigError(f"--dpo-samples / dpo_samples: {text!r} is not a count. Give how many prompts to sample, e.g. 4.")
    return count


def _generation(option: Callable[[str], Any], ini: Callable[[str], Any]) -> GenerationSettings:
    lines, source = (option("dpo_generation"), "--dpo-generation") if option("dpo_generation") else (ini("dpo_generation"), "dpo_generation")
    try:
        return GenerationSettings.from_lines(lines or [], source)
    except GenerationError as error:
        raise ConfigError(str(error)) from None


def _lock_path(value: str) -> str | None:
    return None if value.strip().lower() in ("none", "off", "false") else value


def _read_publish(option: Callable[[str], Any], ini: Callable[[str], Any], ini_dir: Path | None) -> PublishConfig:
    def flag(name: str) -> bool:
        return bool(option(f"dpo_{name}") or ini(f"dpo_{name}"))

    which = option("dpo_push_which") or ini("dpo_push_which") or "all"
    if which not in PUSH_WHICH:
        raise ConfigError(
            f"--dpo-push-which / dpo_push_which: {which!r} is not one of {', '.join(PUSH_WHICH)}. Choose all (every "
            "passing checkpoint, in training-step order) or last (only the last passing one)."
        )
    push_to = option("dpo_push_to") or ini("dpo_push_to") or None
    if push_to is not None and not re.fullmatch(r"[\w.-]{1,96}/[\w.-]{1,96}", push_to):
        raise ConfigError(
            f"--dpo-push-to / dpo_push_to: {push_to!r} is not a Hub repo id. Write it as namespace/name, "
            "e.g. my-org/my-dpo-model."
        )
    timeout_text = option("dpo_push_timeout") or ini("dpo_push_timeout") or "60"
    try:
        timeout = float(timeout_text)
    except ValueError:
        timeout = 0.0
    if not 0 < timeout < float("inf"):
        raise ConfigError(
            f"--dpo-push-timeout / dpo_push_timeout: {timeout_text!r} is not a number of seconds > 0. "
            "Give how long each Hub request may take, e.g. 60."
        )
    revision = option("dpo_push_revision") or ini("dpo_push_revision") or "main"
    if not _GIT_BRANCH.fullmatch(revision) or ".." in revision or revision.endswith((".", "/", ".lock")):
        raise ConfigError(
            f"--dpo-push-revision / dpo_push_revision: {revision!r} is not a branch name. Use letters, digits, "
            "'-', '_', '.' and '/', e.g. release or releases/v2."
        )
    return PublishConfig(
        save_dir=_ini_relative(option("dpo_save_dir"), ini("dpo_save_dir"), ini_dir, must_exist=False),
        push_to=push_to,
        revision=revision,
        which=which,
        private=flag("private"),
        create_pr=flag("push_pr"),
        tag=not flag("no_tag"),
        dry_run=flag("dry_run"),
        timeout=timeout,
    )


def _ini_relative(command_line: str | None, ini_value: str, ini_dir: Path | None, must_exist: bool = True) -> str | None:
    """A command-line path as given; an ini path relative to the ini file's folder (when it exists there, for inputs)."""
    if command_line:
        return command_line
    if not ini_value:
        return None
    if ini_dir is not None and not Path(ini_value).is_absolute() and (not must_exist or (ini_dir / ini_value).exists()):
        return str(ini_dir / ini_value)
    return ini_value
