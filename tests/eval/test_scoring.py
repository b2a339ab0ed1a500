"""Benchmark scoring against hand-worked cases of each official definition, and the local-file readers."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from eval.benchmarks import (
    BenchmarkFormatError,
    read_mme,
    read_multiple_choice_tsv,
    read_pope,
    read_seed_bench,
    read_vqav2,
)
from eval.scoring import (
    MME_SUBTASKS,
    MMERecord,
    circular_accuracy,
    extract_choice,
    mme_scores,
    mme_yes_no,
    multiple_choice_accuracy,
    pope_metrics,
    pope_yes_no,
)
from eval.vqa_rules import vqav2_accuracy

# ------------------------------------------------------------------------------- POPE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes, there is a dog in the image.", "yes"),
        ("No, there is no dog.", "no"),
        ("no", "no"),
        ("There is not a dog", "no"),
        ("I do not see one", "no"),
        # only the first sentence counts
        ("Yes. It is not a cat.", "yes"),
        # anything without the words No/no/not is yes, including nothing at all
        ("", "yes"),
        ("Nothing", "yes"),
        # official quirks: exact, case-sensitive words split on single spaces
        ("NO", "yes"),
        ("Not really", "yes"),
        ("no!", "yes"),
    ],
)
def test_pope_yes_no(text: str, expected: str) -> None:
    assert pope_yes_no(text) == expected


def test_pope_metrics_on_a_hand_counted_confusion_matrix() -> None:
    # 4 "yes" questions answered yes, yes, yes, no -> TP 3, FN 1;
    # 4 "no" questions answered yes, yes, no, no  -> FP 2, TN 2.
    labels = ["yes"] * 4 + ["no"] * 4
    predictions = ["Yes", "Yes, there is.", "yes", "No", "Yes", "yes", "No.", "There is not."]
    metrics = pope_metrics(predictions, labels)
    assert (metrics["tp"], metrics["fn"], metrics["fp"], metrics["tn"]) == (3, 1, 2, 2)
    assert metrics["accuracy"] == pytest.approx(5 / 8)
    assert metrics["precision"] == pytest.approx(3 / 5)
    assert metrics["recall"] == pytest.approx(3 / 4)
    # 2PR / (P + R) = 2 * 0.6 * 0.75 / 1.35 = 0.9 / 1.35 = 2/3
    assert metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["yes_ratio"] == pytest.approx(5 / 8)
    assert metrics["num_questions"] == 8


def test_pope_metrics_without_yes_predictions_scores_zero_precision() -> None:
    metrics = pope_metrics(["no", "no"], ["yes", "NO"])
    assert metrics["precision"] == metrics["recall"] == metrics["f1"] == 0.0
    assert metrics["accuracy"] == 0.5


def test_pope_metrics_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        pope_metrics(["yes", "no"], ["yes"])
    with pytest.raises(ValueError, match="'maybe'"):
        pope_metrics(["yes"], ["maybe"])


# -------------------------------------------------------------------------------- MME


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("no", "no"),
        ("No.", "no"),
        ("Yes, it is.", "yes"),
        ("Not sure", "no"),
        ("None", "no"),
        ("I think yes", "other"),
        ("", "other"),
    ],
)
def test_mme_yes_no(text: str, expected: str) -> None:
    assert mme_yes_no(text) == expected


def test_mme_scores_acc_and_acc_plus() -> None:
    records = [
        # existence: image 1 both right, image 2 one of two right
        # -> acc 3/4, acc+ 1/2 (image 2 counts for acc but not acc+), score 75 + 50 = 125
        MMERecord("existence", "1.jpg", "Yes", "yes"),
        MMERecord("existence", "1.jpg", "No", "no"),
        MMERecord("existence", "2.jpg", "Yes", "yes"),
        MMERecord("existence", "2.jpg", "Yes", "no"),
        # count: an unreadable answer is wrong -> acc 1/2, acc+ 0, score 50
        MMERecord("count", "3.jpg", "maybe", "Yes"),
        MMERecord("count", "3.jpg", "no", "No"),
        # code_reasoning (cognition): all right -> 200
        MMERecord("code_reasoning", "4.png", "yes", "yes"),
        MMERecord("code_reasoning", "4.png", "no", "no"),
    ]
    scores = mme_scores(records)
    existence = scores["subtasks"]["existence"]
    assert existence["acc"] == pytest.approx(0.75)
    assert existence["acc_plus"] == pytest.approx(0.5)
    assert existence["score"] == pytest.approx(125.0)
    assert (existence["num_questions"], existence["num_images"], existence["other"]) == (4, 2, 0)
    assert scores["subtasks"]["count"]["score"] == pytest.approx(50.0)
    assert scores["subtasks"]["count"]["other"] == 1
    assert scores["perception"] == pytest.approx(175.0)
    assert scores["cognition"] == pytest.approx(200.0)
    assert scores["total"] == pytest.approx(375.0)
    assert len(scores["missing_subtasks"]) == len(MME_SUBTASKS) - 3
    assert "OCR" in scores["missing_subtasks"] and "existence" not in scores["missing_subtasks"]


def test_mme_scores_rejects_bad_records() -> None:
    with pytest.raises(ValueError, match="unknown MME subtask 'ocr'"):
        mme_scores([MMERecord("ocr", "1.jpg", "yes", "yes")])
    with pytest.raises(ValueError, match="'maybe'"):
        mme_scores([MMERecord("OCR", "1.jpg", "yes", "maybe")])
    with pytest.raises(ValueError, match="at least one"):
        mme_scores([])


# -------------------------------------------------------------------- multiple choice

OPTIONS = {"A": "dog", "B": "cat", "C": "Vitamin C", "D": "dark red"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # letters in their usual dress
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B) cat", "B"),
        ("(b)", "B"),
        ("b) cat", "B"),
        ("b.", "B"),
        ("b", "B"),
        ("Option D", "D"),
        ("I think B", "B"),
        # answer phrases; they win over other letters mentioned
        ("The answer is B", "B"),
        ("The correct answer is (c).", "C"),
        ("Answer: d", "D"),
        ("The answer is B. A is wrong.", "B"),
        ("A is correct", "A"),
        # a lone lower-case "a" and a capital "A" before a word are the article, not option A
        ("a cat", "B"),
        ("A cat.", "B"),
        ("The answer is a cat", "B"),
        # the option's text: whole answer first, so "Vitamin C" is not read as letter C by accident
        ("Vitamin C", "C"),
        ("cat", "B"),
        ("It is a dog.", "A"),
        ("dark red", "D"),
        # ambiguous or empty -> None
        ("A or B", None),
        ("A. dog B. cat", None),
        ("The answer is A. The answer is B.", None),
        ("a dog and a cat", None),
        ("I don't know", None),
        ("E", None),
        ("", None),
    ],
)
def test_extract_choice(text: str, expected: str | None) -> None:
    assert extract_choice(text, OPTIONS) == expected


def test_extract_choice_nested_option_texts_are_ambiguous() -> None:
    # "dark red" contains "red": with both as options, only the exact whole answer decides.
    options = {"A": "red", "B": "dark red"}
    assert extract_choice("dark red", options) == "B"
    assert extract_choice("It is dark red", options) is None


def test_extract_choice_rejects_bad_option_keys() -> None:
    with pytest.raises(ValueError, match="single upper-case letters"):
        extract_choice("A", {"a": "dog", "b": "cat"})


def test_multiple_choice_accuracy() -> None:
    options = [{"A": "dog", "B": "cat"}] * 4
    metrics = multiple_choice_accuracy(["A", "(b) cat", "A or B", "B"], ["A", "B", "A", "A"], options)
    assert metrics == {"accuracy": 0.5, "correct": 2, "unparsed": 1, "num_questions": 4}
    with pytest.raises(ValueError, match="answer 'C' is not one of its options"):
        multiple_choice_accuracy(["A"], ["C"], [{"A": "dog", "B": "cat"}])


def test_circular_accuracy_needs_every_rotation_right() -> None:
    # question 1 and its copies 1000001, 2000001 all right; question 2's copy 1000002 wrong
    metrics = circular_accuracy([1, 1000001, 2000001, 2, 1000002], [True, True, True, True, False])
    assert metrics["accuracy"] == 0.5
    assert metrics["num_groups"] == 2
    assert metrics["vanilla_accuracy"] == pytest.approx(4 / 5)


# ------------------------------------------------------------------- readers: VQAv2


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def _vqav2_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    questions = {
        "data_subtype": "val2014",
        "questions": [
            {"question_id": 420, "image_id": 42, "question": "How many dogs?"},
            {"question_id": 73, "image_id": 7, "question": "Is it raining?"},
        ],
    }
    annotations = {
        "annotations": [
            {
                "question_id": 420,
                "image_id": 42,
                "question_type": "how many",
                "answer_type": "number",
                "multiple_choice_answer": "2",
                "answers": [{"answer": "2", "answer_id": i + 1} for i in range(3)]
                + [{"answer": "3", "answer_id": i + 4} for i in range(7)],
            },
            {
                "question_id": 73,
                "image_id": 7,
                "answer_type": "yes/no",
                "answers": [{"answer": "no", "answer_id": i + 1} for i in range(10)],
            },
        ]
    }
    image_dir = tmp_path / "val2014"
    _touch(image_dir / "COCO_val2014_000000000042.jpg")
    _touch(image_dir / "COCO_val2014_000000000007.jpg")
    return (
        _write_json(tmp_path / "questions.json", questions),
        _write_json(tmp_path / "annotations.json", annotations),
        image_dir,
    )


def test_read_vqav2_official_layout(tmp_path: Path) -> None:
    questions, annotations, image_dir = _vqav2_files(tmp_path)
    samples = read_vqav2(questions, image_dir, annotations)
    assert [sample.question_id for sample in samples] == [420, 73]
    first = samples[0]
    assert first.image_path == image_dir / "COCO_val2014_000000000042.jpg"
    assert first.question == "How many dogs?"
    assert first.answers == ("2",) * 3 + ("3",) * 7
    assert first.extra == {
        "image_id": 42,
        "question_type": "how many",
        "answer_type": "number",
        "multiple_choice_answer": "2",
    }
    assert vqav2_accuracy("two", first.answers) == pytest.approx(0.9)
    # test-dev style: questions only
    assert read_vqav2(questions, image_dir)[1].answers == ()


def test_read_vqav2_errors(tmp_path: Path) -> None:
    questions, annotations, image_dir = _vqav2_files(tmp_path)
    with pytest.raises(BenchmarkFormatError, match=r"nope\.json: VQAv2 questions file not found"):
        read_vqav2(tmp_path / "nope.json", image_dir)

    data = json.loads(questions.read_text())
    no_subtype = _write_json(tmp_path / "no_subtype.json", {"questions": data["questions"]})
    with pytest.raises(BenchmarkFormatError, match="no_subtype.json: missing 'data_subtype'"):
        read_vqav2(no_subtype, image_dir)

    data["questions"].append({"question_id": 99, "question": "Where?"})
    no_image_id = _write_json(tmp_path / "no_image_id.json", data)
    with pytest.raises(BenchmarkFormatError, match=r"no_image_id.json: questions\[2\]: missing 'image_id'"):
        read_vqav2(no_image_id, image_dir)

    data["questions"][-1]["image_id"] = 7
    extra_question = _write_json(tmp_path / "extra_question.json", data)
    with pytest.raises(BenchmarkFormatError, match="annotations.json: no annotation for question_id 99"):
        read_vqav2(extra_question, image_dir, annotations)

    (image_dir / "COCO_val2014_000000000007.jpg").unlink()
    with pytest.raises(BenchmarkFormatError, match=r"1 image\(s\) it names are missing, e\.g\. .*000000000007\.jpg"):
        read_vqav2(questions, image_dir, annotations)
    assert len(read_vqav2(questions, image_dir, annotations, check_images=False)) == 2

    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(BenchmarkFormatError, match="broken.json: not valid JSON"):
        read_vqav2(tmp_path / "broken.json", image_dir)


# -------------------------------------------------------------------- readers: POPE


def _pope_lines(records: list[dict]) -> str:
    return "\n".join(json.dumps(record) for record in records) + "\n\n"


POPE_RECORDS = [
    {
        "question_id": 1,
        "image": "COCO_val2014_000000310196.jpg",
        "text": "Is there a snowboard in the image?",
        "label": "yes",
    },
    {"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a dog in the image?", "label": "no"},
]


def test_read_pope_jsonl_and_json_array(tmp_path: Path) -> None:
    _touch(tmp_path / "images" / "COCO_val2014_000000310196.jpg")
    jsonl = tmp_path / "coco_pope_random.json"
    jsonl.write_text(_pope_lines(POPE_RECORDS))
    samples = read_pope(jsonl, tmp_path / "images")
    assert [(sample.question_id, sample.label) for sample in samples] == [(1, "yes"), (2, "no")]
    assert samples[0].question == "Is there a snowboard in the image?"
    assert samples[0].image_path == tmp_path / "images" / "COCO_val2014_000000310196.jpg"
    metrics = pope_metrics(["Yes, there is.", "Yes"], [sample.label for sample in samples])
    assert (metrics["tp"], metrics["fp"]) == (1, 1)

    array = _write_json(tmp_path / "pope_array.json", POPE_RECORDS)
    assert read_pope(array, tmp_path / "images") == samples


def test_read_pope_errors(tmp_path: Path) -> None:
    images = tmp_path / "images"
    _touch(images / "COCO_val2014_000000310196.jpg")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(_pope_lines(POPE_RECORDS[:1]) + "{oops\n")  # line 2 is blank
    with pytest.raises(BenchmarkFormatError, match=r"broken.jsonl:3: not valid JSON"):
        read_pope(broken, images)

    no_label = tmp_path / "no_label.jsonl"
    no_label.write_text(_pope_lines([{key: value for key, value in POPE_RECORDS[0].items() if key != "label"}]))
    with pytest.raises(BenchmarkFormatError, match="no_label.jsonl: line 1: missing 'label'"):
        read_pope(no_label, images)

    bad_label = tmp_path / "bad_label.jsonl"
    bad_label.write_text(_pope_lines([{**POPE_RECORDS[0], "label": "maybe"}]))
    with pytest.raises(BenchmarkFormatError, match="bad_label.jsonl: line 1: label must be yes or no, got 'maybe'"):
        read_pope(bad_label, images)

    other_image = tmp_path / "other_image.jsonl"
    other_image.write_text(_pope_lines([{**POPE_RECORDS[0], "image": "missing.jpg"}]))
    with pytest.raises(BenchmarkFormatError, match=r"other_image.jsonl: 1 image\(s\) it names are missing"):
        read_pope(other_image, images)

    with pytest.raises(BenchmarkFormatError, match="absent.jsonl: POPE questions file not found"):
        read_pope(tmp_path / "absent.jsonl", images)


# --------------------------------------------------------------------- readers: MME


def _mme_folder(root: Path) -> Path:
    """existence in the flat layout, artwork in the images/ + questions_answers_YN/ layout."""
    _touch(root / "existence" / "000000006040.jpg")
    (root / "existence" / "000000006040.txt").write_text(
        "Is there a train in this image? Please answer yes or no.\tYes\n"
        "Is there a bed in this image? Please answer yes or no.\tNo\n"
    )
    _touch(root / "artwork" / "images" / "10002.png")
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork created by Donatello? Please answer yes or no.\tYes\r\n"
        "Is this artwork created by Monet? Please answer yes or no.\tNo\r\n"
    )
    (root / "eval_tool").mkdir()
    return root


def test_read_mme_both_folder_layouts(tmp_path: Path) -> None:
    root = _mme_folder(tmp_path / "MME_Benchmark_release_version")
    samples = read_mme(root)
    assert [sample.extra["subtask"] for sample in samples] == ["existence"] * 2 + ["artwork"] * 2
    first = samples[0]
    assert first.question_id == "existence/000000006040.jpg#1"
    assert first.image_path == root / "existence" / "000000006040.jpg"
    assert first.question == "Is there a train in this image? Please answer yes or no."
    assert [sample.label for sample in samples] == ["yes", "no", "yes", "no"]
    assert samples[2].image_path == root / "artwork" / "images" / "10002.png"
    assert samples[2].extra["image_id"] == "10002.png"

    # perfect answers give 200 per subtask; one wrong answer costs both acc and acc+
    records = [MMERecord(s.extra["subtask"], s.extra["image_id"], s.label, s.label) for s in samples]
    records[-1] = MMERecord("artwork", "10002.png", "yes", "no")
    scores = mme_scores(records)
    assert scores["subtasks"]["existence"]["score"] == pytest.approx(200.0)
    assert scores["subtasks"]["artwork"]["score"] == pytest.approx(50.0)
    assert [sample.extra["subtask"] for sample in read_mme(root, subtasks=["artwork"])] == ["artwork"] * 2


def test_read_mme_errors(tmp_path: Path) -> None:
    root = _mme_folder(tmp_path / "mme")
    with pytest.raises(BenchmarkFormatError, match="MME folder not found"):
        read_mme(tmp_path / "absent")
    with pytest.raises(BenchmarkFormatError, match="none of the MME subtask folders"):
        read_mme(root / "eval_tool")
    with pytest.raises(BenchmarkFormatError, match="unknown MME subtask 'Existence'"):
        read_mme(root, subtasks=["Existence"])
    with pytest.raises(BenchmarkFormatError, match=r"mme/OCR: MME subtask folder not found"):
        read_mme(root, subtasks=["OCR"])

    (root / "existence" / "000000000001.txt").write_text("Is there a cat?\tYes\n")
    with pytest.raises(BenchmarkFormatError, match=r"000000000001\.txt: no image 000000000001\.jpg/\.png"):
        read_mme(root)
    _touch(root / "existence" / "000000000001.jpg")
    (root / "existence" / "000000000001.txt").write_text("Is there a cat? Yes\n")
    with pytest.raises(BenchmarkFormatError, match=r"000000000001\.txt:1: expected 'question<TAB>answer'"):
        read_mme(root)
    (root / "existence" / "000000000001.txt").write_text("Is there a cat?\tYes\nIs there a dog?\tMaybe\n")
    with pytest.raises(BenchmarkFormatError, match=r"000000000001\.txt:2: label must be yes or no, got 'Maybe'"):
        read_mme(root)


# ---------------------------------------------------------- readers: multiple choice


def _png_bytes(size: tuple[int, int] = (4, 3)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)
    return path


MMBENCH_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]


def test_read_mmbench_tsv_base64(tmp_path: Path) -> None:
    png = _png_bytes()
    encoded = base64.b64encode(png).decode()
    tsv = _write_tsv(
        tmp_path / "MMBench_DEV_EN.tsv",
        MMBENCH_HEADER,
        [
            [
                "1",
                'What is "this"?\nPick one.',
                "A hint",
                "dog",
                "cat",
                "bird",
                "fish",
                "B",
                "identity_reasoning",
                encoded,
            ],
            ["2", "Which colour?", "", "red", "blue", "", "", "A", "attribute_recognition", encoded],
            # a circular copy whose image cell names the row holding the image
            [
                "1000001",
                'What is "this"?\nPick one.',
                "A hint",
                "cat",
                "bird",
                "fish",
                "dog",
                "A",
                "identity_reasoning",
                "1",
            ],
        ],
    )
    samples = read_multiple_choice_tsv(tsv)
    first, second, copy = samples
    assert first.question_id == 1
    assert first.question == 'What is "this"?\nPick one.'
    assert first.options == {"A": "dog", "B": "cat", "C": "bird", "D": "fish"}
    assert first.answer == "B"
    assert first.extra == {"hint": "A hint", "category": "identity_reasoning"}
    assert first.image_path is None and first.image_bytes == png
    assert Image.open(io.BytesIO(first.image_source)).size == (4, 3)
    assert second.options == {"A": "red", "B": "blue"}  # empty C and D cells are no options
    assert copy.image_bytes == png
    hits = [
        extract_choice(prediction, sample.options) == sample.answer
        for prediction, sample in zip(["cat", "A", "dog"], samples, strict=True)
    ]
    assert circular_accuracy([sample.question_id for sample in samples], hits)["accuracy"] == 0.5


def test_read_mmbench_tsv_image_paths_and_hidden_answers(tmp_path: Path) -> None:
    _touch(tmp_path / "imgs" / "q1.jpg")
    tsv = _write_tsv(
        tmp_path / "test.tsv", ["index", "question", "A", "B", "image_path"], [["7", "Q?", "x", "y", "imgs/q1.jpg"]]
    )
    (sample,) = read_multiple_choice_tsv(tsv)
    assert sample.answer is None
    assert sample.image_path == tmp_path / "imgs" / "q1.jpg" and sample.image_bytes is None
    assert sample.image_source == sample.image_path


def test_read_mmbench_tsv_errors(tmp_path: Path) -> None:
    encoded = base64.b64encode(_png_bytes()).decode()
    no_a = _write_tsv(tmp_path / "no_a.tsv", ["index", "question", "B", "image"], [["1", "Q?", "x", encoded]])
    with pytest.raises(BenchmarkFormatError, match="no_a.tsv: missing column"):
        read_multiple_choice_tsv(no_a)
    no_image = _write_tsv(tmp_path / "no_image.tsv", ["index", "question", "A", "B"], [["1", "Q?", "x", "y"]])
    with pytest.raises(BenchmarkFormatError, match="no_image.tsv: missing column.*image or image_path"):
        read_multiple_choice_tsv(no_image)

    header = ["index", "question", "A", "B", "answer", "image"]
    bad_answer = _write_tsv(tmp_path / "bad_answer.tsv", header, [["1", "Q?", "x", "y", "C", encoded]])
    with pytest.raises(BenchmarkFormatError, match=r"bad_answer.tsv: row 2 \(index '1'\): answer 'C' is not one of"):
        read_multiple_choice_tsv(bad_answer)
    bad_base64 = _write_tsv(tmp_path / "bad_base64.tsv", header, [["1", "Q?", "x", "y", "A", "not base64!"]])
    with pytest.raises(BenchmarkFormatError, match="bad_base64.tsv: row 2 .*not valid base64"):
        read_multiple_choice_tsv(bad_base64)
    bad_index = _write_tsv(tmp_path / "bad_index.tsv", header, [["one", "Q?", "x", "y", "A", encoded]])
    with pytest.raises(BenchmarkFormatError, match="bad_index.tsv: row 2 .*index must be an integer"):
        read_multiple_choice_tsv(bad_index)
    short_row = _write_tsv(tmp_path / "short_row.tsv", header, [["1", "Q?", "x"]])
    with pytest.raises(BenchmarkFormatError, match="short_row.tsv: row 2 .*number of cells differs"):
        read_multiple_choice_tsv(short_row)
    missing_file = _write_tsv(
        tmp_path / "missing_file.tsv",
        ["index", "question", "A", "B", "image_path"],
        [["1", "Q?", "x", "y", "gone.jpg"]],
    )
    with pytest.raises(BenchmarkFormatError, match=r"missing_file.tsv: row 2 .*gone\.jpg not found"):
        read_multiple_choice_tsv(missing_file)


def _seed_question(question_id: str, data_id: str, data_type: str = "image") -> dict:
    return {
        "answer": "B",
        "choice_a": "One",
        "choice_b": "Two",
        "choice_c": "Three",
        "choice_d": "Four",
        "data_id": data_id,
        "data_type": data_type,
        "question": "How many towels are in the image?",
        "question_id": question_id,
        "question_type_id": 5,
    }


def test_read_seed_bench(tmp_path: Path) -> None:
    _touch(tmp_path / "SEED-Bench-image" / "1454426_2591111986.jpg")
    seed = _write_json(
        tmp_path / "SEED-Bench.json",
        {"questions": [_seed_question("101669", "1454426_2591111986"), _seed_question("v1", "clip.mp4", "video")]},
    )
    (sample,) = read_seed_bench(seed, tmp_path / "SEED-Bench-image")
    assert sample.question_id == "101669"
    assert sample.image_path == tmp_path / "SEED-Bench-image" / "1454426_2591111986.jpg"
    assert sample.options == {"A": "One", "B": "Two", "C": "Three", "D": "Four"}
    assert sample.answer == "B"
    assert sample.extra == {"question_type_id": 5, "data_id": "1454426_2591111986"}
    assert extract_choice("There are two towels.", sample.options) == "B"


def test_read_seed_bench_errors(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    question = _seed_question("1", "img")
    del question["choice_c"]
    no_choice = _write_json(tmp_path / "no_choice.json", {"questions": [question]})
    with pytest.raises(BenchmarkFormatError, match=r"no_choice.json: questions\[0\]: missing 'choice_c'"):
        read_seed_bench(no_choice, images)
    no_image = _write_json(tmp_path / "no_image.json", {"questions": [_seed_question("1", "img")]})
    with pytest.raises(BenchmarkFormatError, match=r"no_image.json: 1 image\(s\) it names are missing"):
        read_seed_bench(no_image, images)
    only_video = _write_json(tmp_path / "only_video.json", {"questions": [_seed_question("1", "a.mp4", "video")]})
    with pytest.raises(BenchmarkFormatError, match="only_video.json: no image questions"):
        read_seed_bench(only_video, images)
