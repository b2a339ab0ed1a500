"""``image_resize`` in the training data: the readers, the code shards and their meta.json."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mllm_fixtures import IMAGE_SIZE, tiny_visual_tokenizer
from PIL import Image

from tokenizer.config import ConfigError
from tokenizer.images import PAD_COLOUR, load_image, uint8_image_to_tensor
from training.data.code_images import ImageFiles, square_modes
from training.data.code_shards import META_NAME, CodeShardsError, CodeShardsMeta, tokenize_to_shards
from training.data.code_store import CodeStore
from training.data.image_data import DataConfig, build_image_reader
from training.data.readers import ParquetImageTextDataset, WebDatasetTarDataset
from training.data.shapes import ShapesWorld, ShapesWorldConfig

SIZE = 16
GREY = PAD_COLOUR[0] / 127.5 - 1.0  # the padding as the models see it


def _wide_image() -> np.ndarray:
    """A 2:1 image, red with blue side bands: the crop loses the bands, padding keeps them."""
    image = np.zeros((SIZE, 2 * SIZE, 3), dtype=np.uint8)
    image[..., 0] = 255
    image[:, : SIZE // 4] = (0, 0, 255)
    image[:, -SIZE // 4 :] = (0, 0, 255)
    return image


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _check_padded(image: torch.Tensor) -> None:
    """The wide image padded: grey rows above and below, the blue bands at the sides."""
    assert image.shape == (3, SIZE, SIZE)
    assert torch.allclose(image[:, 0], torch.full((3, SIZE), GREY)) and torch.allclose(image[:, -1], image[:, 0])
    middle = image[:, SIZE // 2]
    assert middle[2, 0] > 0.9 and middle[0, 0] < -0.9  # blue at the left edge
    assert middle[0, SIZE // 2] > 0.9  # red in the middle


def _check_cropped(image: torch.Tensor) -> None:
    """The wide image cropped: all red, no grey and no bands."""
    assert torch.allclose(image[0], torch.ones(SIZE, SIZE)) and torch.allclose(image[2], -torch.ones(SIZE, SIZE))


@pytest.mark.parametrize("kind", ["imagefolder", "jsonl"])
def test_data_config_image_resize_reaches_the_readers(tmp_path: Path, kind: str) -> None:
    (tmp_path / "wide.png").write_bytes(_png(_wide_image()))
    if kind == "imagefolder":
        (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "wide.png", "text": "wide"}) + "\n")
        path = tmp_path
    else:
        path = tmp_path / "pairs.jsonl"
        path.write_text(json.dumps({"image": "wide.png", "caption": "wide"}) + "\n")
    images = {}
    for mode in ("pad", "crop"):
        config = DataConfig(kind=kind, path=str(path), image_size=SIZE, image_resize=mode)
        images[mode] = build_image_reader(config, "train")[0]["image"]
    _check_padded(images["pad"])
    _check_cropped(images["crop"])
    # the default is the crop the readers always used
    assert torch.equal(
        build_image_reader(DataConfig(kind=kind, path=str(path), image_size=SIZE), "train")[0]["image"], images["crop"]
    )


def test_parquet_and_tar_readers_follow_image_resize(tmp_path: Path) -> None:
    wide = _png(_wide_image())
    pq.write_table(pa.table({"image": [wide], "caption": ["wide"]}), tmp_path / "data.parquet")
    with tarfile.open(tmp_path / "shard.tar", "w") as archive:
        member = tarfile.TarInfo("000.png")
        member.size = len(wide)
        archive.addfile(member, io.BytesIO(wide))
    for build in (
        lambda mode: ParquetImageTextDataset(tmp_path / "data.parquet", SIZE, image_resize=mode),
        lambda mode: WebDatasetTarDataset(tmp_path / "shard.tar", SIZE, image_resize=mode),
    ):
        _check_padded(build("pad")[0]["image"])
        _check_cropped(build("crop")[0]["image"])


def test_square_images_read_the_same_either_way(tmp_path: Path) -> None:
    """Every Shapes scene is square: pad and crop give the same tensors, so the demo does not move."""
    world = ShapesWorld(ShapesWorldConfig(seed=5, image_size=SIZE, num_train=6))
    root = world.write_imagefolder("train", tmp_path / "folder", limit=6)
    readers = {
        mode: build_image_reader(
            DataConfig(kind="imagefolder", path=str(root), image_size=SIZE, image_resize=mode), "train"
        )
        for mode in ("pad", "crop")
    }
    for index in range(6):
        exact = uint8_image_to_tensor(world.sample("train", index).image)
        assert torch.equal(readers["pad"][index]["image"], exact)
        assert torch.equal(readers["crop"][index]["image"], exact)
    # and a square photo larger than the model's input: resized the same by both modes
    photo = np.random.default_rng(0).integers(0, 256, (3 * SIZE, 3 * SIZE, 3), dtype=np.uint8)
    padded, cropped = (load_image(_png(photo), name="photo", image_size=SIZE, resize=m) for m in ("pad", "crop"))
    assert torch.equal(padded, cropped)


def test_bad_image_resize_is_named() -> None:
    with pytest.raises(ConfigError, match=r"data.image_resize='stretch'; expected crop\|pad"):
        DataConfig(image_resize="stretch")


# ------------------------------------------------------------------ code shards


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """wide.png (2:1), tall.png (1:2) and square.png under one folder, at the tiny tokenizer's size."""
    root = tmp_path_factory.mktemp("images")
    wide = np.asarray(Image.fromarray(_wide_image()).resize((2 * IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST))
    Image.fromarray(wide).save(root / "wide.png")
    Image.fromarray(np.ascontiguousarray(wide.transpose(1, 0, 2))).save(root / "tall.png")
    square = np.random.default_rng(1).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    Image.fromarray(square).save(root / "square.png")
    return root


def _codes_of(visual_tokenizer, root: Path, key: str, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    image = load_image(root / key, name=key, image_size=IMAGE_SIZE, resize=mode)
    with torch.inference_mode():
        codes = visual_tokenizer.encode(image[None])
    return codes.pixel_codes[0].long(), codes.semantic_codes[0].long()


def test_code_shards_pad_conversation_images_and_crop_generation_targets(images: Path, tmp_path: Path) -> None:
    visual_tokenizer = tiny_visual_tokenizer()
    out = tokenize_to_shards(
        visual_tokenizer, ["wide.png", "square.png"], images, tmp_path / "pad", generation_paths=["tall.png"]
    )
    meta = CodeShardsMeta.from_file(out / META_NAME)
    assert meta.image_resize == "pad" and meta.generation_keys_sha256  # the default, recorded
    store = CodeStore(out)
    for key, mode in (("wide.png", "pad"), ("tall.png", "crop"), ("square.png", "pad")):
        pixel, semantic = store.get(key)
        expected_pixel, expected_semantic = _codes_of(visual_tokenizer, images, key, mode)
        assert torch.equal(pixel, expected_pixel) and torch.equal(semantic, expected_semantic), key
    cropped = CodeStore(
        tokenize_to_shards(visual_tokenizer, ["wide.png"], images, tmp_path / "crop", image_resize="crop")
    )
    assert CodeShardsMeta.from_file(tmp_path / "crop" / META_NAME).image_resize == "crop"
    assert torch.equal(cropped.get("wide.png")[0], _codes_of(visual_tokenizer, images, "wide.png", "crop")[0])
    # the two modes really feed the tokenizer different pixels here, and give different codes
    assert not torch.equal(store.get("wide.png")[0], cropped.get("wide.png")[0])
    assert not torch.equal(
        load_image(images / "wide.png", name="w", image_size=IMAGE_SIZE, resize="pad"),
        load_image(images / "wide.png", name="w", image_size=IMAGE_SIZE, resize="crop"),
    )


def test_code_shards_refuse_to_resume_with_another_image_resize(images: Path, tmp_path: Path) -> None:
    visual_tokenizer = tiny_visual_tokenizer()
    tokenize_to_shards(visual_tokenizer, ["wide.png"], images, tmp_path / "codes", image_resize="crop")
    with pytest.raises(CodeShardsError, match="image_resize: 'crop' -> 'pad'"):
        tokenize_to_shards(visual_tokenizer, ["wide.png"], images, tmp_path / "codes", image_resize="pad")
    # a folder written before the setting existed was centre-cropped
    payload = json.loads((tmp_path / "codes" / META_NAME).read_text())
    del payload["image_resize"], payload["generation_keys_sha256"]
    (tmp_path / "codes" / META_NAME).write_text(json.dumps(payload))
    assert CodeShardsMeta.from_file(tmp_path / "codes" / META_NAME).image_resize == "crop"
    (tmp_path / "codes" / META_NAME).write_text(json.dumps({**payload, "image_resize": "stretch"}))
    with pytest.raises(CodeShardsError, match=r"meta.json: image_resize='stretch'; expected one of crop\|pad"):
        CodeStore(tmp_path / "codes")
    with pytest.raises(ValueError, match="image_resize='stretch'"):
        tokenize_to_shards(visual_tokenizer, ["wide.png"], images, tmp_path / "other", image_resize="stretch")
    assert not (tmp_path / "other").exists()


def test_an_image_used_both_ways_must_be_square_under_pad(images: Path) -> None:
    with pytest.raises(ValueError, match=r"named by both .* \(first: 'wide.png'\).*image_resize=crop"):
        square_modes(["wide.png", "square.png"], ["wide.png", "square.png"], "pad", images)
    # square, or cropped anyway: one code set serves both uses
    assert square_modes(["square.png", "wide.png"], ["square.png", "tall.png"], "pad", images) == {
        "square.png": "crop",
        "wide.png": "pad",
        "tall.png": "crop",
    }
    assert set(square_modes(["wide.png"], ["wide.png"], "crop", images).values()) == {"crop"}
    files = ImageFiles(["wide.png", "tall.png"], images, IMAGE_SIZE, False, {"wide.png": "pad", "tall.png": "crop"})
    for index, mode in enumerate(("pad", "crop")):
        image, error = files[index]
        assert error == ""
        assert torch.equal(image, load_image(images / files.keys[index], name="x", image_size=IMAGE_SIZE, resize=mode))
