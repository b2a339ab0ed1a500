"""Shapes-world scores of a unified model: VQA by question type, text-to-image judged by the checker.

The scenes are rendered from the world's seed (nothing is read from the training data), the
model sees them only through :class:`mllm.inference.Pipeline` (as a user would), and the
generated images are judged by :mod:`training.data.shapes.judge`, which never sees the model.

- ``shapes_vqa``: every question of the first ``limit`` scenes of a split, asked on its own;
  exact-match accuracy per kind, next to the majority baseline of that kind (the most common
  training answer, scored on the same questions).
- ``shapes_t2i``: one- and two-object scenes' captions as prompts; "fully correct" means the
  checker finds exactly the named objects with the right colour and shape; the spatial
  relation of two-object prompts is reported separately.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.data.shapes import COLOURS, NUMBER_WORDS, QUESTION_KINDS, SHAPES, SIZES, ShapesWorld, relations
from training.data.shapes.judge import ObjectSpec, judge


@dataclass
class VQAItem:
    image: np.ndarray
    question: str
    answer: str
    kind: str
    key: str


def vqa_items(world: ShapesWorld, split: str, limit: int) -> list[VQAItem]:
    items = []
    for index in range(min(limit, world.split_size(split))):
        sample = world.sample(split, index)
        for number, pair in enumerate(sample.qa):
            items.append(VQAItem(sample.image, pair.question, pair.answer, pair.kind, f"{split}/{index}/{number}"))
    return items


def majority_answers(world: ShapesWorld, scenes: int = 2000) -> dict[str, str]:
    """The most common training answer of each question kind."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for index in range(min(scenes, world.split_size("train"))):
        for pair in world.sample("train", index).qa:
            counts[pair.kind][pair.answer] += 1
    return {kind: counter.most_common(1)[0][0] for kind, counter in counts.items()}


VALID_ANSWERS: dict[str, set[str]] = {
    "colour": set(COLOURS),
    "shape": set(SHAPES),
    "count": set(NUMBER_WORDS),
    "exists": {"yes", "no"},
    "position": {"yes", "no", "left", "right", "top", "bottom"},
}


def score_vqa(items: list[VQAItem], predictions: list[str], majority: dict[str, str]) -> dict[str, float]:
    """Exact match per kind, the majority baseline, and ``vqa_valid``: answers of the right type."""
    hits: dict[str, list[int]] = defaultdict(list)
    base: dict[str, list[int]] = defaultdict(list)
    valid: list[int] = []
    for item, predicted in zip(items, predictions, strict=True):
        hits[item.kind].append(int(predicted.strip().lower() == item.answer))
        base[item.kind].append(int(majority.get(item.kind) == item.answer))
        valid.append(int(predicted.strip().lower() in VALID_ANSWERS.get(item.kind, set())))
    metrics: dict[str, float] = {}
    for kind in QUESTION_KINDS:
        if hits[kind]:
            metrics[f"vqa_{kind}"] = float(np.mean(hits[kind]))
            metrics[f"vqa_{kind}_baseline"] = float(np.mean(base[kind]))
            metrics[f"vqa_{kind}_n"] = len(hits[kind])
    kinds = [kind for kind in QUESTION_KINDS if hits[kind]]
    metrics["vqa_mean"] = float(np.mean([metrics[f"vqa_{kind}"] for kind in kinds]))
    metrics["vqa_mean_baseline"] = float(np.mean([metrics[f"vqa_{kind}_baseline"] for kind in kinds]))
    metrics["vqa_valid"] = float(np.mean(valid))
    return metrics


_NAMED_WORDS = re.compile(r"\b(" + "|".join([*COLOURS, *SHAPES, *SIZES]) + r")s?\b")


def question_form(question: str) -> str:
    """A question's template: colour, shape and size words (and their runs) replaced by one ``X``."""
    return re.sub(r"X( X)+", "X", _NAMED_WORDS.sub("X", question))


def vqa_by_form(items: list[VQAItem], predictions: list[str]) -> list[dict[str, Any]]:
    """Accuracy per question form, beside the most common answer given and the most common truth.

    A model that answers from the prior gives one answer to a form whatever the image (share
    near 1) while the truth is split: this table shows it where per-kind accuracy cannot.
    """
    groups: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for item, predicted in zip(items, predictions, strict=True):
        groups[question_form(item.question)].append((item.kind, item.answer, predicted.strip().lower()))
    rows = []
    for form, triples in groups.items():
        given, truth = Counter(p for _, _, p in triples), Counter(a for _, a, _ in triples)
        (top_given, given_n), (top_truth, truth_n) = given.most_common(1)[0], truth.most_common(1)[0]
        rows.append(
            {
                "form": form,
                "kind": triples[0][0],
                "questions": len(triples),
                "accuracy": float(np.mean([a == p for _, a, p in triples])),
                "top_prediction": top_given,
                "top_prediction_share": given_n / len(triples),
                "top_answer": top_truth,
                "top_answer_share": truth_n / len(triples),
            }
        )
    return sorted(rows, key=lambda row: (-row["questions"], row["form"]))


def shapes_vqa(pipe: Any, world: ShapesWorld, split: str = "test", limit: int = 200, batch_size: int = 32) -> dict:
    items = vqa_items(world, split, limit)
    predictions: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        predictions += pipe.answer_batch([it.image for it in chunk], [it.question for it in chunk])
    return {
        "metrics": score_vqa(items, predictions, majority_answers(world)),
        "by_form": vqa_by_form(items, predictions),
        "items": items,
        "predictions": predictions,
    }


@dataclass
class T2IItem:
    prompt: str
    expected: list[ObjectSpec]
    relation: tuple[int, str, int] | None
    category: str
    key: str


def t2i_items(world: ShapesWorld, split: str, singles: int, pairs: int) -> list[T2IItem]:
    """``singles`` one-object and ``pairs`` two-object prompts from ``split``'s captions."""
    items = []
    for index in range(min(singles, world.split_size(split))):
        sample = world.sample_single(split, index)
        objects = [ObjectSpec(obj.colour, obj.shape) for obj in sample.objects]
        items.append(T2IItem(sample.caption, objects, None, "single", f"{split}/single/{index}"))
    index = 0
    found = 0
    while found < pairs and index < world.split_size(split):
        sample = world.sample(split, index)
        index += 1
        if len(sample.objects) != 2:
            continue
        first, second = sample.objects
        relation_words = relations(first, second)
        relation = (0, relation_words[0], 1) if relation_words else None
        objects = [ObjectSpec(obj.colour, obj.shape) for obj in sample.objects]
        items.append(T2IItem(sample.caption, objects, relation, "two", f"{split}/two/{index - 1}"))
        found += 1
    return items


def score_t2i(items: list[T2IItem], images: list[np.ndarray]) -> tuple[dict[str, float], list[Any]]:
    """Fully correct per category, plus partial credit that moves before the full verdict does.

    ``t2i_object_recall``: named objects found with their colour and shape (extra objects
    allowed); ``t2i_colour_recall``: named objects whose colour is among the detections;
    ``t2i_colour_precision``: the share of the detected objects' area in a named colour (0 for
    an image with no detection), which a canvas splashed with every colour fails;
    ``t2i_count_ok``: images with exactly the named number of objects.
    """
    verdicts = []
    by_category: dict[str, list[int]] = defaultdict(list)
    relation_hits: list[int] = []
    partial: dict[str, list[float]] = defaultdict(list)
    for item, image in zip(items, images, strict=True):
        verdict = judge(image, item.expected)
        verdicts.append(verdict)
        by_category[item.category].append(int(verdict.correct))
        by_category["all"].append(int(verdict.correct))
        if item.relation is not None and verdict.correct:
            relation_hits.append(int(judge(image, item.expected, item.relation).correct))
        colours = {detection.colour for detection in verdict.detections}
        partial["object_recall"] += [float(hit) for hit in verdict.matched]
        partial["colour_recall"] += [float(spec.colour in colours) for spec in item.expected]
        named = {spec.colour for spec in item.expected}
        area = sum(detection.area for detection in verdict.detections)
        in_named = sum(detection.area for detection in verdict.detections if detection.colour in named)
        partial["colour_precision"].append(in_named / area if area > 0 else 0.0)
        partial["count_ok"].append(float(verdict.count_ok))
    metrics = {f"t2i_{name}": float(np.mean(values)) for name, values in by_category.items()}
    metrics.update({f"t2i_{name}": float(np.mean(values)) for name, values in partial.items()})
    if relation_hits:
        metrics["t2i_two_relation_given_correct"] = float(np.mean(relation_hits))
    return metrics, verdicts


def shapes_t2i(
    pipe: Any,
    world: ShapesWorld,
    split: str = "test",
    singles: int = 64,
    pairs: int = 64,
    batch_size: int = 16,
    **sampling: Any,
) -> dict:
    items = t2i_items(world, split, singles, pairs)
    images: list[np.ndarray] = []
    seed = sampling.pop("seed", 0)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        images += pipe.generate([item.prompt for item in chunk], seed=seed + start, **sampling)
    metrics, verdicts = score_t2i(items, images)
    return {"metrics": metrics, "items": items, "images": images, "verdicts": verdicts}
