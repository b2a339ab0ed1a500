"""An independent image checker for the Shapes world: which coloured shapes does a picture show?

It judges images made by a text-to-image model ("does this picture show a red circle to the
left of a blue square?"), so it is plain deterministic image analysis that never runs a model,
and it is independent of the renderer: it imports only the world's public *spec* constants
(the palette, the shape and size names and the nominal sizes, :mod:`.spec`), never its drawing
code, so a bug in the renderer cannot hide behind shared geometry.

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

:mod:`.judge` compares the detections with the objects a prompt names; :mod:`.checker` measures
both on the world's own images.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from training.data.shapes.spec import COLOURS, SIZE_FRACTIONS

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
