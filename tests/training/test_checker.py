"""The Shapes-world image checker: accuracy on the world's images, robustness, negatives, captions."""

from __future__ import annotations

import ast
import inspect
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch

import training.data.shapes.detect as detect_module
import training.data.shapes.judge as judge_module
from tokenizer.images import uint8_image_to_tensor
from training.data.shapes import BACKGROUNDS, COLOURS, SHAPES, ShapesWorld, ShapesWorldConfig, relations
from training.data.shapes.checker import degrade, validate
from training.data.shapes.detect import Detection, classify_shape, detect_objects, to_uint8_image
from training.data.shapes.judge import ObjectSpec, judge, parse_caption

OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(ShapesWorldConfig())


def _scene_with(world: ShapesWorld, count: int):
    """The first test-split scene with ``count`` objects."""
    return next(s for s in (world.sample("test", i) for i in range(200)) if len(s.objects) == count)


def _specs(objects) -> list[ObjectSpec]:
    return [ObjectSpec(obj.colour, obj.shape) for obj in objects]


# ------------------------------------------------------------------ our own rasteriser
# Shapes drawn here with plain binary masks (no anti-aliasing, other sizes, rotations), so the
# checker is also shown to read images the world's renderer did not make.


def _canvas(size: int = 96, grey: int = 120) -> np.ndarray:
    return np.full((size, size, 3), grey, dtype=np.float32)


def _paint(canvas: np.ndarray, shape: str, colour: str, center, side: float, angle: float = 0.0) -> None:
    """Paint ``shape`` of bounding side ``side`` (image fraction) at ``center``, rotated by ``angle``."""
    size = canvas.shape[0]
    coords = (np.arange(size) + 0.5) / size
    dx, dy = coords[None, :] - center[0], coords[:, None] - center[1]
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    half = side / 2
    if shape == "circle":
        inside = u * u + v * v <= half * half
    elif shape == "square":
        inside = (np.abs(u) <= half) & (np.abs(v) <= half)
    elif shape == "triangle":  # apex up at angle 0
        depth = v + half
        inside = (depth >= 0) & (depth <= side) & (np.abs(u) <= half * depth / side)
    elif shape == "bar":
        inside = (np.abs(u) <= half) & (np.abs(v) <= half / 4)
    else:
        raise ValueError(shape)
    canvas[inside] = COLOURS[colour]


def _finish(canvas: np.ndarray) -> np.ndarray:
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ accuracy on the world


def test_validated_on_the_worlds_images() -> None:
    report = validate(300)  # 300 one-object scenes + 300 scenes of 1..3 objects, test + compositional
    print("\n".join(report.lines()))
    assert report.scenes["kind=single"][1] == 300 and report.scenes["kind=multi"][1] == 300
    assert all(report.scenes[f"objects={count}"][1] >= 50 for count in (1, 2, 3))
    assert report.scenes["split=compositional"][1] == report.scenes["split=test"][1] == 300
    assert report.rate("kind=single") >= 0.98, report.failures[:10]
    assert report.rate("kind=multi") >= 0.98, report.failures[:10]
    assert report.sizes[0] >= 0.98 * report.sizes[1]


def test_robust_to_blur_and_noise() -> None:
    # A stand-in for decoder output: 0.7 px Gaussian blur, then noise of std 8 RGB units.
    report = validate(150, blur_sigma=0.7, noise_std=8.0)
    print("\n".join(report.lines()))
    assert report.scenes["all"][1] == 300
    assert report.rate() >= 0.90, report.failures[:10]


def test_degrade_blurs_and_adds_noise(world: ShapesWorld) -> None:
    image = world.sample("test", 0).image
    blurred = degrade(image, 0.7, 0.0, np.random.default_rng(0))
    noisy = degrade(image, 0.0, 8.0, np.random.default_rng(0))
    assert blurred.shape == image.shape and blurred.dtype == np.uint8
    # A blur lowers the pixel-to-pixel differences; noise of std 8 is visible as such.
    assert np.abs(np.diff(blurred.astype(float), axis=1)).mean() < np.abs(np.diff(image.astype(float), axis=1)).mean()
    assert 6 < (noisy.astype(float) - image).std() < 10
    assert np.array_equal(degrade(image, 0.0, 0.0, np.random.default_rng(0)), image)


def test_detections_locate_the_objects(world: ShapesWorld) -> None:
    scene = _scene_with(world, 3)
    detections = detect_objects(scene.image)
    assert len(detections) == 3
    for obj in scene.objects:
        found = next(d for d in detections if (d.colour, d.shape) == (obj.colour, obj.shape))
        assert math.dist(found.center, obj.center) < 0.03
        assert found.size == obj.size
        left, top, right, bottom = found.box
        assert left < found.center[0] < right and top < found.center[1] < bottom
        assert 0.01 < found.area < 0.2


# ------------------------------------------------------------------ negatives


def test_negative_cases_fail(world: ShapesWorld) -> None:
    scene = _scene_with(world, 2)
    image, objects = scene.image, scene.objects
    specs = _specs(objects)
    assert judge(image, specs).correct

    present = {(obj.colour, obj.shape) for obj in objects}
    other_colour = next(c for c in COLOURS if (c, objects[0].shape) not in present)
    wrong_colour = judge(image, [ObjectSpec(other_colour, objects[0].shape), specs[1]])
    assert not wrong_colour.correct and wrong_colour.matched == (False, True)
    assert (
        f"expected {other_colour} {objects[0].shape}, found {objects[0].colour} {objects[0].shape}"
        in wrong_colour.reason
    )

    other_shape = next(s for s in SHAPES if (objects[0].colour, s) not in present)
    wrong_shape = judge(image, [ObjectSpec(objects[0].colour, other_shape), specs[1]])
    assert not wrong_shape.correct and wrong_shape.matched == (False, True)
    assert f"expected {objects[0].colour} {other_shape}" in wrong_shape.reason

    missing = judge(image, [*specs, ObjectSpec(other_colour, objects[0].shape)])
    assert not missing.correct and not missing.count_ok and missing.matched == (True, True, False)
    assert "found nothing more" in missing.reason

    extra = judge(image, specs[:1])
    assert not extra.correct and not extra.count_ok and extra.matched == (True,)
    assert f"extra {objects[1].colour} {objects[1].shape}" in extra.reason
    assert judge(image, specs[:1], exact_count=False).correct

    true_relation = relations(objects[0], objects[1])[0]
    assert judge(image, specs, (0, true_relation, 1)).relation_ok is True
    assert judge(image, specs, (1, OPPOSITE[true_relation], 0)).correct
    wrong_relation = judge(image, specs, (0, OPPOSITE[true_relation], 1))
    assert not wrong_relation.correct and wrong_relation.relation_ok is False
    assert wrong_relation.matched == (True, True) and "is not" in wrong_relation.reason


def test_backgrounds_alone_and_uniform_noise_show_nothing(world: ShapesWorld) -> None:
    rng = np.random.default_rng(0)
    for index in range(40):
        # The world's own textures (its private background painter: tests may use it, the checker never does).
        background = world._background(rng, BACKGROUNDS[index % len(BACKGROUNDS)])
        blank = np.clip(background + rng.normal(0, 5, background.shape), 0, 255).astype(np.uint8)
        for image in (blank, degrade(blank, 0.7, 8.0, rng)):
            assert detect_objects(image) == []
            verdict = judge(image, [ObjectSpec("red", "circle")])
            assert not verdict.correct and verdict.matched == (False,)
            assert verdict.reason.startswith("no objects detected")
    for size in (64, 128):
        noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        assert detect_objects(noise) == []
        assert not judge(noise, [ObjectSpec(shape="circle")]).correct
    assert judge(blank, []).correct  # nothing expected, nothing found


# ------------------------------------------------------------------ matching and relations


def test_matching_is_bipartite_not_greedy() -> None:
    canvas = _canvas()
    _paint(canvas, "circle", "red", (0.3, 0.5), 0.4)  # larger: listed first
    _paint(canvas, "circle", "blue", (0.75, 0.5), 0.25)
    image = _finish(canvas)
    assert [d.name for d in detect_objects(image)] == ["red circle", "blue circle"]
    # Greedy in order would give the red circle to "any circle" and leave "red circle" unmatched.
    verdict = judge(image, [ObjectSpec(shape="circle"), ObjectSpec("red", "circle")])
    assert verdict.correct and verdict.assignment == (1, 0)
    # With two interchangeable specs, the matching that satisfies the relation is chosen.
    assert judge(image, [ObjectSpec(shape="circle"), ObjectSpec(shape="circle")], (0, "right", 1)).correct
    assert judge(image, [ObjectSpec(shape="circle"), ObjectSpec(shape="circle")], (1, "right", 0)).correct
    assert not judge(image, [ObjectSpec(shape="circle"), ObjectSpec(shape="circle")], (0, "above", 1)).correct
    assert judge(image, [ObjectSpec("red", "circle", "large"), ObjectSpec("blue", "circle", "small")]).correct
    assert not judge(image, [ObjectSpec("red", "circle", "small"), ObjectSpec("blue", "circle")]).correct


def test_bad_arguments_are_rejected() -> None:
    image = _finish(_canvas())
    with pytest.raises(ValueError, match="relation"):
        judge(image, [ObjectSpec(), ObjectSpec()], (0, "behind", 1))
    with pytest.raises(ValueError, match="relation"):
        judge(image, [ObjectSpec(), ObjectSpec()], (0, "left", 0))
    with pytest.raises(ValueError, match="ObjectSpec.colour"):
        ObjectSpec("orange", "circle")
    with pytest.raises(ValueError, match="shape"):
        to_uint8_image(np.zeros((4, 64, 64)))


# ------------------------------------------------------------------ shapes and inputs beyond the renderer


@pytest.mark.parametrize(
    ("shape", "angle", "expected"),
    [
        ("circle", 0.0, "circle"),
        ("square", 0.0, "square"),
        ("square", math.pi / 4, "square"),  # a diamond is still a square
        ("square", math.pi / 9, "square"),
        ("triangle", 0.0, "triangle"),
        ("triangle", math.pi, "triangle"),  # pointing down
        ("bar", 0.0, "unknown"),  # elongated: no world shape
    ],
)
def test_own_drawings_classify_at_any_rotation(shape: str, angle: float, expected: str) -> None:
    canvas = _canvas()
    _paint(canvas, shape, "green", (0.5, 0.5), 0.45, angle)
    detections = detect_objects(_finish(canvas))
    assert [(d.colour, d.shape) for d in detections] == [("green", expected)]


def test_two_overlapping_discs_are_no_shape() -> None:
    mask = np.zeros((40, 60), dtype=bool)
    rows, cols = np.mgrid[:40, :60]
    mask |= (rows - 20) ** 2 + (cols - 20) ** 2 <= 15**2
    mask |= (rows - 20) ** 2 + (cols - 40) ** 2 <= 15**2
    assert classify_shape(mask) == "unknown"


def test_inputs_in_model_ranges_give_the_same_detections(world: ShapesWorld) -> None:
    image = _scene_with(world, 3).image
    reference = detect_objects(image)
    tensor = uint8_image_to_tensor(image)  # (3, H, W) in [-1, 1]
    for variant in (tensor, tensor[None], (tensor + 1) / 2, image.astype(np.float32) / 255, torch.from_numpy(image)):
        assert detect_objects(variant) == reference
    assert np.array_equal(to_uint8_image((tensor + 1) / 2, value_range=(0.0, 1.0)), image)


def test_checker_uses_only_the_worlds_spec_constants() -> None:
    # Detection and judging read the world's spec constants and each other, never the renderer
    # or the text generator; only the validation (checker.py) imports the world it measures.
    allowed = {"COLOURS", "SHAPES", "SIZES", "SIZE_FRACTIONS"}
    imported_specs = set()
    for module in (detect_module, judge_module):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("training"):
                names = {alias.name for alias in node.names}
                if node.module == "training.data.shapes.spec":
                    assert names <= allowed, (module.__name__, names)
                    imported_specs |= names
                else:
                    assert node.module == "training.data.shapes.detect", (module.__name__, node.module)
            if isinstance(node, ast.Import):
                assert not any(alias.name.startswith("training") for alias in node.names)
    assert imported_specs == allowed  # the walk saw the imports it guards


# ------------------------------------------------------------------ captions


def test_parse_caption_reads_every_world_caption(world: ShapesWorld) -> None:
    scenes = [world.sample(split, i) for split in ("train", "test", "compositional") for i in range(150)]
    scenes += [world.sample_single("test", i) for i in range(60)]
    forms: dict[int, set[str]] = {1: set(), 2: set(), 3: set()}
    for scene in scenes:
        specs, relation = parse_caption(scene.caption)
        # _make_caption names every object (size, colour, shape), so the specs are exactly the objects.
        assert Counter((s.colour, s.shape) for s in specs) == Counter((o.colour, o.shape) for o in scene.objects)
        sized, _ = parse_caption(scene.caption, sizes=True)
        assert Counter((s.colour, s.shape, s.size) for s in sized) == Counter(
            (o.colour, o.shape, o.size) for o in scene.objects
        )
        if len(scene.objects) == 1:
            assert relation is None
        else:  # ... plus one strict relation between two of them
            first, name, second = relation
            by_name = {(o.colour, o.shape): o for o in scene.objects}
            objects = [by_name[(specs[i].colour, specs[i].shape)] for i in (first, second)]
            assert name in relations(*objects), scene.caption
        form = re.sub(r"(?:a|the) (?:small |large )?\w+ (?:circle|square|triangle)", "X", scene.caption)
        form = re.sub(r"\b(?:plain|gradient|striped|checkered|blotchy)\b", "B", form)
        forms[len(scene.objects)].add(re.sub(r"(?:to the (?:left|right) of|above|below)", "R", form))
    # Every caption template appeared (6 for one object, 7 for several).
    assert len(forms[1]) == 6 and len(forms[2]) == 7 and len(forms[3]) == 7, forms


def test_parse_caption_reads_prompts_like_the_captions() -> None:
    red_circle, blue_square = ObjectSpec("red", "circle"), ObjectSpec("blue", "square")
    assert parse_caption("A Red Circle to the left of a blue square") == ([red_circle, blue_square], (0, "left", 1))
    assert parse_caption("the blue square is below the red circle.") == ([blue_square, red_circle], (0, "below", 1))
    assert parse_caption("a red circle. the blue square is right of the red circle.") == (
        [red_circle, blue_square],
        (1, "right", 0),
    )
    assert parse_caption("a red object above a triangle on a plain background") == (
        [ObjectSpec(colour="red"), ObjectSpec(shape="triangle")],
        (0, "above", 1),
    )
    assert parse_caption("a large green triangle", sizes=True) == ([ObjectSpec("green", "triangle", "large")], None)
    assert parse_caption("there are three objects: a red circle, a red square and a red triangle.")[0] == [
        ObjectSpec("red", shape) for shape in SHAPES
    ]
    for text in ("", "a photo of a striped background.", "three objects"):
        with pytest.raises(ValueError, match=re.escape(repr(text))):
            parse_caption(text)
    with pytest.raises(ValueError, match="more than one relation"):
        parse_caption("a red circle left of a blue square above a green triangle")


def test_judging_a_caption_end_to_end(world: ShapesWorld) -> None:
    scene = _scene_with(world, 3)
    verdict = judge(scene.image, *parse_caption(scene.caption))
    assert verdict.correct and verdict.relation_ok is True and verdict.reason.startswith("ok: found")
    assert all(isinstance(d, Detection) for d in verdict.detections)
    # The same caption does not fit a different scene.
    other = next(s for s in (world.sample("test", i) for i in range(1, 200)) if s.caption != scene.caption)
    assert not judge(other.image, *parse_caption(scene.caption)).correct


def test_text_to_image_scores_give_partial_credit() -> None:
    from eval.shapes_scoring import score_t2i, t2i_items
    from training.data.shapes import ShapesWorld, ShapesWorldConfig

    world = ShapesWorld(ShapesWorldConfig(seed=0, image_size=64))
    items = t2i_items(world, "test", 3, 3)
    renders = [world.sample_single("test", i).image for i in range(3)]
    renders += [world.sample("test", int(item.key.rsplit("/", 1)[1])).image for item in items[3:]]
    perfect, _ = score_t2i(items, renders)
    assert perfect["t2i_all"] == perfect["t2i_object_recall"] == perfect["t2i_colour_recall"] == 1.0
    assert perfect["t2i_count_ok"] == perfect["t2i_colour_precision"] == 1.0
    # Each single-object prompt answered with a two-object scene that holds its object: the full
    # verdict fails on the extra object, object recall does not; a blank canvas scores nothing.
    pairs = [world.sample("test", i) for i in range(200)]
    pairs = [scene for scene in pairs if len(scene.objects) == 2]
    holding = []
    for item in items[:3]:
        wanted = (item.expected[0].colour, item.expected[0].shape)
        holding.append(
            next(
                scene.image
                for scene in pairs
                if wanted in {(o.colour, o.shape) for o in scene.objects}
                and scene.objects[0].colour != scene.objects[1].colour
            )
        )
    extra, _ = score_t2i(items[:3], holding)
    assert extra["t2i_all"] == 0.0 and extra["t2i_count_ok"] == 0.0
    assert extra["t2i_object_recall"] == extra["t2i_colour_recall"] == 1.0
    assert 0.0 < extra["t2i_colour_precision"] < 1.0  # the extra object has another colour
    blank, _ = score_t2i(items, [np.full((64, 64, 3), 128, np.uint8)] * len(items))
    assert blank["t2i_object_recall"] == blank["t2i_colour_recall"] == blank["t2i_count_ok"] == 0.0
    assert blank["t2i_colour_precision"] == 0.0


def test_vqa_by_form_shows_a_model_that_answers_from_the_prior() -> None:
    from eval.shapes_scoring import VQAItem, question_form, vqa_by_form

    assert question_form("is the yellow triangle to the right of the large red triangle?") == (
        "is the X to the right of the X?"
    )
    assert question_form("how many squares are there?") == "how many X are there?"
    assert question_form("what colour is the small circle?") == question_form("what colour is the square?")
    image = np.zeros((8, 8, 3), np.uint8)
    sides = [
        ("red circle", "left"),
        ("large blue square", "right"),
        ("green triangle", "left"),
        ("cyan circle", "right"),
    ]
    items = [
        VQAItem(image, f"which side is the {name} on?", side, "position", str(i))
        for i, (name, side) in enumerate(sides)
    ]
    items += [VQAItem(image, "how many objects are there?", "two", "count", "c0")]
    rows = vqa_by_form(items, ["right"] * 4 + ["two"])
    assert [row["form"] for row in rows] == ["which side is the X on?", "how many objects are there?"]
    side = rows[0]
    assert side["questions"] == 4 and side["accuracy"] == 0.5 and side["kind"] == "position"
    assert (side["top_prediction"], side["top_prediction_share"]) == ("right", 1.0)
    assert side["top_answer_share"] == 0.5  # the truth is split, the answers are not: the prior
    assert rows[1]["accuracy"] == 1.0
