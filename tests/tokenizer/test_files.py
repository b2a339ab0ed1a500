"""The atomic writer (tokenizer/files.py): manifests written last, verification, recovery after a kill."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from tokenizer import files
from tokenizer.files import (
    MANIFEST_NAME,
    ManifestError,
    atomic_directory,
    folder_is_complete,
    recover_directory,
    replace_directory,
    verify_folder,
    verify_manifest,
    write_manifest,
)


def write_folder(directory: Path, version: str = "v1") -> Path:
    """A small folder written the way every model folder is: through atomic_directory."""
    with atomic_directory(directory) as staging:
        (staging / "weights.bin").write_bytes(version.encode() * 1000)
        (staging / "config.json").write_text(json.dumps({"version": version}))
        (staging / "sub").mkdir()
        (staging / "sub" / "vocab.txt").write_text("a\nb\n")
    return directory


class SimulatedKill(BaseException):
    """Raised in place of a process kill; BaseException so no ``except Exception`` swallows it."""


def kill_after_first_rename(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make replace_directory stop between renaming the old folder aside and renaming the new one in."""
    real_replace = os.replace
    calls = []

    def replace(source, target):
        if Path(source).is_dir():  # the manifest's own atomic rename is a file's
            calls.append((source, target))
            if len(calls) == 2:
                raise SimulatedKill
        real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", replace)


def siblings(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.parent.iterdir())


# ------------------------------------------------------------------------------- manifest
def test_manifest_lists_every_file_and_is_written_last(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "model")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == files.MANIFEST_FORMAT_VERSION
    listed = {entry["path"]: entry for entry in manifest["files"]}
    assert sorted(listed) == ["config.json", "sub/vocab.txt", "weights.bin"]
    assert listed["weights.bin"]["size"] == 2000
    manifest_time = (folder / MANIFEST_NAME).stat().st_mtime_ns
    assert all((folder / name).stat().st_mtime_ns <= manifest_time for name in listed)
    assert verify_manifest(folder, full=True) == manifest
    assert siblings(folder) == ["model"]  # no staging folder or backup left


def test_a_failed_write_leaves_no_manifest_and_the_old_folder(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "model")
    with pytest.raises(RuntimeError, match="disk full"), atomic_directory(folder) as staging:
        (staging / "weights.bin").write_bytes(b"half")
        raise RuntimeError("disk full")
    assert json.loads((folder / "config.json").read_text()) == {"version": "v1"}
    verify_manifest(folder, full=True)
    assert siblings(folder) == ["model"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda folder: (folder / "weights.bin").write_bytes(b"v1" * 10), r"weights\.bin is 20 bytes, .* lists 2000"),
        (lambda folder: (folder / "sub" / "vocab.txt").unlink(), r"sub/vocab\.txt is missing"),
        (
            lambda folder: (folder / MANIFEST_NAME).write_text('{"format_version": 1, "fi'),
            "manifest.json is unreadable",
        ),
        (lambda folder: (folder / MANIFEST_NAME).unlink(), "no manifest.json"),
    ],
    ids=["truncated", "missing", "torn-manifest", "no-manifest"],
)
def test_verification_names_the_folder_and_the_bad_file(tmp_path: Path, damage, message: str) -> None:
    folder = write_folder(tmp_path / "model")
    damage(folder)
    for full in (False, True):
        with pytest.raises(ManifestError, match=message) as error:
            verify_manifest(folder, full=full)
        assert str(folder) in str(error.value) and "\n" not in str(error.value)
    assert not folder_is_complete(folder)


def test_a_changed_byte_is_caught_by_hashes_not_by_sizes(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "model")
    data = bytearray((folder / "weights.bin").read_bytes())
    data[1234] ^= 0xFF
    (folder / "weights.bin").write_bytes(bytes(data))
    verify_manifest(folder, full=False)  # loads compare sizes only: a stat per file
    with pytest.raises(ManifestError, match=rf"{folder}: weights\.bin does not match its sha256"):
        verify_manifest(folder, full=True)
    assert not folder_is_complete(folder)  # reuse compares hashes


def test_files_added_after_the_manifest_are_allowed(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "model")
    (folder / "sampling.json").write_text("{}")  # mllm.inference.write_sampling adds this later
    assert folder_is_complete(folder)
    assert not folder_is_complete(folder, required=("config.json", "metrics.json"))  # never written by the writer


def test_a_folder_without_a_manifest_loads_with_a_warning_but_is_never_complete(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="tokenizer.files"):
        assert verify_folder(folder) is False
    assert [record.getMessage() for record in caplog.records] == [
        f"{folder} has no manifest.json: loading it unverified (it is never reused as a finished stage)"
    ]
    assert not folder_is_complete(folder)
    write_manifest(folder)  # adopting a folder one trusts
    assert verify_folder(folder) is True and folder_is_complete(folder)


def test_a_manifest_entry_cannot_point_outside_the_folder(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "model")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["files"].append({"path": "../elsewhere", "size": 0, "sha256": ""})
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="bad entry"):
        verify_manifest(folder)


# ------------------------------------------------------------------------------- recovery
def test_a_kill_between_the_two_renames_is_recovered_on_the_next_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_folder(tmp_path / "model")
    with monkeypatch.context() as patch:
        kill_after_first_rename(patch)
        with pytest.raises(SimulatedKill):
            write_folder(folder, "v2")
    # atomic_directory's cleanup removed the staging folder; a real kill would not (test below).
    assert siblings(folder) == [".model.old"]
    assert verify_folder(folder) is True  # a loader restores the old folder before reading it
    assert json.loads((folder / "config.json").read_text()) == {"version": "v1"}
    assert siblings(folder) == ["model"]


def test_a_kill_between_the_two_renames_is_recovered_on_the_next_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_folder(tmp_path / "model")
    with monkeypatch.context() as patch:
        kill_after_first_rename(patch)
        with pytest.raises(SimulatedKill):
            write_folder(folder, "v2")
    write_folder(folder, "v3")
    assert json.loads((folder / "config.json").read_text()) == {"version": "v3"}
    assert siblings(folder) == ["model"]
    assert folder_is_complete(folder)


def test_recovery_promotes_a_finished_staging_folder_over_the_old_one(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "model")
    # The pieces of replace_directory, stopped where a kill -9 would stop them: the new folder is
    # finished (its manifest written), the old one renamed aside, the new one not yet renamed in.
    staging = tmp_path / ".model.partial-abc123"
    staging.mkdir()
    (staging / "config.json").write_text(json.dumps({"version": "v2"}))
    write_manifest(staging)
    unfinished = tmp_path / ".model.partial-killed"  # a second writer killed before its manifest
    unfinished.mkdir()
    (unfinished / "config.json").write_text("{")
    os.replace(folder, tmp_path / ".model.old")
    recover_directory(folder, remove_leftovers=False)  # what a loader does: nothing deleted
    assert json.loads((folder / "config.json").read_text()) == {"version": "v2"}
    assert siblings(folder) == [".model.old", ".model.partial-killed", "model"]
    assert folder_is_complete(folder)  # a completeness check (before a stage writes) clears the rest
    assert siblings(folder) == ["model"]


def test_recovery_ignores_a_staging_folder_that_does_not_verify(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "model")
    staging = tmp_path / ".model.staging"
    staging.mkdir()
    (staging / "config.json").write_text(json.dumps({"version": "v2"}))
    write_manifest(staging)
    (staging / "config.json").write_text(json.dumps({"version": "v3"}))  # same size, other bytes
    os.replace(folder, tmp_path / ".model.old")
    recover_directory(folder)
    assert json.loads((folder / "config.json").read_text()) == {"version": "v1"}
    assert siblings(folder) == ["model"]


def test_leftovers_beside_a_finished_folder_are_removed_by_writers_only(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "model")
    other = write_folder(tmp_path / "model2")  # a neighbour whose name starts the same is not a leftover
    for leftover in (".model.old", ".model.tmp", ".model.partial-x"):
        (tmp_path / leftover).mkdir()
    verify_folder(folder)
    assert len(siblings(folder)) == 5
    recover_directory(folder)
    assert siblings(folder) == ["model", "model2"] and folder_is_complete(other)


def test_replace_directory_of_a_new_name_is_one_rename(tmp_path: Path) -> None:
    staging = tmp_path / ".model.staging"
    staging.mkdir()
    (staging / "a").write_text("a")
    replace_directory(staging, tmp_path / "model")
    assert siblings(tmp_path / "model") == ["model"]
