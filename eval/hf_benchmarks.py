"""Readers for the benchmarks as lmms-lab publishes them on the Hugging Face hub (parquet, images inside).

Each ``path`` is one parquet file or a folder of them (read in name order, as ``datasets`` does
for ``data/<split>-0000k-of-0000n.parquet``); nothing is downloaded. Image cells are the
``datasets`` ``Image`` feature as stored in parquet, a struct ``{bytes, path}``. A missing file or
column raises :class:`~eval.benchmarks.BenchmarkFormatError` naming the file and the column.

Layouts (column names as in the datasets' cards):

- ``lmms-lab/VQAv2`` (splits validation, testdev, test): question_id, question, image_id, image,
  answers (list of {answer, answer_confidence, answer_id}; empty in test-dev and test),
  answer_type, question_type, multiple_choice_answer.
- ``lmms-lab/GQA``: ``testdev_balanced_instructions`` (id, imageId, question, answer, fullAnswer,
  ...) and ``testdev_balanced_images`` (id, image), joined on imageId.
- ``lmms-lab/POPE`` (split test): id, question_id, question, answer (yes/no), image_source,
  image, category (adversarial / popular / random).
- ``lmms-lab/MME`` (split test): question_id (the image's file name, shared by its two
  questions), image, question, answer (Yes/No), category (the subtask).
- ``lmms-lab/MMBench`` (config en, splits dev / test): index, question, hint, A-D, answer,
  category, l2-category, image, source, split.
- ``lmms-lab/SEED-Bench`` (split test): question_id, question, choice_a-d, answer, data_id,
  data_type (image / video), question_type_id, image (a list of images; image questions hold one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.benchmarks import BenchmarkFormatError


@dataclass(frozen=True)
class BenchmarkRow:
    """One question of a hub benchmark. Ground truth: ``answers`` (VQAv2 annotators), ``answer``
    (a string, a yes/no label or an option letter; None when hidden) and ``options`` (letters ->
    texts) for multiple choice; everything else in ``extra``."""

    question_id: str
    question: str
    image_bytes: bytes
    answer: str | None = None
    answers: tuple[str, ...] = ()
    options: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image_source(self) -> bytes:
        return self.image_bytes


def parquet_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if files:
            return files
        raise BenchmarkFormatError(f"{path}: no *.parquet files in this folder")
    raise BenchmarkFormatError(f"{path}: parquet file or folder not found")


def read_parquet_rows(path: str | Path, columns: tuple[str, ...]) -> list[dict[str, Any]]:
    """The rows of one parquet file or folder, as dicts; every name in ``columns`` must be present."""
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for file in parquet_files(path):
        try:
            table = pq.read_table(file)
        except Exception as error:  # pyarrow raises its own types for truncated or foreign files
            raise BenchmarkFormatError(f"{file}: not a readable parquet file ({error})") from error
        missing = [name for name in columns if name not in table.column_names]
        if missing:
            raise BenchmarkFormatError(
                f"{file}: missing column(s) {', '.join(missing)}; found {', '.join(table.column_names)}"
            )
        rows.extend(table.to_pylist())
    if not rows:
        raise BenchmarkFormatError(f"{path}: no rows")
    return rows


def _image_bytes(cell: Any, where: str) -> bytes:
    if isinstance(cell, list):  # SEED-Bench stores a list of images
        cell = cell[0] if cell else None
    if isinstance(cell, dict):
        cell = cell.get("bytes")
    if not isinstance(cell, bytes) or not cell:
        raise BenchmarkFormatError(f"{where}: no image bytes (expected a datasets Image cell {{bytes, path}})")
    return cell


def _text(value: Any) -> str:
    """A text cell; pandas-written parquet stores missing hints as None or the string 'nan'."""
    if value is None:
        return ""
    text = str(value).strip()
    return "" if text.lower() == "nan" else text


def read_vqav2_parquet(path: str | Path) -> list[BenchmarkRow]:
    rows = read_parquet_rows(path, ("question_id", "question", "image"))
    samples = []
    for number, row in enumerate(rows):
        answers = tuple(str(entry["answer"]) for entry in (row.get("answers") or []))
        extra = {key: row.get(key) for key in ("image_id", "answer_type", "question_type") if row.get(key) is not None}
        samples.append(
            BenchmarkRow(
                question_id=str(row["question_id"]),
                question=str(row["question"]),
                image_bytes=_image_bytes(row["image"], f"{path}: row {number}"),
                answers=answers,
                extra=extra,
            )
        )
    return samples


def read_gqa_parquet(instructions: str | Path, images: str | Path) -> list[BenchmarkRow]:
    questions = read_parquet_rows(instructions, ("id", "imageId", "question", "answer"))
    pictures = {
        str(row["id"]): _image_bytes(row["image"], f"{images}: image {row['id']}")
        for row in read_parquet_rows(images, ("id", "image"))
    }
    samples = []
    for row in questions:
        image = pictures.get(str(row["imageId"]))
        if image is None:
            raise BenchmarkFormatError(f"{images}: no image {row['imageId']!r} (named by question {row['id']})")
        samples.append(
            BenchmarkRow(
                question_id=str(row["id"]),
                question=str(row["question"]),
                image_bytes=image,
                answer=str(row["answer"]),
                extra={"image_id": str(row["imageId"]), "full_answer": row.get("fullAnswer")},
            )
        )
    return samples


def _yes_no(value: Any, where: str) -> str:
    label = str(value).strip().lower()
    if label not in ("yes", "no"):
        raise BenchmarkFormatError(f"{where}: answer must be yes or no, got {value!r}")
    return label


def read_pope_parquet(path: str | Path, categories: list[str] | None = None) -> list[BenchmarkRow]:
    """POPE rows; ``categories`` (default all) picks among adversarial, popular and random."""
    rows = read_parquet_rows(path, ("question_id", "question", "answer", "image", "category"))
    samples = []
    for number, row in enumerate(rows):
        if categories is not None and row["category"] not in categories:
            continue
        where = f"{path}: row {number}"
        samples.append(
            BenchmarkRow(
                question_id=f"{row['category']}/{row['question_id']}",
                question=str(row["question"]),
                image_bytes=_image_bytes(row["image"], where),
                answer=_yes_no(row["answer"], where),
                extra={"category": str(row["category"]), "image_source": row.get("image_source")},
            )
        )
    if not samples:
        raise BenchmarkFormatError(f"{path}: no rows in categories {categories}")
    return samples


def read_mme_parquet(path: str | Path) -> list[BenchmarkRow]:
    """MME rows; the two questions of an image share its question_id, which groups them for acc+."""
    from eval.scoring import MME_SUBTASKS

    rows = read_parquet_rows(path, ("question_id", "question", "answer", "image", "category"))
    samples, seen = [], {}
    for number, row in enumerate(rows):
        where = f"{path}: row {number}"
        if row["category"] not in MME_SUBTASKS:
            raise BenchmarkFormatError(f"{where}: category {row['category']!r} is not an MME subtask")
        image_id = str(row["question_id"])
        seen[image_id] = seen.get(image_id, 0) + 1
        samples.append(
            BenchmarkRow(
                question_id=f"{row['category']}/{image_id}#{seen[image_id]}",
                question=str(row["question"]),
                image_bytes=_image_bytes(row["image"], where),
                answer=_yes_no(row["answer"], where),
                extra={"subtask": str(row["category"]), "image_id": image_id},
            )
        )
    return samples


def read_mmbench_parquet(path: str | Path) -> list[BenchmarkRow]:
    """MMBench rows with their options (empty cells are no option), hint and category."""
    rows = read_parquet_rows(path, ("index", "question", "A", "B", "image", "category"))
    samples = []
    for number, row in enumerate(rows):
        where = f"{path}: row {number} (index {row['index']})"
        options = {letter: _text(row.get(letter)) for letter in "ABCDEFGHI" if _text(row.get(letter))}
        if len(options) < 2:
            raise BenchmarkFormatError(f"{where}: fewer than two options")
        answer = _text(row.get("answer")) or None
        if answer is not None and answer not in options:
            raise BenchmarkFormatError(f"{where}: answer {answer!r} is not one of the options {sorted(options)}")
        samples.append(
            BenchmarkRow(
                question_id=str(row["index"]),
                question=str(row["question"]),
                image_bytes=_image_bytes(row["image"], where),
                answer=answer,
                options=options,
                extra={"hint": _text(row.get("hint")), "category": _text(row.get("category")) or "unknown"},
            )
        )
    return samples


def read_seed_bench_parquet(path: str | Path) -> list[BenchmarkRow]:
    """SEED-Bench image questions (video questions are skipped) with their evaluation dimension."""
    choice_columns = ("choice_a", "choice_b", "choice_c", "choice_d")
    rows = read_parquet_rows(
        path, ("question_id", "question", "answer", "data_type", "question_type_id", "image", *choice_columns)
    )
    samples = []
    for number, row in enumerate(rows):
        if row["data_type"] != "image":
            continue
        where = f"{path}: row {number} (question_id {row['question_id']})"
        options = {letter: str(row[column]) for letter, column in zip("ABCD", choice_columns, strict=True)}
        if row["answer"] not in options:
            raise BenchmarkFormatError(f"{where}: answer {row['answer']!r} is not A, B, C or D")
        samples.append(
            BenchmarkRow(
                question_id=str(row["question_id"]),
                question=str(row["question"]),
                image_bytes=_image_bytes(row["image"], where),
                answer=str(row["answer"]),
                options=options,
                extra={"dimension": int(row["question_type_id"])},
            )
        )
    if not samples:
        raise BenchmarkFormatError(f"{path}: no image questions")
    return samples
