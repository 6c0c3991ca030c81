"""A pytest plugin the training gate loads into its pytest run (`-p pytest_dpo.gate_publication`).

Through the plugin's `pytest_dpo_published` hook it writes what the publisher did (its lines and its
error) to the file named by `PUBLICATION_FILE_ENV`, so the gate can say what was saved and pushed without
reading the terminal output. Standard library only: it is imported by every gate run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .atomic import write_atomic

PUBLICATION_FILE_ENV = "PYTEST_DPO_PUBLICATION_FILE"


def pytest_dpo_published(publication: Any) -> None:
    path = os.environ.get(PUBLICATION_FILE_ENV)
    if path:
        record = {"lines": list(publication.lines), "error": publication.error}
        write_atomic(Path(path), (json.dumps(record, indent=2) + "\n").encode("utf-8"))
