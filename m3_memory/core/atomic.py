"""Crash-safe file writes: a reader sees the old file or the complete new one, never a torn one.

A writer killed mid-write leaves its temporary file (`.<name>.<8 random>.tmp` beside the target); `remove_stale_temps`
is what a writer calls when it starts on a folder, to clear what an interrupted predecessor left there.
"""
from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

# mkstemp's random part is 8 characters of [a-z0-9_]; matching it exactly leaves other dot-files alone.
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(handle)` on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o644)  # mkstemp files are private; ours are ordinary data files
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temps(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Delete the temporary files that interrupted `write_atomic` calls left in `folder` (and, if `recursive`, its
    subfolders); returns the removed paths. Call it only where no other writer is writing right now."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp"):
        if _TEMP_NAME.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
