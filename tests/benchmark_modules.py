"""Importing a script of `benchmarks/` in a test, without the environment it sets for itself leaking out."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """`benchmarks/<name>.py` as a module; the environment variables and sys.path it sets (offline Hub) are
    restored after."""
    environment, path = dict(os.environ), list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
    finally:
        os.environ.clear()
        os.environ.update(environment)
        sys.path[:] = path
    return module
