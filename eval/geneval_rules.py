"""GenEval's rule for the "position" category, applied to the Shapes checker's detections.

GenEval (Ghosh et al. 2023, ``evaluation/evaluate_images.py`` in djghosh13/geneval) decides where
object A is relative to B from their boxes: the offset between the box centres, each component
shrunk towards zero by ``POSITION_THRESHOLD`` (0.1) times the sum of the two boxes' sizes along
that axis, then divided by the length of the unshrunk offset. A is "left of" B when that x
component is below -0.5, "right of" above 0.5, and likewise "above" / "below" for y (y grows
downwards). When both shrunk components are (near) zero, no relation holds. Several relations may
hold at once (a diagonal offset).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

POSITION_THRESHOLD = 0.1
# The Shapes world's relation words and GenEval's names for them.
GENEVAL_RELATION_NAMES: dict[str, str] = {"left": "left of", "right": "right of", "above": "above", "below": "below"}


def geneval_relations(box_a: Sequence[float], box_b: Sequence[float]) -> set[str]:
    """GenEval's relations of A to B; boxes are (left, top, right, bottom), y down."""
    center_a = ((box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2)
    center_b = ((box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2)
    sizes = (abs(box_a[2] - box_a[0]) + abs(box_b[2] - box_b[0]), abs(box_a[3] - box_a[1]) + abs(box_b[3] - box_b[1]))
    offset = (center_a[0] - center_b[0], center_a[1] - center_b[1])
    shrunk = [
        math.copysign(max(abs(component) - POSITION_THRESHOLD * size, 0.0), component) if component else 0.0
        for component, size in zip(offset, sizes, strict=True)
    ]
    if all(abs(component) < 1e-3 for component in shrunk):
        return set()
    length = math.hypot(*offset)
    dx, dy = shrunk[0] / length, shrunk[1] / length
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


def geneval_relation_holds(box_a: Sequence[float], relation: str, box_b: Sequence[float]) -> bool:
    """Whether the Shapes relation word (left/right/above/below) holds for A and B under GenEval's rule."""
    if relation not in GENEVAL_RELATION_NAMES:
        raise ValueError(f"relation {relation!r}; expected one of {', '.join(GENEVAL_RELATION_NAMES)}")
    return GENEVAL_RELATION_NAMES[relation] in geneval_relations(box_a, box_b)


def agreement_with_world(seed: int = 0, image_size: int = 64, split: str = "test") -> tuple[int, int]:
    """(agreeing, scenes): how many two-object scenes' first stated relation (the world's strict
    rule on true boxes) also holds under GenEval's rule."""
    from training.data.shapes import ShapesWorld, ShapesWorldConfig, relations

    world = ShapesWorld(ShapesWorldConfig(seed=seed, image_size=image_size))
    scenes = agreeing = 0
    for index in range(world.split_size(split)):
        objects = world.sample(split, index).objects
        found = relations(objects[0], objects[1]) if len(objects) == 2 else []
        if found:
            scenes += 1
            agreeing += geneval_relation_holds(objects[0].box(), found[0], objects[1].box())
    return agreeing, scenes


if __name__ == "__main__":
    agreeing, scenes = agreement_with_world()
    print(f"{agreeing} of {scenes} two-object test scenes agree ({100 * agreeing / scenes:.1f} %)")
