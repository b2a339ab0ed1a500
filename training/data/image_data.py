"""Which images to train on: :class:`DataConfig`, the dataset it describes, and batching its items.

:func:`build_image_dataset` gives the Shapes world or a reader of :mod:`training.data.readers`
for a split, and follows ``data.on_bad_image`` through :class:`BadImageGuard`;
:func:`collate_image_text` stacks their items into batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from tokenizer.config import ConfigError
from tokenizer.images import SQUARE_MODES
from training.data.bad_images import ON_BAD_IMAGE, BadImageGuard
from training.data.readers import (
    ImageFolderDataset,
    JsonlImageTextDataset,
    ParquetImageTextDataset,
    WebDatasetTarDataset,
)
from training.data.shapes import ShapesImageDataset, ShapesWorld, ShapesWorldConfig

DATA_KINDS: tuple[str, ...] = ("shapes", "imagefolder", "jsonl", "parquet", "webdataset")


@dataclass
class DataConfig:
    """Which images to train on.

    ``kind="shapes"`` renders the embedded Shapes world (``shapes``); the other kinds read
    ``path`` (a file, folder or glob, see the readers), in which ``"{split}"`` is replaced by
    the split name. ``image_size`` must equal ``shapes.image_size`` for the Shapes world,
    which renders at its own size rather than resampling.

    ``image_resize`` makes the readers' non-square images square (:func:`tokenizer.images.fit_square`):
    ``crop`` (the default: the visual tokenizer learns to reconstruct whole image content, as
    reconstruction tokenizers train) or ``pad`` (pad-to-square on mid grey). The Shapes world is
    square, so neither changes it. The LLM stages read codes, whose mode ``tokenize-codes
    --image-resize`` sets (:mod:`training.data.code_images`).
    """

    kind: str = "shapes"
    path: str | None = None
    image_size: int = 64
    image_resize: str = "crop"  # crop | pad: how the readers make non-square images square
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
        if self.image_resize not in SQUARE_MODES:
            raise ConfigError(f"data.image_resize={self.image_resize!r}; expected {'|'.join(SQUARE_MODES)}")
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
    size, convert, resize = config.image_size, config.convert_to_rgb, config.image_resize
    if config.kind == "imagefolder":
        return ImageFolderDataset(path, size, convert, resize)
    if config.kind == "jsonl":
        return JsonlImageTextDataset(path, size, convert, resize)
    if config.kind == "parquet":
        columns = config.image_column, config.caption_column
        return ParquetImageTextDataset(path, size, convert, *columns, image_resize=resize)
    return WebDatasetTarDataset(path, size, convert, resize)


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
