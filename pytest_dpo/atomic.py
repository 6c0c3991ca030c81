"""Writing a file so that readers never see half of it: a temporary file beside it, then a rename."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path` to write; on success it is renamed over `path`, on any error removed.

    The temporary file is created empty with mode 0o666 less the umask, as any new file (tempfile's would be 0o600).
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns `path`."""
    with replacing(path) as temporary:
        temporary.write_bytes(data)
    return path


def write_atomic_with(path: Path, write: Callable[[Path], None]) -> Path:
    """Have `write(temporary_path)` produce the file (e.g. safetensors' `save_file`), then rename it over `path`."""
    with replacing(path) as temporary:
        write(temporary)
    return path
