"""Each benchmark the paper reports, read from its hub layout (tests/eval/fixtures/) and scored end to end.

A scripted pipeline answers each prompt as the test decides, so every score below is known exactly;
the readers, prompts, preprocessing, cache and scoring are the real ones.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from benchmark_fixtures import FIXTURES, run

from eval.benchmarks import BenchmarkFormatError
from eval.hf_benchmarks import (
    read_gqa_parquet,
    read_mmbench_parquet,
    read_mme_parquet,
    read_pope_parquet,
    read_seed_bench_parquet,
    read_vqav2_parquet,
)


def test_readers_on_the_hub_layout() -> None:
    vqa = read_vqav2_parquet(FIXTURES / "vqav2_validation.parquet")
    assert [s.question_id for s in vqa] == ["262148000", "262148001", "393225000"]
    assert len(vqa[0].answers) == 10 and vqa[0].extra["answer_type"] == "other"
    assert read_vqav2_parquet(FIXTURES / "vqav2_testdev.parquet")[0].answers == ()
    gqa = read_gqa_parquet(
        FIXTURES / "gqa_testdev_balanced_instructions.parquet", FIXTURES / "gqa_testdev_balanced_images.parquet"
    )
    assert [(s.question_id, s.answer, s.extra["image_id"]) for s in gqa][0] == ("20968379", "no", "n288870")
    pope = read_pope_parquet(FIXTURES / "pope_test.parquet")
    assert len(pope) == 6 and {s.extra["category"] for s in pope} == {"adversarial", "popular", "random"}
    assert len(read_pope_parquet(FIXTURES / "pope_test.parquet", ["random"])) == 2
    mme = read_mme_parquet(FIXTURES / "mme_test.parquet")
    assert len(mme) == 8 and len({s.question_id for s in mme}) == 8 and mme[0].answer == "yes"
    mmbench = read_mmbench_parquet(FIXTURES / "mmbench_dev_en.parquet")
    assert mmbench[0].options == {"A": "red", "B": "green", "C": "blue"} and mmbench[1].extra["hint"] == ""
    seed = read_seed_bench_parquet(FIXTURES / "seed_bench_test.parquet")
    assert [s.question_id for s in seed] == ["101", "102", "103"]  # the video question is skipped
    assert seed[2].extra["dimension"] == 5


def test_readers_name_the_file_and_column(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    broken = tmp_path / "pope.parquet"
    pq.write_table(pa.Table.from_pylist([{"question_id": "1", "question": "?"}]), broken)
    with pytest.raises(BenchmarkFormatError, match=r"pope\.parquet: missing column\(s\) answer, image, category"):
        read_pope_parquet(broken)
    with pytest.raises(BenchmarkFormatError, match="parquet file or folder not found"):
        read_mme_parquet(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchmarkFormatError, match=r"no \*\.parquet files"):
        read_mme_parquet(tmp_path / "empty")


def test_vqav2_validation_scores_and_answer_file(tmp_path: Path) -> None:
    answers = {"bus": "Red.", "people": "two", "raining": "No"}
    metrics, pipe = run(
        tmp_path,
        "vqav2",
        {"parquet": str(FIXTURES / "vqav2_validation.parquet")},
        lambda prompt: next(a for word, a in answers.items() if word in prompt),
    )
    # "red" against 3 x red + 7 x dark red: 0.9. "two" -> "2" against 2 x "2" + 2 x "two" (both
    # become "2") + 6 x "3": 4 matches -> 1. "no" against ten "no": 1.
    assert metrics["accuracy"] == pytest.approx((0.9 + 1 + 1) / 3)
    assert metrics["answer_type/other"] == pytest.approx(0.9)
    assert metrics["answer_type/number"] == 1.0 and metrics["answer_type/yes/no"] == 1.0
    assert metrics["questions"] == 3 and metrics["scored"] == 3
    assert pipe.prompts[0] == "What color is the bus?\nAnswer the question using a single word or phrase."
    written = json.loads((tmp_path / metrics["answer_file"]).read_text())
    assert written[0] == {"question_id": 262148000, "answer": "red"}


def test_vqav2_testdev_writes_the_upload_file_only(tmp_path: Path) -> None:
    metrics, _ = run(tmp_path, "vqav2", {"parquet": str(FIXTURES / "vqav2_testdev.parquet")}, lambda p: "A table!")
    assert "accuracy" not in metrics and metrics["questions"] == 1
    assert json.loads((tmp_path / "vqav2_answers.json").read_text()) == [{"question_id": 4195880, "answer": "table"}]


def test_gqa_exact_match(tmp_path: Path) -> None:
    answers = {"left": "No.", "made": "Glass", "wearing": "woman"}
    options = {
        "instructions": str(FIXTURES / "gqa_testdev_balanced_instructions.parquet"),
        "images": str(FIXTURES / "gqa_testdev_balanced_images.parquet"),
    }
    metrics, _ = run(tmp_path, "gqa", options, lambda p: next(a for w, a in answers.items() if w in p))
    assert metrics == {"accuracy": pytest.approx(2 / 3), "correct": 2, "num_questions": 3}


def test_pope_per_category(tmp_path: Path) -> None:
    # The fixture's rows ask about a dog (yes) and a cat (no) in each category; the script answers
    # adversarial right, popular always "Yes", random always "No, there is not.", told apart by
    # the image (each category's rows are read in order, two per category).
    seen: list[str] = []

    def script(prompt: str) -> str:
        seen.append(prompt)
        category = ("adversarial", "popular", "random")[(len(seen) - 1) // 2]
        if category == "adversarial":
            return "Yes" if "dog" in prompt else "No"
        return "Yes" if category == "popular" else "No, there is not."

    metrics, _ = run(tmp_path, "pope", {"parquet": str(FIXTURES / "pope_test.parquet")}, script)
    assert metrics["adversarial/accuracy"] == 1.0 and metrics["adversarial/f1"] == 1.0
    assert metrics["popular/accuracy"] == 0.5 and metrics["popular/precision"] == 0.5
    assert metrics["popular/f1"] == pytest.approx(2 / 3) and metrics["popular/yes_ratio"] == 1.0
    assert metrics["random/accuracy"] == 0.5 and metrics["random/f1"] == 0.0 and metrics["random/yes_ratio"] == 0.0
    assert metrics["mean/accuracy"] == pytest.approx(2 / 3)
    assert metrics["mean/f1"] == pytest.approx(5 / 9)
    assert metrics["popular/num_questions"] == 2


def test_mme_per_subtask_acc_plus(tmp_path: Path) -> None:
    def right(prompt: str) -> str:
        return "Yes" if "Is the answer yes" in prompt else "No"

    metrics, _ = run(tmp_path / "a", "mme", {"parquet": str(FIXTURES / "mme_test.parquet")}, right)
    assert metrics["existence/score"] == 200.0 and metrics["total"] == 400.0

    def wrong_on_0002(prompt: str) -> str:
        return "Yes" if "0002.png" in prompt else right(prompt)

    metrics, _ = run(tmp_path / "b", "mme", {"parquet": str(FIXTURES / "mme_test.parquet")}, wrong_on_0002)
    # Per subtask, image 0002's "no" question is wrong: acc 3/4, acc+ 1/2 -> 100 (0.75 + 0.5) = 125.
    assert metrics["existence/acc"] == 0.75 and metrics["existence/acc_plus"] == 0.5
    assert metrics["existence/score"] == pytest.approx(125.0)
    assert metrics["code_reasoning/score"] == pytest.approx(125.0)
    assert metrics["perception"] == pytest.approx(125.0) and metrics["cognition"] == pytest.approx(125.0)
    assert metrics["total"] == pytest.approx(250.0) and metrics["missing_subtasks"] == 12


def test_mmbench_circular_with_hint_per_category(tmp_path: Path) -> None:
    # Question 10 is answered by the letter that reads "blue" in each rotation; question 11 always "A".
    def script(prompt: str) -> str:
        if "colour" in prompt:
            return re.search(r"^([A-Z])\. blue$", prompt, re.MULTILINE).group(1)
        return "A"

    metrics, pipe = run(tmp_path, "mmbench", {"parquet": str(FIXTURES / "mmbench_dev_en.parquet")}, script)
    assert len(pipe.prompts) == 3 + 2  # every rotation of each question
    assert pipe.prompts[0] == (
        "The picture shows a square.\nWhich colour is the square?\nA. red\nB. green\nC. blue\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert pipe.prompts[1].splitlines()[2:5] == ["A. green", "B. blue", "C. red"]
    assert pipe.prompts[3].startswith("How many squares are there?\nA. one")  # no hint, no empty line
    assert metrics["circular_accuracy"] == 0.5 and metrics["vanilla_accuracy"] == 1.0
    assert metrics["category/attribute_recognition"] == 1.0 and metrics["category/object_localization"] == 0.0
    assert metrics["questions"] == 2 and metrics["unparsed"] == 0


def test_seed_bench_per_dimension(tmp_path: Path) -> None:
    answers = {"101": "A", "102": "banana", "103": "A"}
    metrics, _ = run(
        tmp_path,
        "seed_bench",
        {"parquet": str(FIXTURES / "seed_bench_test.parquet")},
        lambda p: next(a for q, a in answers.items() if f"Question {q}?" in p),
    )
    assert metrics == {
        "accuracy": pytest.approx(2 / 3),
        "questions": 3,
        "dimension/Scene Understanding": 1.0,
        "dimension/Instances Counting": 0.0,
    }


@pytest.mark.parametrize(("mode", "top_is_pad"), [("pad", True), ("crop", False)])
def test_preprocessing_is_chosen_by_settings(tmp_path: Path, mode: str, top_is_pad: bool) -> None:
    options = {
        "instructions": str(FIXTURES / "gqa_testdev_balanced_instructions.parquet"),
        "images": str(FIXTURES / "gqa_testdev_balanced_images.parquet"),
        "image_resize": mode,
        "limit": 1,
    }
    _, pipe = run(tmp_path, "gqa", options, lambda p: "no")
    image = pipe.images[0]  # a 12 x 8 grey-90 picture as the 16 x 16 input
    assert image.shape == (3, 16, 16)
    colour = 90 / 127.5 - 1
    assert image[:, 8, 8].tolist() == pytest.approx([colour] * 3, abs=0.01)
    expected_top = 127 / 127.5 - 1 if top_is_pad else colour
    assert image[:, 0, 8].tolist() == pytest.approx([expected_top] * 3, abs=0.01)
