"""``dualtoken tokenize`` and ``dualtoken reconstruct``: use a trained tokenizer on files.

dualtoken tokenize    --tokenizer runs/tiny/stage1/tokenizer --images a.png b.png -o codes.pt
dualtoken reconstruct --tokenizer runs/tiny/stage1/tokenizer --images a.png b.png -o grid.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tokenizer.images import load_image
from tokenizer.model import DualTokenizer


def _load(args: argparse.Namespace) -> tuple[DualTokenizer, torch.Tensor]:
    visual_tokenizer = DualTokenizer.from_pretrained(args.tokenizer)
    size = visual_tokenizer.backbone.image_size
    images = torch.stack(
        [load_image(path, name=str(path), image_size=size, convert_to_rgb=args.convert_to_rgb) for path in args.images]
    )
    return visual_tokenizer, images


def _parser(prog: str, output_help: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--tokenizer", required=True, help="directory written by train-tokenizer (…/tokenizer)")
    parser.add_argument("--images", nargs="+", required=True, help="image files")
    parser.add_argument("-o", "--output", required=True, help=output_help)
    parser.add_argument("--convert-to-rgb", action="store_true", help="convert grayscale / RGBA / palette images")
    return parser


def tokenize_main(argv: list[str] | None = None) -> dict[str, torch.Tensor]:
    args = _parser("dualtoken tokenize", "output .pt file with pixel_codes and semantic_codes").parse_args(argv)
    visual_tokenizer, images = _load(args)
    codes = visual_tokenizer.encode(images)
    payload = {"pixel_codes": codes.pixel_codes, "semantic_codes": codes.semantic_codes, "files": list(args.images)}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, output)
    print(
        f"wrote {output}: pixel_codes {tuple(codes.pixel_codes.shape)}, semantic_codes {tuple(codes.semantic_codes.shape)}"
    )
    return payload


def reconstruct_main(argv: list[str] | None = None) -> Path:
    from training.evaluation import save_image_grid

    args = _parser("dualtoken reconstruct", "output PNG (originals above, reconstructions below)").parse_args(argv)
    visual_tokenizer, images = _load(args)
    recons = visual_tokenizer.decode(visual_tokenizer.encode(images).pixel_codes)
    path = save_image_grid([images, recons], Path(args.output), labels=["original", "decoded"])
    print(f"wrote {path}")
    return path
