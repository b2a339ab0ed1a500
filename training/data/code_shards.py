"""Pre-tokenised code shards: images are encoded once, LLM training reads codes (docs/architecture.md, "Data flow").

This module holds the format (``meta.json``, keys, the tokenizer fingerprint), the writer
(:func:`tokenize_to_shards`) and its command line; :class:`training.data.code_store.CodeStore`
reads the shards.

On-disk layout of ``out_dir``::

    meta.json        grid, depths, codebook sizes, image size, image_resize, tokenizer path + weight
                     fingerprint, number of images, shard size, the completed shards (see CodeShardsMeta)
    shard-00000/     a Hugging Face ``datasets`` folder (``Dataset.save_to_disk``), rows sorted by key:
    shard-00001/       key: str (the image path relative to the image root, as the annotation files
    ...                write it), pixel / semantic: fixed-length lists of int16 (int32 for codebooks
                       over 32767 codes), the (h, w, D) codes flattened row-major

``datasets.load_from_disk("out_dir/shard-00000")`` reads a shard; ``CodeStore`` reads them all,
memory-mapped, with O(1) lookup by key.

Writing is resumable: each shard is saved under a temporary name and renamed when complete, and
``meta.json`` (rewritten atomically) lists the completed shards, so a rerun after an interruption
encodes only the missing shards and ends with the same files as an uninterrupted run. A rerun
against other weights or another image list raises unless ``overwrite=True``.

Conversation images are made square by ``image_resize`` (``pad``, the default, or ``crop``),
text-to-image targets are centre-cropped (:mod:`training.data.code_images`); ``meta.json``
records the mode, and an LLM stage copies it into its model folder, so answering prepares
images as training did.

CLI: ``python -m training.data.code_shards --tokenizer DIR --llava data/shapes/llava.json
--t2i data/shapes/t2i.jsonl --out data/shapes/codes [--image-resize pad|crop]``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import posixpath
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from tokenizer.devices import add_device_argument, autocast, resolve_device
from tokenizer.files import replace_directory, write_text_atomic
from tokenizer.images import SQUARE_MODES, ImageLoadError
from tokenizer.model import DualTokenizer
from training.data.bad_images import BAD_IMAGES_FILE, ON_BAD_IMAGE
from training.data.code_images import ImageFiles, collect_images_by_use, square_modes
from training.data.code_images import collect_image_paths as collect_image_paths  # imported from here too

logger = logging.getLogger(__name__)

META_NAME = "meta.json"
FORMAT_VERSION = 1
_SHARD_PREFIX = "shard-"
_TEMPORARY_SUFFIX = ".tmp"
# Settings that must match for a rerun to continue (or reuse) what is on disk.
_RESUME_FIELDS = (
    "tokenizer_fingerprint",
    "keys_sha256",
    "num_images",
    "shard_size",
    "convert_to_rgb",
    "image_size",
    "image_resize",
    "generation_keys_sha256",
    "grid",
    "pixel_depth",
    "semantic_depth",
    "dtype",
)


class CodeShardsError(ValueError):
    """A code-shard folder does not match its meta.json, the tokenizer, or the requested images."""


@dataclass
class CodeShardsMeta:
    """Contents of ``meta.json``. ``grid``: (h, w); ``shards``: the completed shards' folder names, in order."""

    tokenizer_fingerprint: str
    tokenizer_path: str | None
    image_size: int
    grid: tuple[int, int]
    pixel_depth: int
    semantic_depth: int
    pixel_codebook_size: int
    semantic_codebook_size: int
    dtype: str
    convert_to_rgb: bool
    num_images: int
    shard_size: int
    keys_sha256: str
    image_root: str | None = None
    shards: list[str] = field(default_factory=list)
    # on_bad_image="skip": the keys of the images left out (unreadable), by shard; a rerun encodes those shards again
    bad_images: dict[str, list[str]] = field(default_factory=dict)
    # How conversation images were made square (training.data.code_images); folders written before
    # the setting existed were centre-cropped. Text-to-image targets (hashed below) are always cropped.
    image_resize: str = "crop"
    generation_keys_sha256: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def num_codes(self) -> int:
        """How many images the shards hold codes of: all but the bad ones left out."""
        return self.num_images - sum(len(keys) for keys in self.bad_images.values())

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    @property
    def complete(self) -> bool:
        return self.shards == [shard_name(index) for index in range(self.num_shards)]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "grid": list(self.grid), "num_shards": self.num_shards, "complete": self.complete}

    @classmethod
    def from_file(cls, path: Path) -> CodeShardsMeta:
        try:
            payload = json.loads(path.read_text())
            payload.pop("num_shards", None)
            payload.pop("complete", None)
            meta = cls(**payload)
        except (json.JSONDecodeError, TypeError) as error:
            raise CodeShardsError(f"{path} is not a code-shard meta.json ({error})") from error
        meta.grid = (int(meta.grid[0]), int(meta.grid[1]))
        if meta.format_version != FORMAT_VERSION:
            raise CodeShardsError(f"{path} has format_version {meta.format_version}; expected {FORMAT_VERSION}")
        if meta.image_resize not in SQUARE_MODES:
            raise CodeShardsError(
                f"{path}: image_resize={meta.image_resize!r}; expected one of {'|'.join(SQUARE_MODES)}"
            )
        return meta

    def write(self, out_dir: Path) -> None:

        write_text_atomic(out_dir / META_NAME, json.dumps(self.to_dict(), indent=2) + "\n")


def shard_name(index: int) -> str:
    return f"{_SHARD_PREFIX}{index:05d}"


def normalise_key(path: str | os.PathLike) -> str:
    """The store key of an image path: POSIX separators, ``.`` and ``a/../`` segments removed."""
    return posixpath.normpath(Path(path).as_posix())


def tokenizer_fingerprint(visual_tokenizer: DualTokenizer) -> str:
    """sha256 of the tokenizer's state dict (names, dtypes, shapes, bytes).

    Hashing the weights in memory rather than ``model.safetensors`` works for a tokenizer
    that was never saved and does not depend on how the file was serialised.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(visual_tokenizer.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def _keys_sha256(keys: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def _codebook_sizes(visual_tokenizer: DualTokenizer) -> tuple[int, int]:
    config = visual_tokenizer.config
    semantic = config.semantic_quantizer.codebook_size
    # The shared-codebook ablation (paper Table 5) decodes the semantic codes as pixel codes.
    pixel = semantic if config.shared_codebook else config.pixel_quantizer.codebook_size
    return pixel, semantic


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence ``datasets``' per-save progress bar (one bar per shard would bury ours)."""
    import datasets

    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _save_shard(out_dir: Path, name: str, keys: list[str], pixel: np.ndarray, semantic: np.ndarray) -> None:
    """Save one shard under a temporary name, then rename it: a shard folder exists only when complete."""
    import datasets

    from tokenizer.files import recover_directory, write_manifest

    def codes_column(codes: np.ndarray) -> pa.Array:
        flat = codes.reshape(len(keys), int(np.prod(codes.shape[1:])))  # also a shard whose images were all bad
        return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])

    table = pa.table(
        {"key": pa.array(keys, pa.string()), "pixel": codes_column(pixel), "semantic": codes_column(semantic)}
    )
    # An explicit fingerprint derived from the keys keeps state.json identical on reruns.
    fingerprint = hashlib.sha256(f"{name}|{_keys_sha256(keys)}".encode()).hexdigest()[:16]
    dataset = datasets.Dataset(datasets.table.InMemoryTable(table), fingerprint=fingerprint)
    temporary = out_dir / f".{name}{_TEMPORARY_SUFFIX}"
    recover_directory(out_dir / name)  # a write of this shard killed between the two renames of replace_directory
    shutil.rmtree(temporary, ignore_errors=True)
    with _quiet_datasets():
        dataset.save_to_disk(str(temporary))
    write_manifest(temporary)  # last: the shard's files with their sizes and hashes
    # A folder not listed in meta.json (a crash between this rename and the meta update) is replaced.
    replace_directory(temporary, out_dir / name)


def _remove_shards(out_dir: Path) -> None:
    """Delete what this module wrote (shards, temporaries, meta.json), nothing else."""
    for entry in out_dir.iterdir():
        name = entry.name.lstrip(".")
        if name.startswith(_SHARD_PREFIX) or name.startswith(META_NAME):
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _resume_or_start(out_dir: Path, target: CodeShardsMeta, overwrite: bool) -> CodeShardsMeta:
    """The meta to continue from: the one on disk when it matches ``target``, else a fresh start."""
    meta_path = out_dir / META_NAME
    if meta_path.is_file() and not overwrite:
        existing = CodeShardsMeta.from_file(meta_path)
        differences = [name for name in _RESUME_FIELDS if getattr(existing, name) != getattr(target, name)]
        if differences:
            what = ", ".join(
                f"{name}: {getattr(existing, name)!r} -> {getattr(target, name)!r}" for name in differences
            )
            hint = (
                "another tokenizer (weights differ)"
                if "tokenizer_fingerprint" in differences
                else "another image list or settings"
            )
            raise CodeShardsError(
                f"{out_dir} holds codes from {hint} ({what}); "
                "pass overwrite=True (--overwrite) to replace them, or choose another output folder"
            )
        # Shards listed as done but missing on disk (deleted by hand) are encoded again, and so are
        # those that left bad images out (the files may have been fixed since).
        target.shards = [
            name for name in existing.shards if (out_dir / name).is_dir() and name not in existing.bad_images
        ]
    else:
        _remove_shards(out_dir)
    return target


def tokenize_to_shards(
    visual_tokenizer: DualTokenizer,
    image_paths: Sequence[str],
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    batch_size: int = 64,
    shard_size: int = 4096,
    convert_to_rgb: bool = False,
    overwrite: bool = False,
    visual_tokenizer_path: str | os.PathLike | None = None,
    num_workers: int = 0,
    on_bad_image: str = "error",
    image_resize: str = "pad",
    generation_paths: Sequence[str] = (),
) -> Path:
    """Encode every image of ``image_paths`` and ``generation_paths`` (relative to ``image_root``) once
    into code shards in ``out_dir``.

    ``image_paths`` are images the model answers about, made square by ``image_resize`` (``pad``
    or ``crop``); ``generation_paths`` are text-to-image targets, always centre-cropped
    (:mod:`training.data.code_images`). Square images come out the same either way.

    Paths are normalised, deduplicated and sorted, so the result depends only on the set of
    images. Images run through the tokenizer in batches of ``batch_size`` on its device under
    ``torch.inference_mode()``; ``num_workers`` DataLoader processes decode the files.
    Resumable (see the module docstring). Returns ``out_dir``.

    A bad image (missing, corrupt, truncated) stops the run with ``on_bad_image="error"``; the
    shards already written stay, so a rerun after fixing the file continues. With ``"skip"`` it is
    left out: logged, listed in ``meta.json`` (``bad_images``) and ``out_dir/bad_images.txt``
    (``key<TAB>reason`` lines), and its shard is encoded again by the next run.

    Raises:
        CodeShardsError: ``out_dir`` holds codes of another tokenizer or image list and
            ``overwrite`` is False.
        ImageLoadError: an image is missing or unreadable and ``on_bad_image`` is ``"error"``
            (the message names it).
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size={batch_size} and shard_size={shard_size} must be >= 1")
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image={on_bad_image!r}; expected {'|'.join(ON_BAD_IMAGE)}")
    understanding = {normalise_key(path) for path in image_paths}
    generation = sorted({normalise_key(path) for path in generation_paths})
    keys = sorted(understanding.union(generation))
    if not keys:
        raise ValueError("no image paths to tokenise")
    out_dir, image_root = Path(out_dir), Path(image_root)
    modes = square_modes(understanding, generation, image_resize, image_root)
    out_dir.mkdir(parents=True, exist_ok=True)
    pixel_codebook, semantic_codebook = _codebook_sizes(visual_tokenizer)
    grid = visual_tokenizer.grid_size
    dtype = np.int16 if max(pixel_codebook, semantic_codebook) <= np.iinfo(np.int16).max + 1 else np.int32
    target = CodeShardsMeta(
        tokenizer_fingerprint=tokenizer_fingerprint(visual_tokenizer),
        tokenizer_path=None if visual_tokenizer_path is None else str(visual_tokenizer_path),
        image_size=visual_tokenizer.backbone.image_size,
        grid=(grid, grid),
        pixel_depth=visual_tokenizer.pixel_depth,
        semantic_depth=visual_tokenizer.semantic_quantizer.config.depth,
        pixel_codebook_size=pixel_codebook,
        semantic_codebook_size=semantic_codebook,
        dtype=np.dtype(dtype).name,
        convert_to_rgb=convert_to_rgb,
        num_images=len(keys),
        shard_size=shard_size,
        keys_sha256=_keys_sha256(keys),
        image_root=str(image_root),
        image_resize=image_resize,
        generation_keys_sha256=_keys_sha256(generation) if generation else "",
    )
    meta = _resume_or_start(out_dir, target, overwrite)
    meta.write(out_dir)
    done = set(meta.shards)
    todo = [index for index in range(meta.num_shards) if shard_name(index) not in done]
    if not todo:
        logger.info("%s already holds the codes of all %d images", out_dir, len(keys))
        return out_dir
    skipped = len(keys) - sum(len(keys[i * shard_size : (i + 1) * shard_size]) for i in todo)
    device = next(visual_tokenizer.parameters()).device
    reasons: dict[str, str] = {}  # key -> why it was left out (on_bad_image="skip")
    was_training = visual_tokenizer.training
    visual_tokenizer.eval()
    try:
        with tqdm(total=len(keys), initial=skipped, desc="tokenising", unit="image") as progress:
            for index in todo:
                shard_keys = keys[index * shard_size : (index + 1) * shard_size]
                size = visual_tokenizer.backbone.image_size
                files = ImageFiles(shard_keys, image_root, size, convert_to_rgb, modes)
                loader = DataLoader(files, batch_size=batch_size, shuffle=False, num_workers=num_workers)
                pixel, semantic, bad = _encode(visual_tokenizer, loader, device, dtype, progress, on_bad_image)
                good_keys = [key for position, key in enumerate(shard_keys) if position not in bad]
                _save_shard(out_dir, shard_name(index), good_keys, pixel, semantic)
                for position, reason in bad.items():
                    logger.warning("left out a bad image (on_bad_image=skip): %s", reason)
                    reasons[shard_keys[position]] = reason
                if bad:
                    meta.bad_images[shard_name(index)] = [shard_keys[position] for position in bad]
                meta.shards = sorted(set(meta.shards) | {shard_name(index)})
                meta.write(out_dir)
    finally:
        visual_tokenizer.train(was_training)
    if on_bad_image == "skip":
        write_text_atomic(out_dir / BAD_IMAGES_FILE, "".join(f"{key}\t{why}\n" for key, why in sorted(reasons.items())))
        if reasons:
            logger.warning("left out %d bad image(s), listed in %s", len(reasons), out_dir / BAD_IMAGES_FILE)
    logger.info("wrote the codes of %d images in %d shards to %s", meta.num_codes, meta.num_shards, out_dir)
    return out_dir


def _encode(
    visual_tokenizer: DualTokenizer,
    loader: DataLoader,
    device: torch.device,
    dtype: type,
    progress: tqdm,
    on_bad_image: str = "error",
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Codes of the loader's good images: pixel (N, h, w, D_pixel), semantic (N, h, w, D_semantic) of
    ``dtype``, and the bad ones left out (``on_bad_image="skip"``): position in the loader -> reason."""
    grid = visual_tokenizer.grid_size
    pixel = [np.empty((0, grid, grid, visual_tokenizer.pixel_depth), dtype)]
    semantic = [np.empty((0, grid, grid, visual_tokenizer.semantic_quantizer.config.depth), dtype)]
    bad: dict[int, str] = {}
    seen = 0
    with torch.inference_mode():
        for images, errors in loader:
            good = [row for row, error in enumerate(errors) if not error]
            for row, error in enumerate(errors):
                if error and on_bad_image == "error":
                    raise ImageLoadError(
                        f"{error}; the shards already written are kept: fix or remove the file and run the same "
                        "command to continue, or pass on_bad_image='skip' (--on-bad-image skip) to leave it out"
                    )
                if error:
                    bad[seen + row] = error
            if good:
                with autocast(device):
                    codes = visual_tokenizer.encode(images[good].to(device))
                pixel.append(codes.pixel_codes.cpu().numpy().astype(dtype))
                semantic.append(codes.semantic_codes.cpu().numpy().astype(dtype))
            seen += len(errors)
            progress.update(len(errors))
    return np.concatenate(pixel), np.concatenate(semantic), bad


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> Path:
    """``python -m training.data.code_shards --tokenizer DIR --llava ... --t2i ... --out DIR``."""
    from tokenizer.files import check_output_dir
    from training.common import setup_logging

    parser = argparse.ArgumentParser(
        prog="python -m training.data.code_shards",
        description="Tokenise the images of conversation / text-to-image files once into code shards.",
    )
    parser.add_argument("--tokenizer", required=True, help="a saved DualTokenizer directory")
    parser.add_argument("--llava", nargs="*", default=[], help="LLaVA-format conversation files (.json / .jsonl)")
    parser.add_argument("--t2i", nargs="*", default=[], help="text-to-image files (.jsonl)")
    parser.add_argument("--image-root", default=None, help="root of the relative image paths (default: file folder)")
    parser.add_argument("--out", required=True, help="output folder for meta.json and the shards")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=4096)
    parser.add_argument("--num-workers", type=int, default=0, help="image-decoding processes")
    add_device_argument(parser)
    parser.add_argument("--convert-to-rgb", action="store_true", help="convert grayscale / RGBA / palette images")
    parser.add_argument(
        "--image-resize",
        choices=SQUARE_MODES,
        default="pad",
        help="how conversation images are made square: pad (pad-to-square, the default) or crop (centre crop); "
        "text-to-image targets are always centre-cropped",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace codes of another tokenizer or image list")
    parser.add_argument(
        "--on-bad-image",
        choices=ON_BAD_IMAGE,
        default="error",
        help="a missing or corrupt image: stop (error, the default) or leave it out and list it (skip)",
    )
    args = parser.parse_args(argv)
    check_output_dir(args.out, "--out")
    setup_logging()
    conversation_keys, generation_keys, root = collect_images_by_use(args.llava, args.t2i, args.image_root)
    visual_tokenizer = DualTokenizer.from_pretrained(args.tokenizer, device=resolve_device(args.device))
    return tokenize_to_shards(
        visual_tokenizer,
        conversation_keys,
        root,
        args.out,
        image_resize=args.image_resize,
        generation_paths=generation_keys,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        convert_to_rgb=args.convert_to_rgb,
        overwrite=args.overwrite,
        on_bad_image=args.on_bad_image,
        visual_tokenizer_path=args.tokenizer,
        num_workers=args.num_workers,
    )


if __name__ == "__main__":
    main()
