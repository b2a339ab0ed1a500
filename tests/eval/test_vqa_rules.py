"""VQAv2 scoring against cases whose official scores are worked out by hand from vqaEval.py's rules."""

from __future__ import annotations

import pytest

from eval.vqa_rules import (
    VQA_CONTRACTIONS,
    VQA_PUNCTUATION,
    vqav2_accuracy,
    vqav2_normalize,
    vqav2_strip_punctuation,
    vqav2_upload_records,
)


def test_the_punctuation_list_is_the_official_one() -> None:
    # 21 marks; the apostrophe, colon and period are not among them (the period has its own rule).
    assert set(VQA_PUNCTUATION) == set(';/[]"{}()=+\\_-><@`,?!')
    assert len(VQA_PUNCTUATION) == 21


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # step 1: whitespace
        ("  Yes\n", "yes"),
        ("red\tcar", "red car"),
        # step 2: a mark inside a word becomes a space, a mark touching a space is deleted
        ("yes!", "yes"),  # "!" -> " " -> "yes " -> split -> "yes"
        ("t-shirt", "t shirt"),
        ("red,white", "red white"),
        ("red, white", "red white"),
        ("(left)", "left"),
        ("what?", "what"),
        ("x:y", "x:y"),  # the colon is not punctuation here
        # a comma between digits anywhere deletes every mark instead
        ("10,000", "10000"),
        ("1,000-2", "10002"),
        # periods go unless a digit follows
        ("yes.", "yes"),
        ("3.", "3"),
        ("2.5", "2.5"),
        ("e.g.", "eg"),
        # step 3: number words, whole words only
        ("two", "2"),
        ("Two dogs", "2 dogs"),
        ("none", "0"),
        ("Ten", "10"),
        ("eleven", "eleven"),
        ("someone", "someone"),
        # articles go, words that start like one stay
        ("a dog", "dog"),
        ("The Cat", "cat"),
        ("an apple", "apple"),
        ("theater", "theater"),
        # contractions: an apostrophe left out is put back; a typed one stays
        ("dont", "don't"),
        ("don't", "don't"),
        ("isnt", "isn't"),
        ("oclock", "o'clock"),
        ("hes", "he's"),
        ("couldnt've", "couldn't've"),
        ("couldn'tve", "couldn't've"),
        ("yall'll", "y'all'll"),
        # not in the table: both apostrophes left out, "shes" (the table has only she's -> she's)
        ("couldntve", "couldntve"),
        ("shes", "shes"),
        # the table's capitalised Im never matches lower-cased text; somebody'd maps backwards
        ("Im", "im"),
        ("somebody'd", "somebodyd"),
        ("", ""),
    ],
)
def test_vqav2_normalize(raw: str, expected: str) -> None:
    assert vqav2_normalize(raw) == expected


def test_contraction_keys_leave_out_exactly_one_apostrophe() -> None:
    for key, form in VQA_CONTRACTIONS.items():
        if key == "somebody'd":
            continue
        assert form.count("'") == key.count("'") + 1 and form.replace("'", "") == key.replace("'", "")


def test_only_the_first_32_periods_go() -> None:
    # vqaEval.py passes re.UNICODE (32) where re.sub takes its count.
    assert vqav2_strip_punctuation("ok" + "." * 40) == "ok" + "." * 8


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_ten_choose_nine_average(matches: int, expected: float) -> None:
    # 3 of 10 match: leaving out one of the 3, the other 9 hold 2 -> 2/3; leaving out one of the
    # 7, they hold 3 -> 1. Mean (3 * 2/3 + 7) / 10 = 0.9. 2 match: (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    answers = ["blue"] * matches + ["green"] * (10 - matches)
    assert vqav2_accuracy("blue", answers) == pytest.approx(expected)


def test_differing_ground_truths_get_every_step() -> None:
    # The answers differ, so "two" -> "2" on both sides: 3 matches -> 0.9.
    assert vqav2_accuracy("2", ["two"] * 3 + ["three"] * 7) == pytest.approx(0.9)
    assert vqav2_accuracy("Two!", ["two"] * 3 + ["three"] * 7) == pytest.approx(0.9)
    # "the t-shirt" -> "t shirt", and so do the ground truths "t-shirt": 4 matches -> 1.
    assert vqav2_accuracy("the t-shirt", ["t-shirt"] * 4 + ["shirt"] * 6) == 1.0
    # contractions: "dont" -> "don't"; 2 annotators wrote "don't" -> 0.6
    assert vqav2_accuracy("dont", ["don't", "don't"] + ["no"] * 8) == pytest.approx(0.6)


def test_identical_ground_truths_are_only_stripped() -> None:
    # All ten equal: neither side is processed beyond whitespace, so "yes." never equals "yes" ...
    assert vqav2_accuracy("yes", ["yes."] * 10) == 0.0
    # ... and the raw "Yes" misses "yes"; the harness normalises answers first, which matches.
    assert vqav2_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqav2_accuracy(vqav2_normalize("Yes."), ["yes"] * 10) == 1.0
    # a normalised "none" is "0", which a unanimous "none" does not equal
    assert vqav2_accuracy(vqav2_normalize("none"), ["none"] * 10) == 0.0


def test_accuracy_needs_answers() -> None:
    with pytest.raises(ValueError, match="at least one"):
        vqav2_accuracy("yes", [])


def test_upload_records_are_the_server_format() -> None:
    records = vqav2_upload_records([5, "7"], ["Two dogs.", "yes!"])
    assert records == [{"question_id": 5, "answer": "2 dogs"}, {"question_id": 7, "answer": "yes"}]
    with pytest.raises(ValueError, match="2 question ids but 1 answers"):
        vqav2_upload_records([1, 2], ["x"])
