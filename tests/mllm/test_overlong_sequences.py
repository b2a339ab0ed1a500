"""Sequences longer than the context: refused, or cut where every image block stays whole."""

from __future__ import annotations

import pytest
import torch

from mllm.chat import IGNORE, OverlongSequenceError, SequenceBuilder
from mllm.vocab import VocabLayout

LAYOUT = VocabLayout(100, 16, 16, 64)
GRID = (2, 2)


class WordTokenizer:
    """One id per word (hash of the word into the text rows), enough for laying sequences out."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [sum(map(ord, word)) % 90 + 5 for word in text.split()]}


def _builder(max_length: int, overlong: str) -> SequenceBuilder:
    return SequenceBuilder(WordTokenizer(), LAYOUT, 1, 1, max_length=max_length, overlong=overlong)


def _codes() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(*GRID, 1, dtype=torch.long), torch.ones(*GRID, 1, dtype=torch.long)


def test_a_long_answer_after_the_image_is_cut_to_the_context():
    semantic, pixel = _codes()
    turns = [("user", "<image>\nwhat is it?"), ("assistant", "red " * 40)]
    full = _builder(1000, "error").conversation(turns, semantic=semantic, pixel=pixel, boxes=[(), ((0, 0, 1, 1),)])
    assert len(full) > 30
    cut = _builder(30, "truncate").conversation(turns, semantic=semantic, pixel=pixel, boxes=[(), ((0, 0, 1, 1),)])
    assert len(cut) == 30
    torch.testing.assert_close(cut.ids, full.ids[:30])
    torch.testing.assert_close(cut.labels, full.labels[:30])
    assert (cut.labels[:, 0] != IGNORE).any()  # part of the answer is still learnt
    assert cut.grounding == full.grounding  # the answer's first token is inside the cut
    with pytest.raises(OverlongSequenceError, match="longer than the model's context of 30"):
        _builder(30, "error").conversation(turns, semantic=semantic, pixel=pixel)


def test_a_cut_that_would_split_an_image_refuses():
    semantic, pixel = _codes()
    long_question = [("user", "red " * 26 + "<image>"), ("assistant", "yes")]  # the image straddles slot 30
    with pytest.raises(OverlongSequenceError, match="split an image"):
        _builder(30, "truncate").conversation(long_question, semantic=semantic, pixel=pixel)
    # Text-to-image: the generated image comes last, so a long caption cannot be cut.
    with pytest.raises(OverlongSequenceError, match="split an image"):
        _builder(30, "truncate").generation("red " * 26, pixel, semantic)


def test_a_cut_that_leaves_no_label_refuses():
    semantic, pixel = _codes()
    turns = [("user", "<image>\n" + "red " * 40), ("assistant", "yes")]
    with pytest.raises(OverlongSequenceError, match="nothing to learn"):
        _builder(30, "truncate").conversation(turns, semantic=semantic, pixel=pixel)


def test_independent_turns_are_cut_with_their_segments():
    semantic, pixel = _codes()
    turns = [("user", "what?"), ("assistant", "red " * 20), ("user", "and?"), ("assistant", "blue " * 20)]
    full = _builder(1000, "error").independent_turns(turns, semantic=semantic, pixel=pixel)
    cut = _builder(35, "truncate").independent_turns(turns, semantic=semantic, pixel=pixel)
    assert len(full) > 35 and len(cut) == 35
    torch.testing.assert_close(cut.segments, full.segments[:35])


def test_overlong_mode_is_checked():
    with pytest.raises(ValueError, match="overlong='cut'"):
        _builder(30, "cut")
