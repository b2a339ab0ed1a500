"""Decoding images into the models' input: one function for every file format and reader.

:func:`load_image` turns a path or encoded bytes into a ``(3, S, S)`` float32 tensor in [-1, 1]
(bicubic resize of the shorter side, then a centre crop). Every reader, the inference API and
the evaluation harness decode through it, so a bad file fails the same way everywhere: with an
:class:`ImageLoadError` that names the file and the reason.
"""

from __future__ import annotations

import io
import logging
import os

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

ImageSource = str | os.PathLike | bytes
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageLoadError(ValueError):
    """An image is missing, a folder, undecodable, too small, or not RGB in strict mode."""


def uint8_image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``image``: (H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1] (the models' input range)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
    if not (image.flags.writeable and image.flags.c_contiguous):
        image = np.array(image, order="C")  # np.asarray(PIL image) is read-only; torch warns on those
    return torch.from_numpy(image).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def load_image(
    source: ImageSource,
    *,
    name: str,
    image_size: int,
    strict: bool = False,
    convert_to_rgb: bool | None = None,
    convert_hint: str | None = None,
    resize: str = "crop",
) -> torch.Tensor:
    """Decode ``source`` (a path or encoded bytes) into a (3, image_size, image_size) float32 tensor in [-1, 1].

    ``resize="crop"`` (what training reads images with): the shorter side is resized to
    ``image_size`` with bicubic filtering, then the centre is cropped. ``resize="pad"``: the image
    is padded to a square first (:func:`fit_square`). ``name`` (a file name or sample key) goes
    into every error message.

    Images that are valid but not RGB (grey ``L``, ``LA``, ``RGBA``, ``CMYK``, palette ``P`` /
    ``PA``, 16- and 32-bit integer ``I;16`` / ``I``, float ``F``) are converted: alpha is
    composited over white, grey is repeated into three channels, deep values are rescaled to 8
    bits; each file's conversion is logged once. ``strict`` refuses them instead.
    ``convert_to_rgb`` is the older spelling (``convert_to_rgb=False`` is ``strict=True``).
    ``convert_hint`` tells the user how to turn conversion back on (the flag or config key of
    the caller, e.g. ``"leave out --strict"``); it completes the refusal message.

    Raises:
        ImageLoadError: missing file, a folder, undecodable bytes, an image under 2x2 pixels, or
            a non-RGB image in strict mode.
    """
    if image_size < 1:
        raise ValueError(f"image_size={image_size}; expected >= 1")
    if resize not in SQUARE_MODES:
        raise ValueError(f"resize={resize!r}; expected one of {', '.join(SQUARE_MODES)}")
    if convert_to_rgb is not None:
        if strict and convert_to_rgb:
            raise ValueError("strict=True and convert_to_rgb=True contradict each other; pass one of them")
        strict = not convert_to_rgb
        convert_hint = convert_hint or "set convert_to_rgb=True"
    if isinstance(source, (str, os.PathLike)):
        if os.path.isdir(source):
            raise ImageLoadError(f"{_where(name, source)} is a directory, not an image")
        if not os.path.isfile(source):
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
        if strict:
            raise ImageLoadError(
                f"image {name} has mode {image.mode!r}, not 'RGB'; {convert_hint or 'leave out strict=True'} "
                f"to convert it ({_conversion(image)})"
            )
        mode, what = image.mode, _conversion(image)
        image = _to_rgb(image, name)
        _note_conversion(name, mode, what)
    return uint8_image_to_tensor(np.asarray(fit_square(image, image_size, resize)))


def _where(name: str, source: str | os.PathLike) -> str:
    path = os.fspath(source)
    return path if name == path else f"image {name} ({path})"


# What :func:`_to_rgb` does to each mode, for the note it logs and the strict refusal.
_CONVERSIONS = {
    "L": "grey repeated into R, G and B",
    "LA": "alpha composited over white, grey repeated into R, G and B",
    "La": "alpha composited over white, grey repeated into R, G and B",
    "RGBA": "alpha composited over white",
    "RGBa": "alpha composited over white",
    "PA": "palette expanded, alpha composited over white",
    "P": "palette expanded",
    "CMYK": "CMYK converted to RGB",
    "1": "black and white expanded to RGB",
    "I;16": "16-bit grey rescaled to 8 bits and repeated into R, G and B",
    "I": "32-bit grey rescaled to 8 bits and repeated into R, G and B",
    "F": "float grey rescaled to 8 bits and repeated into R, G and B",
}
_NOTE_LIMIT = 100_000  # names remembered for "once per file"; a bound on memory for huge datasets
_noted: set[str] = set()


def _conversion(image: Image.Image) -> str:
    if image.mode == "P" and "transparency" in image.info:
        return _CONVERSIONS["PA"]
    if image.mode.startswith("I;16"):
        return _CONVERSIONS["I;16"]
    return _CONVERSIONS.get(image.mode, "converted to RGB")


def _note_conversion(name: str, mode: str, what: str) -> None:
    """Log once per file that a non-RGB image was converted, and how."""
    if name in _noted:
        return
    if len(_noted) < _NOTE_LIMIT:
        _noted.add(name)
    logger.info("image %s has mode %r; converted to RGB (%s)", name, mode, what)


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


SQUARE_MODES: tuple[str, ...] = ("crop", "pad")
# LLaVA pads with the vision tower's normalisation mean (its expand2square); the tokenizer's input
# range [-1, 1] has mean 0.5, so the padding is mid grey and reads as 0 after normalisation.
PAD_COLOUR: tuple[int, int, int] = (127, 127, 127)


def fit_square(image: Image.Image, image_size: int, mode: str = "crop") -> Image.Image:
    """An RGB image as an ``image_size`` square: ``"crop"`` or ``"pad"``.

    ``"crop"``: resize the shorter side to ``image_size`` (bicubic) and cut out the centre square,
    as every training reader does. ``"pad"``: centre the image on a square of its longer side
    filled with :data:`PAD_COLOUR` (LLaVA's ``image_aspect_ratio: pad``), then resize that square
    (bicubic). Both leave an ``image_size`` square image unchanged.
    """
    if mode not in SQUARE_MODES:
        raise ValueError(f"square mode {mode!r}; expected one of {', '.join(SQUARE_MODES)}")
    width, height = image.size
    if mode == "pad" and width != height:
        side = max(width, height)
        canvas = Image.new(image.mode, (side, side), PAD_COLOUR if image.mode == "RGB" else 127)
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        image = canvas
    return _resize_and_crop(image, image_size)


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
