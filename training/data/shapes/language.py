"""The Shapes world's text: captions, referring phrases, questions with their answers, and the
spatial relations they state, all computed from a scene's objects.

:func:`_make_caption` and :func:`_make_qa` draw from the sample's random stream right after the
objects and the background are placed, and before the pixels are rendered; the number and order
of their draws is part of every sample's definition.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.data.shapes.spec import COLOURS, NUMBER_WORDS, SHAPES, SIDE_MARGIN, ShapeObject

_BACKGROUND_WORDS = {
    "plain": "plain",
    "gradient": "gradient",
    "stripes": "striped",
    "checker": "checkered",
    "blobs": "blotchy",
}
_RELATION_PHRASES = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


@dataclass
class QAPair:
    """One question about a scene. ``referents``: indices (into the scene's objects) of the
    objects the answer is about: the named object, both objects of a relation, every counted
    object; empty when the answer is about nothing drawn ("is there a blue circle?" "no")."""

    question: str
    answer: str
    kind: str  # one of QUESTION_KINDS
    referents: tuple[int, ...] = ()


def relations(first: ShapeObject, second: ShapeObject) -> list[str]:
    """Every strict spatial relation of ``first`` to ``second`` among left/right/above/below.

    Strict means the bounding squares do not overlap along that axis, so the answer is not
    a judgement call. Placed objects never overlap, so the list is never empty for them.
    """
    left_a, top_a, right_a, bottom_a = first.box()
    left_b, top_b, right_b, bottom_b = second.box()
    found = []
    if right_a <= left_b:
        found.append("left")
    if left_a >= right_b:
        found.append("right")
    if bottom_a <= top_b:
        found.append("above")
    if top_a >= bottom_b:
        found.append("below")
    return found


# ---------------------------------------------------------------------- captions


def _article_phrase(obj: ShapeObject) -> str:
    return f"a {obj.size} {obj.colour} {obj.shape}"


def _the_phrase(obj: ShapeObject) -> str:
    # (colour, shape) is unique within an image, so this always names one object.
    return f"the {obj.colour} {obj.shape}"


def _join(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _make_caption(rng: np.random.Generator, objects: list[ShapeObject], background: str) -> str:
    """A caption naming every object's size, colour and shape, plus one relative position for 2+ objects."""
    listing = _join([_article_phrase(obj) for obj in objects])
    surface = _BACKGROUND_WORDS[background]
    if len(objects) == 1:
        templates = (
            f"{listing}.",
            f"a photo of {listing}.",
            f"there is {listing} in the image.",
            f"{listing} on a {surface} background.",
            f"an image of {listing} on a {surface} background.",
            f"a picture showing {listing}.",
        )
        return templates[int(rng.integers(len(templates)))]
    pairs = list(itertools.permutations(range(len(objects)), 2))
    first, second = pairs[int(rng.integers(len(pairs)))]
    options = relations(objects[first], objects[second])
    relation = _RELATION_PHRASES[options[int(rng.integers(len(options)))]]
    statement = f"{_the_phrase(objects[first])} is {relation} {_the_phrase(objects[second])}"
    rest = [_article_phrase(obj) for i, obj in enumerate(objects) if i not in (first, second)]
    inline = f"{_article_phrase(objects[first])} {relation} {_article_phrase(objects[second])}"
    if rest:
        inline += ", and " + _join(rest)
    templates = (
        f"{listing}. {statement}.",
        f"a photo of {listing}. {statement}.",
        f"there are {NUMBER_WORDS[len(objects)]} objects: {listing}. {statement}.",
        f"{listing} on a {surface} background. {statement}.",
        f"{inline}.",
        f"an image with {listing}, where {statement}.",
        f"a picture showing {listing} on a {surface} background, {statement}.",
    )
    return templates[int(rng.integers(len(templates)))]


# ---------------------------------------------------------------------- questions


def _referent(target: ShapeObject, distractors: list[ShapeObject], head: str) -> str | None:
    """A phrase that picks ``target`` out of ``distractors`` (objects matching ``head`` too), or None."""
    if not distractors:
        return f"the {head}"
    if all(other.size != target.size for other in distractors):
        return f"the {target.size} {head}"
    for relation, word in (("left", "leftmost"), ("right", "rightmost"), ("above", "topmost"), ("below", "bottommost")):
        if all(relation in relations(target, other) for other in distractors):
            return f"the {word} {head}"
    return None


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _make_qa(rng: np.random.Generator, objects: list[ShapeObject], nameable: list[tuple[str, str]]) -> list[QAPair]:
    """Unambiguous questions of every kind in QUESTION_KINDS (position/colour/shape when one can be posed)."""
    qa: list[QAPair] = []

    colour_questions = []
    shape_questions = []
    for index, obj in enumerate(objects):
        same_shape = [other for other in objects if other is not obj and other.shape == obj.shape]
        phrase = _referent(obj, same_shape, obj.shape)
        if phrase is not None:
            colour_questions.append(QAPair(f"what colour is {phrase}?", obj.colour, "colour", (index,)))
        same_colour = [other for other in objects if other is not obj and other.colour == obj.colour]
        phrase = _referent(obj, same_colour, f"{obj.colour} object")
        if phrase is not None:
            shape_questions.append(QAPair(f"what shape is {phrase}?", obj.shape, "shape", (index,)))
    if colour_questions:
        qa.append(_pick(rng, colour_questions))
    if shape_questions:
        qa.append(_pick(rng, shape_questions))

    everything = tuple(range(len(objects)))
    qa.append(QAPair("how many objects are there?", NUMBER_WORDS[len(objects)], "count", everything))
    if rng.random() < 0.5:
        shape = _pick(rng, SHAPES)
        counted = tuple(i for i in everything if objects[i].shape == shape)
        qa.append(QAPair(f"how many {shape}s are there?", NUMBER_WORDS[len(counted)], "count", counted))
    else:
        colour = _pick(rng, list(COLOURS))
        counted = tuple(i for i in everything if objects[i].colour == colour)
        qa.append(QAPair(f"how many {colour} objects are there?", NUMBER_WORDS[len(counted)], "count", counted))

    # One "yes" and one "no" per image, in random order, so the answer prior is exactly 50/50.
    present_index = int(rng.integers(len(objects)))  # the draw of _pick(rng, objects)
    present = objects[present_index]
    present_names = {(obj.colour, obj.shape) for obj in objects}
    absent = _pick(rng, [c for c in nameable if c not in present_names])
    exists = [
        QAPair(f"is there a {present.colour} {present.shape}?", "yes", "exists", (present_index,)),
        QAPair(f"is there a {absent[0]} {absent[1]}?", "no", "exists"),
    ]
    if rng.random() < 0.5:
        exists.reverse()
    qa.extend(exists)

    if len(objects) >= 2:
        pairs = list(itertools.permutations(range(len(objects)), 2))
        first_index, second_index = pairs[int(rng.integers(len(pairs)))]
        first, second = objects[first_index], objects[second_index]
        relation = _pick(rng, relations(first, second))
        answer = "yes" if rng.random() < 0.5 else "no"
        asked = relation if answer == "yes" else _OPPOSITE[relation]
        question = f"is {_the_phrase(first)} {_RELATION_PHRASES[asked]} {_the_phrase(second)}?"
        qa.append(QAPair(question, answer, "position", (first_index, second_index)))
    absolute = []
    for index, obj in enumerate(objects):
        x, y = obj.center
        if abs(x - 0.5) >= SIDE_MARGIN:
            side = "left" if x < 0.5 else "right"
            absolute.append(QAPair(f"which side is {_the_phrase(obj)} on?", side, "position", (index,)))
        if abs(y - 0.5) >= SIDE_MARGIN:
            half = "top" if y < 0.5 else "bottom"
            absolute.append(QAPair(f"is {_the_phrase(obj)} at the top or the bottom?", half, "position", (index,)))
    if absolute:
        qa.append(_pick(rng, absolute))
    return qa
