"""Image preprocessing for answering: pad-to-square or centre crop, identical on square Shapes scenes."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mllm.inference import Pipeline
from tokenizer.images import PAD_COLOUR, fit_square, load_image, uint8_image_to_tensor
from training.data.shapes import ShapesWorld, ShapesWorldConfig


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_pad_and_crop_are_the_identity_on_shapes_scenes() -> None:
    world = ShapesWorld(ShapesWorldConfig(image_size=32))
    for index in range(4):
        scene = world.sample("test", index).image
        exact = uint8_image_to_tensor(scene)
        for mode in ("pad", "crop"):
            assert torch.equal(load_image(_png(scene), name="scene", image_size=32, resize=mode), exact)


def test_pad_centres_the_image_on_mid_grey() -> None:
    picture = np.zeros((4, 8, 3), dtype=np.uint8)
    picture[..., 0] = 255  # a red 8 x 4 image
    padded = np.asarray(fit_square(Image.fromarray(picture), 8, "pad"))
    assert padded.shape == (8, 8, 3)
    assert (padded[:2] == PAD_COLOUR).all() and (padded[6:] == PAD_COLOUR).all()
    assert (padded[2:6] == (255, 0, 0)).all()
    cropped = np.asarray(fit_square(Image.fromarray(picture), 4, "crop"))
    assert (cropped == (255, 0, 0)).all()  # the crop keeps the middle and loses the sides
    with pytest.raises(ValueError, match="square mode 'stretch'"):
        fit_square(Image.fromarray(picture), 8, "stretch")
    with pytest.raises(ValueError, match="resize='stretch'"):
        load_image(_png(picture), name="x", image_size=8, resize="stretch")


def test_pipeline_image_tensor_follows_image_resize() -> None:
    fake = SimpleNamespace(
        visual_tokenizer=SimpleNamespace(backbone=SimpleNamespace(image_size=8)), image_resize="crop"
    )
    wide = np.zeros((4, 8, 3), dtype=np.uint8)
    wide[..., 2] = 255
    cropped = Pipeline._image_tensor(fake, wide)
    assert cropped.shape == (3, 8, 8) and torch.allclose(cropped[2], torch.ones(8, 8))
    fake.image_resize = "pad"
    padded = Pipeline._image_tensor(fake, wide)
    assert padded[2, 0, 4].item() == pytest.approx(127 / 127.5 - 1, abs=1e-6)
    assert padded[2, 4, 4].item() == pytest.approx(1.0)
    # the same for a (3, H, W) tensor in [-1, 1]
    padded_tensor = Pipeline._image_tensor(fake, uint8_image_to_tensor(wide))
    torch.testing.assert_close(padded_tensor, padded)
    square = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    # an S x S array (every Shapes scene) gets exactly the conversion it always had
    assert torch.equal(Pipeline._image_tensor(fake, square), uint8_image_to_tensor(square))
    assert torch.equal(
        Pipeline._image_tensor(fake, square), torch.from_numpy(square).permute(2, 0, 1).float() / 127.5 - 1.0
    )
