"""How the user spells a setting, so that an error raised deep in the core names what they typed.

The same setting is `--dpo-reference` for pytest, `--reference` for `python -m pytest_dpo` and
`reference=` for `evaluate()`. Each face says which it is once, around its work; core modules name
settings by field and ask `option(field)` for the spelling when they write a message.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_SPELLINGS = {
    "pytest": "--dpo-{dashed}",
    "cli": "--{dashed}",
    "python": "{name}=",
}
_face: ContextVar[str] = ContextVar("pytest_dpo_face", default="pytest")


def spelled(name: str, face: str) -> str:
    """How `face` (`pytest`, `cli` or `python`) spells the setting or option `name` (a field name, e.g. `max_length`)."""
    return _SPELLINGS[face].format(dashed=name.replace("_", "-"), name=name)


def option(name: str) -> str:
    """The current face's spelling of the setting `name` (a settings field name, e.g. `max_length`)."""
    return spelled(name, _face.get())


def flag(name: str) -> str:
    """The current face's spelling of turning the on/off setting `name` on: `--dpo-allow-pickle`, `allow_pickle=True`."""
    return f"{name}=True" if _face.get() == "python" else option(name)


@contextmanager
def spelled_for(face: str) -> Iterator[None]:
    """Within the block, `option()` spells settings as `face` does: `pytest`, `cli` or `python`."""
    token = _face.set(face)
    try:
        yield
    finally:
        _face.reset(token)
