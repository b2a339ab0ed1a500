"""The prediction cache and what it is keyed by, so a cached answer is never reused for another run.

A task's predictions are cached in ``<out>/predictions/<task>.jsonl``: a header line with the
cache key and what it was made from, then one line per item. The key hashes

- the model's fingerprint (:func:`folder_fingerprint` of the model folder and of the visual
  tokenizer folder: their config files and weights),
- the task's name and version, its settings section (sampling, splits, sizes, files),
- the prompt template and the image preprocessing.

When any of these changes, the header no longer matches and the cached predictions are set aside
(renamed ``<task>.<old key>.stale.jsonl``) and made again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Files whose bytes define a saved model or tokenizer; anything else in the folder (logs, metrics,
# reconstructions) does not change its outputs.
_DEFINING_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".yaml")
_SKIPPED_NAMES = frozenset({"manifest.json", "metrics.json"})
_CHUNK = 1 << 20


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def folder_fingerprint(folder: str | Path) -> str:
    """sha256 over the names and contents of a model folder's defining files (weights, configs,
    text tokenizer), recursively. The folder's ``manifest.json`` digests are used where they cover
    a file of the same size, so large weights are not read twice."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot fingerprint {folder}: not a folder")
    known: dict[str, tuple[int, str]] = {}
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            entries = json.loads(manifest.read_text()).get("files", [])
            known = {str(entry["path"]): (int(entry["size"]), str(entry["sha256"])) for entry in entries}
        except (ValueError, KeyError, TypeError, AttributeError):
            known = {}
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name in _SKIPPED_NAMES or path.suffix not in _DEFINING_SUFFIXES:
            continue
        relative = path.relative_to(folder).as_posix()
        size = path.stat().st_size
        recorded = known.get(relative)
        file_digest = recorded[1] if recorded and recorded[0] == size else _file_digest(path)
        digest.update(f"{relative}\0{size}\0{file_digest}\n".encode())
    return digest.hexdigest()


def cache_key(identity: dict[str, Any]) -> str:
    """A short stable hash of everything a prediction depends on."""
    canonical = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def read_cache(path: Path, key: str) -> dict[str, dict[str, Any]]:
    """Predictions cached under ``key``; a torn last line (killed mid-write) is dropped.

    A file made under another key (or without a header) is renamed aside, never reused.
    """
    cached: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return cached
    lines = path.read_text().splitlines()
    header: dict[str, Any] = {}
    if lines:
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            header = {}
    if header.get("cache_key") != key:
        old = str(header.get("cache_key") or "unkeyed")
        aside = path.with_name(f"{path.stem}.{old}.stale.jsonl")
        path.replace(aside)
        logger.info(
            "%s was made with other settings or another model (key %s, now %s): moved to %s", path, old, key, aside
        )
        return cached
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        cached[record["key"]] = record["prediction"]
    return cached


def header_line(key: str, identity: dict[str, Any]) -> str:
    return json.dumps({"cache_key": key, "identity": identity}, sort_keys=True, default=str) + "\n"
