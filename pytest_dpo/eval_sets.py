"""A run's named eval sets as the user declares them: `NAME=PATH` values and per-set tokenization options.

`--dpo-eval-set helpful=evals/helpful.jsonl --dpo-eval-set safety=hub:org/safety:test` (or one
`NAME = PATH` per line of the ini key `dpo_eval_sets`) names each set; a bare `PATH` is the set named
`default`. `dpo_eval_set_options` lines such as `safety: max_length=2048 truncation_mode=keep_end` give a
set its own tokenization. Parsing and checking only; reading the sets is `evalset.load_eval_set`'s.
Standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .evalset import HUB_PREFIX
from .settings import SETTINGS_BY_NAME, DPOSettings, SettingsError

DEFAULT_EVAL_SET = "default"
# The settings an eval set may set for itself: they decide its tokens, so they belong to the set.
PER_SET_SETTINGS = ("max_length", "truncation_mode")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_OPTIONS_LINE = re.compile(r"^\s*(?P<name>[^:\s]+)\s*:(?P<pairs>.*)$")


class EvalSetSpecError(ValueError):
    """A declared eval set or its options cannot be used; the message names where and the fix."""


@dataclass(frozen=True)
class EvalSetSpec:
    """One named eval set of a run.

    Attributes:
        name (`str`): e.g. `safety`; `default` for a set given as a bare path.
        source (`str`): a file or folder path, or `hub:org/dataset[:split][@revision]`.
        options (`dict[str, str]`): its own settings as text (`max_length`, `truncation_mode`), which win
            over the run's for this set.
    """

    name: str
    source: str
    options: Mapping[str, str] = field(default_factory=dict)


def parse_eval_set_values(values: Iterable[str], where: str, relative_to: Path | None = None) -> tuple[EvalSetSpec, ...]:
    """`NAME=PATH` (or `NAME = PATH`, or a bare `PATH` for the set `default`) values into specs.

    A value that is an existing path as a whole is a bare path even if it holds `=`. A relative path in an
    ini file is taken from the ini file's folder when it exists there.

    Raises:
        EvalSetSpecError: a name is malformed or given twice; the message names `where` and the value.

    Example:
        >>> [(spec.name, spec.source) for spec in parse_eval_set_values(["eval.jsonl", "safety = s.jsonl"], "x")]
        [('default', 'eval.jsonl'), ('safety', 's.jsonl')]
    """
    specs: dict[str, EvalSetSpec] = {}
    for value in values:
        text = str(value).strip()
        if not text or text.startswith("#"):
            continue
        name, source = _split(text, where)
        if name in specs:
            raise EvalSetSpecError(
                f"{where}: eval set {name!r} is given twice ({specs[name].source} and {source}). Give each set "
                "its own name, e.g. helpful=evals/helpful.jsonl and safety=evals/safety.jsonl."
            )
        specs[name] = EvalSetSpec(name, _resolved(source, relative_to))
    return tuple(specs.values())


def _split(text: str, where: str) -> tuple[str, str]:
    if "=" not in text or Path(text).exists():
        return DEFAULT_EVAL_SET, text
    name, source = (part.strip() for part in text.split("=", 1))
    if not _NAME.fullmatch(name):
        if "/" in name or "\\" in name:
            return DEFAULT_EVAL_SET, text  # a path with '=' in it, not a name
        raise EvalSetSpecError(
            f"{where}: {name!r} in {text!r} is not an eval-set name. Use letters, digits, '_', '-' and '.', "
            "e.g. safety=evals/safety.jsonl."
        )
    if not source:
        raise EvalSetSpecError(f"{where}: eval set {name!r} has no path in {text!r}. Write {name}=PATH.")
    return name, source


def _resolved(source: str, relative_to: Path | None) -> str:
    if source.startswith(HUB_PREFIX) or relative_to is None or Path(source).is_absolute():
        return source
    return str(relative_to / source) if (relative_to / source).exists() else source


def parse_eval_set_options(lines: Sequence[str], where: str) -> dict[str, dict[str, str]]:
    """`NAME: key=value …` lines into each set's own settings, checked as settings are.

    Raises:
        EvalSetSpecError: a line is malformed, a key is not one of `PER_SET_SETTINGS`, or a value cannot be
            read; the message names `where`, the line and the fix.

    Example:
        >>> parse_eval_set_options(["safety: max_length=64 truncation_mode=keep_end"], "dpo_eval_set_options")
        {'safety': {'max_length': '64', 'truncation_mode': 'keep_end'}}
    """
    options: dict[str, dict[str, str]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.strip().startswith("#"):
            continue
        here = f"{where} line {number}" if len(lines) > 1 else where
        match = _OPTIONS_LINE.match(line)
        pairs = match.group("pairs").split() if match else []
        if match is None or not pairs or not all("=" in pair for pair in pairs):
            raise EvalSetSpecError(
                f"{here}: cannot read {line.strip()!r}. Write `NAME: key=value …`, e.g. "
                f"`safety: max_length=2048 truncation_mode=keep_end` (keys: {', '.join(PER_SET_SETTINGS)})."
            )
        own = options.setdefault(match.group("name"), {})
        for pair in pairs:
            key, text = pair.split("=", 1)
            if key not in PER_SET_SETTINGS:
                raise EvalSetSpecError(
                    f"{here}: {key!r} cannot be set per eval set. Per-set keys: {', '.join(PER_SET_SETTINGS)} "
                    "(they decide a set's tokens); give the others for the whole run."
                )
            _check_value(key, text, here)
            own[key] = text
    return options


def _check_value(key: str, text: str, where: str) -> None:
    try:
        DPOSettings.from_text({key: text})
    except SettingsError as error:
        raise EvalSetSpecError(f"{where}: {error}") from None


def with_options(specs: Sequence[EvalSetSpec], options: Mapping[str, Mapping[str, str]], where: str) -> tuple[EvalSetSpec, ...]:
    """The specs with their own options; options for a set the run does not have are an error naming the known sets."""
    names = [spec.name for spec in specs]
    for name in options:
        if name not in names:
            raise EvalSetSpecError(
                f"{where}: options for eval set {name!r}, which this run does not have. Known eval sets: "
                f"{', '.join(names)}."
            )
    return tuple(EvalSetSpec(spec.name, spec.source, dict(options.get(spec.name, {}))) for spec in specs)


def parsed_options(spec: EvalSetSpec) -> dict[str, Any]:
    """A set's own settings as values (checked when they were read)."""
    return {key: SETTINGS_BY_NAME[key].parse(text) for key, text in spec.options.items()}
