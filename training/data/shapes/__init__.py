"""The Shapes world: a deterministic synthetic world of coloured shapes, its captions and questions,
and the checker that reads objects back from images.

Modules: :mod:`.spec` (vocabulary, object record, config), :mod:`.world` (sampling and
rendering), :mod:`.language` (captions, questions, relations), :mod:`.dataset` (a torch
``Dataset``), :mod:`.variants` (the narrower text-to-image worlds); the checker is
:mod:`.detect` (objects in an image), :mod:`.judge` (an image against a prompt) and
:mod:`.checker` (its validation on the world's images), imported from those modules.
"""

from training.data.shapes.dataset import ShapesImageDataset
from training.data.shapes.language import QAPair, relations
from training.data.shapes.spec import (
    BACKGROUNDS,
    CLASS_NAMES,
    COLOUR_JITTER,
    COLOURS,
    LAYOUTS,
    NUMBER_WORDS,
    QUESTION_KINDS,
    SHAPES,
    SIDE_MARGIN,
    SIZE_FRACTIONS,
    SIZE_JITTER,
    SIZES,
    SLOT_CENTRES,
    SPLITS,
    ShapeObject,
    ShapesWorldConfig,
    class_index,
)
from training.data.shapes.variants import (
    CANONICAL_GREY,
    DEFAULT_T2I_WORLD,
    T2I_WORLDS,
    canonical_world_config,
    grid_world_config,
    slots_world_config,
    t2i_world_config,
)
from training.data.shapes.world import ShapesSample, ShapesWorld, object_coverage

__all__ = [
    "BACKGROUNDS",
    "CANONICAL_GREY",
    "CLASS_NAMES",
    "COLOURS",
    "COLOUR_JITTER",
    "DEFAULT_T2I_WORLD",
    "LAYOUTS",
    "NUMBER_WORDS",
    "QUESTION_KINDS",
    "SHAPES",
    "SIDE_MARGIN",
    "SIZES",
    "SIZE_FRACTIONS",
    "SIZE_JITTER",
    "SLOT_CENTRES",
    "SPLITS",
    "T2I_WORLDS",
    "QAPair",
    "ShapeObject",
    "ShapesImageDataset",
    "ShapesSample",
    "ShapesWorld",
    "ShapesWorldConfig",
    "canonical_world_config",
    "class_index",
    "grid_world_config",
    "object_coverage",
    "relations",
    "slots_world_config",
    "t2i_world_config",
]
