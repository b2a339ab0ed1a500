"""LLM stages: train the unified model on pre-tokenised codes (docs/training.md, "LLM stages").

A stage is data (``configs/stages/*.yaml``): which parameters train (globs over parameter
names), the learning rate, the data mix and the loss weights. The paper's four stages are
align (visual embeddings / projector on captions), understand (+ the LLM on VQA),
generate (the depth head on text-image pairs, LLM frozen) and joint (everything, a mix).
Each stage starts from the previous stage's model folder (``stage.init``) or, for the
first, builds one from ``model`` (a base LM from a config or ``from_pretrained``, a text
tokenizer, and the code shards' layout).

    dualtoken train-mllm --config configs/stages/tiny/understand.yaml
    torchrun --nproc_per_node 8 -m training.train_mllm --config configs/stages/qwen2_5_3b/understand.yaml

The model folder a stage writes (``<output_dir>/model``) holds the model (safetensors), the
extended text tokenizer, and ``dualtoken.json`` (the DualToken tokenizer's path for decoding).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from mllm.chat import QWEN_TEMPLATE, ChatTemplate, ConversationError, Sequence, SequenceBuilder, collate_sequences
from mllm.generation import generate_text
from mllm.modeling import (
    GENERATED_POSITIONS,
    IMAGE_POSITIONS,
    IMAGE_ROPES,
    DualTokenMLLMForCausalLM,
    init_code_embeddings,
    pick_attn_implementation,
)
from mllm.vocab import TINY_CHAT_TOKENS, extend_tokenizer, shapes_corpus, train_sentencepiece
from tokenizer.config import ConfigError
from tokenizer.files import atomic_directory
from training import distributed
from training.common import (
    MetricsWriter,
    autocast,
    build_optimizer,
    count_parameters,
    format_metrics,
    restore_schedule_lr,
    seed_everything,
    setup_logging,
    warmup_cosine,
)
from training.config import DeepSpeedConfig, LoopConfig, OptimConfig, load_config
from training.data.code_shards import CodeStore, normalise_key
from training.data.conversations import read_conversations, read_text_image_pairs

logger = logging.getLogger(__name__)

MODEL_DIRNAME = "model"
SIDECAR = "dualtoken.json"
DESCRIBE_PROMPT = "describe the image."
SOURCES = ("vqa", "t2i", "caption")
VQA_TURNS = ("conversation", "independent")
LOSS_WEIGHTS = ("text", "pixel", "semantic", "contrast", "grounding")  # the weightable terms of the model's loss


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    """How the first stage builds the model (later stages load ``stage.init`` instead)."""

    llm_config: dict[str, Any] = field(default_factory=dict)  # a transformers config dict (model_type: qwen2 ...)
    llm_pretrained: str | None = None  # local folder or hub id of a causal LM; wins over llm_config
    text_tokenizer: str | None = None  # HF tokenizer folder; None = train sentencepiece on the Shapes world
    sentencepiece_vocab: int = 256
    chat_template: str = "tiny"  # tiny | qwen
    read: list[str] = field(default_factory=lambda: ["semantic"])
    write: list[str] = field(default_factory=lambda: ["pixel"])
    input_fusion: str = "sum"
    depth_head_layers: int = 2
    depth_head_heads: int = 4
    depth_head_hidden: int = 0
    # Row + column embeddings added to every image slot, so that the LM knows where in the grid a
    # slot sits without working it out from 1-D positions: false | learned (true) | sincos (fixed
    # 2-D sine-cosine features of norm image_position_scale; mllm.modeling.sincos_grid_table) |
    # projector (the same features added to the visual projector's input, so that a slot's
    # embedding mixes what it shows with where it is; needs input_fusion concat_mlp or sum_mlp) |
    # gated (the features scaled channel by channel by a learned linear map of the slot's codes,
    # added to the slot's embedding: the content path stays as it is).
    image_position_embedding: bool | str = False
    image_position_scale: float = 1.0
    # causal | bidirectional: with bidirectional, every slot of an image the model reads attends to
    # its whole image (a prefix-LM block); generated images and text stay causal. Needs SDPA or eager.
    image_attention: str = "causal"
    # 1d | 2d: with 2d, the slots of a read image rotate by their row and column in two of every
    # three rotary frequencies (mllm.modeling.GridRotaryEmbedding; M-RoPE-like); text and generated
    # images keep the LM's own 1-D rotary positions. Needs a rotary LM (Llama / Qwen2 families).
    image_rope: str = "1d"
    # none | sincos: with sincos, the slots of an image the model draws get fixed 2-D sine-cosine row
    # and column features (norm image_position_scale) added to their input, so that the slot that
    # predicts the next one knows where in the grid it is; images the model reads are left alone.
    # Parameter-free. With it, image_position_embedding places the slots of read images only.
    generated_position_embedding: str = "none"
    # random | codebook: start the visual code rows (and the depth heads' code embeddings) as a
    # fixed linear map of the DualToken tokenizer's code vectors (mllm.modeling.init_code_embeddings).
    code_embedding_init: str = "random"
    max_length: int = 0  # 0 = the LM's max_position_embeddings
    attn_implementation: str = "auto"  # auto = FlashAttention-2 when installed (GPU), else SDPA
    gradient_checkpointing: bool = False
    dtype: str = "float32"  # weights dtype when loading a pretrained LM (bfloat16 on GPUs)

    def __post_init__(self) -> None:
        _require(
            self.chat_template in ("tiny", "qwen"), f"model.chat_template={self.chat_template!r}; expected tiny|qwen"
        )
        _require(
            self.code_embedding_init in ("random", "codebook"),
            f"model.code_embedding_init={self.code_embedding_init!r}; expected random|codebook",
        )
        _require(
            self.image_attention in ("causal", "bidirectional"),
            f"model.image_attention={self.image_attention!r}; expected causal|bidirectional",
        )
        _require(
            self.image_rope in IMAGE_ROPES, f"model.image_rope={self.image_rope!r}; expected " + "|".join(IMAGE_ROPES)
        )
        _require(
            self.image_position_embedding in (False, True, *IMAGE_POSITIONS),
            f"model.image_position_embedding={self.image_position_embedding!r}; expected "
            + "|".join(["false", *IMAGE_POSITIONS[1:]]),
        )
        _require(
            self.generated_position_embedding in GENERATED_POSITIONS,
            f"model.generated_position_embedding={self.generated_position_embedding!r}; expected "
            + "|".join(GENERATED_POSITIONS),
        )
        _require(
            _is_weight(self.image_position_scale) and self.image_position_scale > 0,
            f"model.image_position_scale={self.image_position_scale!r}; expected a number > 0",
        )
        _require(
            self.image_position_embedding != "projector" or self.input_fusion != "sum",
            "model.image_position_embedding=projector needs a visual projector: model.input_fusion concat_mlp "
            f"or sum_mlp, not {self.input_fusion!r}",
        )
        _require(
            bool(self.llm_config) or bool(self.llm_pretrained),
            "model.llm_config or model.llm_pretrained is required to build the first stage's model",
        )


def _is_weight(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


@dataclass
class StageConfig:
    name: str = "stage"
    init: str | None = None  # a previous stage's model folder; None = build from `model`
    trainable: list[str] = field(default_factory=lambda: ["*"])  # parameter-name globs
    frozen: list[str] = field(default_factory=list)  # globs removed from `trainable`
    loss_weights: dict[str, float] = field(default_factory=lambda: {"text": 1.0, "pixel": 1.0, "semantic": 1.0})
    uncond_prob: float = 0.1  # caption dropped -> learns the unconditional branch for CFG
    # loss_weights.contrast > 0 adds, for every captioned text-to-image item, the same image under
    # another record's caption, and the term softplus(-contrast_beta * margin) (see model.forward).
    contrast_beta: float = 0.1
    # One weight per pixel RVQ depth: the pixel loss becomes the weighted mean of the per-depth
    # cross-entropies (null = plain mean). Deeper depths hold fine residuals that stay near their
    # unigram entropy in short runs; lower weights there leave the LM's gradient to depth 1.
    pixel_depth_weights: list[float] | None = None
    # loss_weights.grounding > 0: answers whose data gives boxes (the Shapes writer gives the
    # objects each answer is about) train the first `grounding_heads` attention heads of decoder
    # layer `grounding_layer` (null = the middle layer) to look at those image slots from the
    # position that predicts the answer (see model.forward).
    grounding_layer: int | None = None
    grounding_heads: int = 1
    # Text-to-image pairs with boxes (the Shapes writer gives its objects'): the pixel
    # cross-entropy of the slots under the caption's objects counts this many times (1 = plain).
    object_pixel_weight: float = 1.0
    # Text-to-image items: this fraction of the generated slots get random pixel codes as their
    # input (their targets stay true; semantic codes, when written, are left alone), so the next
    # slot cannot just be copied from its neighbours and has to come from the caption as well
    # (0 = off). Held-out losses are computed on clean inputs.
    image_input_noise: float = 0.0

    @property
    def contrast(self) -> bool:
        return self.loss_weights.get("contrast", 0.0) > 0

    @property
    def grounding(self) -> bool:
        return self.loss_weights.get("grounding", 0.0) > 0

    def __post_init__(self) -> None:
        _require(0.0 <= self.uncond_prob < 1.0, f"stage.uncond_prob={self.uncond_prob}; expected in [0, 1)")
        unknown = set(self.loss_weights) - set(LOSS_WEIGHTS)
        _require(not unknown, f"stage.loss_weights has unknown terms {sorted(unknown)}; expected {LOSS_WEIGHTS}")
        for name, weight in self.loss_weights.items():
            # A negative weight would train the model away from its data (and contrast < 0 would
            # silently mean off): 0 switches a term off.
            _require(
                _is_weight(weight),
                f"stage.loss_weights.{name}={weight!r}; expected a finite number >= 0 (0 switches the term off)",
            )
        _require(self.contrast_beta > 0, f"stage.contrast_beta={self.contrast_beta}; expected > 0")
        _require(
            self.grounding_layer is None or (isinstance(self.grounding_layer, int) and self.grounding_layer >= 0),
            f"stage.grounding_layer={self.grounding_layer!r}; expected a decoder layer index >= 0 or null (the middle one)",
        )
        _require(
            _is_weight(self.object_pixel_weight) and self.object_pixel_weight > 0,
            f"stage.object_pixel_weight={self.object_pixel_weight!r}; expected a finite number > 0 (1 = plain mean)",
        )
        _require(
            _is_weight(self.image_input_noise) and self.image_input_noise < 1.0,
            f"stage.image_input_noise={self.image_input_noise!r}; expected a fraction in [0, 1) (0 = off)",
        )
        _require(
            isinstance(self.grounding_heads, int) and self.grounding_heads >= 1,
            f"stage.grounding_heads={self.grounding_heads!r}; expected an integer >= 1",
        )
        weights = self.pixel_depth_weights
        if weights is not None:
            _require(
                isinstance(weights, list) and all(_is_weight(w) for w in weights) and any(w > 0 for w in weights),
                f"stage.pixel_depth_weights={weights!r}; expected a list of finite numbers >= 0, one per pixel "
                "depth, not all 0",
            )


@dataclass
class MLLMDataConfig:
    codes: str = "runs/tiny/data/train/codes"  # code shards of the training images (training/data/code_shards.py)
    val_codes: str | None = None  # code shards of the held-out images (default: `codes`)
    conversations: list[str] = field(default_factory=list)  # LLaVA-format JSON / JSONL files
    text_image: list[str] = field(default_factory=list)  # text-to-image JSONL files
    image_root: str | None = None  # default: each file's folder
    mix: dict[str, float] = field(default_factory=lambda: {"vqa": 1.0, "t2i": 1.0, "caption": 0.0})
    val_conversations: list[str] = field(default_factory=list)
    val_text_image: list[str] = field(default_factory=list)
    # How a VQA record's turns are trained: "conversation" (one dialogue, later turns see the
    # earlier ones) or "independent" (each question-answer pair sees the image and itself only,
    # positions as in a one-question prompt; for sets of independent questions such as the
    # Shapes world's, whose other questions would give answers away).
    vqa_turns: str = "conversation"

    def __post_init__(self) -> None:
        _require(
            self.vqa_turns in VQA_TURNS, f"data.vqa_turns={self.vqa_turns!r}; expected one of {'|'.join(VQA_TURNS)}"
        )
        unknown = set(self.mix) - set(SOURCES)
        _require(not unknown, f"data.mix has unknown sources {sorted(unknown)}; expected a subset of {SOURCES}")
        _require(any(w > 0 for w in self.mix.values()), "data.mix gives every source weight 0")
        _require(all(w >= 0 for w in self.mix.values()), "data.mix weights must be >= 0")


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    merge_on_save: bool = True  # the final model folder holds merged weights (adapter saved beside it)


@dataclass
class EvalConfig:
    vqa_samples: int = 256  # held-out questions answered greedily at the end of the stage
    max_new_tokens: int = 8
    batch_size: int = 32


@dataclass
class MLLMStageConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(llm_config={"model_type": "qwen2"}))
    stage: StageConfig = field(default_factory=StageConfig)
    data: MLLMDataConfig = field(default_factory=MLLMDataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------- model
def build_model(model_config: ModelConfig, store: CodeStore) -> tuple[DualTokenMLLMForCausalLM, Any]:
    """A fresh unified model and its extended text tokenizer, sized by the code shards' layout."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    meta = store.meta
    if model_config.text_tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(model_config.text_tokenizer)
    else:
        from training.data.shapes import ShapesWorld, ShapesWorldConfig

        corpus = shapes_corpus(ShapesWorld(ShapesWorldConfig()), limit=4000)
        corpus += [DESCRIBE_PROMPT, *TINY_CHAT_TOKENS]
        import tempfile

        # The tokenizer holds its model in memory: the folder it was trained into can go (the
        # stage saves it with the model).
        with tempfile.TemporaryDirectory(prefix="dualtoken-sp-") as folder:
            tokenizer = train_sentencepiece(corpus, folder, model_config.sentencepiece_vocab)
    attn = pick_attn_implementation(model_config.attn_implementation)
    dtype = getattr(torch, model_config.dtype)
    if model_config.llm_pretrained:
        llm = AutoModelForCausalLM.from_pretrained(model_config.llm_pretrained, attn_implementation=attn, dtype=dtype)
    else:
        payload = dict(model_config.llm_config)
        payload.setdefault("vocab_size", len(tokenizer))
        llm_config = AutoConfig.for_model(**payload)
        llm = AutoModelForCausalLM.from_config(llm_config, attn_implementation=attn)
    layout = extend_tokenizer(tokenizer, meta.semantic_codebook_size, meta.pixel_codebook_size)
    template = QWEN_TEMPLATE if model_config.chat_template == "qwen" else ChatTemplate()
    model = DualTokenMLLMForCausalLM.from_llm(
        llm,
        layout,
        semantic_depth=meta.semantic_depth,
        pixel_depth=meta.pixel_depth,
        grid_size=tuple(meta.grid),
        read=model_config.read,
        write=model_config.write,
        input_fusion=model_config.input_fusion,
        depth_head_layers=model_config.depth_head_layers,
        depth_head_heads=model_config.depth_head_heads,
        depth_head_hidden=model_config.depth_head_hidden,
        image_position_embedding=model_config.image_position_embedding,
        image_position_scale=model_config.image_position_scale,
        image_attention=model_config.image_attention,
        image_rope=model_config.image_rope,
        generated_position_embedding=model_config.generated_position_embedding,
        chat_template=template.to_dict(),
        attn_implementation=attn,
    )
    if model_config.code_embedding_init == "codebook":
        semantic, pixel = tokenizer_codebooks(store)
        init_code_embeddings(model, semantic, pixel)
    return model, tokenizer


def tokenizer_codebooks(store: CodeStore) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The semantic and pixel codebooks of the DualToken tokenizer that wrote ``store``.

    The tokenizer is found through the shards' ``meta.json`` and must be the one that wrote
    them (same weight fingerprint), or the rows would describe another tokenizer's codes.
    """
    from tokenizer import DualTokenizer
    from training.data.code_shards import tokenizer_fingerprint

    meta = store.meta
    path = Path(meta.tokenizer_path)
    if not path.is_dir():
        raise ConfigError(
            f"model.code_embedding_init=codebook needs the tokenizer that wrote {store.out_dir} "
            f"({meta.tokenizer_path}, from its meta.json), which is not a folder"
        )
    dualtoken = DualTokenizer.from_pretrained(path)
    if tokenizer_fingerprint(dualtoken) != meta.tokenizer_fingerprint:
        raise ConfigError(
            f"{path} is not the tokenizer that wrote {store.out_dir} (weight fingerprints differ); "
            "re-tokenise or set model.code_embedding_init=random"
        )
    pixel = dualtoken.pixel_quantizer.codebook if dualtoken.pixel_quantizer is not None else None
    return dualtoken.semantic_quantizer.codebook, pixel


def load_model_folder(
    directory: str | Path, attn_implementation: str = "auto"
) -> tuple[DualTokenMLLMForCausalLM, Any, dict]:
    """Model, extended text tokenizer and sidecar (DualToken tokenizer path) from a stage's model folder."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    for name in ("config.json", "model.safetensors", SIDECAR):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"model folder {directory} is missing {name}; was the stage finished?")
    model = DualTokenMLLMForCausalLM.from_pretrained(
        str(directory), attn_implementation=pick_attn_implementation(attn_implementation)
    )
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    extend_tokenizer(tokenizer, model.config.semantic_size, model.config.pixel_size)  # checks the layout
    sidecar = json.loads((directory / SIDECAR).read_text())
    return model, tokenizer, sidecar


def model_folder_is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in ("config.json", "model.safetensors", SIDECAR, "metrics.json"))


def select_trainable(model: torch.nn.Module, trainable: list[str], frozen: list[str]) -> list[str]:
    """Set ``requires_grad`` from name globs (LoRA adapters always train); returns the trainable names."""
    names = []
    for name, param in model.named_parameters():
        wanted = any(fnmatch.fnmatchcase(name, glob) for glob in trainable) or "lora_" in name
        wanted = wanted and not any(fnmatch.fnmatchcase(name, glob) for glob in frozen)
        param.requires_grad_(wanted)
        if wanted:
            names.append(name)
    if not names:
        raise ConfigError(
            f"stage.trainable={trainable} (minus stage.frozen={frozen}) matches no parameter; "
            f"names look like {[n for n, _ in list(model.named_parameters())[:3]]}"
        )
    return names


def apply_lora(model: DualTokenMLLMForCausalLM, config: LoraConfig) -> None:
    """Wrap the base LM's linear layers with LoRA adapters (peft)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=list(config.target_modules)
    )
    model.llm = get_peft_model(model.llm, peft_config)


def merge_lora(model: DualTokenMLLMForCausalLM) -> None:
    """Fold LoRA adapters into the base weights (no-op without LoRA)."""
    if hasattr(model.llm, "merge_and_unload"):
        model.llm = model.llm.merge_and_unload()


# ---------------------------------------------------------------------------------- data
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


class MixtureSampler(torch.utils.data.Sampler):
    """One source per step, drawn by the mix weights; records drawn within it; all from ``(seed, step)``.

    A step's batch depends on the step alone (exact resume), and a batch never mixes short
    text-to-image sequences with long conversations, so little compute goes to padding. Rank
    r of w takes the r-th contiguous slice of the global batch.
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
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.max_steps = max_steps
        self.rank = rank
        self.world = world

    def batch_for_step(self, step: int) -> list[tuple[int, int, int]]:
        rng = np.random.default_rng([self.seed, step])
        source = int(rng.choice(len(self.dataset.names), p=self.dataset.weights))
        global_batch = self.batch_size * self.world
        items = rng.integers(0, self.dataset.sizes[source], size=global_batch)
        first = self.rank * self.batch_size
        return [(source, int(items[j]), step * global_batch + j) for j in range(first, first + self.batch_size)]

    def __iter__(self):
        for step in range(self.start_step, self.max_steps):
            yield self.batch_for_step(step)

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step)


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


def _check_images_tokenised(store: CodeStore, records: list[Any], codes_dir: str | None) -> None:
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
    conv_files = config.val_conversations if val else config.conversations
    pair_files = config.val_text_image if val else config.text_image
    conversations = [
        rec for path in conv_files for rec in read_conversations(path, config.image_root, check_files=False)
    ]
    pairs = [rec for path in pair_files for rec in read_text_image_pairs(path, config.image_root, check_files=False)]
    return conversations, pairs


# ---------------------------------------------------------------------------------- eval
def vqa_accuracy(
    model: DualTokenMLLMForCausalLM,
    builder: SequenceBuilder,
    store: CodeStore,
    tokenizer: Any,
    conversations: list[Any],
    limit: int,
    batch_size: int = 32,
    max_new_tokens: int = 8,
) -> dict[str, float]:
    """Exact-match accuracy of greedy answers to single questions, overall and per question kind.

    Every (question, answer) pair of the first records is asked on its own with the image.
    """
    questions: list[tuple[Sequence, str, str]] = []
    for record in conversations:
        kinds = record.meta.get("kinds") or []
        user_turns = [t for t in record.turns if t.role == "user"]
        answers = [t for t in record.turns if t.role == "assistant"]
        for number, (question, answer) in enumerate(zip(user_turns, answers, strict=False)):
            text = question.text.replace("<image>", "").strip()
            prompt = builder.conversation(
                [("user", f"<image>\n{text}")],
                *_codes_for(store, record),
                train=False,
                add_generation_prompt=True,
            )
            kind = kinds[number] if number < len(kinds) else "all"
            questions.append((prompt, answer.text.strip(), kind))
            if len(questions) >= limit:
                break
        if len(questions) >= limit:
            break
    end_ids = tuple(builder.text_ids(builder.template.end))
    stop = (end_ids[0],) if end_ids else ()
    correct: dict[str, list[int]] = defaultdict(list)
    was_training = model.training
    model.eval()
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        outputs = generate_text(model, [q[0] for q in chunk], max_new_tokens, stop_ids=stop)
        for (_, answer, kind), ids in zip(chunk, outputs, strict=True):
            predicted = tokenizer.decode(ids, skip_special_tokens=True).strip()
            correct[kind].append(int(predicted == answer))
            correct["all"].append(int(predicted == answer))
    model.train(was_training)
    return {f"vqa_{kind}": float(np.mean(values)) for kind, values in sorted(correct.items())}


def _codes_for(store: CodeStore, record: Any) -> tuple[torch.Tensor, torch.Tensor]:
    pixel, semantic = store.get(normalise_key(record.image_key))
    return semantic, pixel


# ---------------------------------------------------------------------------------- trainer
class MLLMStageTrainer:
    """One LLM stage: model, engine, mixed data; ``fit`` is the explicit loop."""

    def __init__(self, config: MLLMStageConfig, dist_state: distributed.DistState) -> None:
        self.config = config
        self.dist = dist_state
        self.output_dir = Path(config.loop.output_dir)
        seed_everything(config.loop.seed)
        self.store = CodeStore(config.data.codes)
        stage = config.stage
        if stage.init:
            self.model, self.tokenizer, sidecar = load_model_folder(stage.init, config.model.attn_implementation)
            self.tokenizer_path = sidecar.get("tokenizer_path")
        else:
            self.model, self.tokenizer = build_model(config.model, self.store)
            self.tokenizer_path = self.store.meta.tokenizer_path
        self._check_layout()
        self._check_grounding()
        if config.model.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if config.lora.enabled:
            apply_lora(self.model, config.lora)
        names = select_trainable(self.model, stage.trainable, stage.frozen)
        logger.info(
            "stage %s: %.3fM of %.3fM parameters train (%d tensors)",
            stage.name,
            count_parameters(self.model) / 1e6,
            count_parameters(self.model, trainable_only=False) / 1e6,
            len(names),
        )
        max_length = config.model.max_length or None
        self.builder = SequenceBuilder.for_model(self.tokenizer, self.model.config, max_length)
        self.model.to(dist_state.device)
        loop, optim = config.loop, config.optim
        optimizer = build_optimizer([p for p in self.model.parameters() if p.requires_grad], optim, self.model)
        self.engine = distributed.TrainEngine(
            self.model,
            optimizer,
            warmup_cosine(optimizer, optim, loop.max_steps),
            optim.grad_clip,
            config.deepspeed,
            loop.batch_size,
            loop.precision,
            dist_state.world_size,
        )
        self.engines = {"mllm": self.engine}
        self.writer = MetricsWriter(self.output_dir, enabled=dist_state.is_main)
        conversations, pairs = read_sources(config.data)
        self.val_conversations, self.val_pairs = read_sources(config.data, val=True)
        self.val_store = CodeStore(config.data.val_codes) if config.data.val_codes else self.store
        _check_images_tokenised(self.store, conversations + pairs, config.data.codes)
        _check_images_tokenised(self.val_store, self.val_conversations + self.val_pairs, config.data.val_codes)
        self.dataset = MixedSequences(
            self.builder,
            self.store,
            conversations,
            pairs,
            config.data.mix,
            stage.uncond_prob,
            loop.seed,
            contrast=stage.contrast,
            vqa_turns=config.data.vqa_turns,
            grounding=stage.grounding,
            object_boxes=stage.object_pixel_weight != 1.0,
            image_input_noise=stage.image_input_noise,
        )
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _check_grounding(self) -> None:
        stage, text = self.config.stage, self.model.config.text_config
        layers, heads = text.num_hidden_layers, text.num_attention_heads
        if stage.grounding_layer is not None and stage.grounding_layer >= layers:
            raise ConfigError(
                f"stage.grounding_layer={stage.grounding_layer}; the LM has decoder layers 0..{layers - 1}"
            )
        if stage.grounding_heads > heads:
            raise ConfigError(f"stage.grounding_heads={stage.grounding_heads}; the LM has {heads} attention heads")

    def _check_layout(self) -> None:
        meta, model_config = self.store.meta, self.model.config
        expected = (meta.semantic_codebook_size, meta.pixel_codebook_size, meta.semantic_depth, meta.pixel_depth)
        found = (
            model_config.semantic_size,
            model_config.pixel_size,
            model_config.semantic_depth,
            model_config.pixel_depth,
        )
        if expected != found:
            raise ConfigError(
                f"data.codes={self.config.data.codes} holds codes (semantic size, pixel size, semantic depth, "
                f"pixel depth) = {expected} but the model was built for {found}"
            )
        weights = self.config.stage.pixel_depth_weights
        written = model_config.pixel_depth if self.model.pixel_head is not None else 1
        if weights is not None and len(weights) != written:
            raise ConfigError(
                f"stage.pixel_depth_weights has {len(weights)} entries; the model writes {written} pixel depth(s)"
            )

    def _collate(self, items: list[Sequence | tuple[Sequence, Sequence]]) -> dict[str, torch.Tensor]:
        """Pad a batch; ``(matched, mismatched)`` items put their mismatched rows after the others
        and list the pairs in ``contrast_rows``."""
        paired = [row for row, item in enumerate(items) if isinstance(item, tuple)]
        rows = [item[0] if isinstance(item, tuple) else item for item in items] + [items[row][1] for row in paired]
        batch = collate_sequences(rows, self.pad_id)
        if paired:
            batch["contrast_rows"] = torch.tensor([[row, len(items) + k] for k, row in enumerate(paired)])
        return batch

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        batch = {key: value.to(self.dist.device) for key, value in batch.items()}
        stage = self.config.stage
        with autocast(self.config.loop.precision, self.dist.device):
            out = self.engine(
                **batch,
                loss_weights=stage.loss_weights,
                contrast_beta=stage.contrast_beta,
                pixel_depth_weights=stage.pixel_depth_weights,
                grounding_layer=stage.grounding_layer,
                grounding_heads=stage.grounding_heads,
                object_pixel_weight=stage.object_pixel_weight,
            )
        self.engine.backward(out.loss)
        grad_norm = self.engine.step()
        record = {"loss": out.loss.item()}
        record.update({name: value.item() for name, value in out.losses.items() if name != "idle_heads"})
        if grad_norm is not None and math.isfinite(grad_norm):
            record["grad_norm"] = grad_norm
        return record

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out losses (one batch per source) and VQA exact-match accuracy by question kind."""
        metrics: dict[str, float] = {}
        model = self.engine.module
        model.eval()
        if self.val_pairs:
            # Each image also under the next pair's caption: the held-out contrast_margin (nats per
            # image) says how much the model's likelihood depends on the caption at all.
            pairs = self.val_pairs[:64]
            items = []
            for pair, other in zip(pairs, pairs[1:] + pairs[:1], strict=True):
                codes = self.val_store.get(normalise_key(pair.image_key))
                matched = self.builder.generation(pair.caption, *codes)
                items.append((matched, self.builder.generation(other.caption, *codes)) if len(pairs) > 1 else matched)
            out = model(**self._to_device(self._collate(items)))
            metrics.update({f"val_t2i_{k}": v.item() for k, v in out.losses.items() if k != "contrast"})
        items = grounded_sequences(
            self.builder, self.val_store, self.val_conversations[:256], self.dataset.independent_turns
        )
        if items:
            # How much the grounding heads look at the objects each answer is about (whether or
            # not this stage trains them to): the mean attention mass on those slots.
            stage = self.config.stage
            out = model(
                **self._to_device(self._collate(items)),
                grounding_layer=stage.grounding_layer,
                grounding_heads=stage.grounding_heads,
            )
            metrics.update(
                {f"val_vqa_{k}": out.losses[k].item() for k in ("text", "grounding_mass") if k in out.losses}
            )
        if self.val_conversations and self.config.eval.vqa_samples > 0:
            metrics.update(
                vqa_accuracy(
                    model,
                    self.builder,
                    self.val_store,
                    self.tokenizer,
                    self.val_conversations,
                    self.config.eval.vqa_samples,
                    self.config.eval.batch_size,
                    self.config.eval.max_new_tokens,
                )
            )
        model.train()
        self.writer.scalars(step, metrics, prefix="eval/")
        return metrics

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.dist.device) for key, value in batch.items()}

    def fit(self) -> dict[str, float]:
        loop = self.config.loop
        checkpoints = self.output_dir / "checkpoints"
        start_step = 0
        latest = distributed.latest_checkpoint(checkpoints) if loop.resume else None
        if latest is not None:
            start_step = distributed.load_checkpoint(latest, self.engines)["step"]
            restore_schedule_lr(self.engine.scheduler)
            logger.info("resumed stage %s from %s (step %d)", self.config.stage.name, latest, start_step)
        sampler = MixtureSampler(
            self.dataset, loop.batch_size, loop.seed, start_step, loop.max_steps, self.dist.rank, self.dist.world_size
        )
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, collate_fn=self._collate, num_workers=loop.num_workers
        )
        step, started, window = start_step, time.time(), []
        self.engine.train()
        progress = tqdm(
            loader,
            desc=f"LLM stage {self.config.stage.name}",
            initial=start_step,
            total=loop.max_steps,
            disable=not self.dist.is_main,
        )
        for batch in progress:
            record = self.train_step(batch)
            step += 1
            window.append(record)
            if step % loop.log_every == 0 or step == loop.max_steps:
                keys = sorted({key for r in window for key in r})
                averaged = {k: float(np.mean([r[k] for r in window if k in r])) for k in keys}
                averaged = distributed.all_reduce_scalars(averaged)
                averaged["lr"] = self.engine.lr
                self.writer.scalars(step, averaged, prefix="train/")
                progress.set_postfix({k: f"{averaged[k]:.3f}" for k in ("text", "pixel") if k in averaged})
                window.clear()
            if step % loop.eval_every == 0 and step < loop.max_steps:
                logger.info("step %d: %s", step, format_metrics(self.evaluate(step)))
            if step % loop.save_every == 0 or step == loop.max_steps:
                distributed.save_checkpoint(checkpoints, step, self.engines, {})
                distributed.prune_checkpoints(checkpoints)
        return self.finish(step, time.time() - started)

    def finish(self, step: int, train_seconds: float) -> dict[str, float]:
        metrics = self.evaluate(step)
        metrics.update(train_seconds=train_seconds, steps=float(step))
        # Under ZeRO-3 a parameter's tensor is an empty partition unless a forward left it gathered
        # (micro model: numel() counts 0 of 41888 after initialisation, 23168 after one evaluate).
        metrics["trainable_parameters"] = float(
            sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters() if p.requires_grad)
        )
        state_dict = consolidated_state_dict(self.engine)  # collective under ZeRO-3: every rank calls it
        if self.dist.is_main:
            save_model_folder(
                self.engine.module,
                self.tokenizer,
                self.output_dir / MODEL_DIRNAME,
                {"tokenizer_path": self.tokenizer_path, "stage": self.config.stage.name, "config": asdict(self.config)},
                metrics,
                state_dict=state_dict,
                merge=self.config.lora.merge_on_save,
            )
            (self.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
            self.writer.scalars(step, metrics, prefix="final/")
            logger.info("stage %s done: %s", self.config.stage.name, format_metrics(metrics))
        distributed.barrier()
        self.writer.close()
        return metrics


def consolidated_state_dict(engine: distributed.TrainEngine) -> dict[str, torch.Tensor] | None:
    """The full state dict on rank 0 under ZeRO-3 (parameters are partitioned); None otherwise."""
    if not engine.uses_deepspeed or getattr(engine._wrapped, "zero_optimization_stage", lambda: 0)() != 3:
        return None
    return engine._wrapped._zero3_consolidated_16bit_state_dict()


def save_model_folder(
    model: DualTokenMLLMForCausalLM,
    tokenizer: Any,
    directory: Path,
    sidecar: dict[str, Any],
    metrics: dict[str, float],
    state_dict: dict[str, torch.Tensor] | None = None,
    merge: bool = True,
) -> Path:
    """Write model + tokenizer + sidecar + metrics through a staging folder, then rename (atomic)."""
    if hasattr(model.llm, "peft_config") and merge and state_dict is not None:
        raise ConfigError("merging LoRA under ZeRO-3 is not supported; set lora.merge_on_save=false")
    with atomic_directory(directory) as staging:
        if hasattr(model.llm, "peft_config"):
            model.llm.save_pretrained(str(staging / "adapter"))
            if merge:
                import copy

                model = copy.deepcopy(model)
                merge_lora(model)
        model.save_pretrained(str(staging), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        (staging / SIDECAR).write_text(json.dumps(sidecar, indent=2, default=str))
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return directory


def main(argv: list[str] | None = None) -> dict[str, float]:
    import argparse

    parser = argparse.ArgumentParser(prog="dualtoken train-mllm", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="stage YAML (configs/stages/*/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    config = load_config(MLLMStageConfig, args.config, args.overrides)
    dist_state = distributed.init_distributed(config.deepspeed.enabled)
    setup_logging(dist_state.rank)
    if config.loop.num_threads:
        torch.set_num_threads(config.loop.num_threads)
    try:
        return MLLMStageTrainer(config, dist_state).fit()
    except ConversationError as error:
        raise ConfigError(str(error)) from error
    finally:
        distributed.cleanup_distributed()


if __name__ == "__main__":
    main()
