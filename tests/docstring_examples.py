"""Running the example tests that public docstrings show, so the documentation cannot drift from the code."""

from __future__ import annotations

import inspect
import re
import textwrap
from collections.abc import Callable


def docstring_tests(function: Callable) -> list[Callable]:
    """The `test_*` functions of the ```py example in `function`'s docstring."""
    (source,) = re.findall(r"```py\n(.*?)```", inspect.getdoc(function), flags=re.DOTALL)
    namespace: dict = {}
    exec(compile(textwrap.dedent(source), f"<{function.__name__} docstring>", "exec"), namespace)
    tests = [value for name, value in namespace.items() if name.startswith("test_")]
    assert tests
    return tests
