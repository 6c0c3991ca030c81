"""Reading the next checkpoint's weights from disk while the current one is scored.

A sweep loads its checkpoints one after another; on a cold disk (a CI runner, a network volume) each load
waits for its files. While one checkpoint is scored, `Prefetcher.start` asks the kernel to read the next
one's weight files into the page cache (`posix_fadvise(WILLNEED)`, from a background thread), so its load
reads memory. Nothing is read into the process and nothing is held: a file already cached costs nothing,
and on systems without `posix_fadvise` prefetching does nothing. Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from .checkpoints import Checkpoint, weight_files


class Prefetcher:
    """Asks for one checkpoint's weight files at a time, each request in its own daemon thread."""

    def __init__(self) -> None:
        self.requested: list[Path] = []
        self._thread: threading.Thread | None = None

    def start(self, checkpoint: Checkpoint) -> None:
        """Begin reading `checkpoint`'s weight files into the page cache, once per checkpoint."""
        if checkpoint.path in self.requested or not hasattr(os, "posix_fadvise"):
            return
        self.requested.append(checkpoint.path)
        files = [checkpoint.path / name for name in weight_files(checkpoint.path)]
        self._thread = threading.Thread(target=_advise, args=(files,), name="pytest-dpo-prefetch", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the last request has been handed to the kernel (for tests)."""
        if self._thread is not None:
            self._thread.join()


def _advise(files: list[Path]) -> None:
    for file in files:
        try:
            descriptor = os.open(file, os.O_RDONLY)
        except OSError:
            continue  # a missing or unreadable file is reported when the checkpoint loads
        try:
            with contextlib.suppress(OSError):  # a hint the kernel may decline
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(descriptor)
