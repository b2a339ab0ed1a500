"""The Shapes world: determinism, held-out combinations, truthful text, rendering."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenizer.config import ConfigError
from training.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    QUESTION_KINDS,
    SHAPES,
    SIDE_MARGIN,
    SLOT_CENTRES,
    ShapeObject,
    ShapesImageDataset,
    ShapesWorld,
    ShapesWorldConfig,
    object_coverage,
)

REPO = Path(__file__).resolve().parents[2]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six"]


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(ShapesWorldConfig(seed=3, num_train=400, num_val=100, num_test=100, num_compositional=150))


def _samples(world: ShapesWorld, split: str, count: int, single: bool = False):
    method = world.sample_single if single else world.sample
    return [method(split, index) for index in range(count)]


# ------------------------------------------------------------------ independent checkers
# These recompute every answer from the object list with their own geometry, so a bug in
# the generator's relation / referent logic cannot hide behind shared code.


def _box(obj: ShapeObject) -> tuple[float, float, float, float]:
    x, y = obj.center
    return x - obj.scale / 2, y - obj.scale / 2, x + obj.scale / 2, y + obj.scale / 2


def _holds(first: ShapeObject, relation: str, second: ShapeObject) -> bool:
    a, b = _box(first), _box(second)
    return {
        "left": a[2] <= b[0],
        "right": a[0] >= b[2],
        "above": a[3] <= b[1],
        "below": a[1] >= b[3],
    }[relation]


OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
RELATION_WORDS = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}
EXTREMES = {"leftmost": "left", "rightmost": "right", "topmost": "above", "bottommost": "below"}


def _named(objects: list[ShapeObject], colour: str, shape: str) -> ShapeObject:
    matches = [obj for obj in objects if (obj.colour, obj.shape) == (colour, shape)]
    assert len(matches) == 1, f"'{colour} {shape}' names {len(matches)} objects"
    return matches[0]


def _resolve(objects: list[ShapeObject], modifier: str | None, candidates: list[ShapeObject]) -> ShapeObject:
    """The single object a referent picks out of ``candidates``; fails when it is ambiguous."""
    if modifier in ("small", "large"):
        candidates = [obj for obj in candidates if obj.size == modifier]
    elif modifier in EXTREMES:
        relation = EXTREMES[modifier]
        candidates = [
            obj for obj in candidates if all(_holds(obj, relation, other) for other in candidates if other is not obj)
        ]
    else:
        assert modifier is None, modifier
    assert len(candidates) == 1, f"referent {modifier!r} is ambiguous or empty: {candidates}"
    return candidates[0]


def _true_answer(objects: list[ShapeObject], question: str) -> str:
    modifiers = "small|large|leftmost|rightmost|topmost|bottommost"
    colours, shapes = "|".join(COLOURS), "|".join(SHAPES)
    if m := re.fullmatch(rf"what colour is the (?:({modifiers}) )?({shapes})\?", question):
        return _resolve(objects, m[1], [o for o in objects if o.shape == m[2]]).colour
    if m := re.fullmatch(rf"what shape is the (?:({modifiers}) )?({colours}) object\?", question):
        return _resolve(objects, m[1], [o for o in objects if o.colour == m[2]]).shape
    if question == "how many objects are there?":
        return NUMBERS[len(objects)]
    if m := re.fullmatch(rf"how many ({shapes})s are there\?", question):
        return NUMBERS[sum(o.shape == m[1] for o in objects)]
    if m := re.fullmatch(rf"how many ({colours}) objects are there\?", question):
        return NUMBERS[sum(o.colour == m[1] for o in objects)]
    if m := re.fullmatch(rf"is there a ({colours}) ({shapes})\?", question):
        return "yes" if any((o.colour, o.shape) == (m[1], m[2]) for o in objects) else "no"
    relation = "|".join(RELATION_WORDS)
    if m := re.fullmatch(rf"is the ({colours}) ({shapes}) ({relation}) the ({colours}) ({shapes})\?", question):
        first, second = _named(objects, m[1], m[2]), _named(objects, m[4], m[5])
        asked = RELATION_WORDS[m[3]]
        if _holds(first, asked, second):
            return "yes"
        # "no" is only unambiguous when the opposite relation strictly holds.
        assert _holds(first, OPPOSITE[asked], second), f"ambiguous position question: {question}"
        return "no"
    if m := re.fullmatch(rf"which side is the ({colours}) ({shapes}) on\?", question):
        x = _named(objects, m[1], m[2]).center[0]
        assert abs(x - 0.5) >= SIDE_MARGIN, f"ambiguous side question at x={x}"
        return "left" if x < 0.5 else "right"
    if m := re.fullmatch(rf"is the ({colours}) ({shapes}) at the top or the bottom\?", question):
        y = _named(objects, m[1], m[2]).center[1]
        assert abs(y - 0.5) >= SIDE_MARGIN, f"ambiguous half question at y={y}"
        return "top" if y < 0.5 else "bottom"
    raise AssertionError(f"unrecognised question: {question!r}")


# ------------------------------------------------------------------ tests


def test_same_seed_and_index_give_identical_samples(world: ShapesWorld) -> None:
    again = ShapesWorld(ShapesWorldConfig(seed=3, num_train=400, num_val=100, num_test=100, num_compositional=150))
    for split, index in (("train", 0), ("train", 123), ("val", 7), ("compositional", 5)):
        first, second = world.sample(split, index), again.sample(split, index)
        assert first.image.tobytes() == second.image.tobytes()
        assert (first.caption, first.qa, first.objects) == (second.caption, second.qa, second.objects)
    # Random access: reading out of order gives the same sample.
    assert world.sample("train", 5).image.tobytes() == again.sample("train", 5).image.tobytes()


def test_different_index_split_or_seed_give_different_samples(world: ShapesWorld) -> None:
    reference = world.sample("train", 10).image.tobytes()
    assert world.sample("train", 11).image.tobytes() != reference
    assert world.sample("val", 10).image.tobytes() != reference
    assert world.sample_single("train", 10).image.tobytes() != reference
    other_seed = ShapesWorld(ShapesWorldConfig(seed=4, num_train=400))
    assert other_seed.sample("train", 10).image.tobytes() != reference


def test_samples_are_identical_in_a_fresh_process(world: ShapesWorld) -> None:
    code = (
        "import hashlib\n"
        "from training.data.shapes import ShapesWorld, ShapesWorldConfig\n"
        "w = ShapesWorld(ShapesWorldConfig(seed=3, num_train=400))\n"
        "s = w.sample('train', 77)\n"
        "print(hashlib.sha256(s.image.tobytes() + s.caption.encode()).hexdigest())\n"
    )
    # A different hash seed: nothing may depend on set/dict ordering of strings.
    environment = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=environment, capture_output=True, text=True, check=True
    )
    sample = world.sample("train", 77)
    assert result.stdout.strip() == hashlib.sha256(sample.image.tobytes() + sample.caption.encode()).hexdigest()


def test_holdout_combinations_only_in_compositional_split(world: ShapesWorld) -> None:
    holdout = set(world.config.holdout_combinations)
    for split in ("train", "val", "test"):
        for sample in _samples(world, split, 100) + _samples(world, split, 30, single=True):
            assert not holdout & {obj.name for obj in sample.objects}
            text = " ".join([sample.caption] + [pair.question for pair in sample.qa])
            assert not any(name in text for name in holdout), text
    for sample in _samples(world, "compositional", 100) + _samples(world, "compositional", 30, single=True):
        assert sample.objects[0].name in holdout
    seen = {sample.objects[0].name for sample in _samples(world, "compositional", 150)}
    assert seen == holdout


def test_objects_are_distinct_inside_and_non_overlapping(world: ShapesWorld) -> None:
    counts = set()
    for sample in _samples(world, "train", 200):
        objects = sample.objects
        counts.add(len(objects))
        assert 1 <= len(objects) <= world.config.max_objects
        assert len({(obj.colour, obj.shape) for obj in objects}) == len(objects)
        for obj in objects:
            left, top, right, bottom = _box(obj)
            assert 0 <= left and 0 <= top and right <= 1 and bottom <= 1
            assert abs(obj.scale - {"small": 0.22, "large": 0.40}[obj.size]) <= 0.1 * obj.scale
        for i, first in enumerate(objects):
            for second in objects[i + 1 :]:
                assert any(_holds(first, relation, second) for relation in OPPOSITE), "objects overlap"
    assert counts == {1, 2, 3}


def test_every_qa_answer_is_true_of_the_objects(world: ShapesWorld) -> None:
    kinds_per_image = []
    for split, single in (("train", False), ("val", False), ("compositional", False), ("train", True)):
        for sample in _samples(world, split, 100, single=single):
            for pair in sample.qa:
                assert pair.kind in QUESTION_KINDS
                assert re.fullmatch(r"[a-z]+", pair.answer), pair.answer
                assert _true_answer(sample.objects, pair.question) == pair.answer, (pair, sample.objects)
            exists = [pair.answer for pair in sample.qa if pair.kind == "exists"]
            assert sorted(exists) == ["no", "yes"]
            kinds_per_image.append({pair.kind for pair in sample.qa})
    # count/exists/position are always askable; colour/shape need an unambiguous referent.
    assert all({"count", "exists", "position"} <= kinds for kinds in kinds_per_image)
    complete = sum(kinds == set(QUESTION_KINDS) for kinds in kinds_per_image) / len(kinds_per_image)
    assert complete >= 0.97, complete


def test_captions_name_every_object_and_a_true_relation(world: ShapesWorld) -> None:
    colours, shapes = "|".join(COLOURS), "|".join(SHAPES)
    relation = "|".join(RELATION_WORDS)
    skeletons = set()
    for sample in _samples(world, "train", 300):
        caption = sample.caption
        assert re.fullmatch(r"[a-z ,.:]+", caption), caption
        for obj in sample.objects:
            assert f"{obj.size} {obj.colour} {obj.shape}" in caption
        if len(sample.objects) >= 2:
            pattern = rf"(?:the|a (?:small|large)) ({colours}) ({shapes}) (?:is )?({relation}) "
            pattern += rf"(?:the|a (?:small|large)) ({colours}) ({shapes})"
            m = re.search(pattern, caption)
            assert m, caption
            first, second = _named(sample.objects, m[1], m[2]), _named(sample.objects, m[4], m[5])
            assert _holds(first, RELATION_WORDS[m[3]], second), caption
        skeleton = re.sub(rf"(a (small|large)|the) ({colours}) ({shapes})", "X", caption)
        skeleton = re.sub(r"\b(plain|gradient|striped|checkered|blotchy)\b", "B", skeleton)
        skeleton = re.sub(rf"\b({'|'.join(NUMBERS)})\b", "N", skeleton)
        skeletons.add(re.sub(r"(X( and |, |, and )?)+", "X", re.sub(relation, "R", skeleton)))
    assert len(skeletons) >= 6, skeletons
    mentions_background = sum(
        any(word in sample.caption for word in ("plain", "gradient", "striped", "checkered", "blotchy"))
        for sample in _samples(world, "train", 300)
    )
    assert 0 < mentions_background < 300


def test_class_names_and_labels(world: ShapesWorld) -> None:
    names = world.class_names()
    assert len(names) == 18 == len(set(names))
    assert names[:4] == ["red circle", "red square", "red triangle", "yellow circle"]
    assert set(world.config.holdout_combinations) <= set(names)
    prompts = world.zero_shot_prompts("a photo of a {}.")
    assert prompts[0] == "a photo of a red circle." and len(prompts) == 18
    for sample in _samples(world, "train", 50) + _samples(world, "compositional", 20, single=True):
        assert names[sample.label] == sample.objects[0].name
    singles = _samples(world, "test", 60, single=True)
    assert all(len(sample.objects) == 1 for sample in singles)
    assert len({sample.label for sample in singles}) >= 10  # labels spread over the 15 seen classes


def test_images_have_right_dtype_shape_and_scale_with_image_size() -> None:
    for size in (32, 64, 96):
        world = ShapesWorld(ShapesWorldConfig(image_size=size, num_train=5))
        sample = world.sample("train", 0)
        assert sample.image.dtype == np.uint8 and sample.image.shape == (size, size, 3)
        assert sample.image.min() < sample.image.max()


def test_objects_are_drawn_in_their_named_colour(world: ShapesWorld) -> None:
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    for sample in _samples(world, "train", 80):
        union = np.zeros(sample.image.shape[:2], dtype=bool)
        for obj in sample.objects:
            coverage, (y0, x0) = object_coverage(obj, world.config.image_size)
            full = np.zeros(sample.image.shape[:2], dtype=bool)
            full[y0 : y0 + coverage.shape[0], x0 : x0 + coverage.shape[1]] = coverage > 0
            union |= full
            interior = np.zeros_like(full)
            interior[y0 : y0 + coverage.shape[0], x0 : x0 + coverage.shape[1]] = coverage == 1.0
            assert interior.sum() >= 20  # even small triangles have a solid interior
            mean = sample.image[interior].astype(np.float64).mean(axis=0)
            assert np.abs(mean - np.array(obj.rgb)).max() < 3.0  # only zero-mean pixel noise on top
            assert np.abs(np.array(obj.rgb) - np.array(COLOURS[obj.colour])).max() <= 10
            nearest = list(COLOURS)[int(np.argmin(((palette - mean) ** 2).sum(axis=1)))]
            assert nearest == obj.colour
        # The background is low-saturation, so it cannot be mistaken for an object colour.
        background = sample.image[~union].astype(np.float64)
        saturation = background.max(axis=1) - background.min(axis=1)
        assert saturation.mean() < 45


def test_backgrounds_have_texture_and_noise_has_the_configured_level() -> None:
    clean = ShapesWorld(ShapesWorldConfig(seed=1, num_train=200, noise_std=0.0))
    noisy = ShapesWorld(ShapesWorldConfig(seed=1, num_train=200, noise_std=0.02))
    spread: dict[str, list[float]] = {kind: [] for kind in BACKGROUNDS}
    for index in range(120):
        sample = clean.sample("train", index)
        coverage = np.zeros(sample.image.shape[:2], dtype=bool)
        for obj in sample.objects:
            cov, (y0, x0) = object_coverage(obj, 64)
            coverage[y0 : y0 + cov.shape[0], x0 : x0 + cov.shape[1]] |= cov > 0
        spread[sample.background].append(float(sample.image[~coverage].astype(np.float64).std(axis=0).max()))
        if index < 20:
            # noise is drawn last, so the noisy image is the clean one plus noise of std 0.02 * 255
            difference = noisy.sample("train", index).image.astype(np.float64) - sample.image
            assert 0.015 * 255 < difference.std() < 0.025 * 255
            assert abs(difference.mean()) < 0.5
    assert all(spread[kind] for kind in BACKGROUNDS), "every background kind appears"
    assert max(spread["plain"]) < 0.5
    for kind in ("gradient", "stripes", "checker", "blobs"):
        assert np.median(spread[kind]) > 4.0, (kind, spread[kind])


def test_rendering_speed() -> None:
    world = ShapesWorld(ShapesWorldConfig(num_train=1000))
    # CPU time of this process, so other jobs on a shared machine do not fail the test.
    start = time.process_time()
    for index in range(1000):
        world.sample("train", index)
    assert time.process_time() - start < 3.0


def test_to_hf_dataset_round_trips(world: ShapesWorld, tmp_path: Path) -> None:
    dataset = world.to_hf_dataset("val", limit=4, cache_dir=str(tmp_path))
    assert len(dataset) == 4
    assert {"image", "caption", "label", "objects", "qa"} <= set(dataset.column_names)
    for index in range(4):
        row, sample = dataset[index], world.sample("val", index)
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), sample.image)
        assert row["caption"] == sample.caption and row["label"] == sample.label
        assert [(o["colour"], o["shape"], o["size"]) for o in row["objects"]] == [
            (o.colour, o.shape, o.size) for o in sample.objects
        ]
        assert [(q["question"], q["answer"], q["kind"]) for q in row["qa"]] == [
            (q.question, q.answer, q.kind) for q in sample.qa
        ]


def test_torch_dataset_items(world: ShapesWorld) -> None:
    dataset = ShapesImageDataset(world, "val")
    assert len(dataset) == 100
    item = dataset[3]
    sample = world.sample("val", 3)
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 64, 64)
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    expected = torch.from_numpy(sample.image).permute(2, 0, 1).float() / 127.5 - 1.0
    assert torch.allclose(item["image"], expected)
    assert (item["caption"], item["label"], item["index"]) == (sample.caption, sample.label, 3)
    single = ShapesImageDataset(world, "val", single_object=True)[3]
    assert single["caption"] == world.sample_single("val", 3).caption
    with pytest.raises(IndexError):
        dataset[100]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"max_objects": 0}, "max_objects"),
        ({"image_size": 8}, "image_size"),
        ({"noise_std": 0.5}, "noise_std"),
        ({"num_train": -1}, "num_train"),
        ({"holdout_combinations": ("pink circle",)}, "holdout_combinations"),
        ({"holdout_combinations": ("red circle", "red circle")}, "holdout_combinations"),
        ({"backgrounds": ("plain", "marble")}, "backgrounds"),
        ({"backgrounds": ()}, "backgrounds"),
        ({"snap_cells": -1}, "snap_cells"),
        ({"snap_cells": 65}, "snap_cells"),
        ({"size_jitter": 0.5}, "size_jitter"),
        ({"colour_jitter": -1}, "colour_jitter"),
        ({"plain_rgb": (128, 128)}, "plain_rgb"),
        ({"plain_rgb": (128, 128, 300)}, "plain_rgb"),
        ({"layout": "grid"}, "layout"),
        ({"layout": "slots", "max_objects": 4}, "max_objects"),
    ],
)
def test_config_validation_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        ShapesWorldConfig(**overrides)


def test_generation_world_options_restrict_backgrounds_and_snap_objects_to_the_grid(world: ShapesWorld) -> None:
    """``backgrounds`` and ``snap_cells`` (a world for text-to-image data): every scene draws from
    the named kinds, and every object's bounding square starts on the lattice, inside the image
    and apart from the others; the defaults leave the world as it was."""
    assert ShapesWorldConfig().backgrounds == BACKGROUNDS and ShapesWorldConfig().snap_cells == 0
    # Every recorded number rests on the default world: these scenes hash as they did before the
    # options existed (commit 08a8899). Update the hash only for an intended change of the world.
    digest = hashlib.sha256()
    for index in range(0, 400, 37):
        sample = world.sample("train", index)
        digest.update(sample.image.tobytes() + sample.caption.encode())
    assert digest.hexdigest() == "a278fb9a999443e39b2a54aa26752935203079db1d0e0d756d5f20566df974cd"
    config = ShapesWorldConfig(seed=3, num_train=400, max_objects=2, backgrounds=("plain", "stripes"), snap_cells=8)
    snapped = ShapesWorld(config)
    kinds, corners = set(), set()
    for sample in _samples(snapped, "train", 150):
        kinds.add(sample.background)
        assert 1 <= len(sample.objects) <= 2
        for obj in sample.objects:
            left, top, right, bottom = _box(obj)
            assert 0 <= left and 0 <= top and right <= 1 and bottom <= 1
            for corner in (left, top):
                assert abs(corner * 8 - round(corner * 8)) < 1e-6, (corner, obj)
                corners.add(round(corner * 8))
        for i, first in enumerate(sample.objects):
            for second in sample.objects[i + 1 :]:
                assert any(_holds(first, relation, second) for relation in OPPOSITE), "objects overlap"
    assert kinds == {"plain", "stripes"}
    assert len(corners) >= 5  # objects still go everywhere on the lattice


def test_canonical_world_draws_each_named_object_the_same_everywhere() -> None:
    """No jitter, no noise and a fixed plain colour: the pixels under an object's bounding square
    depend only on its colour, shape and size, not on the scene it is in or where on the lattice
    it sits; the background is exactly ``plain_rgb``. With the default jitter they differ."""

    def patches(config: ShapesWorldConfig) -> dict[tuple[str, str, str], list[np.ndarray]]:
        found: dict[tuple[str, str, str], list[np.ndarray]] = {}
        for index in range(120):
            sample = ShapesWorld(config).sample_single("train", index)
            obj = sample.objects[0]
            left, top, right, bottom = (round(v * 64) for v in _box(obj))
            found.setdefault((obj.colour, obj.shape, obj.size), []).append(sample.image[top:bottom, left:right])
        return found

    base = dict(seed=5, num_train=200, max_objects=2, backgrounds=("plain",), snap_cells=8)
    canonical = ShapesWorldConfig(**base, size_jitter=0.0, colour_jitter=0, noise_std=0.0, plain_rgb=(128, 120, 110))
    repeated = 0
    for key, group in patches(canonical).items():
        for other in group[1:]:
            assert other.shape == group[0].shape and np.array_equal(other, group[0]), key
            repeated += 1
    assert repeated >= 50
    sample = ShapesWorld(canonical).sample("train", 0)
    assert (sample.image[0, 0] == (128, 120, 110)).all() and (sample.image[-1, -1] == (128, 120, 110)).all()
    obj = sample.objects[0]
    centre = sample.image[round(obj.center[1] * 64), round(obj.center[0] * 64)]
    assert tuple(int(c) for c in centre) == COLOURS[obj.colour]
    jittered = patches(ShapesWorldConfig(**base))
    assert any(
        a.shape != b.shape or not np.array_equal(a, b) for group in jittered.values() for a in group for b in group[1:2]
    )


def test_slots_layout_fixes_every_place_by_count_and_order() -> None:
    """``layout="slots"``: the i-th of n objects sits at ``SLOT_CENTRES[n][i]``, the objects'
    names and sizes are those of the random layout's scene of the same index, every caption's
    relation is true of the drawn scene, and in the canonical drawing a caption's objects fix the
    image: two scenes naming the same objects in the same order are pixel-identical."""
    base = dict(seed=2, num_train=300, max_objects=3, backgrounds=("plain",), size_jitter=0.0, colour_jitter=0)
    slots = ShapesWorld(ShapesWorldConfig(**base, noise_std=0.0, plain_rgb=(128, 128, 128), layout="slots"))
    free = ShapesWorld(ShapesWorldConfig(**base, noise_std=0.0, plain_rgb=(128, 128, 128)))
    by_objects: dict[tuple, np.ndarray] = {}
    identical = counts = checked = 0
    for index in range(300):
        sample, other = slots.sample("train", index), free.sample("train", index)
        n = len(sample.objects)
        assert [obj.center for obj in sample.objects] == list(SLOT_CENTRES[n])
        if len(other.objects) == n:  # the random layout may drop an object that does not fit
            assert [(o.colour, o.shape, o.size) for o in sample.objects] == [
                (o.colour, o.shape, o.size) for o in other.objects
            ]
            counts += 1
        for i, first in enumerate(sample.objects):
            for second in sample.objects[i + 1 :]:
                assert any(_holds(first, relation, second) for relation in OPPOSITE), "slots overlap"
        for first in sample.objects:
            for second in sample.objects:
                for word, relation in RELATION_WORDS.items():
                    statement = f"the {first.name} is {word} the {second.name}"
                    inline = f"{first.size} {first.name} {word} a {second.size} {second.name}"
                    if statement in sample.caption or inline in sample.caption:
                        assert _holds(first, relation, second), (sample.caption, relation)
                        checked += 1
        key = tuple((o.colour, o.shape, o.size) for o in sample.objects)
        if key in by_objects:
            assert np.array_equal(by_objects[key], sample.image), key
            identical += 1
        by_objects[key] = sample.image
    assert identical >= 10 and counts >= 250 and checked >= 150
    assert {len(slots.sample("train", i).objects) for i in range(60)} == {1, 2, 3}


def test_snapping_keeps_the_object_inside_on_any_lattice() -> None:
    """On a fine lattice the bounding square's corner lands on it (one cell inward at an edge); on
    a lattice too coarse for the object no lattice point fits, and the centre is clamped inside."""
    from training.data.shapes.world import _snapped

    scale, low, high = 0.25, 0.125 + 0.02, 1.0 - 0.125 - 0.02
    x, y = _snapped((0.40, 0.70), scale, 8, low, high)
    assert (x - scale / 2) * 8 == pytest.approx(2.0) and (y - scale / 2) * 8 == pytest.approx(5.0)
    x, _ = _snapped((low, high), scale, 8, low, high)  # corner 0.02 rounds to 0: one cell inward
    assert x - scale / 2 == pytest.approx(1 / 8) and low <= x <= high
    for cells in (1, 2, 3):
        for value in np.linspace(low, high, 9):
            x, y = _snapped((float(value), float(value)), scale, cells, low, high)
            assert low - 1e-9 <= x <= high + 1e-9 and low - 1e-9 <= y <= high + 1e-9, (cells, value, x)
    # A 1-cell lattice has corners 0 and 1 only: 0 sits in the margin, one cell inward overshoots
    # the image, and the clamp puts the centre at the far edge of the allowed range.
    assert _snapped((0.5, 0.5), scale, 1, low, high) == pytest.approx((high, high))


def test_bad_split_or_index_is_rejected(world: ShapesWorld) -> None:
    with pytest.raises(ValueError, match="split"):
        world.sample("training", 0)
    with pytest.raises(IndexError, match="400"):
        world.sample("train", 400)
