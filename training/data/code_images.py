"""The images of a code store: which ones the annotation files name (:func:`collect_images_by_use`),
and how each is decoded and made square before it is coded (:class:`ImageFiles`).

A code store (:mod:`training.data.code_shards`) holds one set of codes per image. Images the
model answers about (conversations, captions) are made square by the store's ``image_resize``
(:func:`tokenizer.images.fit_square`): ``pad`` (pad-to-square on mid grey, as LLaVA trains and
answers) or ``crop`` (resize the shorter side, cut out the centre). Text-to-image targets are
always centre-cropped: a padded grey border is not something the model should learn to draw.
An image named both ways is coded once, so with ``pad`` it must be square (both modes leave a
square image as it is); :func:`square_modes` refuses it otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from mllm.model_folder import check_image_resize
from tokenizer.images import ImageLoadError, load_image

GENERATION_RESIZE = "crop"  # how text-to-image targets are made square, whatever image_resize says


def _is_square(path: Path) -> bool:
    """Whether the image file at ``path`` is square; a file that cannot be opened counts as square
    (decoding it reports the problem, following ``on_bad_image``)."""
    try:
        with Image.open(path) as image:  # reads the header only
            width, height = image.size
    except (OSError, ValueError, SyntaxError):
        return True
    return width == height


def square_modes(
    understanding_keys: Iterable[str], generation_keys: Iterable[str], image_resize: str, image_root: Path
) -> dict[str, str]:
    """How each key's image is made square: ``image_resize`` for the images the model answers
    about, :data:`GENERATION_RESIZE` for text-to-image targets.

    Raises:
        ValueError: ``image_resize`` is not a mode, or (with ``pad``) an image is named both ways
            and is not square, so one code set cannot serve both.
    """
    check_image_resize(image_resize, "image_resize")
    modes = dict.fromkeys(understanding_keys, image_resize)
    both = []
    for key in generation_keys:
        if modes.get(key, GENERATION_RESIZE) != GENERATION_RESIZE:
            both.append(key)
        modes[key] = GENERATION_RESIZE
    not_square = [key for key in sorted(both) if not _is_square(image_root / key)]
    if not_square:
        raise ValueError(
            f"{len(not_square)} image(s) are named by both conversation and text-to-image files and are not "
            f"square (first: {not_square[0]!r}); with image_resize=pad a conversation image is padded but a "
            "text-to-image target is centre-cropped, and the store holds one code set per image: use "
            "image_resize=crop (--image-resize crop) or give the two uses different image files"
        )
    return modes


class ImageFiles(Dataset):
    """The images of ``keys`` (paths relative to ``image_root``), each made square by ``modes[key]``."""

    def __init__(
        self, keys: list[str], image_root: Path, image_size: int, convert_to_rgb: bool, modes: dict[str, str]
    ) -> None:
        self.keys, self.image_root, self.modes = keys, image_root, modes
        self.image_size, self.convert_to_rgb = image_size, convert_to_rgb

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        """``(image, "")``, or a blank image and why the file could not be read: the caller decides
        (raised in a DataLoader worker, the error would reach it buried in a traceback)."""
        key = self.keys[index]
        try:
            image = load_image(
                self.image_root / key,
                name=key,
                image_size=self.image_size,
                convert_to_rgb=self.convert_to_rgb,
                convert_hint="pass convert_to_rgb=True (--convert-to-rgb)",
                resize=self.modes[key],
            )
        except ImageLoadError as error:
            return torch.zeros(3, self.image_size, self.image_size), " ".join(str(error).split())
        return image, ""


def collect_image_paths(
    llava: Sequence[str | os.PathLike] = (),
    t2i: Sequence[str | os.PathLike] = (),
    image_root: str | os.PathLike | None = None,
) -> tuple[list[str], Path]:
    """``(image keys, image root)`` of the images named by conversation and text-to-image files
    (:func:`collect_images_by_use`, both uses together)."""
    conversation_keys, generation_keys, root = collect_images_by_use(llava, t2i, image_root)
    return conversation_keys + generation_keys, root


def collect_images_by_use(
    llava: Sequence[str | os.PathLike] = (),
    t2i: Sequence[str | os.PathLike] = (),
    image_root: str | os.PathLike | None = None,
) -> tuple[list[str], list[str], Path]:
    """``(conversation image keys, text-to-image keys, image root)`` of the images the files name.

    Each file's keys are relative to ``image_root`` (default: the file's folder); without an
    explicit root all files must sit in one folder, so that one key means one image.
    """
    from training.data.conversations import read_conversations, read_text_image_pairs

    files = [(Path(path), read_conversations) for path in llava] + [(Path(path), read_text_image_pairs) for path in t2i]
    if not files:
        raise ValueError("no annotation files given (--llava and/or --t2i)")
    roots = {Path(image_root) if image_root is not None else path.parent for path, _ in files}
    if len(roots) > 1:
        raise ValueError(
            f"the annotation files sit in different folders ({sorted(map(str, roots))}), so their relative image "
            "paths have different roots; pass --image-root"
        )
    root = roots.pop()
    keys: dict[object, list[str]] = {read_conversations: [], read_text_image_pairs: []}
    for path, reader in files:
        keys[reader].extend(
            record.image_key for record in reader(path, image_root=root) if record.image_key is not None
        )
    return keys[read_conversations], keys[read_text_image_pairs], root
