"""The one atomic writer: files and folders appear complete under their final name, or not at all.

Every package writes through here (model folders, checkpoints, code shards, reports, images), so
a crash or a kill mid-write leaves the previous version or nothing, never a torn file or a half
folder under the final name.

A folder is finished when its :data:`MANIFEST_NAME` verifies. The manifest lists every file of
the folder (relative path, size in bytes, sha256) and is written last, after everything else, so
a folder whose manifest is present was written to the end, and one whose files no longer match
it (a truncated, missing or edited file) is refused by name. :func:`recover_directory` repairs
what a kill between the two renames of :func:`replace_directory` leaves behind. The guarantees
and the tests that hold them are described in docs/reliability.md ("What survives a kill").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT_VERSION = 1
# The names a staging folder of ``NAME`` takes beside it, one per writer that ends in
# replace_directory: atomic_directory (``.NAME.partial-<random>``), training.checkpointing.save_checkpoint
# (``.NAME.staging``) and the code-shard writer (``.NAME.tmp``).
_STAGING_SUFFIXES = (".staging", ".tmp")
_STAGING_RANDOM_PREFIX = ".partial-"
_HASH_CHUNK = 8 << 20


class ManifestError(ValueError):
    """A folder's files do not match its ``manifest.json``; the message names the folder and the file."""


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


# ------------------------------------------------------------------------------- manifest
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _folder_files(directory: Path) -> list[str]:
    """Every file under ``directory`` (relative POSIX paths, sorted), the manifest and its partial excepted."""
    skip = {MANIFEST_NAME, f".{MANIFEST_NAME}.partial"}
    return sorted(
        path.relative_to(directory).as_posix()
        for path in directory.rglob("*")
        if path.is_file() and path.relative_to(directory).as_posix() not in skip
    )


def write_manifest(directory: Path) -> dict[str, Any]:
    """Write ``directory/manifest.json`` listing every file with its size and sha256; call it last.

    Hashing reads every file once more (about 1 GiB/s from the page cache on a 2-core machine), a
    few seconds for a multi-GB model: paid once per save, it lets a reuse check tell a finished
    folder from one with an edited or corrupted file. The manifest itself is written atomically, so it is
    either complete or absent.
    """
    directory = Path(directory)
    files = [
        {"path": name, "size": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
        for name in _folder_files(directory)
    ]
    manifest = {"format_version": MANIFEST_FORMAT_VERSION, "files": files}
    write_text_atomic(directory / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return manifest


def has_manifest(directory: Path) -> bool:
    """Whether ``directory`` was written with a manifest (folders written before manifests have none)."""
    return (Path(directory) / MANIFEST_NAME).is_file()


def read_manifest(directory: Path) -> dict[str, Any]:
    """The parsed manifest of ``directory``; a missing, unreadable or foreign one raises :class:`ManifestError`."""
    path = Path(directory) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{directory}: no {MANIFEST_NAME}; the folder was not finished (write it again)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"{path} is unreadable ({error}); write the folder again") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != MANIFEST_FORMAT_VERSION or not isinstance(manifest.get("files"), list):
        raise ManifestError(
            f"{path}: format_version={version!r}; expected {MANIFEST_FORMAT_VERSION} with a 'files' list"
        )
    return manifest


def verify_manifest(directory: Path, full: bool = False) -> dict[str, Any]:
    """Check every file ``directory/manifest.json`` lists; returns the manifest.

    ``full=False`` compares sizes (a ``stat`` per file: free, and it catches what a kill or a full
    disk leaves, a missing or truncated file); ``full=True`` also compares sha256 hashes (reads
    every byte: a flipped or edited byte of the same length). Files the manifest does not list
    (``sampling.json``, added to a model folder later) are allowed: the manifest vouches for what
    the writer wrote, not for what came after. Raises :class:`ManifestError` naming the folder and
    the first bad file.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    for entry in manifest["files"]:
        name = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(name, str) or name.startswith("/") or ".." in Path(name).parts:
            raise ManifestError(f"{directory / MANIFEST_NAME}: bad entry {entry!r}; expected a relative file path")
        path = directory / name
        if not path.is_file():
            raise ManifestError(f"{directory}: {name} is missing (listed in {MANIFEST_NAME}); write the folder again")
        size = path.stat().st_size
        if size != entry.get("size"):
            raise ManifestError(
                f"{directory}: {name} is {size} bytes, {MANIFEST_NAME} lists {entry.get('size')} "
                "(truncated or replaced); write the folder again"
            )
        if full and _sha256(path) != entry.get("sha256"):
            raise ManifestError(
                f"{directory}: {name} does not match its sha256 in {MANIFEST_NAME} (changed after it was written); "
                "write the folder again"
            )
    return manifest


def _manifest_lists(manifest: dict[str, Any], required: Iterable[str]) -> str | None:
    """The first of ``required`` the manifest does not list, or None."""
    listed = {entry["path"] for entry in manifest["files"]}
    return next((name for name in required if name not in listed), None)


def verify_folder(directory: Path, required: Iterable[str] = (), full: bool = False) -> bool:
    """What a loader calls first: recover ``directory`` (:func:`recover_directory`), then verify it.

    Returns True when the manifest verifies (sizes; hashes with ``full``) and lists every file
    in ``required``. A folder without a manifest (written before manifests existed, or a
    downloaded checkpoint) still loads, with a one-line warning, and returns False; its loader
    checks the files it needs by itself. Loads compare sizes only: hashing a multi-GB model at
    every ``chat`` or evaluation start would cost seconds, while a kill or a full disk shows up as
    a missing or short file; the hashes are compared when a finished stage is reused
    (:func:`folder_is_complete`), where a wrong folder would cost a whole training run.
    """
    directory = Path(directory)
    recover_directory(directory, remove_leftovers=False)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist")
    if not has_manifest(directory):
        logger.warning(
            "%s has no %s: loading it unverified (it is never reused as a finished stage)", directory, MANIFEST_NAME
        )
        return False
    manifest = verify_manifest(directory, full=full)
    missing = _manifest_lists(manifest, required)
    if missing is not None:
        raise ManifestError(f"{directory}: {MANIFEST_NAME} does not list {missing}; this is not a finished folder")
    return True


def folder_is_complete(directory: Path, required: Iterable[str] = ()) -> bool:
    """Whether ``directory`` is a finished folder to reuse: recovered, its manifest verified with
    hashes, and every file of ``required`` listed in it.

    A folder without a manifest is never complete: nothing says its files were written to the
    end. Why a folder that exists is not complete is logged, so a retrained stage says why.
    """
    directory = Path(directory)
    recover_directory(directory)
    if not directory.is_dir():
        return False
    if not has_manifest(directory):
        logger.warning(
            "not reusing %s: it has no %s (unfinished, or written before manifests)", directory, MANIFEST_NAME
        )
        return False
    try:
        manifest = verify_manifest(directory, full=True)
    except ManifestError as error:
        logger.warning("not reusing %s", error)
        return False
    missing = _manifest_lists(manifest, required)
    if missing is not None:
        logger.warning("not reusing %s: %s does not list %s", directory, MANIFEST_NAME, missing)
        return False
    return True


# ------------------------------------------------------------------------------- folders
def _backup_path(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.old")


def _staging_folders(directory: Path) -> list[Path]:
    """Staging folders of ``directory`` left beside it (see _STAGING_SUFFIXES), newest first."""
    if not directory.parent.is_dir():
        return []
    prefix = f".{directory.name}"
    found = []
    for entry in directory.parent.iterdir():
        rest = entry.name[len(prefix) :] if entry.name.startswith(prefix) else ""
        if entry.is_dir() and (rest in _STAGING_SUFFIXES or rest.startswith(_STAGING_RANDOM_PREFIX)):
            found.append(entry)
    return sorted(found, key=lambda path: path.stat().st_mtime_ns, reverse=True)


def recover_directory(directory: Path, remove_leftovers: bool = True) -> None:
    """Repair what a kill during :func:`replace_directory` leaves around ``directory``.

    If ``directory`` is missing (a kill between the two renames), the newest staging folder whose
    manifest verifies with hashes is promoted (its writer had finished: the manifest is written
    last, so that is the newer, complete version); failing that, ``.NAME.old`` is renamed back.
    With ``remove_leftovers`` (writers, and the completeness checks run before a stage writes),
    the staging folders left (unfinished ones included) and a ``.NAME.old`` left after the second
    rename are then deleted: they only take space. Loaders pass False: a staging
    folder may belong to a writer still running in another process (an evaluation started
    while training saves), and deleting it there would break that save.
    """
    directory = Path(directory)
    backup = _backup_path(directory)
    if not directory.exists():
        for staging in _staging_folders(directory):
            try:
                verify_manifest(staging, full=True)
            except ManifestError:
                continue
            os.replace(staging, directory)
            logger.warning("recovered %s from its finished staging folder %s", directory, staging.name)
            break
        else:
            if backup.is_dir():
                os.replace(backup, directory)
                logger.warning("recovered %s from %s (a replacement was interrupted)", directory, backup.name)
    if remove_leftovers:
        for leftover in [*_staging_folders(directory), backup]:
            shutil.rmtree(leftover, ignore_errors=True)


def replace_directory(staging: Path, directory: Path) -> None:
    """Move the finished folder ``staging`` to ``directory``, replacing what is there.

    The old folder is first renamed aside (``.NAME.old``) and removed only after the new one is
    in place, so ``directory`` never holds a mix of the two; a kill between the two renames
    leaves no ``directory``, which :func:`recover_directory` repairs.
    """
    if directory.exists():
        backup = _backup_path(directory)
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(directory, backup)
        os.replace(staging, directory)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staging, directory)


@contextlib.contextmanager
def atomic_directory(directory: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``directory``; on success its manifest is written
    (:func:`write_manifest`, last) and it replaces ``directory`` (:func:`replace_directory`), on an
    error it is removed and ``directory`` is left as it was. An earlier interrupted write of
    ``directory`` is recovered first (:func:`recover_directory`)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(directory)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}{_STAGING_RANDOM_PREFIX}", dir=directory.parent))
    try:
        yield staging
        write_manifest(staging)
        replace_directory(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------------------
# output paths, checked before any work starts
# --------------------------------------------------------------------------------------


class OutputPathError(ValueError):
    """An output folder or file that cannot be written; the message names the flag or field and the path."""


def _creation_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be created or written to (None when it can); creates nothing."""
    if folder.exists():
        if not folder.is_dir():
            return f"{folder} is a file, not a folder"
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"{folder} is not writable"
        return None
    ancestor = folder.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, so {folder} cannot be created inside it"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable, so {folder} cannot be created"
    return None


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as a Path when it is, or can be created as, a writable folder; else :class:`OutputPathError`.

    Called before any model is built or any sample drawn, so a file in the way or a read-only
    parent fails in the first second instead of after the work. ``flag`` (``--out``,
    ``loop.output_dir`` ...) names what the user set. Nothing is created.
    """
    folder = Path(path)
    problem = _creation_problem(folder)
    if problem is not None:
        raise OutputPathError(f"{flag} {folder}: {problem}; expected a folder that can be created and written")
    return folder


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as a Path when a file can be written there (its folder exists or can be created, and is
    writable; ``path`` is not a folder); else :class:`OutputPathError`. Nothing is created."""
    file = Path(path)
    if file.is_dir():
        raise OutputPathError(f"{flag} {file}: is a folder; expected a file name")
    problem = _creation_problem(file.parent)
    if problem is not None:
        raise OutputPathError(f"{flag} {file}: {problem}; expected a file in a folder that can be written")
    return file
