"""Chat template and sequence building: conversations and text-to-image pairs -> slot ids + labels.

A sequence is ``(L, C)`` slot ids (see :mod:`mllm.modeling`) with labels of the same shape
(``-100`` where nothing is predicted). The template is plain strings, so the tiny default
(``<|user|>`` ...) and Qwen2.5 (``<|im_start|>user\\n`` ...) share one builder::

    [system] user_prefix <image> slots </image> question end assistant_prefix answer end ...
    user_prefix caption end assistant_prefix <image_gen_start> slots <image_gen_end> end

Training labels cover the assistant's answers (and their ``end``) and, for generation, the
image slots, ``<image_gen_end>`` and ``end``. Image slots read the branches in
``config.read`` and write those in ``config.write``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mllm.vocab import VocabLayout

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in image fractions

IMAGE_PLACEHOLDER = "<image>"
IGNORE = -100


class ConversationError(ValueError):
    """A conversation or prompt the model cannot take (no answer, too long, empty ...)."""


class OverlongSequenceError(ConversationError):
    """A sequence longer than the builder's ``max_length`` (and, with ``overlong="truncate"``,
    one that no cut keeps whole: the cut would split an image block or leave nothing to learn)."""


OVERLONG = ("error", "truncate")


@dataclass(frozen=True)
class ChatTemplate:
    user: str = "<|user|>"
    assistant: str = "<|assistant|>"
    end: str = "<|end|>"
    system: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ChatTemplate:
        return cls(**(data or {}))

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


QWEN_TEMPLATE = ChatTemplate(
    user="<|im_start|>user\n",
    assistant="<|im_start|>assistant\n",
    end="<|im_end|>\n",
    system="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
)


@dataclass
class Sequence:
    """One training or prompt sequence: ``ids`` and ``labels`` are ``(L, C)`` long tensors.

    ``segments`` ``(L,)``, set by :meth:`SequenceBuilder.independent_turns`: 0 for the shared
    prefix, k for the k-th question-answer pair, which sees the prefix and itself only.

    ``object_slots``: positions of the generated image's slots under the caption's objects
    (text-to-image sequences built with boxes).

    ``grounding``: ``(query, slots)`` pairs, one per answer that came with boxes: ``query`` is
    the position whose output predicts the answer's first token, ``slots`` the positions of the
    image slots that the boxes cover (the target of the grounding loss).
    """

    ids: torch.Tensor
    labels: torch.Tensor
    segments: torch.Tensor | None = None
    grounding: list[tuple[int, list[int]]] = field(default_factory=list)
    object_slots: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return self.ids.shape[0]


class SequenceBuilder:
    """Turns text, codes and turns into slot-id sequences for one model config and text tokenizer."""

    def __init__(
        self,
        text_tokenizer: Any,
        layout: VocabLayout,
        semantic_depth: int,
        pixel_depth: int,
        read: tuple[str, ...] | list[str] = ("semantic",),
        write: tuple[str, ...] | list[str] = ("pixel",),
        template: ChatTemplate | None = None,
        max_length: int | None = None,
        overlong: str = "error",
    ) -> None:
        if overlong not in OVERLONG:
            raise ValueError(f"overlong={overlong!r}; expected one of {OVERLONG}")
        self.text_tokenizer = text_tokenizer
        self.layout = layout
        self.semantic_depth = semantic_depth
        self.pixel_depth = pixel_depth
        self.width = semantic_depth + pixel_depth
        self.read = tuple(read)
        self.write = tuple(write)
        self.template = template or ChatTemplate()
        self.max_length = max_length
        # "error": a sequence over max_length raises OverlongSequenceError; "truncate": it is cut
        # to max_length when the cut keeps every image block whole and leaves a label (else raises).
        self.overlong = overlong
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def for_model(
        cls, text_tokenizer: Any, config: Any, max_length: int | None = None, overlong: str = "error"
    ) -> SequenceBuilder:
        """A builder matching a :class:`~mllm.config.DualTokenMLLMConfig`."""
        if max_length is None:
            max_length = getattr(config.text_config, "max_position_embeddings", None)
        return cls(
            text_tokenizer,
            config.layout,
            config.semantic_depth,
            config.pixel_depth,
            config.read,
            config.write,
            ChatTemplate.from_dict(config.chat_template),
            max_length,
            overlong,
        )

    # ------------------------------------------------------------------ pieces
    def text_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS); template strings are cached."""
        if text in self._cache:
            return self._cache[text]
        ids = self.text_tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if len(self._cache) < 4096:
            self._cache[text] = ids
        return ids

    def _text_rows(self, ids: list[int], train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.full((len(ids), self.width), -1, dtype=torch.long)
        rows[:, 0] = torch.tensor(ids, dtype=torch.long)
        labels = rows.clone() if train else torch.full_like(rows, IGNORE)
        labels[labels < 0] = IGNORE
        return rows, labels

    def image_slots(self, semantic: torch.Tensor | None, pixel: torch.Tensor | None) -> torch.Tensor:
        """``(h, w, Ds)`` / ``(h, w, Dp)`` codes -> ``(h * w, C)`` slot ids (absent branch = -1)."""
        reference = semantic if semantic is not None else pixel
        if reference is None:
            raise ConversationError("an image slot needs semantic or pixel codes")
        slots = torch.full((reference.shape[0] * reference.shape[1], self.width), -1, dtype=torch.long)
        if semantic is not None:
            _check_depth(semantic, self.semantic_depth, "semantic")
            slots[:, : self.semantic_depth] = self.layout.semantic_ids(semantic.reshape(-1, self.semantic_depth).long())
        if pixel is not None:
            _check_depth(pixel, self.pixel_depth, "pixel")
            slots[:, self.semantic_depth :] = self.layout.pixel_ids(pixel.reshape(-1, self.pixel_depth).long())
        return slots

    def _read_block(self, semantic: torch.Tensor | None, pixel: torch.Tensor | None) -> torch.Tensor:
        slots = self.image_slots(semantic if "semantic" in self.read else None, pixel if "pixel" in self.read else None)
        start = self._text_rows([self.layout.image_start_id], False)[0]
        end = self._text_rows([self.layout.image_end_id], False)[0]
        return torch.cat([start, slots, end])

    # ------------------------------------------------------------------ sequences
    def conversation(
        self,
        turns: list[tuple[str, str]],
        semantic: torch.Tensor | None = None,
        pixel: torch.Tensor | None = None,
        train: bool = True,
        add_generation_prompt: bool = False,
        boxes: list[tuple[Box, ...]] | None = None,
    ) -> Sequence:
        """``turns``: ``[(role, text)]`` with roles ``user`` / ``assistant``; the image replaces ``<image>``.

        With ``train`` the assistant turns are labelled; ``add_generation_prompt`` appends the
        assistant prefix (inference: the model continues with the answer). ``boxes`` (one
        entry per turn, image fractions) fill :attr:`Sequence.grounding` for the answers that
        have them.
        """
        if not turns:
            raise ConversationError("a conversation needs at least one turn")
        if train and not any(role == "assistant" for role, _ in turns):
            raise ConversationError("the conversation has no assistant turn, so there is nothing to learn")
        has_image = semantic is not None or pixel is not None
        boxes = self._check_boxes(boxes, turns, has_image)
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        placed = False
        image_at = -1  # the position of the first image slot
        queries: list[tuple[int, tuple[Box, ...]]] = []
        if self.template.system:
            parts.append(self._text_rows(self.text_ids(self.template.system), False))
        for turn_index, (role, text) in enumerate(turns):
            if role == "user":
                parts.append(self._text_rows(self.text_ids(self.template.user), False))
                pieces = text.split(IMAGE_PLACEHOLDER)
                if len(pieces) > 2 or (len(pieces) == 2 and (placed or not has_image)):
                    raise ConversationError(
                        f"user turn {text[:60]!r} has an {IMAGE_PLACEHOLDER} placeholder without a matching image"
                    )
                for index, piece in enumerate(pieces):
                    if index == 1:
                        block = self._read_block(semantic, pixel)
                        image_at = _length(parts) + 1
                        parts.append((block, torch.full_like(block, IGNORE)))
                        placed = True
                    piece = piece.strip()
                    if piece:
                        parts.append(self._text_rows(self.text_ids(piece), False))
                parts.append(self._text_rows(self.text_ids(self.template.end), False))
            elif role == "assistant":
                parts.append(self._text_rows(self.text_ids(self.template.assistant), False))
                if boxes[turn_index]:
                    queries.append((_length(parts) - 1, boxes[turn_index]))
                parts.append(self._text_rows(self.text_ids(text.strip()) + self.text_ids(self.template.end), train))
            else:
                raise ConversationError(f"unknown role {role!r}; expected 'user' or 'assistant'")
        if has_image and not placed:
            # An image without a placeholder goes in front of the first user text.
            block = self._read_block(semantic, pixel)
            index = 2 if self.template.system else 1
            image_at = _length(parts[:index]) + 1
            queries = [(query + len(block), regions) for query, regions in queries]
            parts.insert(index, (block, torch.full_like(block, IGNORE)))
        if add_generation_prompt:
            parts.append(self._text_rows(self.text_ids(self.template.assistant), False))
        sequence = self._finish(parts)
        sequence.grounding = self._grounding(queries, image_at, semantic, pixel)
        return self._fit(sequence)

    def independent_turns(
        self,
        turns: list[tuple[str, str]],
        semantic: torch.Tensor | None = None,
        pixel: torch.Tensor | None = None,
        train: bool = True,
        boxes: list[tuple[Box, ...]] | None = None,
    ) -> Sequence:
        """Several one-question conversations about one image, packed into one sequence.

        The prefix (system prompt, user prefix, image) is shared; each (user, assistant) pair
        follows as its own segment, laid out exactly as the text after the image in the
        one-turn conversation ``[(user, "<image>\nquestion"), (assistant, answer)]``.
        :func:`collate_sequences` restarts each segment's positions after the prefix, and
        the model lets a segment attend to the prefix and itself only. So an answer cannot
        be read off the other questions of the same image (a question that names a red
        triangle gives away "is there a red triangle?"), and training sees each question
        the way a one-question prompt is asked, for the cost of one image. A last question
        without an answer has nothing to learn and is left out. Without an image this is
        :meth:`conversation`. ``boxes`` as in :meth:`conversation`.
        """
        if semantic is None and pixel is None:
            return self.conversation(turns, train=train, boxes=boxes)
        if not turns:
            raise ConversationError("a conversation needs at least one turn")
        roles = [role for role, _ in turns]
        if any(role not in ("user", "assistant") for role in roles):
            raise ConversationError(f"unknown role in {sorted(set(roles))}; expected 'user' or 'assistant'")
        pairs = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 1, 2)]
        if roles[0::2] != ["user"] * len(roles[0::2]) or roles[1::2] != ["assistant"] * len(roles[1::2]):
            raise ConversationError("independent turns need (user, assistant) pairs in order")
        if train and not pairs:
            raise ConversationError("the conversation has no assistant turn, so there is nothing to learn")
        boxes = self._check_boxes(boxes, turns, True)
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        queries: list[tuple[int, tuple[Box, ...]]] = []
        if self.template.system:
            parts.append(self._text_rows(self.text_ids(self.template.system), False))
        parts.append(self._text_rows(self.text_ids(self.template.user), False))
        block = self._read_block(semantic, pixel)
        image_at = _length(parts) + 1
        parts.append((block, torch.full_like(block, IGNORE)))
        segments = [torch.zeros(sum(len(ids) for ids, _ in parts), dtype=torch.long)]
        for number, (question, answer) in enumerate(pairs, start=1):
            question = question.replace(IMAGE_PLACEHOLDER, " ").strip()
            turn = []
            if question:
                turn.append(self._text_rows(self.text_ids(question), False))
            turn.append(self._text_rows(self.text_ids(self.template.end), False))
            turn.append(self._text_rows(self.text_ids(self.template.assistant), False))
            if boxes[2 * number - 1]:
                queries.append((_length(parts) + _length(turn) - 1, boxes[2 * number - 1]))
            turn.append(self._text_rows(self.text_ids(answer.strip()) + self.text_ids(self.template.end), train))
            parts += turn
            segments.append(torch.full((sum(len(ids) for ids, _ in turn),), number, dtype=torch.long))
        sequence = self._finish(parts)
        sequence.segments = torch.cat(segments)
        sequence.grounding = self._grounding(queries, image_at, semantic, pixel)
        return self._fit(sequence)

    @staticmethod
    def _check_boxes(
        boxes: list[tuple[Box, ...]] | None, turns: list[tuple[str, str]], has_image: bool
    ) -> list[tuple[Box, ...]]:
        if boxes is None:
            return [()] * len(turns)
        if len(boxes) != len(turns):
            raise ConversationError(f"boxes has {len(boxes)} entries for {len(turns)} turns; expected one per turn")
        if any(boxes) and not has_image:
            raise ConversationError("a turn has boxes but the conversation has no image to point into")
        return list(boxes)

    @staticmethod
    def _grounding(
        queries: list[tuple[int, tuple[Box, ...]]],
        image_at: int,
        semantic: torch.Tensor | None,
        pixel: torch.Tensor | None,
    ) -> list[tuple[int, list[int]]]:
        if not queries:
            return []
        reference = semantic if semantic is not None else pixel
        assert reference is not None  # _check_boxes: boxes need an image
        grid = reference.shape[:2]
        return [(query, [image_at + slot for slot in _covered(regions, *grid)]) for query, regions in queries]

    def generation(
        self,
        caption: str,
        pixel: torch.Tensor | None = None,
        semantic: torch.Tensor | None = None,
        train: bool = True,
        boxes: tuple[Box, ...] = (),
    ) -> Sequence:
        """A text-to-image sequence; without codes it is the prompt up to ``<image_gen_start>``.

        An empty ``caption`` gives the unconditional sequence used for classifier-free guidance.
        ``boxes`` (image fractions, where the caption's objects are) fill
        :attr:`Sequence.object_slots`.
        """
        parts = []
        if self.template.system:
            parts.append(self._text_rows(self.text_ids(self.template.system), False))
        parts.append(self._text_rows(self.text_ids(self.template.user), False))
        if caption.strip():
            parts.append(self._text_rows(self.text_ids(caption.strip()), False))
        parts.append(self._text_rows(self.text_ids(self.template.end), False))
        parts.append(self._text_rows(self.text_ids(self.template.assistant), False))
        parts.append(self._text_rows([self.layout.gen_start_id], train and pixel is not None))
        first = _length(parts)
        if pixel is not None:
            slots = self.image_slots(semantic if "semantic" in self.write else None, pixel)
            labels = slots.clone() if train else torch.full_like(slots, IGNORE)
            labels[labels < 0] = IGNORE
            parts.append((slots, labels))
            parts.append(self._text_rows([self.layout.gen_end_id] + self.text_ids(self.template.end), train))
        sequence = self._finish(parts)
        if boxes and pixel is not None:
            sequence.object_slots = [first + slot for slot in _covered(boxes, *pixel.shape[:2])]
        return self._fit(sequence)

    def _finish(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> Sequence:
        return Sequence(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))

    def _fit(self, sequence: Sequence) -> Sequence:
        """``sequence`` if it fits ``max_length``; else cut to it (``overlong="truncate"``) or refused."""
        length, limit = len(sequence), self.max_length
        if limit is None or length <= limit:
            return sequence
        message = f"the sequence has {length} slots, longer than the model's context of {limit}"
        if self.overlong != "truncate":
            raise OverlongSequenceError(message)
        first = sequence.ids[:limit, 0]
        layout = self.layout
        blocks = ((layout.image_start_id, layout.image_end_id), (layout.gen_start_id, layout.gen_end_id))
        if any(int((first == start).sum()) != int((first == end).sum()) for start, end in blocks):
            raise OverlongSequenceError(f"{message}, and cutting it there would split an image")
        if not bool((sequence.labels[1:limit] >= 0).any()):
            raise OverlongSequenceError(f"{message}, and cutting it there would leave nothing to learn")
        return Sequence(
            sequence.ids[:limit],
            sequence.labels[:limit],
            None if sequence.segments is None else sequence.segments[:limit],
            [(query, slots) for query, slots in sequence.grounding if query + 1 < limit],
            [slot for slot in sequence.object_slots if slot < limit],
        )


def _length(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(ids.shape[0] for ids, _ in parts)


def _covered(boxes: tuple[Box, ...], rows: int, cols: int) -> list[int]:
    """Sorted raster indices of the grid cells that any of ``boxes`` covers (:func:`box_slots`)."""
    return sorted({slot for box in boxes for slot in box_slots(box, rows, cols)})


def box_slots(box: Box, rows: int, cols: int, min_cover: float = 0.1) -> list[int]:
    """Raster indices of the ``rows x cols`` grid cells that ``box`` (image fractions) covers.

    A cell counts when the box covers at least ``min_cover`` of it, and the cell holding the
    box's centre always counts, so a box smaller than a cell still names one slot.
    """
    left, top, right, bottom = box
    found = set()
    for row in range(rows):
        overlap_y = min(bottom, (row + 1) / rows) - max(top, row / rows)
        if overlap_y <= 0:
            continue
        for col in range(cols):
            overlap_x = min(right, (col + 1) / cols) - max(left, col / cols)
            if overlap_x > 0 and overlap_x * overlap_y * rows * cols >= min_cover:
                found.add(row * cols + col)
    centre_row = min(int((top + bottom) / 2 * rows), rows - 1)
    centre_col = min(int((left + right) / 2 * cols), cols - 1)
    found.add(centre_row * cols + centre_col)
    return sorted(found)


def _check_depth(codes: torch.Tensor, depth: int, branch: str) -> None:
    if codes.dim() != 3 or codes.shape[-1] != depth:
        raise ConversationError(f"{branch} codes have shape {tuple(codes.shape)}; expected (h, w, {depth})")


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """``(L,)`` segment ids (0 = shared prefix, then 1, 2, ... in order) -> ``(L,)`` position ids:
    the prefix counts 0, 1, ...; every later segment restarts right after the prefix."""
    prefix = int((segments == 0).sum())
    positions = torch.arange(len(segments))
    opens = torch.ones(len(segments), dtype=torch.bool)
    opens[1:] = segments[1:] != segments[:-1]
    segment_start = torch.where(opens, positions, torch.zeros_like(positions)).cummax(dim=0).values
    return torch.where(segments == 0, positions, prefix + positions - segment_start)


def collate_sequences(sequences: list[Sequence], pad_id: int, left_pad: bool = False) -> dict[str, torch.Tensor]:
    """Pad to the longest: ``input_ids`` / ``labels`` ``(B, L, C)`` and ``attention_mask`` ``(B, L)``.

    When a sequence has ``segments`` (independent turns) the batch also carries
    ``segment_ids`` ``(B, L)`` (-1 on padding; a plain sequence is one segment 0) and the
    matching ``position_ids``. When a sequence has :attr:`Sequence.grounding`, the batch also
    carries ``grounding_index`` ``(N, 2)`` (batch row, query position) and ``grounding_slots``
    ``(N, L)`` (True at the slots the N-th answer is about). Sequences with
    :attr:`Sequence.object_slots` add ``object_slots`` ``(B, L)`` (True there).
    """
    length = max(len(seq) for seq in sequences)
    width = sequences[0].ids.shape[1]
    ids = torch.full((len(sequences), length, width), -1, dtype=torch.long)
    ids[:, :, 0] = pad_id
    labels = torch.full((len(sequences), length, width), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    segmented = any(seq.segments is not None for seq in sequences)
    segment_ids = torch.full((len(sequences), length), -1, dtype=torch.long)
    positions = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(length - len(seq), length) if left_pad else slice(0, len(seq))
        ids[row, span] = seq.ids
        labels[row, span] = seq.labels
        mask[row, span] = 1
        if segmented:
            segments = seq.segments if seq.segments is not None else torch.zeros(len(seq), dtype=torch.long)
            segment_ids[row, span] = segments
            positions[row, span] = segment_positions(segments)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if segmented:
        batch.update(segment_ids=segment_ids, position_ids=positions)
    targets = [(row, seq, query, slots) for row, seq in enumerate(sequences) for query, slots in seq.grounding]
    if targets:
        index = torch.zeros(len(targets), 2, dtype=torch.long)
        covered = torch.zeros(len(targets), length, dtype=torch.bool)
        for number, (row, seq, query, slots) in enumerate(targets):
            shift = length - len(seq) if left_pad else 0
            index[number] = torch.tensor([row, query + shift])
            covered[number, torch.tensor(slots, dtype=torch.long) + shift] = True
        batch.update(grounding_index=index, grounding_slots=covered)
    if any(seq.object_slots for seq in sequences):
        objects = torch.zeros(len(sequences), length, dtype=torch.bool)
        for row, seq in enumerate(sequences):
            shift = length - len(seq) if left_pad else 0
            objects[row, torch.tensor(seq.object_slots, dtype=torch.long) + shift] = True
        batch["object_slots"] = objects
    return batch
