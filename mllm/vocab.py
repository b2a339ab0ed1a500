"""The extended vocabulary: text tokens, boundary tokens, semantic codes, pixel codes.

One module owns the id layout. A Hugging Face tokenizer (any: the tiny default's
sentencepiece model, Qwen2.5's BPE) is extended in a fixed order::

    [ text vocabulary | boundary tokens | semantic codes | pixel codes | padding ]
      0 .. T-1          T .. T+B-1        S .. S+Ks-1      P .. P+Kp-1   .. V (multiple of 64)

Every visual code is a real token of the extended tokenizer (``<sem_00017>``,
``<pix_01023>``), so ids round-trip through ``tokenizer.decode`` / ``tokenizer(...)``.
The language model's embedding and head are resized to ``V``; the rows of the original
vocabulary are untouched, so text-only logits equal the original model's.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

# Boundary tokens, in id order. ``<image>`` / ``</image>`` frame an image the model reads;
# ``<image_gen_start>`` / ``<image_gen_end>`` frame an image the model writes.
IMAGE_START = "<image>"
IMAGE_END = "</image>"
GEN_START = "<image_gen_start>"
GEN_END = "<image_gen_end>"
BOUNDARY_TOKENS: tuple[str, ...] = (IMAGE_START, IMAGE_END, GEN_START, GEN_END)
# Chat-role markers of the tiny default's tokenizer (Qwen brings its own <|im_start|> etc.).
TINY_CHAT_TOKENS: tuple[str, ...] = ("<|user|>", "<|assistant|>", "<|end|>")


class VocabularyError(ValueError):
    """An id or code outside the range it must fall in, or a tokenizer that does not fit the layout."""


def semantic_token(code: int) -> str:
    return f"<sem_{code:05d}>"


def pixel_token(code: int) -> str:
    return f"<pix_{code:05d}>"


@dataclass(frozen=True)
class VocabLayout:
    """Id ranges of the extended vocabulary (see the module docstring)."""

    text_size: int
    semantic_size: int
    pixel_size: int
    pad_to_multiple_of: int = 64

    @property
    def boundary_offset(self) -> int:
        return self.text_size

    @property
    def semantic_offset(self) -> int:
        return self.text_size + len(BOUNDARY_TOKENS)

    @property
    def pixel_offset(self) -> int:
        return self.semantic_offset + self.semantic_size

    @property
    def used_size(self) -> int:
        """Number of ids that name a token (the tokenizer's length after extension)."""
        return self.pixel_offset + self.pixel_size

    @property
    def padded_size(self) -> int:
        """Rows of the resized embedding / head: ``used_size`` rounded up to the multiple."""
        multiple = self.pad_to_multiple_of
        return -(-self.used_size // multiple) * multiple

    def boundary_id(self, token: str) -> int:
        if token not in BOUNDARY_TOKENS:
            raise VocabularyError(f"{token!r} is not a boundary token; expected one of {BOUNDARY_TOKENS}")
        return self.boundary_offset + BOUNDARY_TOKENS.index(token)

    @property
    def image_start_id(self) -> int:
        return self.boundary_id(IMAGE_START)

    @property
    def image_end_id(self) -> int:
        return self.boundary_id(IMAGE_END)

    @property
    def gen_start_id(self) -> int:
        return self.boundary_id(GEN_START)

    @property
    def gen_end_id(self) -> int:
        return self.boundary_id(GEN_END)

    # ------------------------------------------------------------------ codes <-> ids
    def semantic_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Semantic codebook indices -> token ids (any shape)."""
        _check_codes(codes, self.semantic_size, "semantic")
        return codes + self.semantic_offset

    def pixel_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Pixel codebook indices -> token ids (any shape)."""
        _check_codes(codes, self.pixel_size, "pixel")
        return codes + self.pixel_offset

    def semantic_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> semantic codebook indices; every id must be a semantic code."""
        _check_ids(ids, self.semantic_offset, self.semantic_size, "semantic")
        return ids - self.semantic_offset

    def pixel_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> pixel codebook indices; every id must be a pixel code."""
        _check_ids(ids, self.pixel_offset, self.pixel_size, "pixel")
        return ids - self.pixel_offset

    def is_text(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= 0) & (ids < self.text_size)

    def is_semantic(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.semantic_offset) & (ids < self.pixel_offset)

    def is_pixel(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.pixel_offset) & (ids < self.used_size)

    def check_ids(self, ids: torch.Tensor, what: str = "input_ids") -> None:
        """Raise :class:`VocabularyError` naming the first id outside ``[-1, used_size)`` (-1 = empty depth)."""
        bad = (ids < -1) | (ids >= self.used_size)
        if bool(bad.any()):
            first = int(ids[bad].flatten()[0])
            raise VocabularyError(
                f"{what} contains id {first}, outside the extended vocabulary [0, {self.used_size}) "
                f"(text < {self.text_size}, semantic codes [{self.semantic_offset}, {self.pixel_offset}), "
                f"pixel codes [{self.pixel_offset}, {self.used_size}))"
            )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _check_codes(codes: torch.Tensor, size: int, branch: str) -> None:
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= size):
        bad = int(codes.min()) if int(codes.min()) < 0 else int(codes.max())
        raise VocabularyError(f"{branch} code {bad} is outside the {branch} codebook [0, {size})")


def _check_ids(ids: torch.Tensor, offset: int, size: int, branch: str) -> None:
    if ids.numel() and (int(ids.min()) < offset or int(ids.max()) >= offset + size):
        bad = int(ids.min()) if int(ids.min()) < offset else int(ids.max())
        raise VocabularyError(f"id {bad} is not a {branch} code (expected ids in [{offset}, {offset + size}))")


# ---------------------------------------------------------------------- tokenizers
def extend_tokenizer(
    text_tokenizer: Any, semantic_size: int, pixel_size: int, pad_to_multiple_of: int = 64
) -> VocabLayout:
    """Add the boundary and code tokens to ``text_tokenizer`` (in place) and return the layout.

    Idempotent: a tokenizer that already carries this exact extension (e.g. one loaded from a
    saved model folder) is checked and left as it is.
    """
    if semantic_size < 1 or pixel_size < 1:
        raise VocabularyError(f"codebook sizes must be >= 1, got semantic={semantic_size} pixel={pixel_size}")
    from transformers import AddedToken

    existing = text_tokenizer.convert_tokens_to_ids(IMAGE_START) if IMAGE_START in text_tokenizer.get_vocab() else None
    if existing is not None:
        layout = VocabLayout(existing, semantic_size, pixel_size, pad_to_multiple_of)
        check_tokenizer(text_tokenizer, layout)
        return layout
    text_size = len(text_tokenizer)
    names = [*BOUNDARY_TOKENS]
    names += [semantic_token(code) for code in range(semantic_size)]
    names += [pixel_token(code) for code in range(pixel_size)]
    added = text_tokenizer.add_tokens(
        [AddedToken(name, special=True, normalized=False) for name in names], special_tokens=True
    )
    if added != len(names):
        raise VocabularyError(f"the tokenizer already had {len(names) - added} of the visual tokens; cannot extend it")
    layout = VocabLayout(text_size, semantic_size, pixel_size, pad_to_multiple_of)
    check_tokenizer(text_tokenizer, layout)
    return layout


def row_ranges(layout: VocabLayout) -> dict[str, range]:
    """The embedding rows of each group of the extended vocabulary (padding rows belong to none)."""
    return {
        "text": range(0, layout.text_size),
        "boundary": range(layout.boundary_offset, layout.semantic_offset),
        "semantic": range(layout.semantic_offset, layout.pixel_offset),
        "pixel": range(layout.pixel_offset, layout.used_size),
    }


ROW_GROUPS: tuple[str, ...] = ("text", "boundary", "semantic", "pixel")


def row_mask(layout: VocabLayout, groups: Iterable[str], rows: int) -> torch.Tensor:
    """``(rows,)`` bool: True on the embedding rows of ``groups`` (names from :data:`ROW_GROUPS`)."""
    ranges = row_ranges(layout)
    mask = torch.zeros(rows, dtype=torch.bool)
    for group in groups:
        if group not in ranges:
            raise VocabularyError(f"unknown row group {group!r}; expected some of {ROW_GROUPS}")
        span = ranges[group]
        mask[span.start : span.stop] = True
    return mask


@torch.no_grad()
def init_rows_from_text_mean(weight: torch.Tensor, layout: VocabLayout) -> None:
    """Set every row past the text vocabulary (boundary, code and padding rows) to the mean text row.

    weight: ``(V, H)`` an input embedding or LM head. A new row at the mean is, to a first
    approximation, a token the pretrained LM already finds unremarkable: as an output row its
    logit is the average text logit, so the LM does not start putting mass on codes in its
    text answers (random rows of a tied head can), and as an input it is the centre of what
    the LM reads. This is what ``resize_token_embeddings(mean_resizing=True)`` aims at, applied
    to the rows a pretrained checkpoint already had beyond its tokenizer (Qwen2.5 pads its
    151,665 tokens to 151,936 rows) as well as to the new ones.
    """
    text = layout.text_size
    mean = weight[:text].float().mean(dim=0)
    weight[text:] = mean.to(weight.dtype)


def check_tokenizer(text_tokenizer: Any, layout: VocabLayout) -> None:
    """Raise if ``text_tokenizer``'s visual tokens do not sit at ``layout``'s ids."""
    probes = {
        IMAGE_START: layout.image_start_id,
        GEN_END: layout.gen_end_id,
        semantic_token(0): layout.semantic_offset,
        semantic_token(layout.semantic_size - 1): layout.pixel_offset - 1,
        pixel_token(0): layout.pixel_offset,
        pixel_token(layout.pixel_size - 1): layout.used_size - 1,
    }
    for token, expected in probes.items():
        found = text_tokenizer.convert_tokens_to_ids(token)
        if found != expected:
            raise VocabularyError(
                f"tokenizer maps {token} to id {found}, expected {expected}: it was extended for another layout "
                f"(text {layout.text_size}, semantic {layout.semantic_size}, pixel {layout.pixel_size})"
            )
    if len(text_tokenizer) != layout.used_size:
        raise VocabularyError(f"tokenizer has {len(text_tokenizer)} tokens; the layout expects {layout.used_size}")


def train_sentencepiece(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 256, extra_tokens: tuple[str, ...] = TINY_CHAT_TOKENS
) -> Any:
    """Train a BPE sentencepiece model on ``texts`` and return it as a Hugging Face tokenizer saved in ``out_dir``.

    ``vocab_size`` is an upper bound: a small corpus (the Shapes world has ~80 words) yields fewer pieces.
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="bpe",
        character_coverage=1.0,
        user_defined_symbols=list(extra_tokens),
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        minloglevel=2,
    )
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    text_tokenizer = LlamaTokenizer.from_pretrained(str(out_dir), add_bos_token=False, add_eos_token=False)
    text_tokenizer.pad_token = "<pad>"
    text_tokenizer.save_pretrained(str(out_dir))
    return text_tokenizer


def shapes_corpus(world: Any, split: str = "train", limit: int = 4000) -> list[str]:
    """Every caption, question and answer of the first ``limit`` scenes of ``split``."""
    texts: list[str] = []
    for index in range(min(limit, world.split_size(split))):
        sample = world.sample(split, index)
        texts.append(sample.caption)
        texts.extend(f"{pair.question} {pair.answer}" for pair in sample.qa)
    return texts


def save_layout(layout: VocabLayout, path: str | Path) -> None:
    Path(path).write_text(json.dumps(layout.to_dict(), indent=2) + "\n")


def load_layout(path: str | Path) -> VocabLayout:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary layout {path} is missing")
    return VocabLayout(**json.loads(path.read_text()))
