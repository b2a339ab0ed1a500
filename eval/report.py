"""Pictures for reports: image grids with a caption under every image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def save_labelled_grid(
    images: Sequence[np.ndarray], labels: Sequence[str], path: Path, columns: int = 8, scale: int = 2
) -> Path:
    """(H, W, 3) uint8 images in a grid, each upscaled ``scale`` x (nearest) with its label underneath."""
    from PIL import Image, ImageDraw

    if not images:
        raise ValueError(f"no images to put in {path}")
    height, width = images[0].shape[:2]
    cell_w, cell_h = width * scale, height * scale
    label_h, pad = 24, 4
    cell_w = max(cell_w, 150)
    rows = -(-len(images) // columns)
    canvas = Image.new("RGB", (columns * (cell_w + pad) + pad, rows * (cell_h + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (image, label) in enumerate(zip(images, labels, strict=False)):
        row, col = divmod(index, columns)
        left = pad + col * (cell_w + pad)
        top = pad + row * (cell_h + label_h + pad)
        tile = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((width * scale, height * scale), Image.NEAREST)
        canvas.paste(tile, (left + (cell_w - width * scale) // 2, top))
        colour = (0, 120, 0) if label.startswith("OK") else (170, 0, 0) if label.startswith("X ") else (0, 0, 0)
        words, line, lines = label.split(), "", []
        for word in words:
            if len(line) + len(word) + 1 > cell_w // 6 and line:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        for number, text in enumerate(lines[:2]):
            draw.text((left, top + height * scale + 1 + 11 * number), text, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
