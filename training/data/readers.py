"""Readers for real image(-text) data, all yielding the items of ``ShapesImageDataset``.

Every reader returns a torch ``Dataset`` whose items are
``{"image": (3, S, S) float32 in [-1, 1], "caption": str, "label": int (-1 when absent), "index": int}``
and decodes every image through :func:`load_image`, made square by ``image_resize``: ``"crop"``
(the default: bicubic resize of the shorter side to ``image_size``, then a centre crop) or
``"pad"`` (pad-to-square on mid grey first, :func:`tokenizer.images.fit_square`), so a bad file
fails the same way whatever the format: with an :class:`ImageLoadError` naming the file and the reason.

Formats:
- image folder: ``root/metadata.jsonl`` with ``{"file_name": ..., "text" | "caption": ...}`` lines
  (the Hugging Face ``imagefolder`` layout; ``ShapesWorld.write_imagefolder`` writes it);
- JSON lines: ``{"image": path, "caption": ...}``, relative paths resolved against the file's folder;
- Parquet: an image column of bytes or ``{"bytes", "path"}`` structs (the ``datasets.Image`` layout);
- WebDataset tar shards: members grouped by key, random access through an offset index.

:class:`DataConfig` (:mod:`training.data.image_data`) picks one from a config; what a bad image
then does to training is up to :mod:`training.data.bad_images`.
"""

from __future__ import annotations

import bisect
import glob
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from tokenizer.images import ImageLoadError, ImageSource, load_image

logger = logging.getLogger(__name__)

# How a reader's user turns conversion of non-RGB images back on, for load_image's refusal message.
_HINT = "set data.convert_to_rgb=true"

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")


class MetadataError(ValueError):
    """A metadata line (JSON lines, tar sample) is malformed; the message names the file and line."""


def _item(image: torch.Tensor, caption: str, label: int, index: int) -> dict[str, Any]:
    return {"image": image, "caption": caption, "label": label, "index": index}


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line_number, record)`` for each non-blank line of ``path``; bad JSON names the line."""
    if not path.is_file():
        raise FileNotFoundError(f"metadata file not found: {path}")
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise MetadataError(f"{path}:{line_number}: invalid JSON ({error.msg})") from error
            if not isinstance(record, dict):
                raise MetadataError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            records.append((line_number, record))
    return records


def _field(record: dict[str, Any], keys: tuple[str, ...], where: str) -> Any:
    """The first of ``keys`` present in ``record``; a MetadataError naming ``where`` when none is."""
    for key in keys:
        if key in record:
            return record[key]
    wanted = " or ".join(repr(key) for key in keys)
    raise MetadataError(f"{where}: missing key {wanted} (keys present: {sorted(record)})")


def _label(record: dict[str, Any], where: str) -> int:
    label = record.get("label", -1)
    if isinstance(label, bool) or not isinstance(label, int):
        raise MetadataError(f"{where}: 'label' must be an integer, got {label!r}")
    return label


def _expand_paths(
    paths: str | os.PathLike | list[str | os.PathLike], suffixes: tuple[str, ...], what: str
) -> list[str]:
    """Files named by ``paths``: each entry a file, a glob, or a folder (all ``suffixes`` files inside)."""
    entries = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files: list[str] = []
    for entry in entries:
        entry = os.fspath(entry)
        if os.path.isdir(entry):
            found = sorted(str(p) for p in Path(entry).iterdir() if p.name.endswith(suffixes))
        elif glob.has_magic(entry):
            found = sorted(glob.glob(entry))
        else:
            found = [entry] if os.path.isfile(entry) else []
        if not found:
            raise FileNotFoundError(f"no {what} files found at {entry!r} (expected a file, a glob or a folder)")
        files.extend(found)
    return files


# --------------------------------------------------------------------------------------
# image folder and JSON lines
# --------------------------------------------------------------------------------------


class _ListedImageDataset(Dataset):
    """Images listed as ``(path, caption, label)`` entries, decoded on access."""

    def __init__(
        self, entries: list[tuple[Path, str, int]], image_size: int, convert_to_rgb: bool, image_resize: str = "crop"
    ) -> None:
        self.entries = entries
        self.image_size = image_size
        self.convert_to_rgb = convert_to_rgb
        self.image_resize = image_resize

    def __len__(self) -> int:
        return len(self.entries)

    def image_name(self, index: int) -> str:
        """The file of item ``index``, as its errors name it."""
        return str(self.entries[index][0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, caption, label = self.entries[index]
        image = load_image(
            path,
            name=str(path),
            image_size=self.image_size,
            convert_to_rgb=self.convert_to_rgb,
            convert_hint=_HINT,
            resize=self.image_resize,
        )
        return _item(image, caption, label, index)


class ImageFolderDataset(_ListedImageDataset):
    """``root/metadata.jsonl`` with ``{"file_name": "a.png", "text" | "caption": "...", "label"?: int}`` lines."""

    def __init__(
        self, root: str | os.PathLike, image_size: int = 64, convert_to_rgb: bool = True, image_resize: str = "crop"
    ) -> None:
        root = Path(root)
        metadata = root / "metadata.jsonl"
        if not metadata.is_file():
            raise FileNotFoundError(
                f"image folder {root} has no metadata.jsonl (expected lines like "
                '{"file_name": "a.png", "text": "a caption"})'
            )
        entries = []
        for line_number, record in _read_jsonl(metadata):
            where = f"{metadata}:{line_number}"
            file_name = _field(record, ("file_name",), where)
            caption = _field(record, ("text", "caption"), where)
            entries.append((root / file_name, str(caption), _label(record, where)))
        super().__init__(entries, image_size, convert_to_rgb, image_resize)


class JsonlImageTextDataset(_ListedImageDataset):
    """A ``.jsonl`` file of ``{"image": "rel/or/abs.jpg", "caption": "...", "label"?: int}`` lines.

    Relative image paths are resolved against the folder holding the ``.jsonl`` file.
    """

    def __init__(
        self, path: str | os.PathLike, image_size: int = 64, convert_to_rgb: bool = True, image_resize: str = "crop"
    ) -> None:
        path = Path(path)
        entries = []
        for line_number, record in _read_jsonl(path):
            where = f"{path}:{line_number}"
            image_path = Path(_field(record, ("image",), where))
            caption = _field(record, ("caption", "text"), where)
            entries.append(
                (
                    image_path if image_path.is_absolute() else path.parent / image_path,
                    str(caption),
                    _label(record, where),
                )
            )
        super().__init__(entries, image_size, convert_to_rgb, image_resize)


# --------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------


class ParquetImageTextDataset(Dataset):
    """Parquet files with an image column (bytes, or ``{"bytes", "path"}`` structs) and a caption column.

    ``paths``: a file, a glob, a folder of ``.parquet`` files, or a list of those. Rows are
    addressed through the row-group metadata, and the last row group read is cached per
    process, so sequential access decodes each row group once; random access reads one row
    group per item (write shards with small row groups, e.g. 256 rows, for shuffled training).
    """

    def __init__(
        self,
        paths: str | os.PathLike | list[str | os.PathLike],
        image_size: int = 64,
        convert_to_rgb: bool = True,
        image_column: str = "image",
        caption_column: str = "caption",
        label_column: str | None = None,
        image_resize: str = "crop",
    ) -> None:
        self.files = _expand_paths(paths, (".parquet",), "parquet")
        self.image_size = image_size
        self.convert_to_rgb = convert_to_rgb
        self.image_resize = image_resize
        self.columns = [image_column, caption_column] + ([label_column] if label_column else [])
        self.image_column, self.caption_column, self.label_column = image_column, caption_column, label_column
        self._groups: list[tuple[int, int]] = []  # (file index, row group) in reading order
        self._starts: list[int] = []  # first global row of each entry of _groups
        total = 0
        for file_index, file in enumerate(self.files):
            parquet = pq.ParquetFile(file)
            missing = [column for column in self.columns if column not in parquet.schema_arrow.names]
            if missing:
                raise ValueError(
                    f"parquet file {file} lacks column(s) {missing} (columns: {parquet.schema_arrow.names}); "
                    "set image_column / caption_column"
                )
            for group in range(parquet.metadata.num_row_groups):
                self._groups.append((file_index, group))
                self._starts.append(total)
                total += parquet.metadata.row_group(group).num_rows
        self._length = total
        self._cache: tuple[int, pa.Table] | None = None

    def __len__(self) -> int:
        return self._length

    def image_name(self, index: int) -> str:
        """``file#rowN``: the row of item ``index``, as its errors name it."""
        slot = bisect.bisect_right(self._starts, index) - 1
        return f"{self.files[self._groups[slot][0]]}#row{index - self._starts[slot]}"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None  # DataLoader workers read their own row groups
        return state

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for a parquet dataset of {self._length} rows")
        slot = bisect.bisect_right(self._starts, index) - 1
        if self._cache is None or self._cache[0] != slot:
            file_index, group = self._groups[slot]
            table = pq.ParquetFile(self.files[file_index]).read_row_group(group, columns=self.columns)
            self._cache = (slot, table)
        table = self._cache[1]
        row = index - self._starts[slot]
        file = self.files[self._groups[slot][0]]
        name = f"{file}#row{row}"
        image = load_image(
            self._image_source(table.column(self.image_column)[row].as_py(), file, name),
            name=name,
            image_size=self.image_size,
            convert_to_rgb=self.convert_to_rgb,
            convert_hint=_HINT,
            resize=self.image_resize,
        )
        caption = table.column(self.caption_column)[row].as_py()
        label = table.column(self.label_column)[row].as_py() if self.label_column else -1
        return _item(image, "" if caption is None else str(caption), -1 if label is None else int(label), index)

    @staticmethod
    def _image_source(value: Any, file: str, name: str) -> ImageSource:
        """Bytes, or a path (relative to the parquet file's folder) from a cell of the image column."""
        if isinstance(value, dict):  # the datasets.Image struct: bytes win, path is the fallback
            if value.get("bytes") is not None:
                return value["bytes"]
            value = value.get("path")
        if isinstance(value, bytes):
            return value
        if isinstance(value, str):
            return value if os.path.isabs(value) else os.path.join(os.path.dirname(file), value)
        raise ImageLoadError(f"image {name}: the image cell holds neither bytes nor a path ({type(value).__name__})")


# --------------------------------------------------------------------------------------
# WebDataset tar shards
# --------------------------------------------------------------------------------------


@dataclass
class _TarSample:
    shard: int
    key: str
    image: tuple[int, int, str]  # (data offset, size, extension)
    caption: tuple[int, int, str] | None
    label: tuple[int, int, str] | None


class WebDatasetTarDataset(Dataset):
    """WebDataset tar shards: members ``<key>.<ext>`` grouped by key, read by offset.

    The key is the member path up to the first dot of its base name (``dir/000.jpg`` ->
    ``dir/000``). The image comes from ``jpg``/``jpeg``/``png``/``webp``, the caption from
    ``txt`` or ``json`` (field ``"caption"`` or ``"text"``), the label from ``cls`` if present.
    Samples without an image are skipped (with a warning); without a caption, the caption is "".
    The index of member offsets is built once at construction, so ``__getitem__`` is one seek.
    Shards must be uncompressed ``.tar`` (a gzip stream cannot be entered at an offset).
    """

    def __init__(
        self,
        paths: str | os.PathLike | list[str | os.PathLike],
        image_size: int = 64,
        convert_to_rgb: bool = True,
        image_resize: str = "crop",
    ) -> None:
        self.shards = _expand_paths(paths, (".tar",), "tar shard")
        self.image_size = image_size
        self.convert_to_rgb = convert_to_rgb
        self.image_resize = image_resize
        self.samples: list[_TarSample] = []
        skipped = 0
        for shard_index, shard in enumerate(self.shards):
            indexed, shard_skipped = self._index_shard(shard_index, shard)
            self.samples.extend(indexed)
            skipped += shard_skipped
        if skipped:
            logger.warning("skipped %d tar samples without an image (%s)", skipped, "/".join(IMAGE_EXTENSIONS))
        self._handles: dict[int, Any] = {}

    @staticmethod
    def _index_shard(shard_index: int, shard: str) -> tuple[list[_TarSample], int]:
        members: dict[str, dict[str, tuple[int, int, str]]] = {}
        try:
            with tarfile.open(shard, mode="r:") as archive:  # "r:" refuses compressed shards
                for member in archive:
                    if not member.isfile():
                        continue
                    folder, base = os.path.split(member.name)
                    if base.startswith(".") or "." not in base:
                        continue
                    stem, extension = base.split(".", 1)
                    key = f"{folder}/{stem}" if folder else stem
                    members.setdefault(key, {})[extension.lower()] = (member.offset_data, member.size, extension)
        except tarfile.ReadError as error:
            raise ValueError(f"cannot read tar shard {shard} ({error}); shards must be uncompressed .tar") from error
        samples, skipped = [], 0
        for key, parts in members.items():
            image = next((parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts), None)
            if image is None:
                skipped += 1
                continue
            caption = parts.get("txt") or parts.get("json")
            samples.append(_TarSample(shard_index, key, image, caption, parts.get("cls")))
        return samples, skipped

    def __len__(self) -> int:
        return len(self.samples)

    def image_name(self, index: int) -> str:
        """``shard.tar:key.ext``: the member of item ``index``, as its errors name it."""
        sample = self.samples[index]
        return f"{self.shards[sample.shard]}:{sample.key}.{sample.image[2]}"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open files do not cross process boundaries
        return state

    def _read(self, shard: int, span: tuple[int, int, str]) -> bytes:
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = open(self.shards[shard], "rb")  # kept open: one seek per item
        handle.seek(span[0])
        return handle.read(span[1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        where = f"{self.shards[sample.shard]}:{sample.key}"
        image = load_image(
            self._read(sample.shard, sample.image),
            name=f"{where}.{sample.image[2]}",
            image_size=self.image_size,
            convert_to_rgb=self.convert_to_rgb,
            convert_hint=_HINT,
            resize=self.image_resize,
        )
        caption = ""
        if sample.caption is not None:
            text = self._read(sample.shard, sample.caption).decode("utf-8")
            if sample.caption[2].lower() == "json":
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as error:
                    raise MetadataError(f"{where}.json: invalid JSON ({error.msg})") from error
                if not isinstance(record, dict):
                    raise MetadataError(f"{where}.json: expected a JSON object, got {type(record).__name__}")
                text = str(_field(record, ("caption", "text"), f"{where}.json"))
            caption = text.strip()
        label = -1
        if sample.label is not None:
            raw = self._read(sample.shard, sample.label).decode("utf-8").strip()
            try:
                label = int(raw)
            except ValueError as error:
                raise MetadataError(f"{where}.cls: expected an integer class, got {raw!r}") from error
        return _item(image, caption, label, index)

    def __del__(self) -> None:
        for handle in getattr(self, "_handles", {}).values():
            handle.close()
