"""Readers for real image(-text) data, all yielding the items of ``ShapesImageDataset``.

Every reader returns a torch ``Dataset`` whose items are
``{"image": (3, S, S) float32 in [-1, 1], "caption": str, "label": int (-1 when absent), "index": int}``
and decodes every image through :func:`load_image` (bicubic resize of the shorter side to
``image_size``, then a centre crop), so a bad file fails the same way whatever the format:
with an :class:`ImageLoadError` naming the file and the reason.

Formats:
- image folder: ``root/metadata.jsonl`` with ``{"file_name": ..., "text" | "caption": ...}`` lines
  (the Hugging Face ``imagefolder`` layout; ``ShapesWorld.write_imagefolder`` writes it);
- JSON lines: ``{"image": path, "caption": ...}``, relative paths resolved against the file's folder;
- Parquet: an image column of bytes or ``{"bytes", "path"}`` structs (the ``datasets.Image`` layout);
- WebDataset tar shards: members grouped by key, random access through an offset index.

:class:`DataConfig` + :func:`build_image_dataset` pick one from a config. ``data.on_bad_image``
says what a bad image does to training: stop it after a checkpoint, or give way to the next good
item (:class:`BadImageGuard`), counted and listed by :class:`BadImageLog`.
"""

from __future__ import annotations

import bisect
import glob
import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from tokenizer.config import ConfigError
from tokenizer.files import write_text_atomic
from tokenizer.images import ImageLoadError, ImageSource, load_image
from training.data.shapes import ShapesImageDataset, ShapesWorld, ShapesWorldConfig

logger = logging.getLogger(__name__)

# How a reader's user turns conversion of non-RGB images back on, for load_image's refusal message.
_HINT = "set data.convert_to_rgb=true"

DATA_KINDS: tuple[str, ...] = ("shapes", "imagefolder", "jsonl", "parquet", "webdataset")
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
ON_BAD_IMAGE: tuple[str, ...] = ("error", "skip")
BAD_IMAGES_FILE = "bad_images.txt"


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

    def __init__(self, entries: list[tuple[Path, str, int]], image_size: int, convert_to_rgb: bool) -> None:
        self.entries = entries
        self.image_size = image_size
        self.convert_to_rgb = convert_to_rgb

    def __len__(self) -> int:
        return len(self.entries)

    def image_name(self, index: int) -> str:
        """The file of item ``index``, as its errors name it."""
        return str(self.entries[index][0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, caption, label = self.entries[index]
        image = load_image(
            path, name=str(path), image_size=self.image_size, convert_to_rgb=self.convert_to_rgb, convert_hint=_HINT
        )
        return _item(image, caption, label, index)


class ImageFolderDataset(_ListedImageDataset):
    """``root/metadata.jsonl`` with ``{"file_name": "a.png", "text" | "caption": "...", "label"?: int}`` lines."""

    def __init__(self, root: str | os.PathLike, image_size: int = 64, convert_to_rgb: bool = True) -> None:
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
        super().__init__(entries, image_size, convert_to_rgb)


class JsonlImageTextDataset(_ListedImageDataset):
    """A ``.jsonl`` file of ``{"image": "rel/or/abs.jpg", "caption": "...", "label"?: int}`` lines.

    Relative image paths are resolved against the folder holding the ``.jsonl`` file.
    """

    def __init__(self, path: str | os.PathLike, image_size: int = 64, convert_to_rgb: bool = True) -> None:
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
        super().__init__(entries, image_size, convert_to_rgb)


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
    ) -> None:
        self.files = _expand_paths(paths, (".parquet",), "parquet")
        self.image_size = image_size
        self.convert_to_rgb = convert_to_rgb
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
        self, paths: str | os.PathLike | list[str | os.PathLike], image_size: int = 64, convert_to_rgb: bool = True
    ) -> None:
        self.shards = _expand_paths(paths, (".tar",), "tar shard")
        self.image_size = image_size
        self.convert_to_rgb = convert_to_rgb
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


# --------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Which images to train on.

    ``kind="shapes"`` renders the embedded Shapes world (``shapes``); the other kinds read
    ``path`` (a file, folder or glob, see the readers), in which ``"{split}"`` is replaced by
    the split name. ``image_size`` must equal ``shapes.image_size`` for the Shapes world,
    which renders at its own size rather than resampling.
    """

    kind: str = "shapes"
    path: str | None = None
    image_size: int = 64
    convert_to_rgb: bool = True  # false: refuse grey / alpha / palette / CMYK / 16-bit images instead of converting
    image_column: str = "image"  # parquet only
    caption_column: str = "caption"  # parquet only
    shapes: ShapesWorldConfig = field(default_factory=ShapesWorldConfig)
    # A training image that cannot be read (missing, corrupt, truncated): "error" checkpoints the
    # steps trained so far and stops, naming the file; "skip" leaves it out (the next good item
    # takes its place), logs it once, and lists it in <output_dir>/bad_images.txt.
    on_bad_image: str = "error"

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ConfigError(f"data.kind={self.kind!r}; expected one of {DATA_KINDS}")
        if self.on_bad_image not in ON_BAD_IMAGE:
            raise ConfigError(f"data.on_bad_image={self.on_bad_image!r}; expected {'|'.join(ON_BAD_IMAGE)}")
        if self.image_size < 2:
            raise ConfigError(f"data.image_size={self.image_size}; expected >= 2")
        if self.kind != "shapes" and not self.path:
            raise ConfigError(f"data.path is required for data.kind={self.kind!r}")
        if self.kind == "shapes" and self.image_size != self.shapes.image_size:
            raise ConfigError(
                f"data.image_size={self.image_size} but data.shapes.image_size={self.shapes.image_size}; "
                "the Shapes world renders at its own size, so set both to the same value"
            )


def build_image_dataset(config: DataConfig, split: str, report_bad_images: bool = False) -> Dataset:
    """The dataset of ``split`` that ``config`` describes (items as in the module docstring).

    Bad images follow ``config.on_bad_image``: ``error`` raises :class:`ImageLoadError`, ``skip``
    puts the next good item in their place (:class:`BadImageGuard`, which logs each once).
    ``report_bad_images`` is for a training loop that decides itself (:class:`BadImageLog`): the
    next good item takes the bad one's place in either mode, and the item names the bad file.
    """
    if config.kind == "shapes":
        return ShapesImageDataset(ShapesWorld(config.shapes), split)
    reader = build_image_reader(config, split)
    if report_bad_images:
        return BadImageGuard(reader)
    return BadImageGuard(reader, log=True) if config.on_bad_image == "skip" else reader


def build_image_reader(config: DataConfig, split: str) -> Dataset:
    """The reader of ``split`` for a file-based ``config`` (not the Shapes world): bad images raise."""
    assert config.path is not None  # checked by DataConfig
    if "{split}" in config.path:
        path = config.path.format(split=split)
    elif split == "train":
        path = config.path
    else:
        raise ValueError(
            f"split {split!r} requested but data.path={config.path!r} has no '{{split}}' placeholder "
            "(only 'train' is available; write e.g. 'data/{split}/metadata' to provide other splits)"
        )
    size, convert = config.image_size, config.convert_to_rgb
    if config.kind == "imagefolder":
        return ImageFolderDataset(path, size, convert)
    if config.kind == "jsonl":
        return JsonlImageTextDataset(path, size, convert)
    if config.kind == "parquet":
        return ParquetImageTextDataset(path, size, convert, config.image_column, config.caption_column)
    return WebDatasetTarDataset(path, size, convert)


def collate_image_text(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack reader items: ``image`` (B, 3, H, W), ``label`` (B,) int64, ``index`` (B,) int64, ``caption`` list;
    ``bad_images``: the ``(name, reason)`` of the bad files passed over, when a :class:`BadImageGuard` read them."""
    if not batch:
        raise ValueError("collate_image_text got an empty batch")
    shapes = {tuple(item["image"].shape) for item in batch}
    if len(shapes) > 1:
        raise ValueError(f"images in one batch must share a shape, got {sorted(shapes)}; check data.image_size")
    collated = {
        "image": torch.stack([item["image"] for item in batch]),
        "caption": [item["caption"] for item in batch],
        "label": torch.tensor([item["label"] for item in batch], dtype=torch.long),
        "index": torch.tensor([item["index"] for item in batch], dtype=torch.long),
    }
    if any("bad_images" in item for item in batch):  # from a BadImageGuard: the files passed over
        collated["bad_images"] = [entry for item in batch for entry in item.get("bad_images", ())]
    return collated


# --------------------------------------------------------------------------------------
# bad images
# --------------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def image_name(reader: Dataset, index: int) -> str:
    """The file of item ``index`` of a reader, as its errors name it."""
    name = getattr(reader, "image_name", None)
    return name(index) if name is not None else f"item {index}"


_LOG_LIMIT = 100_000  # names remembered for "logged once"; a bound on memory for huge datasets
_logged: set[str] = set()


def _log_once(name: str, reason: str) -> None:
    if name in _logged:
        return
    if len(_logged) < _LOG_LIMIT:
        _logged.add(name)
    logger.warning("left out a bad image (data.on_bad_image=skip): %s", reason)


class BadImageGuard(Dataset):
    """A reader whose bad images give way to the next good item, each named in the item it gave way to.

    ``guard[i]`` is ``reader[i]`` when its image decodes; otherwise it is the item of the next
    index whose image does (i + 1, i + 2, ..., wrapping around), with ``bad_images`` listing the
    ``(name, reason)`` of every bad image passed over (an empty list when none was). Which item
    takes a bad one's place depends only on the index and the files, never on what was read
    before, so a step-indexed sampler gives a resumed run the batches of an uninterrupted one,
    whichever DataLoader worker reads them. ``log``: log each bad image once (for datasets read
    in the main process; a training loop logs through :class:`BadImageLog` instead).
    """

    def __init__(self, reader: Dataset, log: bool = False) -> None:
        self.reader = reader
        self.log = log
        self._bad: dict[int, tuple[str, str]] = {}  # known bad indices: not decoded twice

    def __len__(self) -> int:
        return len(self.reader)

    def image_name(self, index: int) -> str:
        return image_name(self.reader, index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        size = len(self.reader)
        passed: list[tuple[str, str]] = []
        for offset in range(size):
            position = (index + offset) % size
            if position not in self._bad:
                try:
                    item = self.reader[position]
                except ImageLoadError as error:
                    self._bad[position] = (image_name(self.reader, position), _one_line(error))
                else:
                    item["bad_images"] = passed
                    return item
            passed.append(self._bad[position])
            if self.log:
                _log_once(*self._bad[position])
        raise ImageLoadError(f"all {size} images are bad (the first: {passed[0][1]})")


class BadImageLog:
    """The training loop's side of ``data.on_bad_image``, for batches read through a :class:`BadImageGuard`.

    With ``skip`` it logs each bad image once, counts them and keeps the list in
    ``output_dir/bad_images.txt`` (``name<TAB>reason`` lines, rewritten atomically as images are
    found, so a resumed run goes on counting from it). With ``error`` it tells the loop to stop
    at the first batch that met one, and words the error. ``enabled``: this process writes the
    list (rank 0).
    """

    def __init__(self, on_bad_image: str, output_dir: Path, resumed: bool = False, enabled: bool = True) -> None:
        if on_bad_image not in ON_BAD_IMAGE:
            raise ConfigError(f"data.on_bad_image={on_bad_image!r}; expected {'|'.join(ON_BAD_IMAGE)}")
        self.on_bad_image = on_bad_image
        self.path = Path(output_dir) / BAD_IMAGES_FILE
        self.enabled = enabled
        self.found: dict[str, str] = {}  # name -> reason, in the order met
        self.first: tuple[str, str] | None = None  # on_bad_image=error: the image that stops the run
        if resumed and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                name, _, reason = line.partition("\t")
                self.found[name] = reason

    @property
    def count(self) -> int:
        return len(self.found)

    def meet(self, batch: dict[str, Any]) -> bool:
        """Take (and remove) the bad images ``batch`` passed over; True when the run must stop."""
        bad = batch.pop("bad_images", None) or []
        if not bad:
            return False
        if self.on_bad_image == "error":
            self.first = bad[0]
            return True
        new = [(name, reason) for name, reason in bad if name not in self.found]
        for name, reason in new:
            self.found[name] = reason
            logger.warning("left out a bad image (data.on_bad_image=skip): %s", reason)
        if new:
            self._write()
        return False

    def stop_error(self, step: int, checkpoint: Path) -> ImageLoadError:
        """The one-line error of a run stopped by a bad image, after ``checkpoint`` (of ``step``) was written."""
        reason = self.first[1] if self.first is not None else "another rank met a bad image (its log names it)"
        return ImageLoadError(
            f"{reason}; stopped before step {step + 1} with a checkpoint in {checkpoint}: fix or remove the file "
            "and run the same command to resume from it, or set data.on_bad_image=skip to leave bad images out"
        )

    def summary(self) -> dict[str, float]:
        """With ``skip``: log the count and where the list is, write the list, return ``{"bad_images": count}``."""
        if self.on_bad_image != "skip":
            return {}
        self._write()
        if self.found:
            logger.warning("left out %d bad image(s), listed in %s", self.count, self.path)
        return {"bad_images": float(self.count)}

    def _write(self) -> None:
        if self.enabled:
            lines = "".join(f"{name}\t{reason}\n" for name, reason in self.found.items())
            write_text_atomic(self.path, lines)
