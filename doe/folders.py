"""Folders written whole or not at all (expert and router files)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_folder"]


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _replace_dir(new: Path, target: Path) -> None:
    """Rename folder ``new`` to ``target``; an existing ``target`` is swapped out first and
    removed only after the rename succeeded."""
    if not target.exists():
        os.replace(new, target)
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    os.rmdir(old)
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(directory: Path) -> Iterator[Path]:
    """``with atomic_folder(d) as tmp:`` write the folder's files into ``tmp``; on a clean exit
    ``tmp`` replaces ``d`` (an existing ``d`` only once the new one is complete), on an error
    ``d`` stays as it was and ``tmp`` is removed."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a saved folder follows the umask
    try:
        yield tmp
        _replace_dir(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
