"""Text side of the tokenizer: the frozen SigLIP text tower used for zero-shot scoring.

DualToken keeps SigLIP's text tower frozen (docs/architecture.md, "The method"), so zero-shot classification
through the semantic codes compares the re-pooled image embedding with the *original*
text embeddings. At paper scale the text tower and its tokenizer come from the same
SigLIP checkpoint; in the tiny default they come from the stage-0 teacher, whose text
tokenizer is a word-level Hugging Face tokenizer built from the Shapes world's closed
vocabulary (a sentencepiece model would only re-learn those words).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast, SiglipTextConfig, SiglipTextModel

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
EOS_TOKEN = "</s>"

_WORD_PATTERN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def build_word_tokenizer(texts: Iterable[str], max_length: int) -> PreTrainedTokenizerFast:
    """A word-level Hugging Face tokenizer over the words of ``texts`` (lower-cased).

    Every text is padded to ``max_length`` and ends with ``</s>``: SigLIP's text tower
    pools the last position, so fixed-length padding is how it was trained.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    words = sorted({word for text in texts for word in _WORD_PATTERN.findall(text.lower())})
    vocab = {PAD_TOKEN: 0, UNK_TOKEN: 1, EOS_TOKEN: 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, vocab[EOS_TOKEN])]
    )
    text_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        eos_token=EOS_TOKEN,
        model_max_length=max_length,
        padding_side="right",
        truncation_side="right",
    )
    return text_tokenizer


def tokenize_texts(text_tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> torch.Tensor:
    """``texts`` -> input ids ``(len(texts), max_length)``, padded the way SigLIP expects."""
    if isinstance(texts, str):
        raise TypeError("tokenize_texts expects a list of strings, got a single string")
    encoded = text_tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return encoded["input_ids"]


class TextTower(nn.Module):
    """A frozen SigLIP text encoder plus the learned logit scale and bias of SigLIP."""

    def __init__(self, text_model: SiglipTextModel, logit_scale: float, logit_bias: float) -> None:
        super().__init__()
        self.text_model = text_model
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.register_buffer("logit_bias", torch.tensor(float(logit_bias)))
        self.requires_grad_(False)

    @classmethod
    def from_config(cls, text_config: SiglipTextConfig) -> TextTower:
        return cls(SiglipTextModel(text_config), logit_scale=0.0, logit_bias=0.0)

    @property
    def max_length(self) -> int:
        return int(self.text_model.config.max_position_embeddings)

    def train(self, mode: bool = True) -> TextTower:
        # Frozen (the paper fine-tunes the vision tower only): stays in eval mode.
        return super().train(False)

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (T, L) -> L2-normalised text embeddings (T, D)."""
        embeds = self.text_model(input_ids=input_ids).pooler_output
        return nn.functional.normalize(embeds.float(), dim=-1)

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """image_embeds: (B, D) (unnormalised), text_embeds: (T, D) normalised -> logits (B, T)."""
        image_embeds = nn.functional.normalize(image_embeds.float(), dim=-1)
        return image_embeds @ text_embeds.t() * self.logit_scale.exp() + self.logit_bias
