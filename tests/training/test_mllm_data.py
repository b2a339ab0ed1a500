"""MLLM data: LLaVA conversations and text-to-image pairs (writers, readers, validation) and code shards."""

import json
import pickle
import re
from pathlib import Path

import mllm_fixtures
import numpy as np
import pytest
import torch

from tokenizer.images import load_image
from tokenizer.model import DualTokenizer
from training.data import code_shards, conversations
from training.data.code_shards import CodeShardsError, tokenize_to_shards
from training.data.code_store import CodeStore
from training.data.conversations import (
    IMAGE_PLACEHOLDER,
    Turn,
    read_conversations,
    read_text_image_pairs,
    write_shapes_llava,
    write_shapes_t2i,
)
from training.data.readers import MetadataError
from training.data.shapes import ShapesWorld, ShapesWorldConfig

SIZE = 32
NUM_IMAGES = 5


def tiny_visual_tokenizer(seed: int = 0) -> DualTokenizer:
    return mllm_fixtures.tiny_visual_tokenizer(seed, pixel_depth=3)


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(ShapesWorldConfig(seed=11, image_size=SIZE, num_val=NUM_IMAGES))


@pytest.fixture(scope="module")
def shapes_dir(world: ShapesWorld, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_shapes_llava(world, "val", out)
    write_shapes_t2i(world, "val", out)
    return out


@pytest.fixture(scope="module")
def visual_tokenizer() -> DualTokenizer:
    return tiny_visual_tokenizer()


# --------------------------------------------------------------------------------------
# writers and readers
# --------------------------------------------------------------------------------------


def test_llava_writer_round_trips_through_the_reader(world: ShapesWorld, shapes_dir: Path) -> None:
    records = read_conversations(shapes_dir / "llava.json")
    assert len(records) == NUM_IMAGES
    shuffled = False
    for index, record in enumerate(records):
        sample = world.sample("val", index)
        assert record.id == f"shapes-val-{index:06d}"
        assert record.image_key == f"images/val/{index:06d}.png"
        assert record.image == shapes_dir / record.image_key
        np.testing.assert_array_equal(np.asarray(load_png(record.image)), sample.image)
        assert [turn.role for turn in record.turns] == ["user", "assistant"] * len(sample.qa)
        assert record.turns[0].text.startswith(f"{IMAGE_PLACEHOLDER}\n")
        questions = [turn.text.removeprefix(f"{IMAGE_PLACEHOLDER}\n") for turn in record.turns[0::2]]
        answers = [turn.text for turn in record.turns[1::2]]
        written = list(zip(questions, answers, record.meta["kinds"], strict=True))
        expected = [(pair.question, pair.answer, pair.kind) for pair in sample.qa]
        assert sorted(written) == sorted(expected)
        shuffled |= written != expected
        assert record.meta["objects"] == [
            {"colour": obj.colour, "shape": obj.shape, "size": obj.size, "center": list(obj.center)}
            for obj in sample.objects
        ]
    assert shuffled, "turn order is never shuffled"


def test_llava_answers_carry_the_boxes_of_the_objects_they_are_about(world: ShapesWorld, shapes_dir: Path) -> None:
    seen_kinds = set()
    for index, record in enumerate(read_conversations(shapes_dir / "llava.json")):
        objects = world.sample("val", index).objects
        boxes = {tuple(round(v, 4) for v in np.clip(obj.box(), 0, 1)): obj for obj in objects}
        for question, answer, kind in zip(record.turns[0::2], record.turns[1::2], record.meta["kinds"], strict=True):
            named = [boxes[box] for box in answer.boxes]  # every box is one of the scene's objects
            text = question.text
            if kind == "colour":
                assert len(named) == 1 and named[0].colour == answer.text and named[0].shape in text
            elif kind == "shape":
                assert len(named) == 1 and named[0].shape == answer.text and named[0].colour in text
            elif kind == "exists":
                assert (answer.text == "yes") == bool(named)
                assert all(f"{obj.colour} {obj.shape}" in text for obj in named)
            elif kind == "count" and text.endswith("how many objects are there?"):
                assert len(named) == len(objects)
            elif kind == "position":
                assert len(named) in (1, 2) and all(f"{obj.colour} {obj.shape}" in text for obj in named)
            seen_kinds.add(kind)
    assert seen_kinds == {"colour", "shape", "exists", "count", "position"}


def load_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_t2i_writer_round_trips_and_shares_the_pngs(world: ShapesWorld, shapes_dir: Path) -> None:
    pairs = read_text_image_pairs(shapes_dir / "t2i.jsonl")
    conversations_by_key = {record.image_key: record for record in read_conversations(shapes_dir / "llava.json")}
    assert [pair.caption for pair in pairs] == [world.sample("val", i).caption for i in range(NUM_IMAGES)]
    assert [pair.image_key for pair in pairs] == list(conversations_by_key)
    assert sorted(path.name for path in (shapes_dir / "images" / "val").iterdir()) == [
        f"{i:06d}.png" for i in range(NUM_IMAGES)
    ]
    assert pairs[0].meta["objects"] == conversations_by_key[pairs[0].image_key].meta["objects"]
    for index, pair in enumerate(pairs):  # where the caption's objects are, for object_pixel_weight
        objects = world.sample("val", index).objects
        assert pair.boxes == tuple(tuple(round(v, 4) for v in np.clip(obj.box(), 0, 1)) for obj in objects)
        assert all(f"{obj.colour} {obj.shape}" in pair.caption for obj in objects)


def test_writers_are_deterministic(world: ShapesWorld, shapes_dir: Path, tmp_path: Path) -> None:
    conversations.write_shapes(world, "val", tmp_path, limit=NUM_IMAGES)
    for name in ("llava.json", "t2i.jsonl", "images/val/000003.png"):
        assert (tmp_path / name).read_bytes() == (shapes_dir / name).read_bytes(), name


def test_conversation_cli_writes_both_formats(tmp_path: Path) -> None:
    written = conversations.main(["--split", "val", "--limit", "3", "--out", str(tmp_path), "--image-size", "32"])
    assert set(written) == {"llava", "t2i"}
    assert len(read_conversations(written["llava"])) == 3
    assert len(read_text_image_pairs(written["t2i"])) == 3


def test_conversation_cli_writes_the_pairs_the_tiny_stages_draw_from(tmp_path: Path) -> None:
    """``make-data --t2i-world slots`` writes the same pairs as ``tiny-mllm``'s data step, beside the split."""
    from training.data.shapes import SLOT_CENTRES, slots_world_config

    argv = ["--split", "val", "--limit", "4", "--out", str(tmp_path / "cli"), "--image-size", "32"]
    written = conversations.main([*argv, "--t2i-world", "slots", "--grid-size", "8"])
    assert set(written) == {"llava", "t2i", "t2i_slots"} and written["t2i_slots"].name == "t2i_slots.jsonl"
    pairs = read_text_image_pairs(written["t2i_slots"])
    assert len(pairs) == 4 and all(pair.image_key.startswith("images/val_slots/") for pair in pairs)
    for line in written["t2i_slots"].read_text().splitlines():
        objects = json.loads(line)["objects"]
        assert [tuple(obj["center"]) for obj in objects] == list(SLOT_CENTRES[len(objects)])
    world = ShapesWorld(slots_world_config(0, 32, 8))
    reference = conversations.write_shapes(world, "val", tmp_path / "ref", 4, "images/val_slots", formats=("t2i",))
    assert written["t2i_slots"].read_bytes() == reference["t2i"].read_bytes()
    for pair in pairs:
        assert (tmp_path / "cli" / pair.image_key).read_bytes() == (tmp_path / "ref" / pair.image_key).read_bytes()


def test_conversation_cli_names_a_bad_grid_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--split", "val", "--limit", "2", "--out", str(tmp_path), "--image-size", "32", "--t2i-world", "slots"]
    for bad in ("0", "33"):
        with pytest.raises(SystemExit):
            conversations.main([*argv, "--grid-size", bad])
        assert f"--grid-size={bad}; expected 1..32 (the --image-size)" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_conversation_cli_passes_the_generation_world_options(tmp_path: Path) -> None:
    argv = ["--split", "val", "--limit", "6", "--out", str(tmp_path), "--image-size", "32"]
    written = conversations.main([*argv, "--max-objects", "1", "--backgrounds", "plain", "--snap-cells", "4"])
    pairs = read_text_image_pairs(written["t2i"])
    assert len(pairs) == 6
    for pair in pairs:
        assert not any(word in pair.caption for word in ("gradient", "striped", "checkered", "blotchy")), pair.caption
        (box,) = pair.boxes  # one object each
        assert all(abs(corner * 4 - round(corner * 4)) < 0.01 for corner in box[:2]), box


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------


def good_record(record_id: str = "good") -> dict:
    return {
        "id": record_id,
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\nwhat colour is the circle?"},
            {"from": "gpt", "value": "red"},
        ],
    }


def turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"from": role, "value": value} for role, value in pairs]


Q = ("human", f"{IMAGE_PLACEHOLDER}\nhow many?")
A = ("gpt", "two")


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"conversations": None}, "missing 'conversations'"),
        ({"conversations": turns(Q)}, r"the conversation has no answer \(no assistant turn\)"),
        (
            {"conversations": turns(Q, A, ("human", "and now?"))},
            r"the last turn \(turn 2\) is a user turn with no answer",
        ),
        ({"conversations": turns(Q, Q, A)}, "roles must alternate .* turn 1 is from the user"),
        ({"conversations": turns(A, Q, A)}, "roles must alternate .* turn 0 is from the assistant"),
        ({"conversations": turns(Q, ("robot", "two"))}, "turn 1 has unknown role 'robot'"),
        ({"conversations": turns(("human", "how many?"), A)}, "exactly one <image> placeholder, found 0"),
        ({"conversations": turns(Q, A, ("human", "<image> again?"), A)}, "exactly one <image> placeholder, found 2"),
        ({"image": "missing.png"}, r"image file not found: .*missing\.png"),
        ({"image": None}, r"1 <image> placeholder\(s\) but the record has no 'image'"),
        (
            {
                "conversations": [
                    {"from": Q[0], "value": Q[1]},
                    {"from": "gpt", "value": "two", "boxes": [[0.5, 0, 0.2, 1]]},
                ]
            },
            r"turn 1: box 0 is \[0.5, 0, 0.2, 1\]; expected \[left, top, right, bottom\] in image fractions",
        ),
        (
            {
                "conversations": [
                    {"from": Q[0], "value": Q[1]},
                    {"from": "gpt", "value": "two", "boxes": [0, 0, 1, 1]},
                ]
            },
            r"turn 1: box 0 is 0; expected \[left, top, right, bottom\]",
        ),
        (
            {
                "conversations": [
                    {"from": "human", "value": Q[1], "boxes": [[0, 0, 1, 1]]},
                    {"from": A[0], "value": A[1]},
                ]
            },
            "turn 0 has 'boxes' but is a user turn",
        ),
    ],
)
def test_conversation_errors_name_file_record_and_problem(tmp_path: Path, change: dict, problem: str) -> None:
    (tmp_path / "a.png").write_bytes(b"")  # only its existence is checked
    bad = {**good_record("bad"), **change}
    bad = {key: value for key, value in bad.items() if not (key == "conversations" and value is None)}
    path = tmp_path / "conv.json"
    path.write_text(json.dumps([good_record(), bad]))
    with pytest.raises(MetadataError, match=rf"{re.escape(str(path))}: record 1 id='bad': .*{problem}"):
        read_conversations(path)


def test_conversation_jsonl_errors_give_the_line_and_text_only_records_are_allowed(tmp_path: Path) -> None:
    text_only = {"id": "text", "conversations": turns(("human", "hi"), ("gpt", "hello"))}
    path = tmp_path / "conv.jsonl"
    path.write_text(json.dumps(text_only) + "\n\n" + json.dumps({**good_record("bad"), "image": "gone.png"}) + "\n")
    with pytest.raises(MetadataError, match=r"conv\.jsonl: record 1 \(line 3\) id='bad': image file not found"):
        read_conversations(path)
    records = read_conversations(path, check_files=False)
    assert records[0].image is None and records[0].image_key is None
    assert records[0].turns == [Turn("user", "hi"), Turn("assistant", "hello")]
    assert records[1].image == tmp_path / "gone.png"


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"image": "a.png", "caption": "  "}, "empty caption"),
        ({"image": "a.png"}, "missing 'caption'"),
        ({"caption": "a red circle"}, "missing 'image'"),
        ({"image": "missing.png", "caption": "a red circle"}, r"image file not found: .*missing\.png"),
        (
            {"image": "a.png", "caption": "a red circle", "boxes": [[0.2, 0.2, 0.1, 0.9]]},
            r"box 0 is \[0.2, 0.2, 0.1, 0.9\]",
        ),
    ],
)
def test_text_image_errors_name_file_record_and_problem(tmp_path: Path, record: dict, problem: str) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    path = tmp_path / "t2i.jsonl"
    path.write_text(json.dumps({"image": "a.png", "caption": "a blue square"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(MetadataError, match=rf"{re.escape(str(path))}: record 1 \(line 2\): .*{problem}"):
        read_text_image_pairs(path)


# --------------------------------------------------------------------------------------
# code shards
# --------------------------------------------------------------------------------------


def image_keys() -> list[str]:
    return [f"images/val/{i:06d}.png" for i in range(NUM_IMAGES)]


def encode_files(visual_tokenizer: DualTokenizer, root: Path, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([load_image(root / key, name=key, image_size=SIZE, convert_to_rgb=False) for key in keys])
    codes = visual_tokenizer.encode(images)
    return codes.pixel_codes, codes.semantic_codes


class Interrupted(Exception):
    """Stands in for a crash or Ctrl-C in the middle of tokenisation."""


def count_encodes(
    monkeypatch: pytest.MonkeyPatch, visual_tokenizer: DualTokenizer, fail_on_call: int | None = None
) -> list:
    """Wrap ``visual_tokenizer.encode``; returns the list of batch sizes it was called with."""
    calls: list[int] = []
    original = DualTokenizer.encode.__get__(visual_tokenizer)  # the real method, even when already wrapped

    def encode(images: torch.Tensor):
        if fail_on_call is not None and len(calls) + 1 == fail_on_call:
            raise Interrupted("simulated interruption")
        calls.append(len(images))
        return original(images)

    monkeypatch.setattr(visual_tokenizer, "encode", encode)
    return calls


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_code_store_holds_the_encoded_codes(visual_tokenizer: DualTokenizer, shapes_dir: Path, tmp_path: Path) -> None:
    keys = image_keys()
    # Duplicates and non-normalised spellings of one path are encoded once.
    paths = [*reversed(keys), keys[0], "./" + keys[1]]
    tokenize_to_shards(visual_tokenizer, paths, shapes_dir, tmp_path / "codes", batch_size=2, shard_size=2)
    store = CodeStore(tmp_path / "codes")
    assert len(store) == NUM_IMAGES and store.keys() == keys
    assert keys[2] in store and "./" + keys[2] in store and "images/val/999999.png" not in store
    meta = store.meta
    assert (meta.grid, meta.pixel_depth, meta.semantic_depth) == ((4, 4), 3, 2)
    assert (meta.pixel_codebook_size, meta.semantic_codebook_size, meta.dtype) == (32, 16, "int16")
    assert meta.shards == ["shard-00000", "shard-00001", "shard-00002"] and meta.complete
    pixel, semantic = encode_files(visual_tokenizer, shapes_dir, keys)
    assert len({tuple(codes.flatten().tolist()) for codes in pixel}) == NUM_IMAGES  # the check below can fail
    for index, key in enumerate(keys):
        stored_pixel, stored_semantic = store.get(key)
        assert stored_pixel.dtype == torch.long and stored_pixel.shape == (4, 4, 3)
        assert torch.equal(stored_pixel, pixel[index]) and torch.equal(stored_semantic, semantic[index])
    reopened = pickle.loads(pickle.dumps(store))  # as a spawned DataLoader worker gets it
    assert torch.equal(reopened.get(keys[4])[1], semantic[4])
    with pytest.raises(
        KeyError, match=rf"image 'images/val/999999\.png' has no codes in {re.escape(str(store.out_dir))}"
    ):
        store.get("images/val/999999.png")


def test_interrupted_tokenisation_resumes_to_the_same_result(
    visual_tokenizer: DualTokenizer, shapes_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = image_keys()
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    tokenize_to_shards(visual_tokenizer, keys, shapes_dir, reference, batch_size=2, shard_size=2)

    count_encodes(monkeypatch, visual_tokenizer, fail_on_call=2)  # dies while encoding the second shard
    with pytest.raises(Interrupted):
        tokenize_to_shards(visual_tokenizer, keys, shapes_dir, resumed, batch_size=2, shard_size=2)
    assert json.loads((resumed / "meta.json").read_text())["shards"] == ["shard-00000"]
    with pytest.raises(CodeShardsError, match=r"incomplete \(1 of 3 shards\)"):
        CodeStore(resumed)

    # Leftovers of a crash while saving shard 1 and of one between its rename and the meta.json update.
    for leftover in (".shard-00001.tmp", "shard-00001"):
        (resumed / leftover).mkdir(exist_ok=True)
        (resumed / leftover / "data-00000-of-00001.arrow").write_bytes(b"partial")
    calls = count_encodes(monkeypatch, visual_tokenizer)
    tokenize_to_shards(visual_tokenizer, keys, shapes_dir, resumed, batch_size=2, shard_size=2)
    assert calls == [2, 1]  # the finished first shard is not encoded again
    assert tree_bytes(resumed) == tree_bytes(reference)

    tokenize_to_shards(visual_tokenizer, keys, shapes_dir, resumed, batch_size=2, shard_size=2)
    assert calls == [2, 1]  # a complete folder is reused as is


def test_other_tokenizer_or_images_need_overwrite(shapes_dir: Path, tmp_path: Path) -> None:
    keys, out = image_keys(), tmp_path / "codes"
    tokenize_to_shards(tiny_visual_tokenizer(seed=0), keys, shapes_dir, out, shard_size=4)
    other = tiny_visual_tokenizer(seed=1)
    with pytest.raises(CodeShardsError, match="holds codes from another tokenizer .*pass overwrite=True"):
        tokenize_to_shards(other, keys, shapes_dir, out, shard_size=4)
    with pytest.raises(CodeShardsError, match="another image list .*keys_sha256"):
        tokenize_to_shards(tiny_visual_tokenizer(seed=0), keys[:3], shapes_dir, out, shard_size=4)
    tokenize_to_shards(other, keys, shapes_dir, out, shard_size=4, overwrite=True)
    store = CodeStore(out)
    assert store.meta.tokenizer_fingerprint == code_shards.tokenizer_fingerprint(other)
    pixel, semantic = encode_files(other, shapes_dir, keys[-1:])
    assert torch.equal(store.get(keys[-1])[0], pixel[0]) and torch.equal(store.get(keys[-1])[1], semantic[0])


def test_code_shards_cli_collects_both_formats(
    visual_tokenizer: DualTokenizer, shapes_dir: Path, tmp_path: Path
) -> None:
    visual_tokenizer.save_pretrained(tmp_path / "tokenizer")
    out = code_shards.main(
        [
            "--tokenizer",
            str(tmp_path / "tokenizer"),
            "--llava",
            str(shapes_dir / "llava.json"),
            "--t2i",
            str(shapes_dir / "t2i.jsonl"),
            "--out",
            str(tmp_path / "codes"),
            "--device",
            "cpu",
        ]
    )
    store = CodeStore(out)
    assert store.keys() == image_keys() and store.meta.tokenizer_path == str(tmp_path / "tokenizer")
    assert store.meta.tokenizer_fingerprint == code_shards.tokenizer_fingerprint(visual_tokenizer)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "t2i.jsonl").write_bytes((shapes_dir / "t2i.jsonl").read_bytes())
    with pytest.raises(ValueError, match="different folders .*pass --image-root"):
        code_shards.collect_image_paths([shapes_dir / "llava.json"], [tmp_path / "elsewhere" / "t2i.jsonl"])
