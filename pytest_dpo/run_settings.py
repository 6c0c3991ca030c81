"""The settings each checkpoint is scored with, and where each one came from.

A TRL run saves its `DPOConfig` into every checkpoint folder (`training_args.bin`). A checkpoint is
scored with the settings it was trained with (beta, loss type, max length, ...) unless the command
line or the ini file says otherwise; scoring a `beta=0.05` run with the default 0.1 would halve
every reward in silence. What the run asked for that pytest-dpo cannot reproduce (an `aot` loss, a
drifting reference) becomes a warning, and a `training_args.bin` that cannot be read safely is
never executed: the checkpoint is scored with the explicit settings and defaults, and a warning says so.
Standard library only: nothing here imports torch or TRL.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .settings import PER_EXAMPLE_LOSS_TYPES, DPOSettings, SettingsError
from .training_args import (
    TRAINING_SETTING_FIELDS,
    TrainingArgsError,
    find_training_args,
    read_training_args,
    training_settings,
    unreproducible_settings,
)

COMMAND_LINE, INI, ARGUMENT, RUN, DEFAULT = "command line", "ini", "argument", "run", "default"
EXPLICIT = (COMMAND_LINE, INI, ARGUMENT)


class FromRun:
    """The default of `evaluate()`'s training settings: what the checkpoint's run trained with, else TRL's default."""

    def __repr__(self) -> str:
        return "FROM_RUN"


FROM_RUN = FromRun()


@dataclass(frozen=True)
class SettingSource:
    """One setting's value for a checkpoint, where it came from, and what the run was trained with.

    Attributes:
        name (`str`): the `DPOSettings` field, e.g. `beta`.
        value: the value used.
        source (`str`): `command line`, `ini`, `argument` (of `evaluate()`), `run` (the checkpoint's
            `training_args.bin`) or `default`.
        trained: the run's own value, or None when the run did not record one.
    """

    name: str
    value: Any
    source: str
    trained: Any = None

    @property
    def differs(self) -> bool:
        """An explicit value that is not what the run was trained with."""
        return self.trained is not None and self.source in EXPLICIT and self.value != self.trained

    def __str__(self) -> str:
        note = f"; trained with {_text(self.trained)}" if self.differs else ""
        return f"{self.name}={_text(self.value)} ({self.source}{note})"


@dataclass(frozen=True)
class CheckpointSettings:
    """The settings one checkpoint is scored with.

    Attributes:
        settings (`DPOSettings`): what scoring uses.
        sources (`tuple[SettingSource, ...]`): each setting a run can set, and each one given explicitly.
        warnings (`tuple[str, ...]`): training settings whose effect is not reproduced, or why the run's
            settings could not be read.
        training_args (`str`, *optional*): the `training_args.bin` read, if any.
    """

    settings: DPOSettings
    sources: tuple[SettingSource, ...]
    warnings: tuple[str, ...] = ()
    training_args: str | None = None

    def describe(self) -> str:
        """`beta=0.1 (run), loss_type=sigmoid (run), max_length=128 (run), …` for the terminal header."""
        return ", ".join(str(source) for source in self.sources)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per setting its value, source and (when known) training value; the warnings."""
        return {
            "training_args": self.training_args,
            "sources": {
                source.name: {"value": _plain(source.value), "source": source.source, "trained": _plain(source.trained)}
                for source in self.sources
            },
            "warnings": list(self.warnings),
        }


def resolve_settings(base: DPOSettings, explicit: Mapping[str, str], folder: Path) -> CheckpointSettings:
    """The settings to score the checkpoint in `folder` with.

    Args:
        base (`DPOSettings`): the settings from the command line and ini file, defaults elsewhere.
        explicit (`Mapping[str, str]`): the fields given explicitly, each with its source (`command line`,
            `ini` or `argument`); they win over the run's values.
        folder (`Path`): the checkpoint folder, where TRL saved `training_args.bin`.

    Raises:
        SettingsError: the run's settings combine with the explicit ones into an invalid set; the
            message names the file and says to give the settings explicitly.
    """
    path = find_training_args(folder)
    trained: dict[str, Any] = {}
    warnings: list[str] = []
    if path is not None:
        try:
            args = read_training_args(path)
            trained = training_settings(args)
            warnings += [f"{path}: trained with {sentence}" for sentence in unreproducible_settings(args)]
        except TrainingArgsError as error:
            warnings.append(f"{error} Scored with the settings given and defaults instead.")
    known = {field.name for field in fields(DPOSettings)}
    taken = {name: value for name, value in trained.items() if name in known and name not in explicit}
    unscorable = not set(taken.get("loss_type", PER_EXAMPLE_LOSS_TYPES)) <= set(PER_EXAMPLE_LOSS_TYPES)
    if unscorable or "loss_type" in explicit:
        # The weights belong to the run's loss types: they go, or stay, together.
        taken.pop("loss_type", None)
        taken.pop("loss_weights", None)
    try:
        settings = dataclasses.replace(base, **taken)
    except SettingsError as error:
        raise SettingsError(
            error.field, f"{path}: the run's settings cannot be scored as saved: {error} Give the settings explicitly."
        ) from None
    names = [name for name in TRAINING_SETTING_FIELDS if name in known] + sorted(set(explicit) - set(TRAINING_SETTING_FIELDS))
    sources = tuple(
        SettingSource(
            name,
            getattr(settings, name),
            explicit.get(name) or (RUN if name in taken else DEFAULT),
            trained.get(name),
        )
        for name in names
    )
    return CheckpointSettings(settings, sources, tuple(warnings), str(path) if path is not None else None)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
