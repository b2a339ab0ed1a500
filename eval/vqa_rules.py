"""VQAv2 answer normalisation and accuracy, written from the rules of the official evaluation code.

The rules are those of ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` in
https://github.com/GT-Vision-Lab/VQA (the code linked from visualqa.org; the EvalAI server of the
challenge runs the same rules). lmms-eval's ``vqav2`` task applies them the same way.

Answer processing, in order:

1. Newlines and tabs become spaces; the ends are stripped.
2. Punctuation (:data:`VQA_PUNCTUATION`, 21 marks; the apostrophe, the colon and the period are
   not among them): each mark is deleted when it touches a space in the text or when the text has
   a comma between two digits anywhere, and replaced by a space otherwise. Then every period not
   followed by a digit is deleted (at most 32 of them: the official call passes ``re.UNICODE``,
   which is 32, where ``re.sub`` takes its count).
3. The text is lower-cased and split on whitespace; the number words ``none``, ``zero`` ...
   ``ten`` become digits; the articles a, an, the are dropped; words found in the contraction
   table (:data:`VQA_CONTRACTIONS`) are replaced ("dont" -> "don't"); the words are joined by
   single spaces.

Accuracy: when the annotators' answers are not all the same, each of them and the prediction go
through steps 1-3; otherwise both are only stripped (step 1). Leaving out one of the (ten)
annotators at a time, the answers of the other nine are compared with the prediction and
``min(1, matches / 3)`` taken; the score is the mean of these. The harness writes answers normalised (steps 1-3), as
LLaVA's upload converter and lmms-eval do before this rule, so a unanimous "yes" is matched by a
generated "Yes.".
"""

from __future__ import annotations

import re
from collections.abc import Sequence

VQA_PUNCTUATION: tuple[str, ...] = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")  # fmt: skip
VQA_NUMBER_WORDS: dict[str, str] = {
    word: str(value)
    for value, word in enumerate(
        ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
    )
}
VQA_NUMBER_WORDS["none"] = "0"
VQA_ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# The contracted forms of the official table. Its keys are each form with exactly one of its
# apostrophes left out ("dont" -> "don't"; "couldnt've" and "couldn'tve" -> "couldn't've", but not
# "couldntve"). The table's capitalised entries (I'm, I've, I'd've) never match lower-cased words
# and are left out; its entries mapping a word to itself (let's, she's) change nothing.
_CONTRACTED_FORMS: tuple[str, ...] = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't",
    "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's",
    "isn't", "it'd", "it'd've", "it'll", "ma'am", "mightn't", "mightn't've", "might've", "mustn't",
    "must've", "needn't", "not've", "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd've",
    "should've", "shouldn't", "shouldn't've", "somebody'd've", "somebody'll", "somebody's",
    "someone'd", "someone'd've", "someone'll", "someone's", "something'd", "something'd've",
    "something'll", "that's", "there'd", "there'd've", "there're", "there's", "they'd", "they'd've",
    "they'll", "they're", "they've", "'twas", "wasn't", "we'd've", "we've", "weren't", "what'll",
    "what're", "what's", "what've", "when's", "where'd", "where's", "where've", "who'd", "who'd've",
    "who'll", "who's", "who've", "why'll", "why're", "why's", "won't", "would've", "wouldn't",
    "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've",
)  # fmt: skip


def _one_apostrophe_dropped(form: str) -> list[str]:
    positions = [index for index, char in enumerate(form) if char == "'"]
    return [form[:index] + form[index + 1 :] for index in positions]


VQA_CONTRACTIONS: dict[str, str] = {key: form for form in _CONTRACTED_FORMS for key in _one_apostrophe_dropped(form)}
# An official entry that runs backwards: the contracted spelling maps to the plain one.
VQA_CONTRACTIONS["somebody'd"] = "somebodyd"

_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern "(?!<=\d)(\.)(?!\d)" starts with a mistyped look-ahead that always holds
# before a ".", so the rule is: drop every period not followed by a digit ("3." -> "3", "2.5" kept).
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_OFFICIAL_PERIOD_COUNT = 32


def vqav2_strip(text: str) -> str:
    """Step 1: newlines and tabs to spaces, ends stripped."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqav2_strip_punctuation(text: str) -> str:
    """Step 2 (``processPunctuation``); the conditions look at the input text, not the partly cleaned one."""
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    cleaned = text
    for mark in VQA_PUNCTUATION:
        if has_digit_comma or f"{mark} " in text or f" {mark}" in text:
            cleaned = cleaned.replace(mark, "")
        else:
            cleaned = cleaned.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", cleaned, count=_OFFICIAL_PERIOD_COUNT)


def vqav2_digits_articles(text: str) -> str:
    """Step 3 (``processDigitArticle``): lower case, number words, articles, contractions."""
    words = []
    for word in text.lower().split():
        word = VQA_NUMBER_WORDS.get(word, word)
        if word not in VQA_ARTICLES:
            words.append(word)
    return " ".join(VQA_CONTRACTIONS.get(word, word) for word in words)


def vqav2_normalize(text: str) -> str:
    """Steps 1-3: the processing an answer gets before it is compared."""
    return vqav2_digits_articles(vqav2_strip_punctuation(vqav2_strip(text)))


def vqav2_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the annotators' answers, in [0, 1].

    ``prediction`` is taken as written (the harness normalises answers before scoring). With ``k``
    of ten annotators matching, the leave-one-out mean is ``0.3 k`` for ``k <= 3`` and 1 above.
    """
    if not answers:
        raise ValueError("vqav2_accuracy needs at least one ground-truth answer")
    predicted = vqav2_strip(prediction)
    truths = [vqav2_strip(answer) for answer in answers]
    if len(set(truths)) > 1:
        truths = [vqav2_normalize(truth) for truth in truths]
        predicted = vqav2_normalize(predicted)
    matches = sum(truth == predicted for truth in truths)
    # Leaving out a matching annotator leaves matches - 1 among the others; any other leaves all.
    return sum(min(1.0, (matches - (truth == predicted)) / 3) for truth in truths) / len(truths)


def vqav2_upload_records(question_ids: Sequence[int], predictions: Sequence[str]) -> list[dict[str, int | str]]:
    """The test-dev / test answer file the evaluation server takes: ``[{"question_id", "answer"}]``."""
    if len(question_ids) != len(predictions):
        raise ValueError(f"{len(question_ids)} question ids but {len(predictions)} answers")
    return [
        {"question_id": int(qid), "answer": vqav2_normalize(answer)}
        for qid, answer in zip(question_ids, predictions, strict=True)
    ]
