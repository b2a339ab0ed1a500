"""Readers for the standard VQA benchmarks as users download them: local files only, no network.

Each reader returns a list of small frozen dataclasses (question id, image, question, the ground
truth, and everything else in ``extra``) to pair with the scoring in :mod:`eval.scoring`. A file
that is missing or malformed raises :class:`BenchmarkFormatError` naming the file (and line or
row) and the problem. Images are returned as paths (or, for base64 TSVs, as encoded bytes);
``sample.image_source`` feeds :func:`tokenizer.images.load_image` either way.

Layouts read:

- **VQAv2** (:func:`read_vqav2`): the official ``v2_OpenEnded_mscoco_<subtype>_questions.json``
  and, where released, ``v2_mscoco_<subtype>_annotations.json``; images are
  ``<image_dir>/COCO_<subtype>_<image_id:012d>.jpg`` with ``<subtype>`` (e.g. ``val2014``) taken
  from the questions file's ``data_subtype``.
- **POPE** (:func:`read_pope`): ``coco_pope_{random,popular,adversarial}.json``, which are JSON
  lines ``{"question_id", "image", "text", "label"}``; a JSON array of the same objects also works.
- **MME** (:func:`read_mme`): the released folder ``MME_Benchmark_release_version/``, one folder
  per subtask holding ``<name>.txt`` files of ``question<TAB>Yes|No`` lines next to the image
  ``<name>.jpg|png``, or (artwork, celebrity, landmark, posters, scene) the text files in
  ``questions_answers_YN/`` and the images in ``images/``. The single-TSV MME layout of VLMEvalKit
  is not read.
- **Multiple choice**: MMBench-style TSV (:func:`read_multiple_choice_tsv`: ``index``,
  ``question``, option columns ``A``, ``B``, ... and ``image`` as base64 or ``image_path``,
  optional ``answer``, ``hint``, ``category`` ...) and SEED-Bench's ``SEED-Bench.json``
  (:func:`read_seed_bench`, image questions only).
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.scoring import MME_SUBTASKS

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


class BenchmarkFormatError(ValueError):
    """A benchmark file is missing or malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class VQASample:
    """A VQAv2 question; ``answers`` holds the annotators' answers (10; empty for test splits)."""

    question_id: int
    image_path: Path
    question: str
    answers: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image_source(self) -> Path:
        return self.image_path


@dataclass(frozen=True)
class YesNoSample:
    """A POPE or MME question whose ground truth ``label`` is "yes" or "no"."""

    question_id: int | str
    image_path: Path
    question: str
    label: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image_source(self) -> Path:
        return self.image_path


@dataclass(frozen=True)
class ChoiceSample:
    """A multiple-choice question: ``options`` maps letters to texts; ``answer`` is None when hidden.

    The image is a file (``image_path``) or the encoded bytes of a base64 TSV (``image_bytes``).
    """

    question_id: int | str
    image_path: Path | None
    question: str
    options: dict[str, str]
    answer: str | None
    extra: dict[str, Any] = field(default_factory=dict)
    image_bytes: bytes | None = None

    @property
    def image_source(self) -> Path | bytes:
        return self.image_bytes if self.image_bytes is not None else self.image_path


# --------------------------------------------------------------------------------- helpers


def _existing_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise BenchmarkFormatError(f"{path}: {what} not found")
    return path


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise BenchmarkFormatError(f"{path}: not valid JSON ({error})") from error


def _require(record: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(record, dict):
        raise BenchmarkFormatError(f"{where}: expected an object, got {type(record).__name__}")
    missing = [key for key in keys if key not in record]
    if missing:
        raise BenchmarkFormatError(f"{where}: missing {', '.join(repr(key) for key in missing)}")


def _yes_no(label: Any, where: str) -> str:
    normalized = str(label).strip().lower()
    if normalized not in ("yes", "no"):
        raise BenchmarkFormatError(f"{where}: label must be yes or no, got {label!r}")
    return normalized


def _check_images(paths: list[Path], source: Path) -> None:
    missing = sorted(path for path in set(paths) if not path.is_file())
    if missing:
        raise BenchmarkFormatError(
            f"{source}: {len(missing)} image(s) it names are missing, e.g. {missing[0]}"
            " (pass check_images=False to read the questions anyway)"
        )


def _with_image_suffix(path: Path) -> Path:
    """``path`` itself when it exists, else the first ``path.<image suffix>`` that does (SEED ids)."""
    if path.is_file():
        return path
    for suffix in IMAGE_SUFFIXES:
        candidate = path.with_name(path.name + suffix)
        if candidate.is_file():
            return candidate
    return path


# ----------------------------------------------------------------------------------- VQAv2


def read_vqav2(
    questions_file: str | Path,
    image_dir: str | Path,
    annotations_file: str | Path | None = None,
    *,
    check_images: bool = True,
) -> list[VQASample]:
    """VQAv2 questions, with the annotators' answers when ``annotations_file`` is given.

    ``extra`` holds image_id and, with annotations, question_type, answer_type and
    multiple_choice_answer. Every question must have an annotation when annotations are given.
    """
    questions_path = _existing_file(questions_file, "VQAv2 questions file")
    data = _load_json(questions_path)
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise BenchmarkFormatError(f"{questions_path}: expected an object with a 'questions' list")
    subtype = data.get("data_subtype")
    if not subtype:
        raise BenchmarkFormatError(
            f"{questions_path}: missing 'data_subtype' (e.g. 'val2014'), which names the images"
            " COCO_<data_subtype>_<image_id>.jpg"
        )

    annotations: dict[int, dict] = {}
    if annotations_file is not None:
        annotations_path = _existing_file(annotations_file, "VQAv2 annotations file")
        annotation_data = _load_json(annotations_path)
        if not isinstance(annotation_data, dict) or not isinstance(annotation_data.get("annotations"), list):
            raise BenchmarkFormatError(f"{annotations_path}: expected an object with an 'annotations' list")
        for position, annotation in enumerate(annotation_data["annotations"]):
            where = f"{annotations_path}: annotations[{position}]"
            _require(annotation, ("question_id", "answers"), where)
            if not isinstance(annotation["answers"], list) or not annotation["answers"]:
                raise BenchmarkFormatError(f"{where}: 'answers' must be a non-empty list")
            for answer in annotation["answers"]:
                _require(answer, ("answer",), f"{where}.answers")
            annotations[int(annotation["question_id"])] = annotation

    image_dir = Path(image_dir)
    samples = []
    for position, question in enumerate(data["questions"]):
        _require(question, ("question_id", "image_id", "question"), f"{questions_path}: questions[{position}]")
        question_id, image_id = int(question["question_id"]), int(question["image_id"])
        extra: dict[str, Any] = {"image_id": image_id}
        answers: tuple[str, ...] = ()
        if annotations_file is not None:
            annotation = annotations.get(question_id)
            if annotation is None:
                raise BenchmarkFormatError(f"{annotations_path}: no annotation for question_id {question_id}")
            answers = tuple(str(answer["answer"]) for answer in annotation["answers"])
            for key in ("question_type", "answer_type", "multiple_choice_answer"):
                if key in annotation:
                    extra[key] = annotation[key]
        samples.append(
            VQASample(
                question_id=question_id,
                image_path=image_dir / f"COCO_{subtype}_{image_id:012d}.jpg",
                question=str(question["question"]),
                answers=answers,
                extra=extra,
            )
        )
    if check_images:
        _check_images([sample.image_path for sample in samples], questions_path)
    return samples


# ------------------------------------------------------------------------------------ POPE


def read_pope(questions_file: str | Path, image_dir: str | Path, *, check_images: bool = True) -> list[YesNoSample]:
    """POPE questions: JSON lines (the released format) or a JSON array of the same objects."""
    path = _existing_file(questions_file, "POPE questions file")
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        records = list(enumerate(_load_json(path), start=1))
        where = "item"
    else:
        records = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((line_number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise BenchmarkFormatError(f"{path}:{line_number}: not valid JSON ({error})") from error
        where = "line"

    image_dir = Path(image_dir)
    samples = []
    for number, record in records:
        location = f"{path}: {where} {number}"
        _require(record, ("question_id", "image", "text", "label"), location)
        samples.append(
            YesNoSample(
                question_id=record["question_id"],
                image_path=image_dir / str(record["image"]),
                question=str(record["text"]),
                label=_yes_no(record["label"], location),
                extra={
                    key: value for key, value in record.items() if key not in ("question_id", "image", "text", "label")
                },
            )
        )
    if not samples:
        raise BenchmarkFormatError(f"{path}: no questions")
    if check_images:
        _check_images([sample.image_path for sample in samples], path)
    return samples


# ------------------------------------------------------------------------------------- MME


def _mme_subtask(root: Path, subtask: str) -> list[YesNoSample]:
    folder = root / subtask
    if (folder / "questions_answers_YN").is_dir():
        text_dir, image_dir = folder / "questions_answers_YN", folder / "images"
    else:
        text_dir = image_dir = folder
    if not image_dir.is_dir():
        raise BenchmarkFormatError(f"{image_dir}: MME image folder not found")
    images = {path.stem: path for path in sorted(image_dir.iterdir()) if path.suffix in IMAGE_SUFFIXES}
    text_files = sorted(text_dir.glob("*.txt"))
    if not text_files:
        raise BenchmarkFormatError(f"{text_dir}: no question files (*.txt) for MME subtask {subtask}")

    samples = []
    for text_file in text_files:
        image_path = images.get(text_file.stem)
        if image_path is None:
            raise BenchmarkFormatError(f"{text_file}: no image {text_file.stem}.jpg/.png in {image_dir}")
        lines = [line for line in text_file.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        if not lines:
            raise BenchmarkFormatError(f"{text_file}: no questions")
        for line_number, line in enumerate(lines, start=1):
            if "\t" not in line:
                raise BenchmarkFormatError(f"{text_file}:{line_number}: expected 'question<TAB>answer', got {line!r}")
            question, label = line.rsplit("\t", 1)
            samples.append(
                YesNoSample(
                    question_id=f"{subtask}/{image_path.name}#{line_number}",
                    image_path=image_path,
                    question=question.strip(),
                    label=_yes_no(label, f"{text_file}:{line_number}"),
                    extra={"subtask": subtask, "image_id": image_path.name},
                )
            )
    return samples


def read_mme(root: str | Path, subtasks: list[str] | None = None) -> list[YesNoSample]:
    """MME questions from the released folder; ``extra`` holds subtask and image_id (for acc+).

    ``subtasks`` defaults to every official subtask folder found under ``root`` (other folders,
    e.g. ``eval_tool``, are ignored); a subtask asked for by name must exist.
    """
    root = Path(root)
    if not root.is_dir():
        raise BenchmarkFormatError(f"{root}: MME folder not found")
    if subtasks is None:
        subtasks = [name for name in MME_SUBTASKS if (root / name).is_dir()]
        if not subtasks:
            raise BenchmarkFormatError(f"{root}: none of the MME subtask folders ({', '.join(MME_SUBTASKS)})")
    for name in subtasks:
        if name not in MME_SUBTASKS:
            raise BenchmarkFormatError(f"unknown MME subtask {name!r}; the subtasks are {', '.join(MME_SUBTASKS)}")
        if not (root / name).is_dir():
            raise BenchmarkFormatError(f"{root / name}: MME subtask folder not found")
    return [sample for name in subtasks for sample in _mme_subtask(root, name)]


# ------------------------------------------------------------------------- multiple choice


def _read_tsv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    # Base64 image cells are far longer than csv's default 128 KiB field limit.
    previous_limit = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except csv.Error as error:
        raise BenchmarkFormatError(f"{path}: not a readable TSV ({error})") from error
    finally:
        csv.field_size_limit(previous_limit)
    return columns, rows


def read_multiple_choice_tsv(tsv_file: str | Path, image_root: str | Path | None = None) -> list[ChoiceSample]:
    """MMBench-style TSV: index, question, options A, B, ... (empty cells = no such option), image.

    The image is the ``image`` column (base64; a cell holding only another row's index, as in
    MMBench's circular copies, reuses that row's image) or the ``image_path`` column (relative to
    ``image_root``, default the TSV's folder). ``answer`` is optional (hidden in test splits); the
    other columns (hint, category, l2-category, split ...) go to ``extra``.
    """
    path = _existing_file(tsv_file, "multiple-choice TSV")
    columns, rows = _read_tsv(path)
    missing = [column for column in ("index", "question", "A", "B") if column not in columns]
    if "image" not in columns and "image_path" not in columns:
        missing.append("image or image_path")
    if missing:
        raise BenchmarkFormatError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(columns)}")
    if not rows:
        raise BenchmarkFormatError(f"{path}: no questions")
    option_columns = [letter for letter in string.ascii_uppercase if letter in columns]
    used = {"index", "question", "answer", "image", "image_path", *option_columns}
    image_root = Path(image_root) if image_root is not None else path.parent
    images_by_index = {row["index"]: row.get("image") or "" for row in rows}

    samples = []
    for row_number, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{path}: row {row_number} (index {row.get('index')!r})"
        try:
            question_id = int(row["index"])
        except (TypeError, ValueError) as error:
            raise BenchmarkFormatError(f"{where}: index must be an integer") from error
        if None in row or None in row.values():
            raise BenchmarkFormatError(f"{where}: number of cells differs from the header's {len(columns)}")
        options = {letter: row[letter].strip() for letter in option_columns if row[letter].strip()}
        if len(options) < 2:
            raise BenchmarkFormatError(f"{where}: fewer than two options")
        answer = (row.get("answer") or "").strip() or None
        if answer is not None and answer not in options:
            raise BenchmarkFormatError(f"{where}: answer {answer!r} is not one of the options {sorted(options)}")

        image_path, image_bytes = None, None
        encoded = (row.get("image") or "").strip()
        if encoded.isdigit() and encoded in images_by_index:
            encoded = images_by_index[encoded].strip()
        if encoded:
            try:
                image_bytes = base64.b64decode(encoded, validate=True)
            except binascii.Error as error:
                raise BenchmarkFormatError(f"{where}: image is not valid base64 ({error})") from error
        elif row.get("image_path"):
            image_path = image_root / row["image_path"]
            if not image_path.is_file():
                raise BenchmarkFormatError(f"{where}: image {image_path} not found")
        else:
            raise BenchmarkFormatError(f"{where}: no image (empty image and image_path)")
        samples.append(
            ChoiceSample(
                question_id=question_id,
                image_path=image_path,
                question=row["question"],
                options=options,
                answer=answer,
                extra={key: value for key, value in row.items() if key not in used},
                image_bytes=image_bytes,
            )
        )
    return samples


SEED_CHOICE_KEYS: dict[str, str] = {"A": "choice_a", "B": "choice_b", "C": "choice_c", "D": "choice_d"}


def read_seed_bench(json_file: str | Path, image_dir: str | Path, *, check_images: bool = True) -> list[ChoiceSample]:
    """SEED-Bench(-1) image questions (``data_type == "image"``; video questions are skipped).

    The image is ``<image_dir>/<data_id>``, or that name plus an image suffix when the id has none.
    ``extra`` holds question_type_id and data_id.
    """
    path = _existing_file(json_file, "SEED-Bench JSON")
    data = _load_json(path)
    questions = data.get("questions") if isinstance(data, dict) else data
    if not isinstance(questions, list):
        raise BenchmarkFormatError(f"{path}: expected a 'questions' list")
    image_dir = Path(image_dir)
    required = ("question_id", "question", "answer", "data_id", "data_type", *SEED_CHOICE_KEYS.values())
    samples = []
    for position, question in enumerate(questions):
        where = f"{path}: questions[{position}]"
        _require(question, required, where)
        if question["data_type"] != "image":
            continue
        if question["answer"] not in SEED_CHOICE_KEYS:
            raise BenchmarkFormatError(f"{where}: answer {question['answer']!r} is not A, B, C or D")
        samples.append(
            ChoiceSample(
                question_id=str(question["question_id"]),
                image_path=_with_image_suffix(image_dir / str(question["data_id"])),
                question=str(question["question"]),
                options={letter: str(question[key]) for letter, key in SEED_CHOICE_KEYS.items()},
                answer=question["answer"],
                extra={"question_type_id": question.get("question_type_id"), "data_id": question["data_id"]},
            )
        )
    if not samples:
        raise BenchmarkFormatError(f"{path}: no image questions")
    if check_images:
        _check_images([sample.image_path for sample in samples if sample.image_path is not None], path)
    return samples
