"""Real-data readers: every format loads the same pixels and captions; bad input fails clearly."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tokenizer.config import ConfigError, config_from_dict, config_to_dict
from tokenizer.images import ImageLoadError, load_image
from training.data.image_data import DataConfig, build_image_dataset, collate_image_text
from training.data.readers import (
    ImageFolderDataset,
    JsonlImageTextDataset,
    MetadataError,
    ParquetImageTextDataset,
    WebDatasetTarDataset,
)
from training.data.shapes import ShapesImageDataset, ShapesWorld, ShapesWorldConfig

SIZE = 32


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(ShapesWorldConfig(seed=5, image_size=SIZE, num_train=8, num_val=4))


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def _load(source, name: str = "x") -> torch.Tensor:
    return load_image(source, name=name, image_size=SIZE, convert_to_rgb=False)


def _expected(world: ShapesWorld, index: int) -> torch.Tensor:
    image = world.sample("train", index).image
    return torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0


# ------------------------------------------------------------------ the four formats


def test_imagefolder_written_by_shapes_world(world: ShapesWorld, tmp_path: Path) -> None:
    root = world.write_imagefolder("train", tmp_path / "folder", limit=5)
    dataset = ImageFolderDataset(root, image_size=SIZE)
    assert len(dataset) == 5
    lines = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    for index in range(5):
        item, sample = dataset[index], world.sample("train", index)
        assert torch.equal(item["image"], _load(root / lines[index]["file_name"]))
        # PNG is lossless and the size already matches: the exact rendered pixels come back.
        assert torch.equal(item["image"], _expected(world, index))
        assert (item["caption"], item["label"], item["index"]) == (sample.caption, sample.label, index)


def test_jsonl_relative_and_absolute_paths(world: ShapesWorld, tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    lines = []
    for index in range(4):
        path = tmp_path / "images" / f"{index}.png"
        path.write_bytes(_png(world.sample("train", index).image))
        image = str(path) if index == 3 else f"images/{index}.png"  # one absolute path
        lines.append(json.dumps({"image": image, "caption": f"caption {index}"}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n\n")  # a trailing blank line is fine
    dataset = JsonlImageTextDataset(tmp_path / "data.jsonl", image_size=SIZE)
    assert len(dataset) == 4
    for index in range(4):
        item = dataset[index]
        assert torch.equal(item["image"], _load(tmp_path / "images" / f"{index}.png"))
        assert torch.equal(item["image"], _expected(world, index))
        assert item["caption"] == f"caption {index}" and item["label"] == -1


def test_parquet_struct_and_bytes_columns_with_glob(world: ShapesWorld, tmp_path: Path) -> None:
    encoded = [_png(world.sample("train", index).image) for index in range(6)]
    captions = [world.sample("train", index).caption for index in range(6)]
    # File a: the Hugging Face Image layout (struct of bytes/path), two rows per row group.
    struct = pa.array([{"bytes": data, "path": None} for data in encoded[:4]])
    pq.write_table(pa.table({"image": struct, "caption": captions[:4]}), tmp_path / "a.parquet", row_group_size=2)
    # File b: raw bytes under other column names.
    pq.write_table(pa.table({"png": encoded[4:], "text": captions[4:]}), tmp_path / "b.parquet")

    dataset = ParquetImageTextDataset(str(tmp_path / "a*.parquet"), image_size=SIZE)
    assert len(dataset) == 4
    for index in reversed(range(4)):  # out of order: crosses row groups both ways
        item = dataset[index]
        assert torch.equal(item["image"], _load(encoded[index]))
        assert torch.equal(item["image"], _expected(world, index))
        assert item["caption"] == captions[index] and item["index"] == index

    renamed = ParquetImageTextDataset([tmp_path / "b.parquet"], SIZE, image_column="png", caption_column="text")
    assert [renamed[i]["caption"] for i in range(2)] == captions[4:]
    assert torch.equal(renamed[1]["image"], _expected(world, 5))
    # Unpickled copies (DataLoader workers) start without the row-group cache and still read.
    copy = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(copy[2]["image"], dataset[2]["image"])
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['image', 'caption'\]"):
        ParquetImageTextDataset(tmp_path / "b.parquet", SIZE)


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def test_webdataset_tar_random_access(world: ShapesWorld, tmp_path: Path) -> None:
    encoded = [_png(world.sample("train", index).image) for index in range(4)]
    jpeg = io.BytesIO()
    Image.fromarray(world.sample("train", 3).image).save(jpeg, format="JPEG", quality=90)
    with tarfile.open(tmp_path / "shard-0.tar", "w") as archive:
        _add(archive, "000.png", encoded[0])
        _add(archive, "000.txt", b"first caption\n")
        _add(archive, "000.cls", b"7")
        _add(archive, "001.json", json.dumps({"caption": "second caption"}).encode())
        _add(archive, "001.png", encoded[1])
        _add(archive, "orphan.txt", b"a caption without an image is skipped")
    with tarfile.open(tmp_path / "shard-1.tar", "w") as archive:
        _add(archive, "part/002.png", encoded[2])
        _add(archive, "part/002.json", json.dumps({"text": "third caption"}).encode())
        _add(archive, "003.jpg", jpeg.getvalue())
    dataset = WebDatasetTarDataset(str(tmp_path / "shard-*.tar"), image_size=SIZE)
    assert len(dataset) == 4
    expected_captions = ["first caption", "second caption", "third caption", ""]
    items = [dataset[index] for index in (3, 1, 2, 0)]  # random access
    for item in items:
        index = item["index"]
        assert item["caption"] == expected_captions[index]
        source = jpeg.getvalue() if index == 3 else encoded[index]
        assert torch.equal(item["image"], _load(source))
    assert torch.equal(dataset[2]["image"], _expected(world, 2))
    assert dataset[0]["label"] == 7 and dataset[1]["label"] == -1
    copy = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(copy[1]["image"], dataset[1]["image"])


def test_dataloader_and_collate(world: ShapesWorld, tmp_path: Path) -> None:
    root = world.write_imagefolder("train", tmp_path, limit=5)
    loader = DataLoader(ImageFolderDataset(root, SIZE), batch_size=2, collate_fn=collate_image_text)
    batches = list(loader)
    assert [batch["image"].shape for batch in batches] == [(2, 3, SIZE, SIZE)] * 2 + [(1, 3, SIZE, SIZE)]
    assert batches[0]["index"].tolist() == [0, 1] and batches[0]["label"].dtype == torch.long
    assert batches[1]["caption"] == [world.sample("train", 2).caption, world.sample("train", 3).caption]
    odd = {"image": torch.zeros(3, 8, 8), "caption": "", "label": -1, "index": 9}
    with pytest.raises(ValueError, match="share a shape"):
        collate_image_text([ImageFolderDataset(root, SIZE)[0], odd])


# ------------------------------------------------------------------ decoding


def test_resize_shorter_side_then_centre_crop() -> None:
    # 60x20: red | green | blue thirds. Shorter side 20 -> 10, so 30x10, centre crop keeps the green third.
    array = np.zeros((20, 60, 3), dtype=np.uint8)
    array[:, :20, 0] = 255
    array[:, 20:40, 1] = 255
    array[:, 40:, 2] = 255
    image = load_image(_png(array), name="wide", image_size=10, convert_to_rgb=False)
    assert image.shape == (3, 10, 10)
    centre = image[:, :, 3:7]
    assert torch.all(centre[1] > 0.9) and torch.all(centre[0] < -0.9) and torch.all(centre[2] < -0.9)
    assert image.min() >= -1.0 and image.max() <= 1.0
    tall = load_image(
        _png(np.ascontiguousarray(array.transpose(1, 0, 2))), name="tall", image_size=10, convert_to_rgb=False
    )
    assert torch.equal(tall, image.transpose(1, 2))


def test_missing_file(tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": "nowhere.png", "caption": "c"}) + "\n")
    dataset = JsonlImageTextDataset(tmp_path / "data.jsonl", SIZE)
    with pytest.raises(ImageLoadError, match=r"nowhere\.png.*not found|not found.*nowhere\.png"):
        dataset[0]


def test_corrupt_bytes(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(ImageLoadError, match=r"broken\.png.*cannot decode"):
        _load(path, name=str(path))
    truncated = _png(np.zeros((16, 16, 3), dtype=np.uint8))[:40]
    with pytest.raises(ImageLoadError, match="shard-key"):
        _load(truncated, name="shard-key")


def test_tiny_image_is_rejected() -> None:
    with pytest.raises(ImageLoadError, match=r"tiny\.png is 1x1"):
        _load(_png(np.zeros((1, 1, 3), dtype=np.uint8)), name="tiny.png")
    assert _load(_png(np.zeros((2, 2, 3), dtype=np.uint8))).shape == (3, SIZE, SIZE)


def test_grayscale_converts_unless_strict(tmp_path: Path) -> None:
    grey = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))  # (32, 32) ramp
    path = tmp_path / "grey.png"
    path.write_bytes(_png(grey, "L"))
    converted = load_image(path, name=str(path), image_size=SIZE)
    expected = torch.from_numpy(grey).float() / 127.5 - 1.0
    assert all(torch.equal(converted[channel], expected) for channel in range(3))
    with pytest.raises(ImageLoadError, match=r"grey\.png.*'L'.*leave out strict=True to convert"):
        load_image(path, name=str(path), image_size=SIZE, strict=True)
    # convert_to_rgb=False is the older spelling of strict=True.
    with pytest.raises(ImageLoadError, match=r"'L'.*set convert_to_rgb=True"):
        load_image(path, name=str(path), image_size=SIZE, convert_to_rgb=False)
    # The readers convert by default; data.convert_to_rgb=false refuses and the message names that key.
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "grey.png", "caption": "grey"}) + "\n")
    assert torch.equal(ImageFolderDataset(tmp_path, SIZE)[0]["image"], converted)
    with pytest.raises(ImageLoadError, match=r"'L'.*set data\.convert_to_rgb=true"):
        ImageFolderDataset(tmp_path, SIZE, convert_to_rgb=False)[0]
    assert DataConfig(kind="imagefolder", path=str(tmp_path), image_size=SIZE).convert_to_rgb


def test_other_modes_convert() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent
    image = load_image(_png(rgba, "RGBA"), name="rgba", image_size=4, convert_to_rgb=True)
    assert torch.equal(image[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.equal(image[:, 3, 0], torch.ones(3))  # transparent -> white
    deep = np.full((4, 4), 65535, dtype=np.uint16)
    deep[0, 0] = 0
    buffer = io.BytesIO()
    Image.fromarray(deep).save(buffer, format="PNG")
    image = load_image(buffer.getvalue(), name="deep", image_size=4, convert_to_rgb=True)
    assert image[0, 0, 0] == -1.0 and torch.all(image[:, 1:, :] == 1.0)  # 16-bit white stays white
    palette = Image.fromarray(np.full((4, 4, 3), 200, dtype=np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    image = load_image(buffer.getvalue(), name="palette", image_size=4, convert_to_rgb=True)
    assert torch.allclose(image, torch.full((3, 4, 4), 200 / 127.5 - 1.0))
    with pytest.raises(ImageLoadError, match="'P'"):
        load_image(buffer.getvalue(), name="palette", image_size=4, convert_to_rgb=False)


def test_bad_metadata_lines_name_the_line(tmp_path: Path) -> None:
    good = json.dumps({"file_name": "a.png", "text": "ok"})
    (tmp_path / "metadata.jsonl").write_text(good + "\n" + good + "\n{not json\n")
    with pytest.raises(MetadataError, match=r"metadata\.jsonl:3: invalid JSON"):
        ImageFolderDataset(tmp_path, SIZE)
    (tmp_path / "metadata.jsonl").write_text(good + "\n" + json.dumps({"file_name": "b.png"}) + "\n")
    with pytest.raises(MetadataError, match=r"metadata\.jsonl:2: missing key 'text' or 'caption'"):
        ImageFolderDataset(tmp_path, SIZE)
    (tmp_path / "data.jsonl").write_text(json.dumps({"caption": "no image"}) + "\n")
    with pytest.raises(MetadataError, match=r"data\.jsonl:1: missing key 'image'"):
        JsonlImageTextDataset(tmp_path / "data.jsonl", SIZE)
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        ImageFolderDataset(tmp_path / "empty", SIZE)


# ------------------------------------------------------------------ config


def test_data_config_validation() -> None:
    with pytest.raises(ConfigError, match="data.kind"):
        DataConfig(kind="csv", path="x")
    with pytest.raises(ConfigError, match="data.path"):
        DataConfig(kind="jsonl")
    with pytest.raises(ConfigError, match="data.shapes.image_size"):
        DataConfig(kind="shapes", image_size=128)


def test_build_image_dataset(world: ShapesWorld, tmp_path: Path) -> None:
    shapes = build_image_dataset(DataConfig(shapes=ShapesWorldConfig(num_val=3)), "val")
    assert isinstance(shapes, ShapesImageDataset) and len(shapes) == 3
    for split in ("train", "val"):
        world.write_imagefolder(split, tmp_path / split, limit=2)
    config = DataConfig(kind="imagefolder", path=str(tmp_path / "{split}"), image_size=SIZE)
    val = build_image_dataset(config, "val")
    assert isinstance(val, ImageFolderDataset) and val[1]["caption"] == world.sample("val", 1).caption
    fixed = DataConfig(kind="imagefolder", path=str(tmp_path / "train"), image_size=SIZE)
    assert len(build_image_dataset(fixed, "train")) == 2
    with pytest.raises(ValueError, match="split"):
        build_image_dataset(fixed, "val")


def test_data_config_loads_from_nested_dicts() -> None:
    config = config_from_dict(DataConfig, {"kind": "shapes", "shapes": {"holdout_combinations": ["red circle"]}})
    assert config.shapes.holdout_combinations == ("red circle",)
    assert config_from_dict(DataConfig, config_to_dict(config)) == config
    with pytest.raises(ConfigError, match="max_objects"):
        config_from_dict(DataConfig, {"shapes": {"max_objects": 9}})
