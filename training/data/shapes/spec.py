"""The Shapes world's specification: what a scene can hold and how a world is configured.

The vocabulary (colours, shapes, sizes, backgrounds, question kinds, splits), the nominal
geometry of objects (sizes, jitter, slots), the zero-shot class names, the object record
:class:`ShapeObject` and :class:`ShapesWorldConfig`. The renderer (:mod:`.world`) and the text
(:mod:`.language`) build on these; the image checker (:mod:`.detect`, :mod:`.judge`) reads only
the palette, the shape and size names and the nominal sizes from here, so it shares no drawing
code with the renderer.

Coordinates: ``center = (x, y)`` as fractions of the image side, x to the right, y down
(so "above" means a smaller y).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizer.config import ConfigError

COLOURS: dict[str, tuple[int, int, int]] = {
    # Saturated and >= 40 degrees apart in hue, so they stay distinct after +-10 jitter and
    # next to the low-saturation backgrounds.
    "red": (220, 40, 40),
    "yellow": (235, 205, 35),
    "green": (45, 175, 60),
    "cyan": (35, 195, 215),
    "blue": (45, 75, 225),
    "purple": (150, 55, 205),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "stripes", "checker", "blobs")
QUESTION_KINDS: tuple[str, ...] = ("colour", "shape", "count", "exists", "position")
SPLITS: tuple[str, ...] = ("train", "val", "test", "compositional")

# Side of an object's bounding square as a fraction of the image side (before +-8% jitter).
SIZE_FRACTIONS: dict[str, float] = {"small": 0.22, "large": 0.40}
SIZE_JITTER = 0.08
COLOUR_JITTER = 10
# An object is "on the left" when its centre x < 0.5 - SIDE_MARGIN (likewise right/top/bottom);
# closer to the middle the answer would be a judgement call, so no such question is asked.
SIDE_MARGIN = 0.1
# Where objects go in a world with ``layout="slots"``, by the number of objects (in caption
# order). The centres sit on the 8x8 code lattice, so an object's sub-cell offset (and so its
# code pattern) is the same in every slot; no two bounding squares of the large size overlap.
SLOT_CENTRES: dict[int, tuple[tuple[float, float], ...]] = {
    1: ((0.5, 0.5),),
    2: ((0.25, 0.5), (0.75, 0.5)),
    3: ((0.25, 0.25), (0.75, 0.25), (0.5, 0.75)),
}
LAYOUTS: tuple[str, ...] = ("random", "slots")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
CLASS_NAMES: tuple[str, ...] = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)


@dataclass
class ShapesWorldConfig:
    """Size, seed and held-out combinations of a Shapes world."""

    seed: int = 0
    image_size: int = 64
    num_train: int = 50000
    num_val: int = 512
    num_test: int = 1024
    num_compositional: int = 512
    max_objects: int = 3
    noise_std: float = 0.02  # [0, 1] pixel units; bounds the PSNR a perfect reconstruction of the clean image reaches
    holdout_combinations: tuple[str, ...] = ("purple triangle", "cyan circle", "yellow square")
    # The background kinds scenes are drawn from (all of BACKGROUNDS by default).
    backgrounds: tuple[str, ...] = BACKGROUNDS
    # > 0: every object's bounding square starts on a lattice of this many cells per side (the
    # tokenizer's grid, say 8), so an object's code pattern does not depend on a sub-cell offset.
    snap_cells: int = 0
    # Object side: +-size_jitter (a fraction) around its size's nominal side; object colour:
    # +-colour_jitter levels per channel around its named colour.
    size_jitter: float = SIZE_JITTER
    colour_jitter: int = COLOUR_JITTER
    # None: each plain background gets a random muted colour; [r, g, b]: every plain background
    # is exactly that colour. With no jitter and no noise, a scene's pixels are then a function of
    # its objects' names, sizes and places alone (a canonical world for text-to-image pairs).
    plain_rgb: tuple[int, int, int] | None = None
    # "random": objects anywhere, rejection-sampled apart; "slots": the i-th of n objects (in
    # caption order) always sits at SLOT_CENTRES[n][i], so a caption fixes the whole layout (a
    # world for text-to-image pairs that a small model learns to draw in few steps).
    layout: str = "random"

    def __post_init__(self) -> None:
        self.holdout_combinations = tuple(self.holdout_combinations)
        self.backgrounds = tuple(self.backgrounds)
        if self.plain_rgb is not None:
            rgb = tuple(self.plain_rgb)
            if len(rgb) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in rgb):
                raise ConfigError(f"shapes.plain_rgb={list(rgb)}; expected null or three integers in 0..255")
            self.plain_rgb = rgb
        if not 0.0 <= self.size_jitter < 0.5:
            raise ConfigError(f"shapes.size_jitter={self.size_jitter}; expected in [0, 0.5) (a fraction of the side)")
        if not 0 <= self.colour_jitter <= 20:
            raise ConfigError(
                f"shapes.colour_jitter={self.colour_jitter}; expected 0..20 (colours are 40 degrees of hue apart)"
            )
        unknown = [kind for kind in self.backgrounds if kind not in BACKGROUNDS]
        if unknown or not self.backgrounds:
            raise ConfigError(
                f"shapes.backgrounds={list(self.backgrounds)}; expected a non-empty subset of {list(BACKGROUNDS)}"
            )
        if self.layout not in LAYOUTS:
            raise ConfigError(f"shapes.layout={self.layout!r}; expected one of {list(LAYOUTS)}")
        if self.layout == "slots" and self.max_objects > max(SLOT_CENTRES):
            raise ConfigError(
                f"shapes.max_objects={self.max_objects} with shapes.layout='slots'; expected <= {max(SLOT_CENTRES)} "
                "(the slots are defined for that many objects)"
            )
        if not 0 <= self.snap_cells <= self.image_size:
            raise ConfigError(f"shapes.snap_cells={self.snap_cells}; expected 0 (off) .. image_size={self.image_size}")
        if self.image_size < 16:
            raise ConfigError(f"shapes.image_size={self.image_size}; expected >= 16 so small shapes stay visible")
        for name in ("num_train", "num_val", "num_test", "num_compositional"):
            if getattr(self, name) < 0:
                raise ConfigError(f"shapes.{name}={getattr(self, name)}; expected >= 0")
        if not 1 <= self.max_objects <= len(NUMBER_WORDS) - 1:
            raise ConfigError(f"shapes.max_objects={self.max_objects}; expected 1..{len(NUMBER_WORDS) - 1}")
        if not 0.0 <= self.noise_std <= 0.2:
            raise ConfigError(f"shapes.noise_std={self.noise_std}; expected in [0, 0.2] (pixel units in [0, 1])")
        for combination in self.holdout_combinations:
            if combination not in CLASS_NAMES:
                raise ConfigError(
                    f"shapes.holdout_combinations contains {combination!r}; expected '<colour> <shape>' "
                    f"with colour in {list(COLOURS)} and shape in {list(SHAPES)}"
                )
        if len(set(self.holdout_combinations)) != len(self.holdout_combinations):
            raise ConfigError(f"shapes.holdout_combinations has duplicates: {self.holdout_combinations}")
        if len(CLASS_NAMES) - len(self.holdout_combinations) < self.max_objects:
            raise ConfigError(
                f"shapes.holdout_combinations holds out {len(self.holdout_combinations)} of {len(CLASS_NAMES)} "
                f"combinations, leaving fewer than shapes.max_objects={self.max_objects} for the training splits"
            )
        if self.num_compositional > 0 and not self.holdout_combinations:
            raise ConfigError("shapes.num_compositional > 0 needs at least one entry in shapes.holdout_combinations")


@dataclass
class ShapeObject:
    """One drawn object. ``scale``: side of its bounding square / image side; ``rgb``: the drawn colour."""

    colour: str
    shape: str
    size: str
    center: tuple[float, float]
    scale: float = 0.0
    rgb: tuple[int, int, int] = (0, 0, 0)

    @property
    def name(self) -> str:
        """``"<colour> <shape>"``, the zero-shot class name."""
        return f"{self.colour} {self.shape}"

    def box(self) -> tuple[float, float, float, float]:
        """Bounding square ``(left, top, right, bottom)`` in image fractions."""
        half = self.scale / 2
        return (self.center[0] - half, self.center[1] - half, self.center[0] + half, self.center[1] + half)


def class_index(colour: str, shape: str) -> int:
    """Index of ``"<colour> <shape>"`` in :data:`CLASS_NAMES` (colour-major)."""
    return list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)
