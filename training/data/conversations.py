"""Conversation (LLaVA-format) and text-to-image data for the unified MLLM, and Shapes-world writers.

Formats read here (docs/data.md: understanding data and generation data):

- **Conversations**, the LLaVA layout: a JSON list (or JSON lines) of records
  ``{"id": str, "image"?: "relative/path.png", "conversations": [{"from": "human", "value":
  "<image>\\nwhat colour is the circle?"}, {"from": "gpt", "value": "red"}, ...]}``.
  Roles ``human``/``user`` become ``"user"`` and ``gpt``/``assistant`` become
  ``"assistant"``; turns must alternate, start with the user and end with an answer.
  A record with an image holds exactly one ``<image>`` placeholder, in a user turn; it is
  kept in the turn text so the chat template decides where the image tokens go.
  Records without ``"image"`` are text-only. An answer turn may carry ``"boxes": [[left, top,
  right, bottom], ...]`` (image fractions): the regions it is about, which the grounding loss
  (``stage.loss_weights.grounding``) uses; the Shapes writer gives the objects each answer names.
- **Text-to-image pairs**: JSON lines (or a JSON list) of ``{"image": "relative/path.png",
  "caption": str}``, optionally with ``"boxes"`` (where the caption's objects are, as above),
  which ``stage.object_pixel_weight`` uses.

Relative image paths are resolved against ``image_root`` (default: the annotation file's
folder); the path exactly as written is kept as ``image_key``, the key of the image's codes in
a :class:`training.data.code_store.CodeStore`. Keys other than the ones above are kept in
``meta`` (the Shapes writers add ``objects`` and, for conversations, ``kinds``: the QA kind
of each assistant turn, for evaluation by question type).

Every validation error is a :class:`MetadataError` naming the file, the record (index, line
for JSON lines, id) and the problem.

CLI: ``python -m training.data.conversations --split train --limit 20000 --out data/shapes``
writes ``llava.json``, ``t2i.jsonl`` and the PNGs they share under ``images/<split>/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from mllm.chat import Box
from training.data.readers import MetadataError
from training.data.shapes import (
    BACKGROUNDS,
    SPLITS,
    T2I_WORLDS,
    ShapesSample,
    ShapesWorld,
    ShapesWorldConfig,
    t2i_world_config,
)

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
LLAVA_FILE_NAME = "llava.json"
T2I_FILE_NAME = "t2i.jsonl"
ROLES: dict[str, str] = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_CONVERSATION_KEYS = ("id", "image", "conversations")
_PAIR_KEYS = ("image", "caption")  # required; "boxes" is optional
# rng stream of the per-image turn shuffle; distinct from the world's own streams ([seed, split] and
# [seed, split + 100]) because it has three entries.
_SHUFFLE_STREAM = 7


@dataclass(frozen=True)
class Turn:
    """One turn. ``boxes`` (answers only): the image regions the answer is about, each
    ``(left, top, right, bottom)`` in image fractions; empty when the data gives none."""

    role: str  # "user" or "assistant"
    text: str
    boxes: tuple[Box, ...] = ()


@dataclass
class Conversation:
    """One conversation. ``image``: resolved path, None for text-only; ``image_key``: the path as written."""

    id: str
    image: Path | None
    turns: list[Turn]
    image_key: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class TextImagePair:
    """One text-to-image example. ``image``: resolved path; ``image_key``: the path as written;
    ``boxes``: where the caption's objects are (image fractions), when the data says."""

    image: Path
    caption: str
    image_key: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    boxes: tuple[Box, ...] = ()


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------


def _read_records(path: Path) -> list[tuple[str, Any]]:
    """``(location, record)`` pairs of a JSON list or a JSON-lines file; bad JSON names the line.

    ``location`` reads ``"<file>: record <i> (line <n>)"`` for JSON lines and
    ``"<file>: record <i>"`` for a JSON list.
    """
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise MetadataError(f"{path}: invalid JSON at line {error.lineno} ({error.msg})") from error
        return [(f"{path}: record {index}", record) for index, record in enumerate(records)]
    located = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: record {len(located)} (line {line_number})"
        try:
            located.append((where, json.loads(line)))
        except json.JSONDecodeError as error:
            raise MetadataError(f"{where}: invalid JSON ({error.msg})") from error
    return located


def _resolve_image(
    record: dict[str, Any], where: str, image_root: Path, check_files: bool
) -> tuple[Path | None, str | None]:
    """``(resolved path, key as written)`` of the record's image, ``(None, None)`` when it has none."""
    key = record.get("image")
    if key is None:
        return None, None
    if not isinstance(key, str) or not key.strip():
        raise MetadataError(f"{where}: 'image' must be a non-empty path string, got {key!r}")
    resolved = image_root / key
    if check_files and not resolved.is_file():
        raise MetadataError(f"{where}: image file not found: {resolved} (image root {image_root})")
    return resolved, key


def _parse_turns(raw_turns: Any, where: str) -> list[Turn]:
    if not isinstance(raw_turns, list) or not raw_turns:
        raise MetadataError(f"{where}: 'conversations' must be a non-empty list of turns, got {raw_turns!r:.80}")
    turns = []
    for position, raw in enumerate(raw_turns):
        if not isinstance(raw, dict) or "from" not in raw or "value" not in raw:
            raise MetadataError(f"{where}: turn {position} must be an object with 'from' and 'value', got {raw!r:.80}")
        role = ROLES.get(raw["from"])
        if role is None:
            raise MetadataError(
                f"{where}: turn {position} has unknown role {raw['from']!r}; expected one of {sorted(ROLES)}"
            )
        if not isinstance(raw["value"], str):
            raise MetadataError(f"{where}: turn {position} 'value' must be a string, got {type(raw['value']).__name__}")
        boxes = _parse_boxes(raw.get("boxes"), f"{where}: turn {position}") if "boxes" in raw else ()
        if boxes and role != "assistant":
            raise MetadataError(f"{where}: turn {position} has 'boxes' but is a user turn; boxes belong to answers")
        turns.append(Turn(role=role, text=raw["value"], boxes=boxes))
    if not any(turn.role == "assistant" for turn in turns):
        raise MetadataError(f"{where}: the conversation has no answer (no assistant turn)")
    for position, turn in enumerate(turns):
        expected = "user" if position % 2 == 0 else "assistant"
        if turn.role != expected:
            raise MetadataError(
                f"{where}: roles must alternate user, assistant, user, ...; turn {position} is from the {turn.role}"
            )
    if turns[-1].role != "assistant":
        raise MetadataError(f"{where}: the last turn (turn {len(turns) - 1}) is a user turn with no answer")
    for position, turn in enumerate(turns):
        if turn.role == "assistant" and not turn.text.strip():
            raise MetadataError(f"{where}: turn {position} is an empty answer")
    return turns


def _parse_boxes(raw: Any, where: str) -> tuple[Box, ...]:
    """``[[left, top, right, bottom], ...]`` in image fractions (0 <= left < right <= 1, same for y)."""
    if not isinstance(raw, list):
        raise MetadataError(f"{where}: 'boxes' must be a list of [left, top, right, bottom] lists, got {raw!r:.80}")
    boxes = []
    for number, box in enumerate(raw):
        ok = isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
        if ok:
            left, top, right, bottom = (float(v) for v in box)
            ok = 0.0 <= left < right <= 1.0 and 0.0 <= top < bottom <= 1.0
        if not ok:
            raise MetadataError(
                f"{where}: box {number} is {box!r:.80}; expected [left, top, right, bottom] in image fractions "
                "with 0 <= left < right <= 1 and 0 <= top < bottom <= 1"
            )
        boxes.append((left, top, right, bottom))
    return tuple(boxes)


def _check_placeholders(turns: list[Turn], has_image: bool, where: str) -> None:
    count = sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in turns)
    if has_image and count != 1:
        raise MetadataError(
            f"{where}: a record with an image needs exactly one {IMAGE_PLACEHOLDER} placeholder, found {count}"
        )
    if not has_image and count:
        raise MetadataError(f"{where}: {count} {IMAGE_PLACEHOLDER} placeholder(s) but the record has no 'image'")
    for position, turn in enumerate(turns):
        if turn.role == "assistant" and IMAGE_PLACEHOLDER in turn.text:
            raise MetadataError(f"{where}: the {IMAGE_PLACEHOLDER} placeholder is in an answer (turn {position})")


def read_conversations(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, check_files: bool = True
) -> list[Conversation]:
    """Read a LLaVA-format conversation file (a JSON list or JSON lines); see the module docstring.

    ``image_root`` defaults to the file's folder. ``check_files`` checks that every image exists.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        MetadataError: a malformed record; the message names the file, the record and the problem.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    conversations = []
    for index, (location, record) in enumerate(_read_records(path)):
        if not isinstance(record, dict):
            raise MetadataError(f"{location}: expected a JSON object, got {type(record).__name__}")
        record_id = str(record.get("id", index))  # LLaVA data always has ids; others get their index
        where = f"{location} id={record_id!r}"
        if "conversations" not in record:
            raise MetadataError(f"{where}: missing 'conversations' (keys present: {sorted(record)})")
        turns = _parse_turns(record["conversations"], where)
        image, key = _resolve_image(record, where, root, check_files)
        _check_placeholders(turns, image is not None, where)
        meta = {name: value for name, value in record.items() if name not in _CONVERSATION_KEYS}
        conversations.append(Conversation(id=record_id, image=image, turns=turns, image_key=key, meta=meta))
    return conversations


def read_text_image_pairs(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, check_files: bool = True
) -> list[TextImagePair]:
    """Read text-to-image pairs (JSON lines, or a JSON list, of ``{"image", "caption"}``).

    ``image_root`` defaults to the file's folder. ``check_files`` checks that every image exists.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        MetadataError: a malformed record (missing or empty caption, missing image ...).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    pairs = []
    for location, record in _read_records(path):
        if not isinstance(record, dict):
            raise MetadataError(f"{location}: expected a JSON object, got {type(record).__name__}")
        for name in _PAIR_KEYS:
            if name not in record:
                raise MetadataError(f"{location}: missing {name!r} (keys present: {sorted(record)})")
        caption = record["caption"]
        if not isinstance(caption, str) or not caption.strip():
            raise MetadataError(f"{location}: empty caption {caption!r}; a text-to-image pair needs a text")
        image, key = _resolve_image(record, location, root, check_files)
        if image is None or key is None:
            raise MetadataError(f"{location}: 'image' is null; a text-to-image pair needs an image")
        boxes = _parse_boxes(record["boxes"], location) if "boxes" in record else ()
        meta = {name: value for name, value in record.items() if name not in (*_PAIR_KEYS, "boxes")}
        pairs.append(TextImagePair(image=image, caption=caption, image_key=key, meta=meta, boxes=boxes))
    return pairs


# --------------------------------------------------------------------------------------
# Shapes-world writers
# --------------------------------------------------------------------------------------


def _objects_record(sample: ShapesSample) -> list[dict[str, Any]]:
    return [
        {"colour": obj.colour, "shape": obj.shape, "size": obj.size, "center": list(obj.center)}
        for obj in sample.objects
    ]


def _rounded_box(box: tuple[float, float, float, float]) -> list[float]:
    """A box in image fractions, clipped to the image and rounded to 4 decimals for the JSON."""
    return [round(min(max(value, 0.0), 1.0), 4) for value in box]


def shapes_conversation_record(world: ShapesWorld, split: str, index: int, sample: ShapesSample, image: str) -> dict:
    """The LLaVA record of one Shapes sample: all its QA pairs as turns, in a per-image shuffled order.

    The order comes from its own rng stream ``[seed, split, index, 7]``, so it is deterministic
    and independent of how many samples are written.
    """
    rng = np.random.default_rng([world.config.seed, SPLITS.index(split), index, _SHUFFLE_STREAM])
    order = rng.permutation(len(sample.qa)).tolist()
    turns = []
    for position, qa_index in enumerate(order):
        pair = sample.qa[qa_index]
        question = pair.question
        turns.append({"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}" if position == 0 else question})
        answer: dict[str, Any] = {"from": "gpt", "value": pair.answer}
        if pair.referents:
            answer["boxes"] = [_rounded_box(sample.objects[index].box()) for index in pair.referents]
        turns.append(answer)
    return {
        "id": f"shapes-{split}-{index:06d}",
        "image": image,
        "conversations": turns,
        "objects": _objects_record(sample),
        "kinds": [sample.qa[qa_index].kind for qa_index in order],
    }


def shapes_t2i_record(sample: ShapesSample, image: str) -> dict:
    """The text-to-image record of one Shapes sample (``objects`` lets generation be checked)."""
    return {
        "image": image,
        "caption": sample.caption,
        "boxes": [_rounded_box(obj.box()) for obj in sample.objects],
        "objects": _objects_record(sample),
    }


def _write_atomic(path: Path, lines: Iterator[str], opening: str = "", closing: str = "") -> None:
    """Write ``opening + lines + closing`` to a temporary name, then rename it to ``path``."""
    from tokenizer.files import atomic_output

    with atomic_output(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        handle.write(opening)
        for line in lines:
            handle.write(line)
        handle.write(closing)


def write_shapes(
    world: ShapesWorld,
    split: str,
    out_dir: str | os.PathLike,
    limit: int | None = None,
    image_dir: str | os.PathLike | None = None,
    formats: Sequence[str] = ("llava", "t2i"),
    progress: bool = False,
    t2i_name: str = T2I_FILE_NAME,
) -> dict[str, Path]:
    """Render the first ``limit`` samples of ``split`` once: PNGs plus the annotation files of ``formats``.

    PNGs go to ``image_dir`` (relative to ``out_dir``; default ``images/<split>``) as
    ``<index:06d>.png``; annotation files (``llava.json``, ``t2i.jsonl``, one split per
    ``out_dir``: they are overwritten) refer to them relative to ``out_dir``, so both formats
    share the same files and keys. ``t2i_name`` renames the pairs file, so that pairs from another
    world can sit beside the default ones in one folder. Returns ``{format: annotation file}``.
    """
    unknown = sorted(set(formats) - {"llava", "t2i"})
    if unknown or not formats:
        raise ValueError(f"formats={list(formats)}; expected a non-empty subset of ['llava', 't2i']")
    out_dir = Path(out_dir)
    images = out_dir / (Path(image_dir) if image_dir is not None else Path("images") / split)
    images.mkdir(parents=True, exist_ok=True)
    count = world.split_size(split) if limit is None else min(limit, world.split_size(split))
    conversations: list[str] = []
    pairs: list[str] = []
    for index in tqdm(range(count), desc=f"shapes {split}", disable=not progress, unit="image"):
        sample = world.sample(split, index)
        png = images / f"{index:06d}.png"
        Image.fromarray(sample.image).save(png)
        key = Path(os.path.relpath(png, out_dir)).as_posix()
        if "llava" in formats:
            conversations.append(json.dumps(shapes_conversation_record(world, split, index, sample, key)))
        if "t2i" in formats:
            pairs.append(json.dumps(shapes_t2i_record(sample, key)) + "\n")
    written = {}
    if "llava" in formats:
        # A JSON list with one record per line: valid LLaVA input and still diff- and grep-friendly.
        written["llava"] = out_dir / LLAVA_FILE_NAME
        body = iter([",\n".join(conversations)])
        _write_atomic(written["llava"], body, "[\n", "\n]\n")
    if "t2i" in formats:
        written["t2i"] = out_dir / t2i_name
        _write_atomic(written["t2i"], iter(pairs))
    return written


def write_shapes_llava(
    world: ShapesWorld,
    split: str,
    out_dir: str | os.PathLike,
    limit: int | None = None,
    image_dir: str | os.PathLike | None = None,
) -> Path:
    """Write ``split`` (first ``limit`` samples) as PNGs + ``llava.json``; returns the JSON file.

    One record per image, all its QA pairs as a multi-turn conversation; extra keys
    ``objects`` and ``kinds`` (see :func:`shapes_conversation_record`).
    """
    return write_shapes(world, split, out_dir, limit, image_dir, formats=("llava",))["llava"]


def write_shapes_t2i(
    world: ShapesWorld,
    split: str,
    out_dir: str | os.PathLike,
    limit: int | None = None,
    image_dir: str | os.PathLike | None = None,
) -> Path:
    """Write ``split`` (first ``limit`` samples) as PNGs + ``t2i.jsonl`` (caption per image); returns the file."""
    return write_shapes(world, split, out_dir, limit, image_dir, formats=("t2i",))["t2i"]


def t2i_pairs_file(t2i_world: str) -> str:
    """Name of the pairs file of ``t2i_world`` beside a split's conversations (``t2i_grid.jsonl``, ...)."""
    return T2I_FILE_NAME if t2i_world == "scenes" else f"t2i_{t2i_world}.jsonl"


def write_world_pairs(
    world: ShapesWorld, t2i_world: str, split: str, out_dir: str | os.PathLike, limit: int | None = None
) -> Path:
    """Write ``split``'s pairs from the drawing world ``t2i_world`` beside the split's own files:
    ``t2i_<world>.jsonl``, images under ``images/<split>_<world>``; returns the pairs file."""
    image_dir = Path("images") / f"{split}_{t2i_world}"
    name = t2i_pairs_file(t2i_world)
    return write_shapes(world, split, out_dir, limit, image_dir, formats=("t2i",), progress=True, t2i_name=name)["t2i"]


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """``python -m training.data.conversations --split train --limit 20000 --out data/shapes``."""
    from training.common import setup_logging

    parser = argparse.ArgumentParser(
        prog="python -m training.data.conversations",
        description="Write a Shapes-world split as LLaVA conversations (llava.json) and text-to-image pairs "
        "(t2i.jsonl) sharing one folder of PNGs.",
    )
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--limit", type=int, default=None, help="first N samples (default: the whole split)")
    parser.add_argument("--out", required=True, help="output folder (one split per folder)")
    parser.add_argument("--seed", type=int, default=ShapesWorldConfig.seed, help="Shapes-world seed")
    parser.add_argument("--image-size", type=int, default=ShapesWorldConfig.image_size)
    parser.add_argument(
        "--max-objects", type=int, default=ShapesWorldConfig.max_objects, help="objects per scene, 1..N"
    )
    parser.add_argument(
        "--backgrounds", nargs="+", default=list(BACKGROUNDS), choices=BACKGROUNDS, help="background kinds to draw from"
    )
    parser.add_argument(
        "--snap-cells",
        type=int,
        default=0,
        help="start every object's bounding square on a lattice of N cells per side (0 = anywhere)",
    )
    parser.add_argument(
        "--t2i-world",
        default="scenes",
        choices=T2I_WORLDS,
        help="also write text-to-image pairs from a narrower world (t2i_<world>.jsonl, images under "
        "images/<split>_<world>), as `dualtoken tiny-mllm --t2i-world` does; the tiny stages train on 'slots'",
    )
    parser.add_argument(
        "--grid-size", type=int, default=8, help="code grid of the tokenizer the pairs are for (the tiny one's: 8)"
    )
    args = parser.parse_args(argv)
    if args.t2i_world != "scenes" and not 1 <= args.grid_size <= args.image_size:
        parser.error(f"--grid-size={args.grid_size}; expected 1..{args.image_size} (the --image-size)")
    setup_logging()
    config = ShapesWorldConfig(
        seed=args.seed,
        image_size=args.image_size,
        max_objects=args.max_objects,
        backgrounds=tuple(args.backgrounds),
        snap_cells=args.snap_cells,
    )
    written = write_shapes(ShapesWorld(config), args.split, args.out, args.limit, progress=True)
    if args.t2i_world != "scenes":
        pairs_world = ShapesWorld(t2i_world_config(args.t2i_world, args.seed, args.image_size, args.grid_size))
        written[f"t2i_{args.t2i_world}"] = write_world_pairs(
            pairs_world, args.t2i_world, args.split, args.out, args.limit
        )
    for name, path in written.items():
        logger.info("wrote %s: %s", name, path)
    return written


if __name__ == "__main__":
    main()
