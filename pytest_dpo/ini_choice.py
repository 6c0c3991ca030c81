"""Read the ini file pytest would have read had it known the `--dpo-*` options when it chose one.

pytest picks its ini file before plugins add their options (pytest-dev/pytest#8846), so in
`pytest --dpo-checkpoint /data/runs/dpo` the path is first taken for a test path, and the ini file
is searched from `/data/runs/dpo` upwards instead of from the current folder: the project's
`pytest.ini`, with its eval set and gates, is never read. Once the options are known, this module
chooses again, as pytest itself does, and switches to that ini file; where a switch cannot be made
faithfully (the ini files load plugins or change `sys.path` while pytest starts) it stops with a
usage error naming both files and the fix.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

# ini keys pytest acts on before plugins are loaded: a late switch could not undo or redo their effect.
_EARLY_KEYS = ("pythonpath", "required_plugins")


def reconsider_ini(config: pytest.Config, args: list[str], value_flags: frozenset[str]) -> None:
    """Switch `config` to the ini file chosen with `value_flags` known to take a value.

    Does nothing unless one of `value_flags` was given with its value as a separate argument
    (`--dpo-checkpoint PATH`) and that changed the choice. `args` is the argument list pytest goes
    on to parse; the addopts of the two ini files are swapped in it.

    Raises:
        pytest.UsageError: the switch cannot be made; says which ini file pytest read, which it did
            not, and how to run so it reads the right one.
    """
    if not any(arg in value_flags for arg in args):
        return
    namespace = config.known_args_namespace
    if namespace.inifilename or namespace.rootdir:
        return
    rootpath, inipath, inicfg = _determine_setup(config, list(namespace.file_or_dir or []))
    if inipath == config.inipath:
        return
    blocker = _switch_blocker(config, inicfg)
    if blocker is not None:
        raise pytest.UsageError(_cannot_switch(config, inipath, blocker))
    _switch(config, args, rootpath, inipath, inicfg)


def _determine_setup(config: pytest.Config, file_or_dir: list[str]) -> tuple[Path, Path | None, Any]:
    from _pytest.config.findpaths import determine_setup

    namespace = config.known_args_namespace
    offered = {
        "inifile": None,
        "override_ini": getattr(namespace, "override_ini", None),
        "args": file_or_dir,
        "rootdir_cmd_arg": None,
        "invocation_dir": config.invocation_params.dir,
    }
    # pytest 8 and 9 take different keywords (9 added override_ini); offer each only where it is taken.
    accepted = inspect.signature(determine_setup).parameters
    rootpath, inipath, inicfg, *_ = determine_setup(**{key: value for key, value in offered.items() if key in accepted})
    return rootpath, inipath, inicfg


def _switch_blocker(config: pytest.Config, inicfg: Any) -> str | None:
    """Why the switch cannot be made faithfully, or None."""
    for key in _EARLY_KEYS:
        if key in inicfg or config.getini(key):
            return f"an ini file sets `{key}`, which pytest applies before plugins load"
    if "-p" in _split_addopts(config, inicfg) or "-p" in config.getini("addopts"):
        return "an ini file's addopts load plugins (-p), which pytest does before plugins load"
    return None


def _split_addopts(config: pytest.Config, inicfg: Any) -> list[str]:
    if "addopts" not in inicfg:
        return []
    value = inicfg["addopts"]
    value = getattr(value, "value", value)
    if isinstance(value, str):
        import shlex

        return shlex.split(value)
    return [str(part) for part in value]


def _switch(config: pytest.Config, args: list[str], rootpath: Path, inipath: Path | None, inicfg: Any) -> None:
    old_addopts = list(config.getini("addopts"))
    new_addopts = _split_addopts(config, inicfg)
    old_inipath, old_rootpath = config.inipath, config.rootpath
    if old_addopts and args[: len(old_addopts)] == old_addopts:
        del args[: len(old_addopts)]
    args[:0] = new_addopts
    config._rootpath = rootpath
    config._inipath = inipath
    config._inicfg = inicfg
    config._inicache.clear()
    config._parser.extra_info["rootdir"] = str(rootpath)
    config._parser.extra_info["inifile"] = str(inipath)
    namespace = config.known_args_namespace
    if namespace.confcutdir == str(old_inipath.parent if old_inipath is not None else old_rootpath):
        namespace.confcutdir = str(inipath.parent if inipath is not None else rootpath)


def _cannot_switch(config: pytest.Config, right: Path, why: str) -> str:
    read = config.inipath or "no ini file"
    return (
        f"pytest read {read}, not {right}: it chose its ini file before pytest-dpo's options were known, and "
        f"took the value of a separated --dpo-* option for a test path; pytest-dpo cannot switch ({why}). "
        f"Write the option with '=' (--dpo-checkpoint=PATH), or name the ini file: -c {right}."
    )
