"""Shared tiny setup of the LLM-stage tests: a random visual tokenizer, Shapes data, code shards.

``make_mllm_data(root)`` writes, under ``root``: a saved visual tokenizer, ``train/`` and ``val/``
Shapes splits (LLaVA conversations + text-image pairs + PNGs) and each split's code shards;
``stage_overrides(data)`` points a stage config at them and shrinks the LM to a few thousand
parameters, so a stage step takes well under a second on one core.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tokenizer.config import (
    BackboneConfig,
    DecoderConfig,
    DualTokenizerConfig,
    ProjectionConfig,
    QuantizerConfig,
    TapsConfig,
)
from tokenizer.model import DualTokenizer
from training.data.code_shards import collect_image_paths, tokenize_to_shards
from training.data.conversations import write_shapes
from training.data.shapes import ShapesWorld, ShapesWorldConfig

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32
TRAIN_IMAGES = 48
VAL_IMAGES = 12


def tiny_qwen2(
    vocab: int, hidden: int = 32, layers: int = 2, max_positions: int = 64, tie: bool = False
) -> Qwen2ForCausalLM:
    """A random Qwen2 LM of a few thousand parameters, the same weights for the same arguments."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
    )
    return Qwen2ForCausalLM(config)


def tiny_visual_tokenizer(seed: int = 0, pixel_depth: int = 2) -> DualTokenizer:
    """A random-weight DualTokenizer for 32-px images (4 x 4 codes)."""
    torch.manual_seed(seed)
    config = DualTokenizerConfig(
        backbone=BackboneConfig(
            image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, num_layers=4, num_heads=2, intermediate_size=64
        ),
        taps=TapsConfig(pixel_layer=1, semantic_layer=3),
        projection=ProjectionConfig(kind="mlp", hidden_dim=32),
        pixel_quantizer=QuantizerConfig(codebook_size=32, code_dim=8, depth=pixel_depth),
        semantic_quantizer=QuantizerConfig(codebook_size=16, code_dim=4, depth=2),
        decoder=DecoderConfig(base_channels=8, channel_mult=(1, 2, 2, 2), num_res_blocks=1),
    )
    return DualTokenizer(config).eval()


def make_mllm_data(root: Path) -> dict[str, Path]:
    """Visual tokenizer, train/val Shapes data and their code shards under ``root``."""
    world = ShapesWorld(ShapesWorldConfig(seed=5, image_size=IMAGE_SIZE))
    visual_tokenizer = tiny_visual_tokenizer()
    visual_tokenizer_dir = visual_tokenizer.save_pretrained(root / "tokenizer")
    paths: dict[str, Path] = {"visual_tokenizer": Path(visual_tokenizer_dir)}
    for split, count in (("train", TRAIN_IMAGES), ("val", VAL_IMAGES)):
        written = write_shapes(world, split, root / split, count)
        keys, image_root = collect_image_paths([written["llava"]], [written["t2i"]])
        tokenize_to_shards(
            visual_tokenizer,
            keys,
            image_root,
            root / split / "codes",
            batch_size=16,
            shard_size=32,
            visual_tokenizer_path=str(visual_tokenizer_dir),
        )
        paths[f"{split}_llava"] = written["llava"]
        paths[f"{split}_t2i"] = written["t2i"]
        paths[f"{split}_codes"] = root / split / "codes"
    return paths


def stage_overrides(data: dict[str, Path], output_dir: Path, init: Path | None = None, steps: int = 2) -> list[str]:
    """``--set`` overrides that run a stage config on ``make_mllm_data``'s output with a micro LM."""
    return [
        f"stage.init={init if init is not None else 'null'}",
        f"loop.output_dir={output_dir}",
        f"loop.max_steps={steps}",
        "loop.batch_size=4",
        "loop.log_every=1",
        "loop.save_every=1",
        "loop.num_threads=1",
        "optim.warmup_steps=1",
        f"data.codes={data['train_codes']}",
        f"data.val_codes={data['val_codes']}",
        f"data.conversations=[{data['train_llava']}]",
        f"data.text_image=[{data['train_t2i']}]",
        f"data.val_conversations=[{data['val_llava']}]",
        f"data.val_text_image=[{data['val_t2i']}]",
        "model.llm_config.hidden_size=32",
        "model.llm_config.intermediate_size=64",
        "model.llm_config.num_hidden_layers=2",
        "model.llm_config.num_attention_heads=2",
        "model.llm_config.num_key_value_heads=1",
        "model.sentencepiece_vocab=128",
        "model.depth_head_layers=1",
        "model.depth_head_heads=2",
        "eval.vqa_samples=8",
        "eval.batch_size=8",
        # The tiny stage configs weigh 4 pixel depths; the fixture's codes have 2.
        "stage.pixel_depth_weights=[1.0,0.1]",
    ]
