"""The training data of an LLM stage: records of the data files as sequences, and the batch order.

:class:`MixedSequences` turns VQA conversations, text-to-image pairs and captions into
:class:`~mllm.chat.Sequence` items; :class:`MixtureSampler` picks each step's source and records
from ``(seed, step)`` alone, so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import copy
import logging
import os
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mllm.chat import OverlongSequenceError, Sequence, SequenceBuilder
from tokenizer.config import ConfigError
from training.common import StepIndexedSampler
from training.data.code_shards import normalise_key
from training.data.code_store import CodeStore
from training.data.conversations import read_conversations, read_text_image_pairs
from training.mllm_config import SOURCES, MLLMDataConfig

logger = logging.getLogger(__name__)

DESCRIBE_PROMPT = "describe the image."
_USES = {"vqa": ("vqa",), "t2i": ("t2i", "caption")}  # the mix sources that read each kind of record
_INPUT_NOISE_STREAM = 7  # rng stream of image_input_noise, apart from the caption-dropping draws


class MixedSequences(Dataset):
    """Training sequences from a weighted mix of VQA, text-to-image and caption sources.

    Items are addressed by ``(source, record, draw)`` tuples from :class:`MixtureSampler`;
    ``draw`` seeds the per-item randomness (dropping the caption for classifier-free guidance).
    """

    def __init__(
        self,
        builder: SequenceBuilder,
        store: CodeStore,
        conversations: list[Any],
        pairs: list[Any],
        mix: dict[str, float],
        uncond_prob: float,
        seed: int,
        contrast: bool = False,
        vqa_turns: str = "conversation",
        grounding: bool = False,
        object_boxes: bool = False,
        image_input_noise: float = 0.0,
    ) -> None:
        self.builder = builder
        self.image_input_noise = image_input_noise
        self.grounding = grounding
        self.object_boxes = object_boxes
        self.independent_turns = vqa_turns == "independent"
        self.store = store
        self.sources = {"vqa": conversations, "t2i": pairs, "caption": pairs}
        weights = {name: mix.get(name, 0.0) for name in SOURCES}
        for name, weight in weights.items():
            if weight > 0 and not self.sources[name]:
                raise ConfigError(f"data.mix gives {name!r} weight {weight} but no {name} records were read")
        if grounding and weights["vqa"] > 0 and not any(turn.boxes for r in conversations for turn in r.turns):
            raise ConfigError(
                "stage.loss_weights.grounding > 0 but no answer in data.conversations has 'boxes' (the regions it "
                "is about); write the data again (the Shapes writer adds them) or set the weight to 0"
            )
        if object_boxes and weights["t2i"] > 0 and not any(pair.boxes for pair in pairs):
            raise ConfigError(
                "stage.object_pixel_weight != 1 but no pair in data.text_image has 'boxes' (where the caption's "
                "objects are); write the data again (the Shapes writer adds them) or set it to 1"
            )
        self.names = [name for name in SOURCES if weights[name] > 0]
        self.weights = np.array([weights[name] for name in self.names]) / sum(weights[name] for name in self.names)
        self.sizes = [len(self.sources[name]) for name in self.names]
        self.uncond_prob = uncond_prob
        self.seed = seed
        self.contrast = contrast

    def __len__(self) -> int:
        return sum(self.sizes)

    def __getitem__(self, key: tuple[int, int, int]) -> Sequence | tuple[Sequence, Sequence]:
        """A sequence; with ``contrast``, a captioned text-to-image item is ``(matched, mismatched)``."""
        source, item, draw = key
        name = self.names[source]
        record = self.sources[name][item]
        if name == "vqa":
            return conversation_sequence(
                self.builder, self.store, record, independent=self.independent_turns, grounding=self.grounding
            )
        pixel, semantic = self.store.get(normalise_key(record.image_key))
        if name == "t2i":
            rng = np.random.default_rng([self.seed, draw])
            if rng.random() < self.uncond_prob:
                return self._noisy(self.builder.generation("", pixel, semantic), draw)
            boxes = record.boxes if self.object_boxes else ()
            matched = self._noisy(self.builder.generation(record.caption, pixel, semantic, boxes=boxes), draw)
            if not self.contrast:
                return matched
            # The same image under another caption: the same slots get the same noise.
            other = self.builder.generation(self._other_caption(record.caption, rng), pixel, semantic)
            return matched, self._noisy(other, draw)
        turns = [("user", f"<image>\n{DESCRIBE_PROMPT}"), ("assistant", record.caption)]
        return self.builder.conversation(turns, semantic=semantic, pixel=pixel)

    def _noisy(self, sequence: Sequence, draw: int) -> Sequence:
        """``sequence`` with ``image_input_noise`` of its generated slots reading random pixel codes."""
        if self.image_input_noise <= 0:
            return sequence
        layout, split = self.builder.layout, self.builder.semantic_depth
        generated = layout.is_pixel(sequence.labels[:, split]).nonzero()[:, 0]
        rng = np.random.default_rng([self.seed, draw, _INPUT_NOISE_STREAM])
        chosen = generated[torch.from_numpy(rng.random(len(generated)) < self.image_input_noise)]
        codes = rng.integers(0, layout.pixel_size, size=(len(chosen), self.builder.pixel_depth))
        sequence.ids = sequence.ids.clone()
        sequence.ids[chosen, split:] = layout.pixel_ids(torch.from_numpy(codes))
        return sequence

    def _other_caption(self, caption: str, rng: np.random.Generator) -> str:
        """A different record's caption (a few draws; the last one stands if all match)."""
        pairs = self.sources["t2i"]
        for _ in range(8):
            other = pairs[int(rng.integers(len(pairs)))].caption
            if other != caption:
                break
        return other


class MixtureSampler(StepIndexedSampler):
    """One source per step, drawn by the mix weights; records drawn within it; all from ``(seed, step)``.

    A step's batch depends on the step alone (exact resume), and a batch never mixes short
    text-to-image sequences with long conversations, so little compute goes to padding. Each
    micro-batch of each rank is a contiguous slice of the global batch
    (:meth:`~training.common.StepIndexedSampler.micro_offset`).
    """

    def __init__(
        self,
        dataset: MixedSequences,
        batch_size: int,
        seed: int,
        start_step: int,
        max_steps: int,
        rank: int,
        world: int,
        accumulation: int = 1,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.max_steps = max_steps
        self.rank = rank
        self.world = world
        self.accumulation = accumulation

    def batch_for_step(self, step: int, micro: int = 0) -> list[tuple[int, int, int]]:
        rng = np.random.default_rng([self.seed, step])
        source = int(rng.choice(len(self.dataset.names), p=self.dataset.weights))
        global_batch = self.global_batch
        items = rng.integers(0, self.dataset.sizes[source], size=global_batch)
        first = self.micro_offset(micro)
        return [(source, int(items[j]), step * global_batch + j) for j in range(first, first + self.batch_size)]


def conversation_sequence(
    builder: SequenceBuilder,
    store: CodeStore,
    record: Any,
    train: bool = True,
    independent: bool = False,
    grounding: bool = False,
) -> Sequence:
    """The training sequence of a conversation record; ``grounding`` keeps its answers' boxes."""
    turns = [(turn.role, turn.text) for turn in record.turns]
    if record.image_key is None:
        return builder.conversation(turns, train=train)
    boxes = [turn.boxes for turn in record.turns] if grounding else None
    pixel, semantic = store.get(normalise_key(record.image_key))
    build = builder.independent_turns if independent else builder.conversation
    return build(turns, semantic=semantic, pixel=pixel, train=train, boxes=boxes)


def grounded_sequences(
    builder: SequenceBuilder, store: CodeStore, records: list[Any], independent: bool = False, limit: int = 64
) -> list[Sequence]:
    """Sequences, with their grounding targets, of the first ``limit`` image records whose answers have boxes."""
    grounded = [r for r in records if r.image_key and any(turn.boxes for turn in r.turns)][:limit]
    return [conversation_sequence(builder, store, r, independent=independent, grounding=True) for r in grounded]


def drop_skipped_images(store: CodeStore, records: list[Any], codes_dir: str | None) -> list[Any]:
    """``records`` without those whose image ``tokenize-codes --on-bad-image skip`` left out of
    ``store`` as unreadable (counted in the log; the store's ``bad_images.txt`` lists them)."""
    skipped = store.skipped_images
    kept = [record for record in records if record.image_key is None or normalise_key(record.image_key) not in skipped]
    if len(kept) < len(records):
        logger.warning(
            "%d record(s) left out: %s skipped their image as unreadable", len(records) - len(kept), codes_dir
        )
    return kept


def fit_to_context(
    builder: SequenceBuilder,
    store: CodeStore,
    conversations: list[Any],
    pairs: list[Any],
    mix: dict[str, float],
    independent: bool = False,
    split: str = "train",
) -> tuple[list[Any], list[Any], dict[str, int]]:
    """The records whose sequences fit ``builder.max_length``, and how many were dropped or cut.

    Every record is laid out once before training (with placeholder codes of the store's grid,
    so no code is read): a sequence over the context is dropped, or with
    ``builder.overlong == "truncate"`` cut to it when the cut keeps every image block whole
    (:meth:`SequenceBuilder._fit`; otherwise dropped). A text-image pair must fit as every
    sequence the mix makes of it (text-to-image, and the caption conversation). Returns the kept
    conversations and pairs and ``{"overlong_dropped": n, "overlong_truncated": m}``; both counts
    are logged. Raises ConfigError naming the context when no record of a used source fits.
    """
    counts = {"overlong_dropped": 0, "overlong_truncated": 0}
    if builder.max_length is None:
        return conversations, pairs, counts
    height, width = store.meta.grid
    semantic = torch.zeros(height, width, builder.semantic_depth, dtype=torch.long)
    pixel = torch.zeros(height, width, builder.pixel_depth, dtype=torch.long)

    strict = copy.copy(builder)
    strict.overlong = "error"

    def build_all(maker: SequenceBuilder, record: Any, kind: str, blank: bool = False) -> int:
        """Lay out every sequence the stage makes of ``record`` (with ``blank``, every text empty);
        the longest length. OverlongSequenceError if one is too long."""
        if kind == "vqa":
            turns = [(turn.role, "" if blank else turn.text) for turn in record.turns]
            if record.image_key is None:
                return len(maker.conversation(turns))
            build = maker.independent_turns if independent else maker.conversation
            return len(build(turns, semantic=semantic, pixel=pixel))
        caption = "" if blank else record.caption
        lengths = [0]
        if mix.get("t2i", 0) > 0 or split != "train":  # held-out pairs are always scored as text-to-image
            lengths.append(len(maker.generation(caption, pixel, semantic)))
        if mix.get("caption", 0) > 0:
            turns = [("user", "" if blank else f"<image>\n{DESCRIBE_PROMPT}"), ("assistant", caption)]
            lengths.append(len(maker.conversation(turns, semantic=semantic, pixel=pixel)))
        return max(lengths)

    blank_lengths: dict[tuple, int] = {}

    def surely_fits(record: Any, kind: str) -> bool:
        """An upper bound on the record's lengths, without tokenising it, is within the context.

        The bound: the record's sequences with every text empty (once per record shape), plus,
        per text, its UTF-8 bytes (raw or NFKC-normalised, the larger: what a byte-level BPE or
        a sentencepiece model sees) and 2. Such a tokenizer gives at most one token per byte,
        plus a word-boundary marker per piece (a user turn is cut in two around its image).
        Records that do not pass are laid out exactly.
        """
        if kind == "vqa":
            texts = [turn.text for turn in record.turns]
            shape: tuple = (tuple(turn.role for turn in record.turns), record.image_key is None)
        else:
            texts, shape = [record.caption, DESCRIBE_PROMPT], ("pair",)
        if shape not in blank_lengths:
            try:
                blank_lengths[shape] = build_all(strict, record, kind, blank=True)
            except OverlongSequenceError:
                blank_lengths[shape] = builder.max_length + 1
        extra = sum(max(len(t.encode()), len(unicodedata.normalize("NFKC", t).encode())) + 2 for t in texts)
        return blank_lengths[shape] + extra <= builder.max_length

    def keep(records: list[Any], kind: str) -> list[Any]:
        kept = []
        for record in records:
            if surely_fits(record, kind):
                kept.append(record)
                continue
            try:
                build_all(strict, record, kind)
            except OverlongSequenceError:
                if builder.overlong != "truncate":
                    counts["overlong_dropped"] += 1
                    continue
                try:
                    build_all(builder, record, kind)
                except OverlongSequenceError:
                    counts["overlong_dropped"] += 1
                    continue
                counts["overlong_truncated"] += 1
            kept.append(record)
        return kept

    kept_conversations, kept_pairs = keep(conversations, "vqa"), keep(pairs, "pair")
    if counts["overlong_dropped"] or counts["overlong_truncated"]:
        logger.warning(
            "%s data: %d record(s) longer than the model's context of %d slots: %d dropped, %d truncated "
            "(data.overlong=%s)",
            split,
            counts["overlong_dropped"] + counts["overlong_truncated"],
            builder.max_length,
            counts["overlong_dropped"],
            counts["overlong_truncated"],
            "truncate" if builder.overlong == "truncate" else "drop",
        )
    for name, records, kept in (("vqa", conversations, kept_conversations), ("t2i", pairs, kept_pairs)):
        if records and not kept and (split != "train" or any(mix.get(s, 0) > 0 for s in _USES[name])):
            raise ConfigError(
                f"every one of the {len(records)} {split} {name} record(s) is longer than the model's context of "
                f"{builder.max_length} slots; raise model.max_length (up to the LM's max_position_embeddings)"
            )
    return kept_conversations, kept_pairs, counts


def check_images_tokenised(store: CodeStore, records: list[Any], codes_dir: str | None) -> None:
    """Fail before training when a record's image has no codes (not tokenised, or a typo), or
    when one store key would stand for two image files."""
    files: dict[str, Path] = {}
    missing: list[str] = []
    for record in records:
        if record.image_key is None:
            continue
        key, image = normalise_key(record.image_key), Path(os.path.normpath(record.image))
        if key not in store:
            missing.append(record.image_key)
        first = files.setdefault(key, image)
        # Paths are compared as strings first: only two spellings of one key touch the disk (a
        # link to the same folder is one image, not two).
        if first != image and os.path.realpath(first) != os.path.realpath(image):
            # Data files in different folders, each with paths relative to its own folder: the
            # code store is keyed by the path as written, so both would read one image's codes.
            raise ConfigError(
                f"image path {record.image_key!r} names two files, {first} and {image}: data files in different "
                f"folders give the same relative path, and {codes_dir} keys codes by that path; give the images "
                "distinct paths, or set data.image_root and tokenise every file with that --image-root"
            )
    if missing:
        raise ConfigError(
            f"{len(missing)} image(s) named by the data files have no codes in {codes_dir} (first: {missing[0]!r}); "
            "tokenise them with `dualtoken tokenize-codes` or fix the paths"
        )


def read_sources(config: MLLMDataConfig, val: bool = False) -> tuple[list[Any], list[Any]]:
    """The conversation and text-to-image records of the data files (the held-out ones with ``val``)."""
    conv_files = config.val_conversations if val else config.conversations
    pair_files = config.val_text_image if val else config.text_image
    conversations = [
        rec for path in conv_files for rec in read_conversations(path, config.image_root, check_files=False)
    ]
    pairs = [rec for path in pair_files for rec in read_text_image_pairs(path, config.image_root, check_files=False)]
    return conversations, pairs


def record_codes(store: CodeStore, record: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(semantic, pixel)`` codes of a record's image."""
    pixel, semantic = store.get(normalise_key(record.image_key))
    return semantic, pixel
