"""The *Shapes world*: a synthetic image-text-QA data set generated from a seed.

Images show 1..``max_objects`` coloured shapes (6 colours x 3 shapes x 2 sizes) on a
textured, low-saturation background; each image comes with a caption and question-answer
pairs. Nothing is downloaded: sample ``index`` of ``split`` is rendered from
``np.random.default_rng([seed, split_id, index])``, so any sample is random-access and
identical across runs, processes and machines (numpy's PCG64 stream is stable).

It is the embedded default (docs/data.md, "The Shapes world"): big enough to exercise every code
path (reconstruction detail in the background textures, zero-shot classes for the
semantic branch, captions for the SigLIP teacher and the LLM, VQA for the MLLM), small
enough to train on 2 CPU cores. Three colour-shape combinations are held out of
train/val/test and appear only in the ``"compositional"`` split, which measures
compositional generalisation.

This module samples and renders scenes (:class:`ShapesWorld`); the vocabulary, the object record
and the config live in :mod:`.spec`, captions and questions in :mod:`.language`.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from training.data.shapes.language import QAPair, _make_caption, _make_qa
from training.data.shapes.spec import (
    BACKGROUNDS,
    CLASS_NAMES,
    COLOURS,
    SHAPES,
    SIDE_MARGIN,
    SIZE_FRACTIONS,
    SIZES,
    SLOT_CENTRES,
    SPLITS,
    ShapeObject,
    ShapesWorldConfig,
    class_index,
)

if TYPE_CHECKING:
    import datasets

_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
_SINGLE_OBJECT_STREAM = 100  # rng stream offset of sample_single, so it never aliases sample()
_SUPERSAMPLING = 4  # 4x4 sub-pixel samples per pixel give anti-aliased object edges (see _count_4x4)
_PLACEMENT_TRIES = 40
# Orthonormal basis of the plane orthogonal to grey (1,1,1): tints move along it.
_TINT_U = (2.0 / math.sqrt(6.0), -1.0 / math.sqrt(6.0), -1.0 / math.sqrt(6.0))
_TINT_V = (0.0, 1.0 / math.sqrt(2.0), -1.0 / math.sqrt(2.0))
# Standard-normal quantiles at the 256 byte midpoints: mapping random bytes through this table
# gives Gaussian noise (truncated at +-2.9 sigma) ~5x faster than rng.standard_normal, which was
# the largest single cost of a sample.
_NORMAL_QUANTILES = np.array([NormalDist().inv_cdf((k + 0.5) / 256) for k in range(256)], dtype=np.float32)


@dataclass
class ShapesSample:
    """One rendered scene. ``image``: (H, W, 3) uint8; ``label``: class index of ``objects[0]``."""

    image: np.ndarray
    objects: list[ShapeObject]
    background: str
    caption: str
    qa: list[QAPair]
    label: int


def object_coverage(obj: ShapeObject, image_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Anti-aliased coverage of ``obj``: ``((h, w) float32 in [0, 1], (y0, x0))`` over its pixel bounding box.

    Each pixel's coverage is the fraction of its 4x4 sub-pixel samples inside the shape.
    """
    centre_x, centre_y = obj.center[0] * image_size, obj.center[1] * image_size
    side = obj.scale * image_size
    x0, y0 = max(int(np.floor(centre_x - side / 2)), 0), max(int(np.floor(centre_y - side / 2)), 0)
    x1 = min(int(np.ceil(centre_x + side / 2)), image_size)
    y1 = min(int(np.ceil(centre_y + side / 2)), image_size)
    ss = _SUPERSAMPLING
    xs = x0 + (np.arange((x1 - x0) * ss, dtype=np.float32) + 0.5) / ss - centre_x
    ys = y0 + (np.arange((y1 - y0) * ss, dtype=np.float32) + 0.5) / ss - centre_y
    dx, dy = xs[None, :], ys[:, None]
    if obj.shape == "circle":
        inside = dx * dx + dy * dy <= (side / 2) ** 2
    elif obj.shape == "square":
        # A square as wide as the circle looks bigger (more area); 0.86 evens the visual size out.
        half = 0.43 * side
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif obj.shape == "triangle":
        # Upright isosceles triangle: base = side, height = 0.9 side, centred in the box.
        height = 0.9 * side
        depth = dy + height / 2  # distance below the apex
        inside = (depth >= 0) & (depth <= height) & (np.abs(dx) <= (side / 2) * depth / height)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
    coverage = _count_4x4(inside).astype(np.float32) * np.float32(1.0 / (ss * ss))
    return coverage, (y0, x0)


def _count_4x4(mask: np.ndarray) -> np.ndarray:
    """``mask``: (4h, 4w) bool -> (h, w) number of True samples in each 4x4 block.

    Summing the 4 rows of a block gives bytes <= 4; reading 4 neighbouring bytes as one
    uint32 and multiplying by 0x01010101 adds them into the top byte (any byte order, no
    overflow since the total is <= 16). 8x faster than ``reshape(...).sum(axis=(1, 3))``,
    which dominated the rendering time.
    """
    height, width = mask.shape[0] // 4, mask.shape[1] // 4
    rows = np.ascontiguousarray(mask).view(np.uint8).reshape(height, 4, width * 4).sum(axis=1, dtype=np.uint8)
    return (rows.view(np.uint32) * np.uint32(0x01010101)) >> np.uint32(24)


class ShapesWorld:
    """Random-access generator of Shapes-world samples; see the module docstring."""

    def __init__(self, config: ShapesWorldConfig | None = None) -> None:
        self.config = config if config is not None else ShapesWorldConfig()
        holdout = set(self.config.holdout_combinations)
        all_combinations = [(colour, shape) for colour in COLOURS for shape in SHAPES]
        self._all_combinations = all_combinations
        self._seen_combinations = [c for c in all_combinations if f"{c[0]} {c[1]}" not in holdout]
        self._holdout_combinations = [c for c in all_combinations if f"{c[0]} {c[1]}" in holdout]
        size = self.config.image_size
        centres = (np.arange(size, dtype=np.float32) + 0.5) / size
        self._grid_x, self._grid_y = centres[None, :], centres[:, None]  # (1, S), (S, 1) in image fractions

    # ------------------------------------------------------------------ splits and labels

    def split_size(self, split: str) -> int:
        """Number of samples in ``split`` (one of :data:`SPLITS`)."""
        self._check_split(split)
        return getattr(self.config, f"num_{split}")

    @staticmethod
    def class_names() -> list[str]:
        """The 18 zero-shot classes ``"red circle", "red square", ...`` (colour-major, holdouts included)."""
        return list(CLASS_NAMES)

    @staticmethod
    def zero_shot_prompts(template: str = "a photo of a {}.") -> list[str]:
        """One prompt per class of :meth:`class_names`, in the same order."""
        if "{}" not in template:
            raise ValueError(f"zero-shot template {template!r} needs a '{{}}' placeholder for the class name")
        return [template.format(name) for name in CLASS_NAMES]

    # ------------------------------------------------------------------ sampling

    def sample(self, split: str, index: int) -> ShapesSample:
        """Sample ``index`` of ``split``: 1..max_objects objects, caption and QA pairs."""
        self._check_index(split, index)
        rng = np.random.default_rng([self.config.seed, _SPLIT_IDS[split], index])
        num_objects = int(rng.integers(1, self.config.max_objects + 1))
        return self._generate(rng, split, num_objects)

    def sample_single(self, split: str, index: int) -> ShapesSample:
        """Like :meth:`sample` but always exactly one object (zero-shot classification), own rng stream."""
        self._check_index(split, index)
        rng = np.random.default_rng([self.config.seed, _SPLIT_IDS[split] + _SINGLE_OBJECT_STREAM, index])
        return self._generate(rng, split, 1)

    def _check_split(self, split: str) -> None:
        if split not in _SPLIT_IDS:
            raise ValueError(f"unknown Shapes-world split {split!r}; expected one of {SPLITS}")

    def _check_index(self, split: str, index: int) -> None:
        size = self.split_size(split)
        if not 0 <= index < size:
            raise IndexError(f"index {index} out of range for Shapes-world split {split!r} of size {size}")

    def _generate(self, rng: np.random.Generator, split: str, num_objects: int) -> ShapesSample:
        compositional = split == "compositional"
        objects = self._place_objects(rng, num_objects, compositional)
        background = self.config.backgrounds[int(rng.integers(len(self.config.backgrounds)))]
        # Questions about absent objects ("is there a ...?") never name a held-out combination
        # outside the compositional split, so the training text never mentions one either.
        nameable = self._all_combinations if compositional else self._seen_combinations
        caption = _make_caption(rng, objects, background)
        qa = _make_qa(rng, objects, nameable)
        # Rendering draws last, so noise_std changes only the pixel noise, never the scene or text.
        image = self._render(rng, objects, background)
        label = class_index(objects[0].colour, objects[0].shape)
        return ShapesSample(image=image, objects=objects, background=background, caption=caption, qa=qa, label=label)

    def _place_objects(self, rng: np.random.Generator, num_objects: int, compositional: bool) -> list[ShapeObject]:
        """Rejection-sample non-overlapping objects with distinct (colour, shape); may return fewer."""
        margin = 1.0 / self.config.image_size  # one pixel of air between bounding squares
        objects: list[ShapeObject] = []
        used: set[tuple[str, str]] = set()
        for position in range(num_objects):
            if not compositional:
                pool = self._seen_combinations
            elif position == 0:  # the compositional split leads with a held-out combination
                pool = self._holdout_combinations
            else:
                pool = self._all_combinations
            choices = [c for c in pool if c not in used]
            # One vector draw per object (rng calls cost microseconds each): combination, size,
            # size jitter, 3 colour jitters, then (x, y) candidates for rejection sampling.
            draws = rng.random(6 + 2 * _PLACEMENT_TRIES)
            colour, shape = choices[int(draws[0] * len(choices))]
            size = SIZES[int(draws[1] * len(SIZES))]
            scale = SIZE_FRACTIONS[size] * (1.0 + self.config.size_jitter * (2.0 * draws[2] - 1.0))
            low, high = scale / 2 + margin, 1.0 - scale / 2 - margin
            placed = None
            # Slots: the same draws are made (so the objects' names and sizes match the random
            # layout's scene of that index); only the place is fixed.
            candidates = (low + (high - low) * draws[6:]).reshape(-1, 2).tolist()
            if self.config.layout == "slots":
                placed, candidates = SLOT_CENTRES[num_objects][position], []
            for candidate in candidates:
                centre = (candidate[0], candidate[1])
                if self.config.snap_cells:
                    centre = _snapped(centre, scale, self.config.snap_cells, low, high)
                # Keep the first object out of the dead-centre zone so it always has an
                # unambiguous "which side / which half" question.
                if position == 0 and max(abs(centre[0] - 0.5), abs(centre[1] - 0.5)) < SIDE_MARGIN:
                    continue
                if all(_separated(centre, scale, other, margin) for other in objects):
                    placed = centre
                    break
            if placed is None:
                if position == 0:  # (practically) cannot happen on an empty canvas; never return no object
                    placed = (low, low)
                else:
                    break  # the canvas is full: keep fewer objects
            spread = self.config.colour_jitter
            jitter = (draws[3:6] * (2 * spread + 1)).astype(int) - spread
            rgb = tuple(min(max(channel + int(j), 0), 255) for channel, j in zip(COLOURS[colour], jitter, strict=True))
            objects.append(
                ShapeObject(colour=colour, shape=shape, size=size, center=placed, scale=float(scale), rgb=rgb)
            )
            used.add((colour, shape))
        return objects

    # ------------------------------------------------------------------ rendering

    def _render(self, rng: np.random.Generator, objects: list[ShapeObject], background: str) -> np.ndarray:
        """Background, then anti-aliased objects, then Gaussian pixel noise -> (H, W, 3) uint8."""
        size = self.config.image_size
        canvas = self._background(rng, background)
        for obj in objects:
            coverage, (y0, x0) = object_coverage(obj, size)
            alpha = coverage[:, :, None]
            region = canvas[y0 : y0 + coverage.shape[0], x0 : x0 + coverage.shape[1]]
            region *= 1.0 - alpha
            region += alpha * np.asarray(obj.rgb, dtype=np.float32)
        if self.config.noise_std > 0:
            noise_bytes = np.frombuffer(rng.bytes(canvas.size), dtype=np.uint8).reshape(canvas.shape)
            canvas += np.take(_NORMAL_QUANTILES, noise_bytes) * np.float32(self.config.noise_std * 255.0)
        np.clip(canvas, 0, 255, out=canvas)
        return (canvas + 0.5).astype(np.uint8)  # round to nearest (values are non-negative)

    def _background(self, rng: np.random.Generator, kind: str) -> np.ndarray:
        """(H, W, 3) float32 in [0, 255]: low-saturation, mid-brightness texture of ``kind``."""
        size = self.config.image_size
        # One vector draw instead of ~10 scalar ones: rng calls cost microseconds each.
        lightness, offset, tint_a, tint_b, hue_a, hue_b, angle, frequency, sharpness, phase = rng.random(10)
        lightness = 85 + 85 * lightness
        # The second colour differs mostly in lightness (25..50 levels), so the texture is
        # visible yet never competes with the saturated object colours.
        offset = (25 + 25 * abs(2 * offset - 1)) * (1 if offset >= 0.5 else -1)
        base = _muted_colour(lightness, 18 * tint_a, 2 * np.pi * hue_a)
        other = _muted_colour(min(max(lightness + offset, 60.0), 200.0), 18 * tint_b, 2 * np.pi * hue_b)
        if kind == "plain":
            if self.config.plain_rgb is not None:
                base = np.asarray(self.config.plain_rgb, dtype=np.float32)
            return np.broadcast_to(base, (size, size, 3)).copy()
        x, y = self._grid_x, self._grid_y
        angle, phase = 2 * np.pi * angle, 2 * np.pi * phase
        cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        along = x * cos + y * sin  # (S, S) image coordinate along the texture direction
        if kind == "gradient":
            weight = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
        elif kind == "stripes":
            # tanh of a sinusoid: soft-edged stripes, sharper than a sine but never aliased.
            wave = np.sin(np.float32(2 * np.pi * (2 + 4 * frequency)) * along + np.float32(phase))
            weight = 0.5 + 0.5 * np.tanh(np.float32(1 + 3 * sharpness) * wave)
        elif kind == "checker":
            across = y * cos - x * sin
            cycles = np.float32(2 * np.pi * (1.5 + 3 * frequency))
            wave = np.sin(cycles * along + np.float32(phase)) * np.sin(cycles * across + np.float32(2 * phase))
            weight = 0.5 + 0.5 * np.tanh(np.float32(2 + 4 * sharpness) * wave)
        elif kind == "blobs":
            weight = np.zeros((size, size), dtype=np.float32)
            for centre_x, centre_y, sigma, strength in rng.random((int(rng.integers(3, 7)), 4)):
                # A Gaussian blob is separable: an outer product of two 1-D profiles (S^2 exp -> 2S).
                scale = np.float32(-1.0 / (2 * (0.08 + 0.14 * sigma) ** 2))
                blob = np.exp(scale * (x - np.float32(centre_x)) ** 2) * np.exp(scale * (y - np.float32(centre_y)) ** 2)
                np.maximum(weight, blob * np.float32(0.6 + 0.4 * strength), out=weight)
        else:
            raise ValueError(f"unknown background kind {kind!r}; expected one of {BACKGROUNDS}")
        weight = weight[:, :, None]
        return base + (other - base) * weight

    # ------------------------------------------------------------------ export

    def _rows(self, split: str, limit: int | None) -> Iterator[tuple[int, ShapesSample]]:
        count = self.split_size(split) if limit is None else min(limit, self.split_size(split))
        for index in range(count):
            yield index, self.sample(split, index)

    def to_hf_dataset(self, split: str, limit: int | None = None, cache_dir: str | None = None) -> datasets.Dataset:
        """``split`` as a Hugging Face ``datasets.Dataset`` (first ``limit`` samples).

        Columns: ``image`` (``datasets.Image``), ``caption``, ``label``, ``index``,
        ``background``, ``objects`` (list of dicts) and ``qa`` (list of dicts).
        """
        import datasets

        string, number = datasets.Value("string"), datasets.Value("float64")
        features = datasets.Features(
            {
                "image": datasets.Image(),
                "caption": string,
                "label": datasets.Value("int64"),
                "index": datasets.Value("int64"),
                "background": string,
                "objects": datasets.List(
                    {
                        "colour": string,
                        "shape": string,
                        "size": string,
                        "center": datasets.List(number, length=2),
                        "scale": number,
                        "rgb": datasets.List(datasets.Value("int64"), length=3),
                    }
                ),
                "qa": datasets.List({"question": string, "answer": string, "kind": string}),
            }
        )
        return datasets.Dataset.from_generator(
            _hf_rows, features=features, gen_kwargs={"world": self, "split": split, "limit": limit}, cache_dir=cache_dir
        )

    def write_imagefolder(self, split: str, out_dir: str | Path, limit: int | None = None) -> Path:
        """Write ``split`` as PNGs + ``metadata.jsonl`` (the image-folder format of ``readers.py``).

        One split per folder (``metadata.jsonl`` is overwritten). The layout also loads with
        ``datasets.load_dataset("imagefolder", data_dir=out_dir)``.

        Each metadata line: ``{"file_name", "text", "label", "index", "background", "objects", "qa"}``.
        Returns ``out_dir``.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "metadata.jsonl", "w", encoding="utf-8") as metadata:
            for index, sample in self._rows(split, limit):
                file_name = f"{index:06d}.png"
                Image.fromarray(sample.image).save(out_dir / file_name)
                record = {"file_name": file_name, "text": sample.caption, **_sample_record(sample, index)}
                metadata.write(json.dumps(record) + "\n")
        return out_dir


def _sample_record(sample: ShapesSample, index: int) -> dict[str, Any]:
    """The JSON-able metadata of ``sample`` (everything except image and caption)."""
    return {
        "label": sample.label,
        "index": index,
        "background": sample.background,
        "objects": [{**asdict(obj), "center": list(obj.center), "rgb": list(obj.rgb)} for obj in sample.objects],
        "qa": [asdict(pair) for pair in sample.qa],
    }


def _hf_rows(world: ShapesWorld, split: str, limit: int | None) -> Iterator[dict[str, Any]]:
    # Module-level (not a closure) so `datasets` can fingerprint it for its cache.
    for index, sample in world._rows(split, limit):
        buffer = io.BytesIO()
        Image.fromarray(sample.image).save(buffer, format="PNG")
        yield {
            "image": {"bytes": buffer.getvalue(), "path": None},
            "caption": sample.caption,
            **_sample_record(sample, index),
        }


def _snapped(centre: tuple[float, float], scale: float, cells: int, low: float, high: float) -> tuple[float, float]:
    """``centre`` moved so the bounding square's top-left corner sits on the ``cells`` lattice,
    one cell inward where that would leave ``[low, high]`` (and clamped there on a lattice too
    coarse for the object)."""
    snapped = []
    for value in centre:
        corner = round((value - scale / 2) * cells) / cells
        if corner + scale / 2 < low:
            corner += 1 / cells
        elif corner + scale / 2 > high:
            corner -= 1 / cells
        snapped.append(min(max(corner + scale / 2, low), high))
    return snapped[0], snapped[1]


def _separated(centre: tuple[float, float], scale: float, other: ShapeObject, margin: float) -> bool:
    """True when the bounding square at ``centre`` keeps ``margin`` from ``other``'s along x or y."""
    reach = (scale + other.scale) / 2 + margin
    return abs(centre[0] - other.center[0]) >= reach or abs(centre[1] - other.center[1]) >= reach


def _muted_colour(lightness: float, tint: float, hue: float) -> np.ndarray:
    """(3,) float32: a grey of ``lightness`` moved ``tint`` RGB units off the grey axis towards ``hue``."""
    cos, sin = math.cos(hue), math.sin(hue)
    # Plain Python arithmetic: numpy's per-call overhead dominates on 3-element vectors.
    channels = [lightness + tint * (cos * u + sin * v) for u, v in zip(_TINT_U, _TINT_V, strict=True)]
    return np.array([min(max(value, 0.0), 255.0) for value in channels], dtype=np.float32)
