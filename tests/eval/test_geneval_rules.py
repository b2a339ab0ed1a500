"""GenEval's position rule, on boxes whose relations are worked out by hand."""

from __future__ import annotations

import pytest

from eval.geneval_rules import geneval_relation_holds, geneval_relations


@pytest.mark.parametrize(
    ("box_a", "box_b", "expected"),
    [
        # centres 0.5 apart in x; shrunk by 0.1 * (0.2 + 0.2) = 0.04 -> -0.46 / 0.5 = -0.92
        ((0.0, 0.0, 0.2, 0.2), (0.5, 0.0, 0.7, 0.2), {"left of"}),
        ((0.5, 0.0, 0.7, 0.2), (0.0, 0.0, 0.2, 0.2), {"right of"}),
        # diagonal: both components -0.46 / 0.707 = -0.65 -> two relations at once
        ((0.0, 0.0, 0.2, 0.2), (0.5, 0.5, 0.7, 0.7), {"left of", "above"}),
        # A's centre 0.05 left of B's and 0.5 above: x shrinks to -0.01 (-0.02 after dividing), y
        # to -0.46 (-0.915): only "above", though A's centre is left of B's
        ((0.35, 0.0, 0.55, 0.2), (0.4, 0.5, 0.6, 0.7), {"above"}),
        ((0.4, 0.5, 0.6, 0.7), (0.35, 0.0, 0.55, 0.2), {"below"}),
        # 60 degrees off the x axis: dx = (0.2 - 0.04) / 0.4 = 0.4, not > 0.5; dy = (0.3464 - 0.04) / 0.4 = 0.77
        ((0.5, 0.4464, 0.7, 0.6464), (0.3, 0.1, 0.5, 0.3), {"below"}),
        # centres closer than the margins: no relation
        ((0.0, 0.0, 0.5, 0.5), (0.02, 0.02, 0.52, 0.52), set()),
    ],
)
def test_relations(box_a, box_b, expected) -> None:
    assert geneval_relations(box_a, box_b) == expected


def test_relation_words_of_the_shapes_world() -> None:
    assert geneval_relation_holds((0.0, 0.0, 0.2, 0.2), "left", (0.5, 0.0, 0.7, 0.2))
    assert not geneval_relation_holds((0.35, 0.0, 0.55, 0.2), "left", (0.4, 0.5, 0.6, 0.7))
    with pytest.raises(ValueError, match="relation 'near'"):
        geneval_relation_holds((0, 0, 1, 1), "near", (0, 0, 1, 1))
