"""The Shapes-world checker's verdict: does an image show the objects (and the relation) a prompt names?

:func:`judge` matches expected objects to the detections of :func:`.detect.detect_objects`
one-to-one (a maximum bipartite matching, not greedy by order) and checks an optional spatial
relation between centres. :func:`parse_caption` turns the world's captions (and prompts written
like them) into the expected objects and relation. Like detection, it reads only the world's
spec constants, never its renderer or its text generator.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from training.data.shapes.detect import Detection, detect_objects
from training.data.shapes.spec import COLOURS, SHAPES, SIZES

RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
_RELATION_WORDS = {"left": "left of", "right": "right of", "above": "above", "below": "below"}


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
