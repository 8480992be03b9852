"""Disk space: what a directory holds, what is free where a path goes, and whether a failed write ran out of room."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

MiB = 2**20


def tree_bytes(path: Path) -> int:
    """The bytes of the files under ``path`` (0 when it is not a directory)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem of ``path``, or of its parent when ``path`` is not made yet."""
    return shutil.disk_usage(path if path.exists() else path.parent).free


def is_disk_full(error: BaseException, path: Path) -> bool:
    """Whether ``error``, raised by a write under ``path``, means the disk is full: ENOSPC anywhere in its chain, or
    under 1 MiB left (torch.save reports a full disk as a RuntimeError, "unexpected pos", without an errno)."""
    seen: BaseException | None = error
    while seen is not None:
        if getattr(seen, "errno", None) == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    return free_bytes(path) < MiB
