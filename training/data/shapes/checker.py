"""An independent image checker for the Shapes world: which coloured shapes does a picture show?

It judges images made by a text-to-image model ("does this picture show a red circle to the
left of a blue square?"), so it is plain deterministic image analysis that never runs a model,
and it is independent of the renderer: it imports only the world's public *spec* constants
(the palette, the shape and size names and the nominal sizes), never its drawing code, so a
bug in the renderer cannot hide behind shared geometry.

Pipeline of :func:`detect_objects`:

1. **Colour segmentation.** Every pixel is projected onto the plane orthogonal to grey
   (``chroma_a, chroma_b``). Its distance from the grey axis is its *chroma*; its angle is its
   hue. Backgrounds are muted (chroma <= ~18 plus noise), the palette is saturated (chroma
   100..150), so pixels with chroma >= :data:`CHROMA_FLOOR` are object candidates, labelled with
   the palette colour of nearest hue (palette hues are >= 45 degrees apart).
2. **Connected components** (4-connected, same colour) by vectorised label propagation.
3. **Adaptive re-threshold.** Inside each component the object mask is re-cut at
   :data:`EDGE_FRACTION` of the component's peak chroma, so the mask edge sits where the object
   covers about half a pixel, whatever the colour's saturation (a pale model output too), and
   blur bridges between neighbouring objects break. Components are labelled again.
4. **Speck removal.** Components smaller than :data:`MIN_AREA_FRACTION` of the image, or with no
   pixel whose 3x3 neighbourhood lies inside it (lines and noise, e.g. the purple fringe a
   blurred red-blue border leaves), are dropped.
5. **Shape measures** from the moments of each component's pixels, which integrate over the
   whole object and so shrug off a ragged edge row that would swing a bounding-box fill ratio
   (see :func:`shape_features`): *compactness* (disk 1, square 0.955, any triangle 0.827),
   *squareness* (4-fold anisotropy of the kurtosis: square 0.6, disk 0) and *asymmetry* (largest
   skewness: isosceles triangle 0.57, disk and square 0). All three hold at any rotation. The
   shape is the nearest prototype; a component far from every prototype, or elongated, is
   reported as ``"unknown"``, so a smear never counts as a shape.

:func:`judge` matches expected objects to detections one-to-one (a maximum bipartite
matching, not greedy by order) and checks an optional spatial relation between centres.
:func:`parse_caption` turns the world's captions (and prompts written like them) into the
expected objects and relation. ``python -m training.data.shapes.checker --validate N`` measures the checker on
the world's own images.
"""

from __future__ import annotations

import argparse
import itertools
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from training.data.shapes import COLOURS, SHAPES, SIZE_FRACTIONS, SIZES

# ---------------------------------------------------------------------- thresholds

# Pixels at least this far from the grey axis (RGB units) may belong to an object. World
# backgrounds reach chroma 18 (their tint) plus noise; the palette has chroma 100 (green) to 152
# (yellow), a little less after colour jitter. At 40 a background pixel needs 22 units of noise
# along its tint to pass (2.7 sigma at std 8; such specks go in step 4 of the pipeline), and
# an object pixel passes once the object covers ~40% of it.
CHROMA_FLOOR = 40.0
# The object mask is cut at this fraction of a component's peak chroma (its 90th percentile),
# i.e. where a blurred or anti-aliased edge is half object, half background.
EDGE_FRACTION = 0.5
PEAK_PERCENTILE = 90.0
# The smallest world object (a small triangle, 0.45 * 0.2^2 of the image) covers 1.8% of the
# image; a quarter of that still counts, anything smaller is a speck.
MIN_AREA_FRACTION = 0.0045
# Prototype shape features (compactness, squareness, asymmetry), from the geometry of ideal
# shapes (see shape_features); they hold at any rotation, so a model's tilted square still counts.
SHAPE_PROTOTYPES: dict[str, tuple[float, float, float]] = {
    "circle": (1.0, 0.0, 0.0),
    "square": (12 / (4 * math.pi), 0.6, 0.0),
    "triangle": (6 * math.sqrt(3) / (4 * math.pi), 0.0, 0.566),
}
# Compactness spans only 0.83..1 across shapes; weighting it x4 gives it the span of the others.
COMPACTNESS_WEIGHT = 4.0
# A component farther than this from every prototype (weighted Euclidean) is "unknown". World
# objects stay within 0.2 of their prototype, 0.32 after a 0.7 px blur plus noise of std 8 and
# 0.49 after a 1.2 px blur plus noise of std 12 (small triangles round off); the prototypes are
# >= 0.63 apart.
MAX_SHAPE_DISTANCE = 0.5
# Covariance axis ratio beyond which a component is no world shape (an ellipse has the
# compactness of a disk). World shapes: 1.0, triangles 1.04 (1.3 at most under heavy blur).
MAX_ELONGATION = 1.5
# Box side (longest, image fraction) splitting "small" from "large": halfway between the
# largest small object (0.22 * 1.08) and the smallest large square (0.40 * 0.92 * 0.86, squares
# are drawn at 0.86 of their bounding square).
SIZE_THRESHOLD = (SIZE_FRACTIONS["small"] * 1.08 + SIZE_FRACTIONS["large"] * 0.92 * 0.86) / 2
UNKNOWN_SHAPE = "unknown"
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
_RELATION_WORDS = {"left": "left of", "right": "right of", "above": "above", "below": "below"}


def _chroma_plane(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``rgb``: (..., 3) float -> two (...) coordinates in the plane orthogonal to grey (orthonormal)."""
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return (2 * red - green - blue) / math.sqrt(6.0), (green - blue) / math.sqrt(2.0)


_PALETTE_NAMES: tuple[str, ...] = tuple(COLOURS)
_PALETTE_A, _PALETTE_B = _chroma_plane(np.array([COLOURS[name] for name in _PALETTE_NAMES], dtype=np.float64))
_PALETTE_HUES = np.arctan2(_PALETTE_B, _PALETTE_A)  # (6,) radians


# ---------------------------------------------------------------------- results


@dataclass(frozen=True)
class Detection:
    """One detected object. ``box``: (left, top, right, bottom) and ``center`` (its middle, as the
    world's object centres) in image fractions, x right, y down; ``area``: fraction of the image
    covered; ``shape``: a name in SHAPES or ``"unknown"``; ``size``: "small" / "large"."""

    colour: str
    shape: str
    center: tuple[float, float]
    area: float
    box: tuple[float, float, float, float]
    size: str = ""

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class ObjectSpec:
    """An expected object; ``None`` fields match anything."""

    colour: str | None = None
    shape: str | None = None
    size: str | None = None

    def __post_init__(self) -> None:
        for name, allowed in (("colour", tuple(COLOURS)), ("shape", SHAPES), ("size", SIZES)):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"ObjectSpec.{name}={value!r}; expected None or one of {allowed}")

    def matches(self, detection: Detection) -> bool:
        return (
            (self.colour is None or self.colour == detection.colour)
            and (self.shape is None or self.shape == detection.shape)
            and (self.size is None or self.size == detection.size)
        )

    @property
    def name(self) -> str:
        words = [self.size, self.colour, self.shape if self.shape is not None else "object"]
        return " ".join(word for word in words if word is not None)


@dataclass(frozen=True)
class Verdict:
    """Result of :func:`judge`.

    ``matched[i]``: expected object ``i`` has its own detection; ``count_ok``: the number of
    detections is right (equal with ``exact_count``, else at least the expected number);
    ``relation_ok``: None when no relation was asked; ``assignment[i]``: index into
    ``detections`` of expected object ``i``'s match, None when unmatched.
    """

    correct: bool
    count_ok: bool
    matched: tuple[bool, ...]
    relation_ok: bool | None
    detections: tuple[Detection, ...]
    reason: str
    assignment: tuple[int | None, ...] = ()


# ---------------------------------------------------------------------- image input


def to_uint8_image(image: Any, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Any single image -> (H, W, 3) uint8.

    Accepts (H, W, 3) or (3, H, W) numpy arrays or torch tensors (channels-first when the first
    dimension is 3 and the last is not). ``value_range`` is the range of the input values;
    when None it is (0, 255) for integer input, (-1, 1) for float input with negative values
    (the models' range) and (0, 1) for other float input.
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().to("cpu", torch.float32).numpy() if image.is_floating_point() else image.cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or 3 not in (array.shape[0], array.shape[2]):
        raise ValueError(f"expected one (H, W, 3) or (3, H, W) image, got shape {array.shape}")
    if array.shape[2] != 3:
        array = np.moveaxis(array, 0, -1)
    if array.dtype == np.uint8 and value_range in (None, (0, 255)):
        return np.ascontiguousarray(array)
    if value_range is None:
        if np.issubdtype(array.dtype, np.integer):
            value_range = (0.0, 255.0)
        else:
            value_range = (-1.0, 1.0) if float(np.nanmin(array)) < 0 else (0.0, 1.0)
    low, high = value_range
    scaled = (np.nan_to_num(array.astype(np.float32)) - low) * (255.0 / (high - low))
    return (np.clip(scaled, 0, 255) + 0.5).astype(np.uint8)


def degrade(image: np.ndarray, blur_sigma: float, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 -> the same after a Gaussian blur (``blur_sigma`` px) and additive Gaussian
    noise (``noise_std`` RGB units): a stand-in for a decoder's output in robustness checks."""
    blurred = image.astype(np.float32)
    if blur_sigma > 0:
        radius = max(int(math.ceil(3 * blur_sigma)), 1)
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / blur_sigma) ** 2).astype(np.float32)
        taps /= taps.sum()
        for axis in (0, 1):
            padding = [(0, 0)] * 3
            padding[axis] = (radius, radius)
            padded = np.pad(blurred, padding, mode="reflect")
            length = blurred.shape[axis]
            blurred = sum(
                weight * np.take(padded, np.arange(offset, offset + length), axis=axis)
                for offset, weight in enumerate(taps)
            )
    if noise_std > 0:
        blurred = blurred + rng.normal(0.0, noise_std, blurred.shape).astype(np.float32)
    return (np.clip(blurred, 0, 255) + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------- segmentation


def _label_components(classes: np.ndarray) -> np.ndarray:
    """``classes``: (H, W) int, -1 = nothing -> (H, W) int64 component labels, -1 outside.

    4-connected components of equal class. Each pixel starts with its own flat index as label;
    labels spread as the minimum over same-class neighbours and jump along label pointers
    (``label = label[label]``: a label is the index of a pixel of the same component, whose own
    label is no larger) until nothing changes, which takes O(log(diameter)) rounds of cheap
    array operations (scipy is not a dependency).
    """
    height, width = classes.shape
    inside = classes >= 0
    sentinel = height * width
    labels = np.where(inside, np.arange(sentinel).reshape(height, width), sentinel)
    joined_down = inside[:-1] & (classes[:-1] == classes[1:])  # pixel and the one below are connected
    joined_right = inside[:, :-1] & (classes[:, :-1] == classes[:, 1:])
    while True:
        updated = labels.copy()
        pair_min = np.where(joined_down, np.minimum(labels[:-1], labels[1:]), sentinel)
        np.minimum(updated[:-1], pair_min, out=updated[:-1])
        np.minimum(updated[1:], pair_min, out=updated[1:])
        pair_min = np.where(joined_right, np.minimum(labels[:, :-1], labels[:, 1:]), sentinel)
        np.minimum(updated[:, :-1], pair_min, out=updated[:, :-1])
        np.minimum(updated[:, 1:], pair_min, out=updated[:, 1:])
        lookup = np.append(updated.ravel(), sentinel)  # the sentinel points to itself
        updated = lookup[lookup[updated]]  # two pointer jumps
        if np.array_equal(updated, labels):
            return np.where(inside, labels, -1)
        labels = updated


def shape_features(mask: np.ndarray) -> tuple[float, float, float, float]:
    """``mask``: (h, w) bool -> (compactness, squareness, asymmetry, elongation) of its pixels.

    Moments of the pixel centres, so every pixel counts and a ragged edge pixel moves the
    features little (unlike the bounding box, which hangs on the outermost pixel):

    - ``compactness`` = area / (4 pi sqrt(det covariance)): 1 for a disk (and any ellipse),
      12 / (4 pi) = 0.955 for a square (and any parallelogram), 6 sqrt(3) / (4 pi) = 0.827
      for any triangle.
    - ``squareness``: twice the amplitude of the cos(4 theta) term of the kurtosis of the
      projection on direction theta: 0.6 for a square at any rotation (1.8 along its sides, 2.4
      along its diagonals), 0 for a disk (2.0 everywhere) and for the world's triangle.
    - ``asymmetry``: the largest |skewness| of a projection: 0.566 for an isosceles triangle
      (along its axis), 0 for point-symmetric shapes.
    - ``elongation``: sqrt of the covariance eigenvalue ratio: 1 for circles and squares,
      1.04 for the world's triangles.
    """
    rows, cols = np.nonzero(mask)
    x = cols - cols.mean()
    y = rows - rows.mean()
    var_x, var_y, cov_xy = float((x * x).mean()), float((y * y).mean()), float((x * y).mean())
    det = max(var_x * var_y - cov_xy * cov_xy, 1e-12)
    compactness = len(x) / (4 * math.pi * math.sqrt(det))
    spread = math.sqrt(max((var_x - var_y) ** 2 + 4 * cov_xy * cov_xy, 0.0))
    elongation = math.sqrt((var_x + var_y + spread) / max(var_x + var_y - spread, 1e-12))
    angles = np.arange(12) * (math.pi / 12)  # every 15 degrees; projections on theta and theta + pi mirror
    projections = np.cos(angles)[:, None] * x[None, :] + np.sin(angles)[:, None] * y[None, :]
    second = np.maximum((projections**2).mean(axis=1), 1e-12)
    skewness = (projections**3).mean(axis=1) / second**1.5
    kurtosis = (projections**4).mean(axis=1) / second**2
    # cos(4 theta) Fourier coefficient of kurtosis(theta) over the 12 samples of [0, pi).
    amplitude = abs(np.sum(kurtosis * np.exp(4j * angles))) * 2 / len(angles)
    return compactness, 2 * float(amplitude), float(np.abs(skewness).max()), elongation


def classify_shape(mask: np.ndarray) -> str:
    """``mask``: (h, w) bool -> a name in SHAPES, or ``"unknown"`` when no world shape fits."""
    compactness, squareness, asymmetry, elongation = shape_features(mask)
    if elongation > MAX_ELONGATION:
        return UNKNOWN_SHAPE
    features = (COMPACTNESS_WEIGHT * compactness, squareness, asymmetry)
    distances = {
        shape: math.dist(features, (COMPACTNESS_WEIGHT * prototype[0], *prototype[1:]))
        for shape, prototype in SHAPE_PROTOTYPES.items()
    }
    best = min(distances, key=distances.__getitem__)
    return best if distances[best] <= MAX_SHAPE_DISTANCE else UNKNOWN_SHAPE


def _colour_classes(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) float -> ((H, W) palette index of nearest hue, (H, W) chroma)."""
    chroma_a, chroma_b = _chroma_plane(rgb)
    # The nearest hue maximises cos(hue - palette hue), i.e. the dot product with the palette's
    # unit hue vectors (the pixel's chroma is a common positive factor).
    similarity = chroma_a[..., None] * np.cos(_PALETTE_HUES) + chroma_b[..., None] * np.sin(_PALETTE_HUES)
    return similarity.argmax(axis=-1), np.hypot(chroma_a, chroma_b)


def _component_sizes(labels: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """Pixels per label (labels are flat pixel indices) of ``labels >= 0`` (and ``where``)."""
    inside = labels >= 0 if where is None else (labels >= 0) & where
    return np.bincount(labels[inside], minlength=labels.size)


def _segments(pixels: np.ndarray) -> list[tuple[str, np.ndarray, tuple[int, int, int, int]]]:
    """(H, W, 3) uint8 -> one ``(colour, mask cropped to its box, (left, top, right, bottom) px)`` per object."""
    height, width = pixels.shape[:2]
    min_area = MIN_AREA_FRACTION * height * width
    colour_index, chroma = _colour_classes(pixels.astype(np.float64))
    candidates = np.where(chroma >= CHROMA_FLOOR, colour_index, -1)
    coarse = _label_components(candidates)
    # Re-cut each component at EDGE_FRACTION of its own peak chroma. Re-cutting only removes
    # pixels, so components already below the minimum area go now (noise makes thousands).
    refined = np.full_like(candidates, -1)
    for label in np.nonzero(_component_sizes(coarse) >= min_area)[0]:
        member = coarse == label
        peak = np.percentile(chroma[member], PEAK_PERCENTILE)
        keep = member & (chroma >= EDGE_FRACTION * peak)
        refined[keep] = candidates[keep]
    labels = _label_components(refined)
    # Core pixels: the whole 3x3 neighbourhood in the same component. Lines and specks have none.
    padded = np.pad(labels, 1, constant_values=-1)
    core = labels >= 0
    for dy, dx in itertools.product(range(3), repeat=2):
        core &= padded[dy : dy + height, dx : dx + width] == labels
    keep = (_component_sizes(labels) >= min_area) & (_component_sizes(labels, core) > 0)
    segments = []
    for label in np.nonzero(keep)[0]:
        member = labels == label
        rows, cols = np.nonzero(member)
        top, bottom, left, right = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
        colour = _PALETTE_NAMES[int(candidates.flat[label])]
        segments.append((colour, member[top:bottom, left:right], (left, top, right, bottom)))
    return segments


def detect_objects(image: Any) -> list[Detection]:
    """Coloured shapes in ``image`` (see :func:`to_uint8_image` for accepted inputs), largest first."""
    pixels = to_uint8_image(image)
    height, width = pixels.shape[:2]
    detections = []
    for colour, mask, (left, top, right, bottom) in _segments(pixels):
        box = (left / width, top / height, right / width, bottom / height)
        side = max(box[2] - box[0], box[3] - box[1])
        detections.append(
            Detection(
                colour=colour,
                shape=classify_shape(mask),
                center=((box[0] + box[2]) / 2, (box[1] + box[3]) / 2),
                area=float(mask.sum()) / (height * width),
                box=box,
                size="small" if side < SIZE_THRESHOLD else "large",
            )
        )
    return sorted(detections, key=lambda detection: -detection.area)


# ---------------------------------------------------------------------- judging


def _max_matching(
    specs: Sequence[ObjectSpec], detections: Sequence[Detection], spec_ids: Sequence[int], free: set[int]
) -> dict[int, int]:
    """Maximum bipartite matching (Kuhn's augmenting paths) of ``spec_ids`` to detections in ``free``."""
    owner: dict[int, int] = {}  # detection index -> spec index

    def augment(spec_id: int, seen: set[int]) -> bool:
        for k in sorted(free):
            if k in seen or not specs[spec_id].matches(detections[k]):
                continue
            seen.add(k)
            if k not in owner or augment(owner[k], seen):
                owner[k] = spec_id
                return True
        return False

    for spec_id in spec_ids:
        augment(spec_id, set())
    return {spec_id: k for k, spec_id in owner.items()}


def _relation_holds(first: Detection, relation: str, second: Detection) -> bool:
    (x_a, y_a), (x_b, y_b) = first.center, second.center
    return {"left": x_a < x_b, "right": x_a > x_b, "above": y_a < y_b, "below": y_a > y_b}[relation]


def _assign(
    specs: Sequence[ObjectSpec], detections: Sequence[Detection], relation: tuple[int, str, int] | None
) -> tuple[dict[int, int], bool | None]:
    """Spec index -> detection index for a maximum matching; with a relation, one under which it
    holds when any maximum matching allows it (the relation's two objects are tried in every
    compatible placement, the rest matched by augmenting paths)."""
    everything = set(range(len(detections)))
    if relation is None:
        return _max_matching(specs, detections, range(len(specs)), everything), None
    first, name, second = relation
    others = [index for index in range(len(specs)) if index not in (first, second)]
    best: tuple[tuple[int, bool], dict[int, int]] | None = None
    first_options = [k for k in everything if specs[first].matches(detections[k])] + [None]
    second_options = [k for k in everything if specs[second].matches(detections[k])] + [None]
    for k_first, k_second in itertools.product(first_options, second_options):
        if k_first is not None and k_first == k_second:
            continue
        chosen = {index: k for index, k in ((first, k_first), (second, k_second)) if k is not None}
        chosen.update(_max_matching(specs, detections, others, everything - set(chosen.values())))
        holds = (
            k_first is not None
            and k_second is not None
            and _relation_holds(detections[k_first], name, detections[k_second])
        )
        score = (len(chosen), holds)
        if best is None or score > best[0]:
            best = (score, chosen)
    assert best is not None
    return best[1], best[0][1]


def _check_relation(relation: tuple[int, str, int] | None, count: int) -> None:
    if relation is None:
        return
    first, name, second = relation
    if name not in RELATIONS:
        raise ValueError(f"relation {relation!r}: expected one of {RELATIONS} in the middle")
    if not (0 <= first < count and 0 <= second < count) or first == second:
        raise ValueError(f"relation {relation!r}: expected two different object indices in 0..{count - 1}")


def judge(
    image: Any,
    expected: Sequence[ObjectSpec],
    relation: tuple[int, str, int] | None = None,
    exact_count: bool = True,
) -> Verdict:
    """Does ``image`` show the ``expected`` objects (and, if given, ``relation``)?

    ``relation = (i, "left" | "right" | "above" | "below", j)``: expected object ``i`` is
    left of / ... object ``j``, comparing the centres of their matched detections.
    Correct = every expected object has its own detection of the same colour and shape (and
    size, when the spec names one) under a maximum one-to-one matching, the relation holds,
    and with ``exact_count`` nothing else was detected.
    """
    specs = list(expected)
    _check_relation(relation, len(specs))
    detections = tuple(detect_objects(image))
    assignment, relation_ok = _assign(specs, detections, relation)
    matched = tuple(index in assignment for index in range(len(specs)))
    count_ok = len(detections) == len(specs) if exact_count else len(detections) >= len(specs)
    extras = [k for k in range(len(detections)) if k not in assignment.values()]
    problems = []
    leftovers = list(extras)
    for index, spec in enumerate(specs):
        if matched[index]:
            continue
        # Name the leftover detection most like the missing object (same colour, then same shape).
        similar = sorted(
            leftovers, key=lambda k: (detections[k].colour != spec.colour, detections[k].shape != spec.shape)
        )
        if similar:
            problems.append(f"expected {spec.name}, found {detections[similar[0]].name}")
            leftovers.remove(similar[0])
        else:
            problems.append(f"expected {spec.name}, found nothing more")
    if exact_count and leftovers:
        problems.append("extra " + ", ".join(detections[k].name for k in leftovers))
    if relation is not None and not relation_ok and all(matched[index] for index in (relation[0], relation[2])):
        first, name, second = relation
        a, b = detections[assignment[first]], detections[assignment[second]]
        problems.append(
            f"{specs[first].name} is not {_RELATION_WORDS[name]} {specs[second].name} "
            f"(centres ({a.center[0]:.2f}, {a.center[1]:.2f}) vs ({b.center[0]:.2f}, {b.center[1]:.2f}))"
        )
    correct = all(matched) and (not exact_count or not extras) and relation_ok is not False
    if not detections:
        reason = "no objects detected" + (f"; expected {', '.join(spec.name for spec in specs)}" if specs else "")
    elif correct:
        reason = "ok: found " + ", ".join(detection.name for detection in detections)
        if relation is not None:
            reason += f"; {specs[relation[0]].name} {_RELATION_WORDS[relation[1]]} {specs[relation[2]].name}"
    else:
        reason = "; ".join(problems)
    return Verdict(
        correct=correct,
        count_ok=count_ok,
        matched=matched,
        relation_ok=relation_ok,
        detections=detections,
        reason=reason,
        assignment=tuple(assignment.get(index) for index in range(len(specs))),
    )


# ---------------------------------------------------------------------- captions

_MENTION = re.compile(
    r"\b(?:(?P<article>a|an|the)\s+)?(?:(?P<size>{sizes})\s+)?(?:(?P<colour>{colours})\s+)?(?P<head>{heads})\b".format(
        sizes="|".join(SIZES), colours="|".join(COLOURS), heads="|".join((*SHAPES, "object", "shape"))
    )
)
# Text between two mentions that makes the first <relation> the second.
_RELATION_GAP = re.compile(
    r"^\s*(?:is\s+|are\s+)?(?:(?:to|on)\s+the\s+)?(?:(?P<side>left|right)(?:\s+side)?\s+of|(?P<vertical>above|below))\s*$"
)


def parse_caption(text: str, sizes: bool = False) -> tuple[list[ObjectSpec], tuple[int, str, int] | None]:
    """The objects and the relation a Shapes-world caption (or a prompt written like one) names.

    Reads every template of the world's captions, e.g. ``"a small red circle to the left of a
    large blue square on a striped background"`` or ``"a photo of a red circle and a blue
    square. the red circle is above the blue square."`` -> ``([ObjectSpec("red", "circle"),
    ObjectSpec("blue", "square")], (0, "left", 1))``. An object is introduced by ``a``/``an``
    (or by a bare colour / size word) and ``the ...`` refers back to one already named with
    the same words. ``"a red object"`` gives a spec of any shape. ``sizes``: also put the
    named sizes into the specs (judge then checks them). Plurals and counts ("two circles")
    are not read. Raises ValueError when the text names no object, or more than one relation.
    """
    lowered = text.lower()
    specs: list[ObjectSpec] = []
    mention_specs: list[int] = []  # spec index of each mention, in text order
    mentions = []
    for match in _MENTION.finditer(lowered):
        article, size, colour, head = match.group("article", "size", "colour", "head")
        if article is None and size is None and colour is None:
            continue  # a bare "shape" / "circle" in running text names nothing specific
        spec = ObjectSpec(
            colour=colour,
            shape=head if head in SHAPES else None,
            size=size if sizes else None,
        )
        referent = None
        if article == "the":
            referent = next(
                (
                    index
                    for index, known in enumerate(specs)
                    if all(
                        getattr(spec, attribute) in (None, getattr(known, attribute))
                        for attribute in ("colour", "shape", "size")
                    )
                ),
                None,
            )
        if referent is None:
            specs.append(spec)
            referent = len(specs) - 1
        mentions.append(match)
        mention_specs.append(referent)
    if not specs:
        raise ValueError(f"caption {text!r} names no object (expected e.g. 'a red circle')")
    relation = None
    for (before, first), (after, second) in itertools.pairwise(zip(mentions, mention_specs, strict=True)):
        gap = _RELATION_GAP.match(lowered[before.end() : after.start()])
        if gap is None:
            continue
        if relation is not None:
            raise ValueError(f"caption {text!r} names more than one relation; judge() checks one")
        if first == second:
            raise ValueError(f"caption {text!r} relates an object to itself")
        relation = (first, gap.group("side") or gap.group("vertical"), second)
    return specs, relation


# ---------------------------------------------------------------------- validation on the world


@dataclass
class ValidationReport:
    """Hit counts of :func:`validate`: ``scenes[group] = (correct, total)`` for groups like
    ``"all"``, ``"objects=2"``, ``"split=test"``; ``objects[group]`` the same per ground-truth
    object (matched or not) for ``"shape=circle"``, ``"colour=red"``, ``"size=small"``;
    ``sizes`` counts matched objects whose detected size is right; ``failures`` holds
    ``"split/kind/index: caption -> reason"`` lines."""

    scenes: dict[str, list[int]] = field(default_factory=dict)
    objects: dict[str, list[int]] = field(default_factory=dict)
    sizes: list[int] = field(default_factory=lambda: [0, 0])
    failures: list[str] = field(default_factory=list)

    def rate(self, group: str = "all") -> float:
        correct, total = self.scenes[group]
        return correct / max(total, 1)

    def lines(self) -> list[str]:
        """The report as printable lines."""
        rows = [
            f"{group:>22}: {hits / max(total, 1):7.2%} ({hits}/{total})" for group, (hits, total) in self.scenes.items()
        ]
        rows.append("objects matched:")
        rows += [
            f"{group:>22}: {hits / max(total, 1):7.2%} ({hits}/{total})"
            for group, (hits, total) in self.objects.items()
        ]
        rows.append(f"{'size right (matched)':>22}: {self.sizes[0] / max(self.sizes[1], 1):7.2%} {tuple(self.sizes)}")
        return rows


def _tally(table: dict[str, list[int]], group: str, hit: bool) -> None:
    counts = table.setdefault(group, [0, 0])
    counts[0] += int(hit)
    counts[1] += 1


def validate(
    num_scenes: int,
    blur_sigma: float = 0.0,
    noise_std: float = 0.0,
    splits: Sequence[str] = ("test", "compositional"),
    seed: int = 0,
    image_size: int = 64,
) -> ValidationReport:
    """Judge ``num_scenes`` one-object scenes (``sample_single``) and ``num_scenes`` scenes of
    1..3 objects (``sample``), taken in turn from ``splits`` of the default world (at
    ``image_size``), against the
    objects and relation their captions name (through :func:`parse_caption`), optionally after
    :func:`degrade`. The world is imported here only: it is what the checker is measured
    against, detection never touches it."""
    from training.data.shapes import ShapesWorld, ShapesWorldConfig

    per_split = -(-num_scenes // len(splits))
    world = ShapesWorld(
        ShapesWorldConfig(image_size=image_size, num_test=max(1024, per_split), num_compositional=max(512, per_split))
    )
    report = ValidationReport()
    for kind, number in itertools.product(("single", "multi"), range(num_scenes)):
        split, index = splits[number % len(splits)], number // len(splits)
        sample = (world.sample_single if kind == "single" else world.sample)(split, index)
        image = sample.image
        if blur_sigma > 0 or noise_std > 0:
            image = degrade(image, blur_sigma, noise_std, np.random.default_rng([seed, number, kind == "multi"]))
        specs, relation = parse_caption(sample.caption)
        verdict = judge(image, specs, relation)
        for group in ("all", f"kind={kind}", f"split={split}", f"objects={len(sample.objects)}"):
            _tally(report.scenes, group, verdict.correct)
        if not verdict.correct:
            report.failures.append(f"{split}/{kind}/{index}: {sample.caption} -> {verdict.reason}")
        for obj in sample.objects:
            # (colour, shape) is unique within a scene, so the caption's spec of obj is the one with its name.
            spec_index = next(i for i, spec in enumerate(specs) if (spec.colour, spec.shape) == (obj.colour, obj.shape))
            detection_index = verdict.assignment[spec_index]
            for group in (f"shape={obj.shape}", f"colour={obj.colour}", f"size={obj.size}"):
                _tally(report.objects, group, detection_index is not None)
            if detection_index is not None:
                report.sizes[0] += int(verdict.detections[detection_index].size == obj.size)
                report.sizes[1] += 1
    report.scenes = dict(sorted(report.scenes.items(), key=lambda item: (item[0] != "all", item[0])))
    report.objects = dict(sorted(report.objects.items()))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Validate the Shapes-world image checker on the world's own images.")
    parser.add_argument("--validate", type=int, metavar="N", required=True, help="scenes per kind (single, multi)")
    parser.add_argument("--blur", type=float, default=0.7, help="Gaussian blur sigma (px) of the degraded pass")
    parser.add_argument("--noise", type=float, default=8.0, help="noise std (RGB units) of the degraded pass")
    parser.add_argument("--image-size", type=int, default=64, help="side of the world's images (px)")
    parser.add_argument("--failures", type=int, default=10, help="failure lines to print per pass")
    args = parser.parse_args(argv)
    for title, blur, noise in (
        ("clean", 0.0, 0.0),
        (f"blur {args.blur} px + noise {args.noise}", args.blur, args.noise),
    ):
        report = validate(args.validate, blur, noise, image_size=args.image_size)
        print(f"== {title}: {args.validate} one-object + {args.validate} 1..3-object scenes of {args.image_size} px")
        print("\n".join(report.lines()))
        reasons = Counter(line.split(" -> ")[1] for line in report.failures)
        for line in report.failures[: args.failures]:
            print("  FAIL", line)
        if reasons:
            print("  most common reasons:", reasons.most_common(5))


if __name__ == "__main__":
    main()
