"""Tiny random models saved exactly as the hub ships the real ones, for offline end-to-end tests.

Each builder writes a ``save_pretrained`` folder whose layout and classes are those of the
checkpoints the paper configs name: a ``SiglipModel`` (SigLIP so400m), a ``Siglip2Model``
(NaFlex SigLIP2), a ``Qwen2ForCausalLM`` (Qwen2.5) and a Qwen2 fast BPE tokenizer with
Qwen's special tokens and a Jinja chat template equivalent to Qwen2.5-Instruct's. Only the
sizes are tiny. :func:`place_in_hub_cache` lays a folder out as the Hugging Face hub cache
does, so a test can name it by a hub id with ``HF_HOME`` pointed at a temporary folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from mllm.vocab import shapes_corpus
from tokenizer.text_tower import build_word_tokenizer
from training.data.shapes import ShapesWorld, ShapesWorldConfig
from training.mllm_data import DESCRIBE_PROMPT

IMAGE_SIZE = 32
PATCH_SIZE = 8
VISION_LAYERS = 4
TEXT_MAX_LENGTH = 16
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5-Instruct's chat template without its tool-calling branches: a system message (the default
# one when the conversation has none), then every message as <|im_start|>role\n...<|im_end|>\n.
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _corpus(limit: int = 1500) -> list[str]:
    chat = ["system", "user", "assistant", "You are a helpful assistant.", QWEN_DEFAULT_SYSTEM]
    return [*shapes_corpus(ShapesWorld(ShapesWorldConfig(image_size=IMAGE_SIZE)), limit=limit), DESCRIBE_PROMPT, *chat]


def _text_config() -> dict:
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TEXT_MAX_LENGTH,
    )


def save_siglip(directory: Path, seed: int = 0) -> Path:
    """A random ``SiglipModel`` (fixed 32-px grid of 4 x 4 patches) and its text tokenizer."""
    from transformers import SiglipConfig, SiglipModel

    return _save_siglip_family(directory, seed, SiglipModel, SiglipConfig, dict(image_size=IMAGE_SIZE))


def save_siglip2(directory: Path, seed: int = 0, position_grid: int = IMAGE_SIZE // PATCH_SIZE) -> Path:
    """A random NaFlex ``Siglip2Model`` whose position table is ``position_grid`` patches a side."""
    from transformers import Siglip2Config, Siglip2Model

    return _save_siglip_family(directory, seed, Siglip2Model, Siglip2Config, dict(num_patches=position_grid**2))


def _save_siglip_family(directory: Path, seed: int, model_class, config_class, vision_options: dict) -> Path:
    """A random SigLIP-family model with the shared tiny text and vision shapes, and its text tokenizer."""
    torch.manual_seed(seed)
    text_tokenizer = build_word_tokenizer(_corpus(300), max_length=TEXT_MAX_LENGTH)
    text = _text_config() | dict(vocab_size=len(text_tokenizer), pad_token_id=0, eos_token_id=2, bos_token_id=None)
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=2,
        patch_size=PATCH_SIZE,
        **vision_options,
    )
    model = model_class(config_class(text_config=text, vision_config=vision))
    model.save_pretrained(directory)
    text_tokenizer.save_pretrained(directory)
    return directory


def build_qwen_tokenizer(vocab_size: int = 600):
    """A Qwen2 fast tokenizer: a byte-level BPE trained on the Shapes world's text with Qwen's
    pre-tokenisation, Qwen's special tokens and a Qwen2.5-style chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    vocab = backend.get_vocab(with_added_tokens=False)
    merges = [tuple(pair) if not isinstance(pair, str) else tuple(pair.split(" ")) for pair in _merges(backend)]
    text_tokenizer = Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=4096,
    )
    text_tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return text_tokenizer


def _merges(backend) -> list:
    import json

    return json.loads(backend.to_str())["model"]["merges"]


def save_qwen_tokenizer(directory: Path) -> Path:
    build_qwen_tokenizer().save_pretrained(directory)
    return directory


def save_qwen2(directory: Path, text_vocab: int, seed: int = 0) -> Path:
    """A random ``Qwen2ForCausalLM`` with tied embeddings; like Qwen2.5's, its embedding has more
    rows than the tokenizer has tokens (padded to a multiple of 64, plus 64)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    rows = -(-text_vocab // 64) * 64 + 64
    config = Qwen2Config(
        vocab_size=rows,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
    )
    Qwen2ForCausalLM(config).save_pretrained(directory)
    return directory


def place_in_hub_cache(folder: Path, hub_cache: Path, repo_id: str, revision: str = "0" * 40) -> Path:
    """Copy ``folder`` into ``hub_cache`` as the hub cache stores ``repo_id`` (one snapshot,
    ``refs/main`` naming it); returns the snapshot folder."""
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot
