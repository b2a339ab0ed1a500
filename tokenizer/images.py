"""Decoding images into the models' input: one function for every file format and reader.

:func:`load_image` turns a path or encoded bytes into a ``(3, S, S)`` float32 tensor in [-1, 1]
(bicubic resize of the shorter side, then a centre crop). Every reader, the inference API and
the evaluation harness decode through it, so a bad file fails the same way everywhere: with an
:class:`ImageLoadError` that names the file and the reason.
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = str | os.PathLike | bytes
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageLoadError(ValueError):
    """An image is missing, undecodable, too small or in a mode we will not silently convert."""


def uint8_image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``image``: (H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1] (the models' input range)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
    if not (image.flags.writeable and image.flags.c_contiguous):
        image = np.array(image, order="C")  # np.asarray(PIL image) is read-only; torch warns on those
    return torch.from_numpy(image).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def load_image(source: ImageSource, *, name: str, image_size: int, convert_to_rgb: bool) -> torch.Tensor:
    """Decode ``source`` (a path or encoded bytes) into a (3, image_size, image_size) float32 tensor in [-1, 1].

    The shorter side is resized to ``image_size`` with bicubic filtering, then the centre is
    cropped. ``name`` (a file name or sample key) goes into every error message.

    Raises:
        ImageLoadError: missing file, undecodable bytes, an image under 2x2 pixels, or a
            non-RGB image while ``convert_to_rgb`` is False. With ``convert_to_rgb`` True,
            grey, palette, CMYK and 16-bit images are converted and alpha is composited on white.
    """
    if image_size < 1:
        raise ValueError(f"image_size={image_size}; expected >= 1")
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise ImageLoadError(f"image {name}: file not found ({os.fspath(source)})")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as opened:
            opened.load()
            # Camera JPEGs store rotation in EXIF; without this, portrait photos come out sideways.
            image = ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageLoadError(f"image {name}: cannot decode ({type(error).__name__}: {error})") from error
    width, height = image.size
    if width < 2 or height < 2:
        raise ImageLoadError(f"image {name} is {width}x{height} pixels; at least 2x2 is needed")
    if image.mode != "RGB":
        if not convert_to_rgb:
            raise ImageLoadError(
                f"image {name} has mode {image.mode!r}, not 'RGB'; set data.convert_to_rgb=true to convert it"
            )
        image = _to_rgb(image, name)
    return uint8_image_to_tensor(np.asarray(_resize_and_crop(image, image_size)))


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Convert any PIL mode to RGB: alpha over white, 16/32-bit integers and floats rescaled to 8 bits."""
    if (image.mode == "P" and "transparency" in image.info) or image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        # PIL's own I;16 -> RGB conversion clips at 255 (a 16-bit image turns white), so rescale.
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and values.max(initial=0.0) <= 1.0:
            values = values * 255.0
        elif values.max(initial=0.0) > 255.0:
            values = values / 257.0  # 65535 -> 255
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ImageLoadError(f"image {name}: cannot convert mode {image.mode!r} to RGB ({error})") from error


def _resize_and_crop(image: Image.Image, image_size: int) -> Image.Image:
    """Resize the shorter side to ``image_size`` (bicubic), then crop the centre square."""
    width, height = image.size
    if (width, height) != (image_size, image_size):
        shorter = min(width, height)
        new_width = max(image_size, round(width * image_size / shorter))
        new_height = max(image_size, round(height * image_size / shorter))
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
        left, top = (new_width - image_size) // 2, (new_height - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
    return image
