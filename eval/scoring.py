"""Scoring for the standard VQA benchmarks, reimplemented from each benchmark's official evaluation.

Pure functions over strings (no torch, no model), so numbers computed here can be compared with
published ones. Where an official script has a quirk that changes scores, the quirk is kept and
said so in the docstring: reproducing the published number matters more than tidiness.

- **VQAv2**: :mod:`eval.vqa_rules` (re-exported here).
- **GQA** (:func:`gqa_normalize`, :func:`gqa_accuracy`): exact match, as GQA's ``eval.py`` after
  LLaVA's ``convert_gqa_for_eval.py`` (which lower-cases the answer and drops a final period).
- **POPE** (:func:`pope_yes_no`, :func:`pope_metrics`): the answer rule and metrics of
  ``evaluate.py`` in https://github.com/RUCAIBox/POPE (also LLaVA's ``eval_pope.py``).
- **MME** (:func:`mme_yes_no`, :func:`mme_scores`): ``eval_tool/calculation.py`` shipped with
  the MME release (https://github.com/BradyFU/Awesome-Multimodal-Large-Language-Models, branch
  ``Evaluation``).
- **Multiple choice** (:func:`extract_choice`, :func:`multiple_choice_accuracy`,
  :func:`circular_accuracy`): MMBench and SEED-Bench score accuracy over option letters. The
  letter extraction is ours (rules in :func:`extract_choice`), in the spirit of VLMEvalKit's
  exact-matching ``can_infer``; MMBench's official score additionally asks an LLM judge when
  exact matching fails, which is out of scope here. The circular grouping follows VLMEvalKit's
  ``mcq_circular_eval``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from eval.vqa_rules import vqav2_accuracy, vqav2_normalize, vqav2_strip_punctuation  # noqa: F401  (re-exported)

# ----------------------------------------------------------------------------------- POPE


def _yes_no_label(label: str, what: str) -> str:
    normalized = str(label).strip().lower()
    if normalized not in ("yes", "no"):
        raise ValueError(f"{what} must be 'yes' or 'no', got {label!r}")
    return normalized


def pope_yes_no(text: str) -> str:
    """POPE's answer rule: ``"no"`` when the first sentence has the word No, no or not, else ``"yes"``.

    As in POPE's evaluate.py: keep the text before the first ".", delete commas, split on single
    spaces, and look for the exact words ``No``, ``no`` or ``not``. So an empty or unrelated answer
    counts as "yes", and (official quirks, kept) ``"NO"``, ``"Not really"``, ``"no!"`` and ``"No\\n"``
    count as "yes" too. The ends are stripped first, as LLaVA does before writing its answers.
    """
    first_sentence = text.strip().split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if any(word in ("No", "no", "not") for word in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE metrics with "yes" as the positive class; predictions are free text (:func:`pope_yes_no`).

    Returns accuracy, precision, recall, f1, yes_ratio (share of "yes" predictions) in [0, 1] and
    the confusion counts tp/fp/tn/fn and num_questions. Precision (no "yes" predicted) and F1
    (precision + recall = 0) are 0.0 where the official script would divide by zero.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("pope_metrics needs at least one question")
    tp = fp = tn = fn = 0
    for index, (prediction, label) in enumerate(zip(predictions, labels, strict=True)):
        predicted_yes = pope_yes_no(prediction) == "yes"
        actual_yes = _yes_no_label(label, f"POPE label {index}") == "yes"
        tp += predicted_yes and actual_yes
        fp += predicted_yes and not actual_yes
        tn += not predicted_yes and not actual_yes
        fn += not predicted_yes and actual_yes
    total = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / total,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / total,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "num_questions": total,
    }


# ------------------------------------------------------------------------------------ MME

# The 14 subtasks and their split into the two totals, as in MME's eval_tool/calculation.py.
MME_PERCEPTION: tuple[str, ...] = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")  # fmt: skip
MME_COGNITION: tuple[str, ...] = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")  # fmt: skip
MME_SUBTASKS: tuple[str, ...] = MME_PERCEPTION + MME_COGNITION


@dataclass(frozen=True)
class MMERecord:
    """One answered MME question: ``label`` is the ground truth, "yes" or "no"."""

    subtask: str
    image_id: str
    prediction: str
    label: str


def mme_yes_no(text: str) -> str:
    """MME's answer rule: ``"yes"``, ``"no"`` or ``"other"`` (counted wrong).

    As in calculation.py: lower-case; an answer that is exactly yes/no is itself; otherwise its first
    four characters decide: containing "yes" -> yes, else containing "no" -> no ("not sure", "none"
    -> no), else other ("I think yes" -> other). The ends are stripped first (the official reader
    keeps the line's newline, which the prefix test ignores).
    """
    answer = text.strip().lower()
    if answer in ("yes", "no"):
        return answer
    prefix = answer[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_scores(records: Iterable[MMERecord]) -> dict:
    """MME scores: per subtask acc, acc+ and score = 100 (acc + acc+); perception, cognition, total.

    acc is over questions; acc+ is over images, an image counting when every one of its questions
    (two in MME) is right. The official tool reads all 14 subtasks; here the totals sum the
    subtasks present and ``missing_subtasks`` lists the others, so a partial run is visibly partial.

    Returns ``{"subtasks": {name: {"acc", "acc_plus", "score", "num_questions", "num_images",
    "other"}}, "perception", "cognition", "total", "missing_subtasks"}`` with acc in [0, 1] and
    scores in points (at most 200 per subtask, 2800 in all).
    """
    per_image: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    unparsed: dict[str, int] = defaultdict(int)
    for record in records:
        if record.subtask not in MME_SUBTASKS:
            raise ValueError(f"unknown MME subtask {record.subtask!r}; the subtasks are {', '.join(MME_SUBTASKS)}")
        label = _yes_no_label(record.label, f"MME label of {record.subtask}/{record.image_id}")
        predicted = mme_yes_no(record.prediction)
        unparsed[record.subtask] += predicted == "other"
        per_image[record.subtask][record.image_id].append(predicted == label)
    if not per_image:
        raise ValueError("mme_scores needs at least one record")

    subtasks = {}
    for name in MME_SUBTASKS:
        if name not in per_image:
            continue
        images = per_image[name].values()
        num_questions = sum(len(results) for results in images)
        acc = sum(sum(results) for results in images) / num_questions
        acc_plus = sum(all(results) for results in images) / len(images)
        subtasks[name] = {
            "acc": acc,
            "acc_plus": acc_plus,
            "score": 100 * (acc + acc_plus),
            "num_questions": num_questions,
            "num_images": len(images),
            "other": unparsed[name],
        }
    perception = sum(subtasks[name]["score"] for name in MME_PERCEPTION if name in subtasks)
    cognition = sum(subtasks[name]["score"] for name in MME_COGNITION if name in subtasks)
    return {
        "subtasks": subtasks,
        "perception": perception,
        "cognition": cognition,
        "total": perception + cognition,
        "missing_subtasks": [name for name in MME_SUBTASKS if name not in subtasks],
    }


# ------------------------------------------------------------------------ multiple choice

# "A" and "I" are also English words: a capital A/I followed by a lower-case word is prose ("A
# cat sits", "I think") unless the word says something about an option ("A is correct").
_PROSE_LETTERS = frozenset({"A", "I"})
_OPTION_VERBS = frozenset({"is", "was", "and", "or"})
_STANDALONE_CAPITAL = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")
_PARENTHESISED_LETTER = re.compile(r"\(([A-Za-z])\)")
# A letter leading a fragment: "(b)", "b)", "B.", "c:", "d," or the letter alone.
_LEADING_LETTER = re.compile(r"\s*(?:\(([A-Za-z])\)|([A-Za-z])(?:[.):,]|\s*$))")
_ANSWER_PHRASE = re.compile(r"\banswer\b(?:\s+is\b)?\s*:?", re.IGNORECASE)
_NEXT_WORD = re.compile(r"\s+([a-z]+)")


def _is_prose(text: str, letter_end: int, letter: str) -> bool:
    if letter not in _PROSE_LETTERS:
        return False
    next_word = _NEXT_WORD.match(text, letter_end)
    return next_word is not None and next_word.group(1) not in _OPTION_VERBS


def _leading_letter(fragment: str) -> str | None:
    """The option letter a fragment starts with ("(b) dog", "B. dog", "b) dog", "C is right"), if any."""
    match = _LEADING_LETTER.match(fragment)
    if match:
        return (match.group(1) or match.group(2)).upper()
    capital = _STANDALONE_CAPITAL.match(fragment.lstrip())
    if capital and not _is_prose(fragment.lstrip(), capital.end(), capital.group(1)):
        return capital.group(1)
    return None


def _letters_mentioned(text: str) -> set[str]:
    letters = {match.group(1).upper() for match in _PARENTHESISED_LETTER.finditer(text)}
    letters |= {
        match.group(1)
        for match in _STANDALONE_CAPITAL.finditer(text)
        if not _is_prose(text, match.end(), match.group(1))
    }
    leading = _leading_letter(text)
    if leading:
        letters.add(leading)
    return letters


def _plain(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .!?")


def _unique(candidates: Iterable[str]) -> str | None:
    found = set(candidates)
    return found.pop() if len(found) == 1 else None


def extract_choice(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter a free-text answer picks, or None when there is none or it is ambiguous.

    ``options`` maps upper-case letters to option texts (``{"A": "cat", "B": "dog"}``); only those
    letters count. Rules, first that decides wins:

    1. The whole answer is an option's text (case, spacing and a final . ! ? ignored) -> that
       option, so the answer "Vitamin C" picks the option reading "Vitamin C", not option C.
    2. An answer phrase "answer is X" / "answer: X" (any case) followed by a letter in the forms of
       rule 3 -> that letter; phrases naming different letters -> None.
    3. Letters mentioned anywhere: "(B)" or "(b)"; a standalone capital "B", "B.", "B)", "B:"; a
       lower-case letter only at the very start and marked ("b)", "b.", "b:", or the whole answer
       "b"), since a lone "a" is usually the article. A capital "A" or "I" followed by a lower-case
       word is prose ("A cat", "I think") unless the word is is/was/and/or. One distinct letter ->
       it; two or more ("A or B", "A. cat B. dog") -> None.
    4. Option texts found in the answer as whole words (case-insensitive): exactly one -> it,
       otherwise None ("dark red" with options "red" and "dark red" is ambiguous here).
    """
    for letter in options:
        if len(letter) != 1 or not letter.isupper():
            raise ValueError(f"option keys must be single upper-case letters, got {letter!r}")
    answer = text.strip()
    if not answer:
        return None

    plain_answer = _plain(answer)
    exact = [letter for letter, option in options.items() if _plain(str(option)) == plain_answer]
    if len(exact) == 1:
        return exact[0]

    stated = {_leading_letter(answer[match.end() :]) for match in _ANSWER_PHRASE.finditer(answer)}
    stated = {letter for letter in stated if letter in options}
    if stated:
        return _unique(stated)

    mentioned = _letters_mentioned(answer) & set(options)
    if mentioned:
        return _unique(mentioned)

    contained = []
    for letter, option in options.items():
        option_text = _plain(str(option))
        if option_text and re.search(rf"(?<!\w){re.escape(option_text)}(?!\w)", plain_answer):
            contained.append(letter)
    return _unique(contained)


def multiple_choice_accuracy(
    predictions: Sequence[str], answers: Sequence[str], options: Sequence[Mapping[str, str]]
) -> dict[str, float]:
    """Accuracy of free-text predictions over option letters; an unreadable prediction counts wrong.

    ``answers`` are the correct letters, ``options`` each question's letter -> text mapping. Returns
    accuracy in [0, 1], correct, unparsed (predictions :func:`extract_choice` could not read) and
    num_questions.
    """
    if not len(predictions) == len(answers) == len(options):
        raise ValueError(f"{len(predictions)} predictions, {len(answers)} answers, {len(options)} option sets")
    if not answers:
        raise ValueError("multiple_choice_accuracy needs at least one question")
    correct = unparsed = 0
    for index, (prediction, answer, choices) in enumerate(zip(predictions, answers, options, strict=True)):
        if answer not in choices:
            raise ValueError(f"question {index}: answer {answer!r} is not one of its options {sorted(choices)}")
        choice = extract_choice(prediction, choices)
        unparsed += choice is None
        correct += choice == answer
    return {
        "accuracy": correct / len(answers),
        "correct": correct,
        "unparsed": unparsed,
        "num_questions": len(answers),
    }


# MMBench numbers a question's circular copies (options rotated) index + k * 1e6 (VLMEvalKit).
MMBENCH_CIRCULAR_STRIDE = 1_000_000


def circular_accuracy(indices: Sequence[int], correct: Sequence[bool]) -> dict[str, float]:
    """MMBench CircularEval: a question counts only if it and all its rotated copies are right.

    ``indices`` are the TSV ``index`` values; copies of question ``i`` carry ``i + k * 1_000_000``,
    so questions are grouped by ``index % 1_000_000``. Returns accuracy over groups, num_groups and
    the plain per-row accuracy (``vanilla_accuracy``) for comparison.
    """
    if len(indices) != len(correct):
        raise ValueError(f"{len(indices)} indices but {len(correct)} results")
    if not indices:
        raise ValueError("circular_accuracy needs at least one result")
    groups: dict[int, bool] = {}
    for index, hit in zip(indices, correct, strict=True):
        group = int(index) % MMBENCH_CIRCULAR_STRIDE
        groups[group] = groups.get(group, True) and bool(hit)
    return {
        "accuracy": sum(groups.values()) / len(groups),
        "num_groups": len(groups),
        "vanilla_accuracy": sum(bool(hit) for hit in correct) / len(correct),
    }


def circular_rotations(options: Mapping[str, str], answer: str | None) -> list[tuple[dict[str, str], str | None]]:
    """MMBench's circular copies of a question: the option texts rotated through the letters.

    Copy ``k`` puts the text of option ``(i + k) mod n`` under letter ``i`` (copy 0 is the question
    itself), and the answer letter follows its text. MMBench (and VLMEvalKit's
    ``mcq_circular_eval``) ask every copy and count the question only when all are answered right.
    """
    letters = list(options)
    texts = [options[letter] for letter in letters]
    copies = []
    for shift in range(len(letters)):
        rotated = {letter: texts[(position + shift) % len(texts)] for position, letter in enumerate(letters)}
        moved = None
        if answer is not None:
            moved = letters[(letters.index(answer) - shift) % len(letters)]
        copies.append((rotated, moved))
    return copies


def circular_by_category(groups: Mapping[str, str], hits: Mapping[str, list[bool]]) -> dict[str, float]:
    """Circular accuracy overall and per category: ``groups`` maps a question to its category,
    ``hits`` maps it to the results of its copies (all must be right)."""
    if not hits:
        raise ValueError("circular_by_category needs at least one question")
    passed = {question: all(results) for question, results in hits.items()}
    metrics: dict[str, float] = {
        "circular_accuracy": sum(passed.values()) / len(passed),
        "vanilla_accuracy": sum(results[0] for results in hits.values()) / len(hits),
        "questions": len(passed),
    }
    for category in sorted({groups[question] for question in passed}):
        members = [passed[question] for question in passed if groups[question] == category]
        metrics[f"category/{category}"] = sum(members) / len(members)
    return metrics


# ------------------------------------------------------------------------------------ GQA


def gqa_normalize(text: str) -> str:
    """LLaVA's ``convert_gqa_for_eval.py``: the answer without a final period, lower-cased."""
    return text.strip().rstrip(".").lower()


def gqa_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """GQA's ``eval.py`` accuracy: the share of normalised predictions equal to the answer."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers")
    if not answers:
        raise ValueError("gqa_accuracy needs at least one question")
    correct = sum(gqa_normalize(p) == a.strip().lower() for p, a in zip(predictions, answers, strict=True))
    return {"accuracy": correct / len(answers), "correct": correct, "num_questions": len(answers)}


# ---------------------------------------------------------------------------- SEED-Bench

# The evaluation dimensions of SEED-Bench's image questions, by ``question_type_id``.
SEED_IMAGE_DIMENSIONS: dict[int, str] = {
    1: "Scene Understanding",
    2: "Instance Identity",
    3: "Instance Attributes",
    4: "Instance Location",
    5: "Instances Counting",
    6: "Spatial Relation",
    7: "Instance Interaction",
    8: "Visual Reasoning",
    9: "Text Understanding",
}


def seed_by_dimension(dimensions: Sequence[int], correct: Sequence[bool]) -> dict[str, float]:
    """SEED-Bench image accuracy over all questions and per evaluation dimension."""
    if len(dimensions) != len(correct):
        raise ValueError(f"{len(dimensions)} dimensions but {len(correct)} results")
    if not correct:
        raise ValueError("seed_by_dimension needs at least one question")
    metrics: dict[str, float] = {"accuracy": sum(correct) / len(correct), "questions": len(correct)}
    for dimension in sorted(set(dimensions)):
        hits = [hit for d, hit in zip(dimensions, correct, strict=True) if d == dimension]
        name = SEED_IMAGE_DIMENSIONS.get(int(dimension), str(dimension))
        metrics[f"dimension/{name}"] = sum(hits) / len(hits)
    return metrics
