"""The plugin's options: one table, each option with its ini twin, declared once.

Each option is an `OptionSpec` row: its meaning, its default and how its value
is read and checked (`config.read_run_config` reads them all into a `RunConfig`). The `--dpo-*` options for the evaluation
settings are generated from `DPOSettings`' fields, so the command line, the ini
file and `evaluate()` cannot disagree. No pytest import here: the plugin turns
`ConfigError` into `pytest.UsageError`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .eval_sets import (
    EvalSetSpec,
    EvalSetSpecError,
    parse_eval_set_options,
    parse_eval_set_values,
)
from .gates import Gate, GateError, parse_gates
from .samples import DEFAULT_MAX_NEW_TOKENS, GenerationError, GenerationSettings
from .settings import (
    SETTINGS,
    SettingsError,
    help_with_default,
    value_text,
)
from .spelling import spelled


class ConfigError(ValueError):
    """An option or ini value cannot be used; the message names the option and the fix."""


@dataclass(frozen=True)
class Given:
    """A value the user gave an option, and where.

    Attributes:
        value (`Any`): as pytest hands it over: text, a list (repeatable options, `linelist`/`paths` ini keys), a bool.
        source (`str`): `COMMAND_LINE` or `INI`.
        where (`str`): the flag or the ini key it was given as (`--dpo-gate`, `dpo_gates`).
        relative_to (`Path`, *optional*): the ini file's folder for an ini value; None on the command line.
    """

    value: Any
    source: str
    where: str
    relative_to: Path | None = None


def _text(spec: OptionSpec, given: Given) -> str:
    return str(given.value)


def _switch(spec: OptionSpec, given: Given) -> bool:
    return bool(given.value)


@dataclass(frozen=True)
class OptionSpec:
    """One plugin option: `--dpo-<name>` on the command line, `dpo_<name>` in the ini file.

    Attributes:
        name (`str`): the field name, e.g. `push_timeout`.
        meaning (`str`): what the option does; its help adds the default.
        ini_type (`str`): pytest's `addini` type (`string`, `bool`, `paths`, `linelist`).
        repeatable (`bool`): may be given several times on the command line.
        ini_key (`str`, *optional*): the ini key, where it is not `dpo_<name>`.
        ini_alias (`str`, *optional*): an older ini key of the same type that is read too (its lines first).
        is_flag (`bool`): an on/off switch, given without a value on the command line.
        default (`Any`): the value when the option is given nowhere.
        default_words (`str`, *optional*): the default in words, where it is decided later or its value is no text
            (`the adapter's base / the model card's base_model`).
        read (`Callable[[OptionSpec, Given], Any]`): a given value → the option's value; raises `ConfigError`
            naming `spec.both` (or the line of `given.where`) and the fix.
    """

    name: str
    meaning: str
    ini_type: str = "string"
    repeatable: bool = False
    ini_key: str | None = None
    ini_alias: str | None = None
    is_flag: bool = False
    default: Any = None
    default_words: str | None = None
    read: Callable[[OptionSpec, Given], Any] = _text

    @property
    def flag(self) -> str:
        return spelled(self.name, "pytest")

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
    def ini_keys(self) -> tuple[str, ...]:
        """The ini key, and the older one read too."""
        return (self.ini, self.ini_alias) if self.ini_alias else (self.ini,)

    @property
    def both(self) -> str:
        return f"{self.flag} / {self.ini}"

    @property
    def default_text(self) -> str | None:
        """The default as the help and the README show it; None for an option that does nothing unless given."""
        if self.default_words is not None:
            return self.default_words
        if self.is_flag:
            return "off"
        if self.default is None or self.default in ((), {}):
            return None
        return value_text(self.default)

    @property
    def help(self) -> str:
        return help_with_default(self.meaning, self.default_text, self.is_flag)


def _paths(spec: OptionSpec, given: Given) -> tuple[str, ...]:
    return tuple(str(path) for path in given.value)


def _input_path(spec: OptionSpec, given: Given) -> str:
    """A path as given on the command line; an ini path relative to the ini file's folder, when it exists there."""
    path = str(given.value)
    if given.relative_to is not None and not Path(path).is_absolute() and (given.relative_to / path).exists():
        return str(given.relative_to / path)
    return path


def _output_folder(spec: OptionSpec, given: Given) -> str:
    """A folder to write into (created if missing): an ini path is relative to the ini file's folder."""
    folder = str(given.value)
    if given.relative_to is not None and not Path(folder).is_absolute():
        folder = str(given.relative_to / folder)
    if Path(folder).exists() and not Path(folder).is_dir():
        raise ConfigError(f"{spec.both}: {folder} is a file, not a folder. Give a folder path (it is created if missing).")
    return folder


def _eval_sets(spec: OptionSpec, given: Given) -> tuple[EvalSetSpec, ...]:
    try:
        return parse_eval_set_values(given.value, given.where, given.relative_to)
    except EvalSetSpecError as error:
        raise ConfigError(str(error)) from None


def _eval_set_options(spec: OptionSpec, given: Given) -> dict[str, dict[str, str]]:
    try:
        return parse_eval_set_options(given.value, given.where)
    except EvalSetSpecError as error:
        raise ConfigError(str(error)) from None


def _gates(spec: OptionSpec, given: Given) -> tuple[Gate, ...]:
    try:
        return parse_gates(given.value, given.where)
    except GateError as error:
        raise ConfigError(str(error)) from None


def _generation(spec: OptionSpec, given: Given) -> GenerationSettings:
    try:
        return GenerationSettings.from_lines(given.value, given.where)
    except GenerationError as error:
        raise ConfigError(str(error)) from None


def _lock(spec: OptionSpec, given: Given) -> str | None:
    text = str(given.value)
    return None if text.strip().lower() in ("none", "off", "false") else text


def _count(spec: OptionSpec, given: Given) -> int:
    text = str(given.value)
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise ConfigError(f"{spec.both}: {text!r} is not a count. Give how many prompts to sample, e.g. 4.")
    return count


def _repo_id(spec: OptionSpec, given: Given) -> str:
    repo_id = str(given.value)
    if not re.fullmatch(r"[\w.-]{1,96}/[\w.-]{1,96}", repo_id):
        raise ConfigError(
            f"{spec.both}: {repo_id!r} is not a Hub repo id. Write it as namespace/name, e.g. my-org/my-dpo-model."
        )
    return repo_id


_GIT_BRANCH = re.compile(r"[A-Za-z0-9_][\w./-]*")


def _branch(spec: OptionSpec, given: Given) -> str:
    revision = str(given.value)
    if not _GIT_BRANCH.fullmatch(revision) or ".." in revision or revision.endswith((".", "/", ".lock")):
        raise ConfigError(
            f"{spec.both}: {revision!r} is not a branch name. Use letters, digits, '-', '_', '.' and '/', "
            "e.g. release or releases/v2."
        )
    return revision


PUSH_WHICH = ("all", "last")


def _push_which(spec: OptionSpec, given: Given) -> str:
    which = str(given.value)
    if which not in PUSH_WHICH:
        raise ConfigError(
            f"{spec.both}: {which!r} is not one of {', '.join(PUSH_WHICH)}. Choose all (every passing checkpoint, "
            "in training-step order) or last (only the last passing one)."
        )
    return which


def _seconds(spec: OptionSpec, given: Given) -> float:
    text = str(given.value)
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise ConfigError(
            f"{spec.both}: {text!r} is not a number of seconds > 0. Give how long each Hub request may take, e.g. 60."
        )
    return seconds


RUN_OPTIONS = (
    OptionSpec(
        "checkpoint",
        "checkpoint to test: a model or adapter folder, a glob, or a TRL output_dir (expands to its checkpoint-N); "
        "repeatable",
        ini_type="paths",
        repeatable=True,
        default=(),
        read=_paths,
    ),
    OptionSpec(
        "reference",
        "reference model or adapter",
        default_words="the adapter's base / the model card's base_model",
        read=_input_path,
    ),
    OptionSpec(
        "eval_set",
        "a preference eval set as NAME=PATH (a bare PATH is the set 'default'): .jsonl, .json, .parquet, .csv, a "
        "datasets save_to_disk folder, or hub:org/dataset[:split][@revision]; repeatable, replacing the ini sets; "
        "one per line in the ini file",
        ini_type="linelist",
        repeatable=True,
        ini_key="dpo_eval_sets",
        ini_alias="dpo_eval_set",
        default=(),
        read=_eval_sets,
    ),
    OptionSpec(
        "eval_set_options",
        "an eval set's own tokenization as 'NAME: max_length=N truncation_mode=keep_end', winning over the run's "
        "for that set; one set per line in the ini file; repeatable",
        ini_type="linelist",
        repeatable=True,
        default={},
        read=_eval_set_options,
    ),
    OptionSpec(
        "subset_column",
        "split every eval set into subsets by this column's value (e.g. subset, source), for subset gates "
        "('helpful/math: rewards/margins > 0') and result.subset(...)",
    ),
    OptionSpec(
        "baseline",
        "the last release to compare with: a checkpoint folder, or a dpo_report.json (or its folder)",
        read=_input_path,
    ),
    OptionSpec(
        "gate",
        "a gate such as 'rewards/accuracies >= 0.6', one per line in the ini file; on the command line "
        "repeatable, replacing the ini gates",
        ini_type="linelist",
        repeatable=True,
        ini_key="dpo_gates",
        default=(),
        read=_gates,
    ),
)
SETTING_OPTIONS = tuple(
    OptionSpec(
        setting.name,
        setting.help,
        ini_type="bool" if setting.is_flag else "string",
        is_flag=setting.is_flag,
        default=setting.default,
        default_words=setting.default_text,
    )
    for setting in SETTINGS
)
LOCK_OPTIONS = (
    OptionSpec(
        "lock",
        "eval-set lock file, relative to the rootdir; 'none' turns the lock off",
        default="dpo.lock",
        read=_lock,
    ),
    OptionSpec(
        "update_lock",
        "accept a changed eval set or tokenizer and rewrite the lock",
        ini_type="bool",
        is_flag=True,
        default=False,
        read=_switch,
    ),
)
REPORT_OPTIONS = (
    OptionSpec(
        "report",
        "write dpo_report.json, dpo_per_example.json, dpo_summary.md and dpo_metrics.png here",
        read=_output_folder,
    ),
    OptionSpec(
        "samples",
        "generate completions of the policy and the reference for the first N eval prompts",
        default=0,
        read=_count,
    ),
    OptionSpec(
        "generation",
        "a generation setting for the samples as key=value (GenerationConfig fields, e.g. max_new_tokens=32, "
        "do_sample=true, temperature=0.7, seed=1), one per line in the ini file; repeatable",
        ini_type="linelist",
        repeatable=True,
        default=GenerationSettings(),
        default_words=f"greedy, max_new_tokens={DEFAULT_MAX_NEW_TOKENS}",
        read=_generation,
    ),
)
CACHE_OPTIONS = (
    OptionSpec(
        "cache_dir",
        "keep per-example scores here across runs",
        default_words="under pytest's cache dir, .pytest_cache",
        read=_output_folder,
    ),
    OptionSpec(
        "no_cache",
        "do not read or write the on-disk score cache",
        ini_type="bool",
        is_flag=True,
        default=False,
        read=_switch,
    ),
)
PUBLISH_OPTIONS = (
    OptionSpec(
        "save_dir",
        "save each passing checkpoint (weights or adapter, tokenizer, model card, dpo_eval.json) here",
        read=_output_folder,
    ),
    OptionSpec(
        "push_to",
        "push each passing checkpoint to this Hugging Face Hub model repo (ns/name), one commit each",
        read=_repo_id,
    ),
    OptionSpec("push_revision", "branch to push to", default="main", read=_branch),
    OptionSpec(
        "push_which",
        "'all' passing checkpoints in training-step order or only the 'last' one",
        default="all",
        read=_push_which,
    ),
    OptionSpec(
        "push_timeout",
        "seconds each Hub request may take to answer before the push fails",
        default=60,
        read=_seconds,
    ),
    OptionSpec("private", "create the Hub repo as private", ini_type="bool", is_flag=True, default=False, read=_switch),
    OptionSpec(
        "push_pr",
        "open a pull request per checkpoint instead of committing to the branch",
        ini_type="bool",
        is_flag=True,
        default=False,
        read=_switch,
    ),
    OptionSpec(
        "no_tag",
        "do not tag each pushed commit with the checkpoint's name",
        ini_type="bool",
        is_flag=True,
        default=False,
        read=_switch,
    ),
    OptionSpec(
        "dry_run",
        "print what would be saved and pushed, and do nothing",
        ini_type="bool",
        is_flag=True,
        default=False,
        read=_switch,
    ),
)
ALL_OPTIONS = RUN_OPTIONS + SETTING_OPTIONS + LOCK_OPTIONS + REPORT_OPTIONS + CACHE_OPTIONS + PUBLISH_OPTIONS
_BY_NAME = {spec.name: spec for spec in ALL_OPTIONS}


def option_spec(name: str) -> OptionSpec:
    """The plugin option for a setting or run option by its field name (`eval_set` → `--dpo-eval-set`)."""
    return _BY_NAME[name]


def setting_error(error: SettingsError) -> ConfigError:
    """A settings error as the plugin says it: prefixed with the option and its ini key (`--dpo-beta / dpo_beta`)."""
    return ConfigError(f"{option_spec(error.field).both}: {error}")
