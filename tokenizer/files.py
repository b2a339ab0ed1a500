"""The one atomic writer: files and folders appear complete under their final name, or not at all.

Every package writes through here (model folders, checkpoints, code shards, reports, images), so
a crash or a kill mid-write leaves the previous version or nothing, never a torn file or a half
folder under the final name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a hidden sibling of ``path`` to write; on success it is renamed to ``path``, on an
    error it is removed. Readers see the old file or the new one, never a torn one."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        yield partial
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`atomic_output`."""
    with atomic_output(path) as partial:
        partial.write_text(text)


def replace_directory(staging: Path, directory: Path) -> None:
    """Move the finished folder ``staging`` to ``directory``, replacing what is there.

    The old folder is first renamed aside and removed only after the new one is in place, so
    ``directory`` never holds a mix of the two.
    """
    if directory.exists():
        backup = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(directory, backup)
        os.replace(staging, directory)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staging, directory)


@contextlib.contextmanager
def atomic_directory(directory: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``directory``; on success it replaces ``directory``
    (:func:`replace_directory`), on an error it is removed and ``directory`` is left as it was."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    try:
        yield staging
        replace_directory(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
