"""Whole-file writes that readers never see half done: temp file in the same directory,
then `os.replace` over the target."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(path: Path, payload: bytes, durable: bool = True, before_replace: Callable[[], None] | None = None,
          sync_rename: bool = True) -> None:
    """Replace `path` with `payload` (mode 0600). `durable` fsyncs the data and the rename,
    for files whose loss matters (the registry); a status snapshot rewritten every round
    skips that cost. `sync_rename=False` keeps the data's fsync (after a power cut the file is
    whole, old or new) but not the rename's: for a change whose loss is harmless.
    `before_replace` runs just before the rename and may raise to cancel it (the temp file is
    removed)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
        if durable and sync_rename:
            _fsync_dir(path.parent)  # the rename itself survives a power cut
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
