"""``dualtoken tokenize`` and ``dualtoken reconstruct``: use a trained tokenizer on files.

dualtoken tokenize    --tokenizer runs/tiny/stage1/tokenizer --images a.png b.png -o codes.safetensors
dualtoken reconstruct --tokenizer runs/tiny/stage1/tokenizer --images a.png b.png -o grid.png

Images that are valid but not RGB (grey, alpha, palette, CMYK, 16-bit) are converted, alpha over
white, with one logged note per file; ``--strict`` refuses them instead. The output path is
checked before the tokenizer is loaded, so a folder in the way fails at once.

Codes are written as safetensors (``safetensors.torch.load_file`` reads ``pixel_codes`` and
``semantic_codes``, each ``(N, h, w, depth)`` int64; the metadata key ``files`` lists the images
as JSON), a format that holds tensors only and never runs code when read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tokenizer.devices import add_device_argument, autocast, resolve_device
from tokenizer.files import OutputPathError, atomic_output, check_output_file
from tokenizer.images import load_image
from tokenizer.model import DualTokenizer


def _load(args: argparse.Namespace) -> tuple[DualTokenizer, torch.Tensor]:
    """The tokenizer on ``--device`` and the images, on the CPU (moved by :func:`_codes`)."""
    from training.common import setup_logging

    visual_tokenizer = DualTokenizer.from_pretrained(args.tokenizer, device=resolve_device(args.device))
    size = visual_tokenizer.backbone.image_size
    setup_logging()  # the notes of converted images
    images = torch.stack(
        [
            load_image(path, name=str(path), image_size=size, strict=args.strict, convert_hint="leave out --strict")
            for path in args.images
        ]
    )
    return visual_tokenizer, images


@torch.no_grad()
def _codes(visual_tokenizer: DualTokenizer, images: torch.Tensor, decode: bool = False) -> dict[str, torch.Tensor]:
    """images (N, 3, H, W) in [-1, 1] on the CPU -> their codes (and reconstructions), on the CPU.

    The forward passes run on the tokenizer's device, under bf16 autocast on CUDA."""
    device = next(visual_tokenizer.parameters()).device
    with autocast(device):
        codes = visual_tokenizer.encode(images.to(device))
        result = {"pixel_codes": codes.pixel_codes, "semantic_codes": codes.semantic_codes}
        if decode:
            result["reconstructions"] = visual_tokenizer.decode(codes.pixel_codes).float()
    return {name: value.cpu() for name, value in result.items()}


def _parse(prog: str, output_help: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--tokenizer", required=True, help="directory written by train-tokenizer (…/tokenizer)")
    parser.add_argument("--images", nargs="+", required=True, help="image files")
    parser.add_argument("-o", "--output", required=True, help=output_help)
    add_device_argument(parser)
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument(
        "--strict", action="store_true", help="refuse images that are not RGB instead of converting them"
    )
    # Conversion is the default; the flag stays so that scripts written for opt-in conversion still run.
    modes.add_argument("--convert-to-rgb", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_output_file(args.output, "-o/--output")
    resolve_device(args.device)  # a device this machine lacks fails before anything is loaded
    return args


def tokenize_main(argv: list[str] | None = None) -> dict[str, torch.Tensor]:
    args = _parse("dualtoken tokenize", "output .safetensors file with pixel_codes and semantic_codes", argv)
    output = Path(args.output)
    if output.suffix != ".safetensors":
        # Codes are tensors only, so they go in a format that cannot carry code (no pickle).
        raise OutputPathError(f"-o/--output {output}: expected a .safetensors file (pixel_codes, semantic_codes)")
    visual_tokenizer, images = _load(args)
    codes = _codes(visual_tokenizer, images)
    payload = {**codes, "files": list(args.images)}
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(output) as partial:
        save_file(
            {name: value.contiguous() for name, value in codes.items()},
            str(partial),
            metadata={"files": json.dumps(payload["files"])},
        )
    print(
        f"wrote {output}: pixel_codes {tuple(codes['pixel_codes'].shape)}, "
        f"semantic_codes {tuple(codes['semantic_codes'].shape)}"
    )
    return payload


def _check_image_extension(path: Path) -> None:
    from PIL import Image

    if Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:
        what = f"extension {path.suffix!r}" if path.suffix else "a name without an extension"
        raise OutputPathError(
            f"-o/--output {path}: {what} is not an image format PIL can write; expected e.g. .png, .jpg or .webp"
        )


def reconstruct_main(argv: list[str] | None = None) -> Path:
    from training.evaluation import save_image_grid

    args = _parse("dualtoken reconstruct", "output PNG (originals above, reconstructions below)", argv)
    _check_image_extension(Path(args.output))
    visual_tokenizer, images = _load(args)
    recons = _codes(visual_tokenizer, images, decode=True)["reconstructions"]
    path = save_image_grid([images, recons], Path(args.output), labels=["original", "decoded"])
    print(f"wrote {path}")
    return path
