"""Durable writes: every file the agent keeps across a power cut is written through here.

A file is written beside its final name, fsync'd, renamed over it and its
folder fsync'd, so a crash at any instant leaves the old file or the new one,
never a mix, and a rename that returned is not undone by a power cut.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make the renames and deletions in folder `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` by `data` atomically and durably. On failure (a full disk) the temp file
    is removed, `path` is as it was, and the OSError is raised."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
