"""The pytest plugin's entry point: options, ini choice, configuration, parametrization over checkpoints.

Hooks only; the work happens in `session`, `verdicts`, `gates` and `report`. The fixtures are in
`plugin_fixtures`, the hooks of a run with checkpoints (gate items, verdicts, publishing, reports)
in `plugin_run`. Nothing here imports torch, transformers or peft: a pytest run that gives no
`--dpo-checkpoint` and uses no `dpo_*` fixture never pays for them.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pytest

from .config import RunConfig, read_run_config
from .options import ALL_OPTIONS, ConfigError
from .verdicts import Verdicts

if TYPE_CHECKING:
    from .distributed import World
    from .session import DPOSession

pytest_plugins = ("pytest_dpo.plugin_fixtures",)
DPO_FIXTURES = frozenset(
    {
        "dpo_checkpoint",
        "dpo_result",
        "dpo_results",
        "dpo_metrics",
        "dpo_model",
        "dpo_reference_model",
        "dpo_tokenizer",
        "dpo_eval_set",
        "dpo_samples",
    }
)
SESSION = pytest.StashKey["DPOSession | None"]()
VERDICTS = pytest.StashKey[Verdicts]()
_NO_CHECKPOINT = "no-dpo-checkpoint"
EVAL_SET_MARKER = "dpo_eval_set"
# The parametrized fixture behind `dpo_checkpoint`: a `(checkpoint id, eval set name)` pair.
TARGET_FIXTURE = "dpo_target"
TARGETS = pytest.StashKey[dict[tuple[str, str], tuple[str, str]]]()
_INI_DEFAULTS = {"paths": [], "linelist": [], "bool": False}
VALUE_FLAGS = frozenset(spec.flag for spec in ALL_OPTIONS if not spec.is_flag)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from . import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dpo", "DPO checkpoint testing (pytest-dpo)")
    for spec in ALL_OPTIONS:
        group.addoption(
            spec.flag,
            dest=spec.dest,
            action=spec.action,
            default=None,
            help=f"{spec.help} (ini: {spec.ini})",
        )
        for key in spec.ini_keys:
            parser.addini(key, spec.help, type=spec.ini_type, default=_INI_DEFAULTS.get(spec.ini_type, ""))


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, args: list[str]) -> None:
    """`--dpo-checkpoint PATH` (a space, not `=`): read the ini file pytest would have read knowing our options."""
    from .ini_choice import reconsider_ini

    reconsider_ini(early_config, args, VALUE_FLAGS)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "dpo_checkpoint(name): set by pytest-dpo on the tests of one checkpoint")
    config.addinivalue_line(
        "markers", f"{EVAL_SET_MARKER}(name): dpo_result, dpo_metrics and dpo_eval_set are of the named eval set"
    )
    _refuse_unknown_options(config.invocation_params.args)
    try:
        run_config = read_run_config(config.getoption, _ini_reader(config), config.inipath.parent if config.inipath else None)
    except ConfigError as error:
        raise pytest.UsageError(str(error)) from None
    dpo_session = _start_session(config, run_config) if run_config.active else None
    config.stash[SESSION] = dpo_session
    config.stash[VERDICTS] = Verdicts(dpo_session.ids if dpo_session else [])
    if dpo_session is None:
        return
    from .plugin_run import ActiveRun

    config.pluginmanager.register(ActiveRun(config, dpo_session), "dpo-active-run")


def _refuse_unknown_options(args: Sequence[str]) -> None:
    """A mistyped `--dpo-*` option (`--dpo-gates=…`) is taken by pytest for a test path: name it and the closest one."""
    known = sorted(spec.flag for spec in ALL_OPTIONS)
    for arg in args:
        if arg == "--":
            return
        flag = str(arg).split("=", 1)[0]
        if flag.startswith("--dpo-") and flag not in known:
            close = difflib.get_close_matches(flag, known, n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise pytest.UsageError(
                f"{flag}: no such pytest-dpo option.{hint} `pytest --help` lists them under 'DPO checkpoint testing'."
            )


def _ini_reader(config: pytest.Config) -> Callable[[str], Any]:
    """`config.getini`, with pytest's own parse errors (`invalid truth value 'maybe'`) naming the key and the fix."""
    types = {key: spec.ini_type for spec in ALL_OPTIONS for key in spec.ini_keys}

    def ini(key: str) -> Any:
        try:
            return config.getini(key)
        except (ValueError, pytest.UsageError) as error:
            expected = "true or false" if types.get(key) == "bool" else "a value pytest can read"
            raise ConfigError(f"{key} in {config.inipath}: {error}. Write {expected}.") from None

    return ini


def _start_session(config: pytest.Config, run_config: RunConfig) -> DPOSession:
    from .session import DPOSession

    worker = getattr(config, "workerinput", {}).get("workerid")
    pytest_cache = getattr(config, "cache", None)
    default_cache_dir = pytest_cache.mkdir("dpo-scores") if pytest_cache is not None else None
    try:
        world = _torchrun_world(config)
        dpo_session = DPOSession(
            run_config,
            worker_index=int(worker[2:]) if worker else None,
            default_cache_dir=default_cache_dir,
            world=world,
        )
        if run_config.lock and not worker:
            dpo_session.lock_status = dpo_session.check_lock(config.rootpath)
        dpo_session.progress = _progress_context(config) if world is None or world.is_main else None
    except ConfigError as error:
        raise pytest.UsageError(str(error)) from None
    return dpo_session


def _torchrun_world(config: pytest.Config) -> World | None:
    """This process's torchrun world with its process group started (and destroyed at exit), or None outside torchrun."""
    from .distributed import world_from_env

    world = world_from_env()
    if world is None:
        return None
    if getattr(config.option, "dist", "no") != "no":
        raise ConfigError(
            f"pytest-xdist (-n / --dist) cannot run under torchrun (WORLD_SIZE={world.world_size}): torchrun already "
            "starts one pytest per GPU and splits each checkpoint's eval set between them. Drop -n, or run "
            "`pytest -n N` without torchrun."
        )
    world.start()
    config.add_cleanup(world.stop)
    return world


def _progress_context(config: pytest.Config) -> Any:
    """How to show scoring progress on the real terminal, or None: quiet under -q, on workers, off a terminal."""
    capture = config.pluginmanager.getplugin("capturemanager")
    quiet = config.option.verbose < 0 or hasattr(config, "workerinput") or config.option.collectonly
    if quiet or capture is None or not sys.__stderr__.isatty():
        return None
    return capture.global_and_fixture_disabled


def session_of(config: pytest.Config) -> DPOSession:
    dpo_session = config.stash[SESSION]
    if dpo_session is None:
        raise pytest.UsageError("no DPO checkpoint configured: pass --dpo-checkpoint=PATH or set dpo_checkpoint.")
    return dpo_session


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each DPO test once per checkpoint, on the default eval set or the one its `dpo_eval_set` marker names.

    The parameter is a `(checkpoint id, eval set)` pair made once per pair (`_target`), so pytest, which tells
    session-scoped parameters apart by identity, shares each checkpoint's fixtures across test functions.
    """
    if not DPO_FIXTURES & set(metafunc.fixturenames):
        return
    dpo_session = metafunc.config.stash[SESSION]
    if dpo_session is None:
        reason = "no DPO checkpoint: pass --dpo-checkpoint=PATH or set dpo_checkpoint in the ini file"
        params = [pytest.param(None, id=_NO_CHECKPOINT, marks=pytest.mark.skip(reason=reason))]
    else:
        marker = metafunc.definition.get_closest_marker(EVAL_SET_MARKER)
        name = dpo_session.default_set if marker is None else _marked_eval_set(marker, dpo_session.eval_sets, metafunc.definition.nodeid)
        suffix = "" if marker is None else f"-{name}"
        params = [
            pytest.param(_target(metafunc.config, checkpoint_id, name), id=checkpoint_id + suffix)
            for checkpoint_id in dpo_session.ids
        ]
    metafunc.parametrize(TARGET_FIXTURE, params, indirect=True, scope="session")


def _target(config: pytest.Config, checkpoint_id: str, eval_set: str) -> tuple[str, str]:
    targets = config.stash.setdefault(TARGETS, {})
    return targets.setdefault((checkpoint_id, eval_set), (checkpoint_id, eval_set))


def _marked_eval_set(marker: pytest.Mark, known: Sequence[str], nodeid: str) -> str:
    """The eval set a `dpo_eval_set` marker names; a missing or unknown name is a collection error naming the test."""
    name = marker.args[0] if len(marker.args) == 1 and not marker.kwargs else None
    if not isinstance(name, str) or name not in known:
        raise pytest.Collector.CollectError(
            f"{nodeid}: @pytest.mark.{EVAL_SET_MARKER}{_call_text(marker)} must name one of this run's eval sets: "
            f"{', '.join(known)}. Write e.g. @pytest.mark.{EVAL_SET_MARKER}({next(iter(known))!r})."
        )
    return name


def _call_text(marker: pytest.Mark) -> str:
    arguments = [repr(arg) for arg in marker.args] + [f"{key}={value!r}" for key, value in marker.kwargs.items()]
    return f"({', '.join(arguments)})"


def verdicts_of(config: pytest.Config) -> Verdicts:
    """The session's per-checkpoint verdicts (final after `pytest_sessionfinish`), for later stages."""
    return config.stash[VERDICTS]
