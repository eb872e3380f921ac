"""Crash-safe file replacement on a local filesystem: what
td3drive.contracts.storage.RunStorage uses for every local write
(checkpoints, replay snapshots, the driver's files)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Replace ``path`` with what ``write(handle)`` writes, atomically.

    The data goes to a temp file in the same directory, is flushed and
    fsynced, renamed over ``path`` (``os.replace``), and the directory is
    fsynced: after a crash ``path`` holds the old content or the new, never a
    mix.

    Raises:
        OSError: on any write failure (e.g. a full disk); the temp file is
            removed and an existing ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path
