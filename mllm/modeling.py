"""The unified model: a Hugging Face causal LM whose vocabulary carries DualToken codes.

Sequences are made of *slots*. A text slot holds one token id; an image slot holds the RVQ
codes of one grid cell, so an image of ``h x w`` cells takes ``h * w`` slots whatever the
RVQ depth. ``input_ids`` is ``(B, L)`` for text only, or ``(B, L, C)`` with
``C = semantic_depth + pixel_depth`` columns per slot: columns ``[0, Ds)`` hold semantic
code ids (or, for a text slot, its token id in column 0), columns ``[Ds, Ds + Dp)`` hold
pixel code ids; ``-1`` marks an empty column. A slot's input embedding is the sum of its
ids' embeddings (``input_fusion="sum"``; with depth 1 an ordinary token embedding), or a
2-layer MLP over the sum (``"sum_mlp"``) or over the channel concatenation of the semantic
and pixel sums (``"concat_mlp"``, the paper's fusion).

Outputs: text positions use the LM head. A position whose *next* slot is a pixel slot feeds
a :class:`DepthHead` that predicts that slot's codes depth by depth (RQ-Transformer /
VILA-U); with pixel depth 1 and ``depth_head_layers=0`` this is the LM head restricted to
the pixel-code rows. An optional second head predicts semantic codes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from mllm.vocab import VocabLayout, VocabularyError

BRANCHES = ("semantic", "pixel")
# The terms of DualTokenMLLMOutput.loss; other entries of ``losses`` are diagnostics (accuracies, CE per depth).
LOSS_TERMS = ("text", "pixel", "semantic", "contrast", "grounding", "idle_heads")
FUSIONS = ("sum", "sum_mlp", "concat_mlp")
IMAGE_ATTENTIONS = ("causal", "bidirectional")
IMAGE_POSITIONS = ("none", "learned", "sincos", "projector", "gated")
IMAGE_ROPES = ("1d", "2d")
GENERATED_POSITIONS = ("none", "sincos")
IGNORE = -100

logger = logging.getLogger(__name__)


def _position_mode(value: bool | str | None) -> str:
    """``image_position_embedding`` as one of IMAGE_POSITIONS (``True`` / ``False`` from older configs)."""
    if value is True:
        return "learned"
    if value is False or value is None:
        return "none"
    return str(value)


def sincos_grid_table(grid_size: Sequence[int], hidden: int, scale: float = 1.0) -> torch.Tensor:
    """``(rows * cols, hidden)`` fixed 2-D sine-cosine embeddings of a grid's slots, each of norm ``scale``.

    The first half of the channels encodes the row, the second half the column, each as sine /
    cosine pairs at frequencies spread geometrically from a quarter turn over the grid's side
    (its sine rises monotonically across the grid, a coordinate that a linear map reads off)
    to half a turn per slot (the finest difference between neighbours).
    """
    if hidden % 4:
        raise ValueError(f"sincos image positions need a hidden size divisible by 4, not {hidden}")
    pairs = hidden // 4

    def axis(length: int) -> torch.Tensor:
        lowest = math.pi / (2 * max(length, 1))
        omega = lowest * (math.pi / lowest) ** (torch.arange(pairs, dtype=torch.float64) / max(pairs - 1, 1))
        angles = torch.arange(length, dtype=torch.float64)[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (length, hidden / 2)

    rows, cols = int(grid_size[0]), int(grid_size[1])
    table = torch.cat(
        [axis(rows)[:, None, :].expand(rows, cols, -1), axis(cols)[None, :, :].expand(rows, cols, -1)], dim=-1
    )
    return (table.reshape(rows * cols, hidden) * (scale / math.sqrt(hidden / 2))).float()


def pick_attn_implementation(requested: str | None = None) -> str:
    """FlashAttention-2 when it is installed and a GPU is present, else PyTorch SDPA."""
    if requested and requested != "auto":
        return requested
    try:
        from transformers.utils import is_flash_attn_2_available
    except ImportError:  # pragma: no cover - very old transformers
        return "sdpa"
    if torch.cuda.is_available() and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"


class DualTokenMLLMConfig(PretrainedConfig):
    """Config of :class:`DualTokenMLLMForCausalLM`: the base LM's config plus the visual layout."""

    model_type = "dualtoken_mllm"
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        text_config: PretrainedConfig | dict | None = None,
        text_size: int = 0,
        semantic_size: int = 1,
        pixel_size: int = 1,
        semantic_depth: int = 1,
        pixel_depth: int = 1,
        grid_size: tuple[int, int] | list[int] = (1, 1),
        pad_to_multiple_of: int = 64,
        read: tuple[str, ...] | list[str] = ("semantic",),
        write: tuple[str, ...] | list[str] = ("pixel",),
        input_fusion: str = "sum",
        depth_head_layers: int = 2,
        depth_head_heads: int = 4,
        depth_head_hidden: int = 0,
        image_position_embedding: bool | str = False,
        image_position_scale: float = 1.0,
        image_attention: str = "causal",
        image_rope: str = "1d",
        generated_position_embedding: str = "none",
        chat_template: dict | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(text_config, dict):
            model_type = text_config.get("model_type")
            if model_type not in CONFIG_MAPPING:
                raise ValueError(f"text_config.model_type={model_type!r} is not a known transformers model type")
            text_config = CONFIG_MAPPING[model_type](**{k: v for k, v in text_config.items() if k != "model_type"})
        self.text_config = text_config
        self.text_size = int(text_size)
        self.semantic_size = int(semantic_size)
        self.pixel_size = int(pixel_size)
        self.semantic_depth = int(semantic_depth)
        self.pixel_depth = int(pixel_depth)
        self.grid_size = [int(v) for v in grid_size]
        self.pad_to_multiple_of = int(pad_to_multiple_of)
        self.read = list(read)
        self.write = list(write)
        self.input_fusion = input_fusion
        self.depth_head_layers = int(depth_head_layers)
        self.depth_head_heads = int(depth_head_heads)
        self.depth_head_hidden = int(depth_head_hidden)
        self.image_position_embedding = _position_mode(image_position_embedding)
        self.image_position_scale = float(image_position_scale)
        self.image_attention = image_attention
        self.image_rope = image_rope
        self.generated_position_embedding = generated_position_embedding
        self.chat_template = dict(chat_template or {})
        super().__init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        if not self.read or any(branch not in BRANCHES for branch in self.read):
            raise ValueError(f"read={self.read}; expected a non-empty subset of {BRANCHES}")
        if "pixel" not in self.write or any(branch not in BRANCHES for branch in self.write):
            raise ValueError(f"write={self.write}; expected ['pixel'] or ['pixel', 'semantic']")
        if self.input_fusion not in FUSIONS:
            raise ValueError(f"input_fusion={self.input_fusion!r}; expected one of {FUSIONS}")
        if self.image_position_embedding not in IMAGE_POSITIONS:
            raise ValueError(
                f"image_position_embedding={self.image_position_embedding!r}; expected one of {IMAGE_POSITIONS}"
            )
        if self.image_position_scale <= 0:
            raise ValueError(f"image_position_scale={self.image_position_scale}; expected > 0")
        if self.image_position_embedding == "projector" and self.input_fusion == "sum":
            raise ValueError(
                "image_position_embedding='projector' feeds the positions through the visual projector, "
                "which input_fusion='sum' does not have; use concat_mlp or sum_mlp"
            )
        if self.image_attention not in IMAGE_ATTENTIONS:
            raise ValueError(f"image_attention={self.image_attention!r}; expected one of {IMAGE_ATTENTIONS}")
        if self.image_rope not in IMAGE_ROPES:
            raise ValueError(f"image_rope={self.image_rope!r}; expected one of {IMAGE_ROPES}")
        if self.generated_position_embedding not in GENERATED_POSITIONS:
            raise ValueError(
                f"generated_position_embedding={self.generated_position_embedding!r}; "
                f"expected one of {GENERATED_POSITIONS}"
            )
        if self.semantic_depth < 1 or self.pixel_depth < 1:
            raise ValueError(f"depths must be >= 1 (semantic {self.semantic_depth}, pixel {self.pixel_depth})")
        if self.depth_head_layers == 0 and self.pixel_depth > 1:
            raise ValueError(
                f"depth_head_layers=0 uses the LM head for pixel codes, which needs pixel_depth=1 (got {self.pixel_depth})"
            )

    @property
    def layout(self) -> VocabLayout:
        return VocabLayout(self.text_size, self.semantic_size, self.pixel_size, self.pad_to_multiple_of)

    @property
    def slot_width(self) -> int:
        return self.semantic_depth + self.pixel_depth

    @property
    def image_slots(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        if isinstance(self.text_config, PretrainedConfig):
            output["text_config"] = self.text_config.to_dict()
        return output


class GridRotaryEmbedding(nn.Module):
    """The LM's rotary embedding with 2-D positions for the slots of the images it reads.

    Rotary frequency k follows the token's 1-D position when k % 3 == 0, its row when k % 3 == 1
    and its column when k % 3 == 2 (the frequencies interleaved, so that rows and columns each
    get fast and slow ones). A slot at (row, col) of an image whose first slot has 1-D position
    p has row position p + row and column position p + col; every other token has all three
    equal to its 1-D position, so text-only sequences, and images being generated, rotate
    exactly as with the wrapped embedding. Multimodal rotary positions (M-RoPE, Qwen2-VL) do
    the same with contiguous frequency sections. Under 1-D positions, raster order puts the
    slots of one column 8 positions apart and those of one row next to each other, so no
    rotary frequency picks out a column; with the column band a query can prefer one side of
    the image. Measured (README): the controlled test of ``scripts/position_learnability.py``
    learns "which side" with it (100 % against 46.5 %) but not "top or bottom", and the tiny
    recipe's position questions stay at chance, so it is off by default.

    :meth:`DualTokenMLLMForCausalLM.forward` sets :attr:`slot_index` (``(B, L)``, each read
    slot's index in its image in raster order, -1 elsewhere) for the duration of one call.
    """

    def __init__(self, rotary: nn.Module, columns: int) -> None:
        super().__init__()
        self.rotary = rotary
        self.columns = columns
        self.slot_index: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slot = self.slot_index
        positions = position_ids.expand(x.shape[0], -1) if position_ids.shape[0] == 1 else position_ids
        if slot is None or slot.shape != positions.shape or not bool((slot >= 0).any()):
            return self.rotary(x, position_ids)
        inv_freq = self.rotary.inv_freq.to(device=x.device, dtype=torch.float)
        flat = positions.float()
        on = slot >= 0
        start = flat - slot.float()
        rows = torch.where(on, start + torch.div(slot, self.columns, rounding_mode="floor").float(), flat)
        cols = torch.where(on, start + (slot % self.columns).float(), flat)
        band = torch.arange(inv_freq.numel(), device=x.device) % 3
        freqs = torch.stack((flat, rows, cols), dim=-1)[..., band] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = getattr(self.rotary, "attention_scaling", 1.0)
        return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)


class DepthHead(nn.Module):
    """Predicts the ``depth`` RVQ codes of one slot from the LM's hidden state, depth by depth.

    Input at depth 0 is the projected LM state; at depth ``d > 0`` it adds the embeddings of
    the codes already chosen at depths ``< d`` (their running sum, as the residual quantiser
    builds its output). A small causal transformer runs over the depths and each depth has
    its own classifier.
    """

    def __init__(
        self, lm_hidden: int, depth: int, codebook_size: int, hidden: int, num_layers: int, num_heads: int
    ) -> None:
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"depth head hidden size {hidden} is not divisible by its {num_heads} heads")
        self.depth = depth
        self.codebook_size = codebook_size
        self.in_proj = nn.Linear(lm_hidden, hidden)
        self.code_embed = nn.Embedding(codebook_size, hidden)
        self.depth_embed = nn.Embedding(depth, hidden)
        layer = nn.TransformerEncoderLayer(
            hidden, num_heads, 4 * hidden, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.classifier_weight = nn.Parameter(torch.empty(depth, hidden, codebook_size))
        self.classifier_bias = nn.Parameter(torch.zeros(depth, codebook_size))
        nn.init.normal_(self.classifier_weight, std=1.0 / math.sqrt(hidden))

    def _inputs(self, context: torch.Tensor, codes: torch.Tensor | None) -> torch.Tensor:
        """(N, H_lm), (N, d) chosen codes -> (N, d + 1, hidden) depth-transformer inputs."""
        start = self.in_proj(context).unsqueeze(1)
        steps = [start]
        if codes is not None and codes.shape[1]:
            running = start + self.code_embed(codes).cumsum(dim=1)
            steps.append(running)
        inputs = torch.cat(steps, dim=1)
        positions = torch.arange(inputs.shape[1], device=inputs.device)
        return inputs + self.depth_embed(positions)

    def _run(self, inputs: torch.Tensor) -> torch.Tensor:
        length = inputs.shape[1]
        mask = torch.triu(torch.full((length, length), float("-inf"), device=inputs.device), diagonal=1)
        return self.norm(self.blocks(inputs, mask=mask.to(inputs.dtype), is_causal=True))

    def forward(self, context: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``(N, depth, K)`` for target ``codes`` ``(N, depth)``."""
        hidden = self._run(self._inputs(context, codes[:, :-1]))
        return torch.einsum("ndh,dhk->ndk", hidden, self.classifier_weight) + self.classifier_bias

    def next_logits(self, context: torch.Tensor, codes: torch.Tensor | None) -> torch.Tensor:
        """Logits ``(N, K)`` of the next depth given the codes chosen so far ``(N, d)`` (or None)."""
        depth = 0 if codes is None else codes.shape[1]
        hidden = self._run(self._inputs(context, codes))[:, -1]
        return hidden @ self.classifier_weight[depth] + self.classifier_bias[depth]


@dataclass
class DualTokenMLLMOutput:
    """Losses (when labels were given), final hidden states and the KV cache."""

    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    hidden_states: torch.Tensor | None = None
    past_key_values: Any = None


class DualTokenMLLMForCausalLM(PreTrainedModel):
    """A causal LM with DualToken codes in its vocabulary, a depth head, and slot-wise inputs."""

    config_class = DualTokenMLLMConfig
    base_model_prefix = "mllm"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _no_split_modules = ["DepthHead"]

    def __init__(self, config: DualTokenMLLMConfig, llm: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        if llm is None:
            if config.text_config is None:
                raise ValueError("DualTokenMLLMConfig.text_config is missing: the base LM's config is required")
            llm = AutoModelForCausalLM.from_config(config.text_config)
        self.llm = llm
        # The wrapper's init resets the sub-config's attention implementation; without it the
        # decoder would build no causal mask. Use the wrapper's (set by from_pretrained /
        # from_config, ``attn_implementation=...``), else FlashAttention-2 when available, else SDPA.
        impl = getattr(config, "_attn_implementation", None) or pick_attn_implementation()
        if config.image_attention == "bidirectional" and impl.startswith("flash"):
            # FlashAttention takes no mask: the image blocks' bidirectional attention needs SDPA.
            logger.warning("image_attention=bidirectional needs a mask: using sdpa instead of %s", impl)
            impl = config._attn_implementation = "sdpa"
        self.llm.config._attn_implementation = impl
        layer_types = set(getattr(self.llm.config, "layer_types", None) or ["full_attention"])
        self._full_attention_only = layer_types == {"full_attention"}
        if config.image_attention == "bidirectional" and not self._full_attention_only:
            raise ValueError(
                f"image_attention=bidirectional supports full-attention LMs only; this one has layers {sorted(layer_types)}"
            )
        config.text_config = self.llm.config
        self._cache_kwarg = _cache_kwarg(self.llm.get_decoder())
        self._grid_rotary: GridRotaryEmbedding | None = None
        self.set_image_rope(config.image_rope)
        rows = self.llm.get_input_embeddings().weight.shape[0]
        if rows < config.layout.used_size:
            raise VocabularyError(
                f"the LM's embedding has {rows} rows but the extended vocabulary needs {config.layout.used_size}; "
                "build the model with DualTokenMLLMForCausalLM.from_llm, which resizes it"
            )
        hidden = self.llm.config.hidden_size
        if config.input_fusion == "sum":
            self.visual_projector = None
        else:
            width = 2 * hidden if config.input_fusion == "concat_mlp" else hidden
            self.visual_projector = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.image_rows = self.image_cols = self.image_position_gate = None
        if config.image_position_embedding == "learned":
            self.image_rows = nn.Embedding(config.grid_size[0], hidden)
            self.image_cols = nn.Embedding(config.grid_size[1], hidden)
        elif config.image_position_embedding == "gated":
            self.image_position_gate = self.new_position_gate()
        head_hidden = config.depth_head_hidden or hidden
        self.pixel_head = None
        if config.depth_head_layers > 0:
            self.pixel_head = DepthHead(
                hidden,
                config.pixel_depth,
                config.pixel_size,
                head_hidden,
                config.depth_head_layers,
                config.depth_head_heads,
            )
        self.semantic_head = None
        if "semantic" in config.write:
            self.semantic_head = DepthHead(
                hidden,
                config.semantic_depth,
                config.semantic_size,
                head_hidden,
                max(config.depth_head_layers, 1),
                config.depth_head_heads,
            )
        self.post_init()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_llm(cls, llm: PreTrainedModel, layout: VocabLayout, **options: Any) -> DualTokenMLLMForCausalLM:
        """Wrap a (pretrained) causal LM: resize its embedding/head to the extended vocabulary.

        The rows of the original vocabulary are kept, so text-only logits are unchanged.
        ``options`` are the remaining :class:`DualTokenMLLMConfig` fields.
        """
        rows = llm.get_input_embeddings().weight.shape[0]
        if rows < layout.text_size:
            raise VocabularyError(f"the LM has {rows} embedding rows but the text vocabulary has {layout.text_size}")
        target = max(rows, layout.used_size)
        multiple = layout.pad_to_multiple_of
        target = -(-target // multiple) * multiple
        if target != rows:
            llm.resize_token_embeddings(target, mean_resizing=False)
        config = DualTokenMLLMConfig(
            text_config=llm.config,
            text_size=layout.text_size,
            semantic_size=layout.semantic_size,
            pixel_size=layout.pixel_size,
            pad_to_multiple_of=multiple,
            **options,
        )
        return cls(config, llm=llm)

    def _init_weights(self, module: nn.Module) -> None:
        # Only this wrapper's own modules: the base LM initialises (or loads) itself.
        if not any(module is own or _contains(own, module) for own in self._own_modules()):
            return
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, DepthHead):
            nn.init.normal_(module.classifier_weight, std=std)
            nn.init.zeros_(module.classifier_bias)
        if module is self.image_position_gate:
            # At std 1 a slot's gates start at about its code vectors' norm, so where an object
            # is shows in an even pooling of the image from the first step; at 0.3 the learnability
            # test (scripts/position_learnability.py) stayed at chance for 240 steps, at 1.0 it
            # answered "which side" perfectly after 140.
            nn.init.normal_(module.weight, std=1.0)

    def set_image_rope(self, mode: str) -> None:
        """Switch the rotary positions of read image slots between ``1d`` (the LM's own) and ``2d``
        (:class:`GridRotaryEmbedding`); no weights change, so a trained model can be tried either way."""
        if mode not in IMAGE_ROPES:
            raise ValueError(f"image_rope={mode!r}; expected one of {IMAGE_ROPES}")
        decoder = self.llm.get_decoder()
        if mode == "2d":
            self._grid_rotary = self._install_grid_rotary(decoder)
        elif self._grid_rotary is not None:
            decoder.rotary_emb = self._grid_rotary.rotary
            self._grid_rotary = None
        self.config.image_rope = mode

    def _install_grid_rotary(self, decoder: nn.Module) -> GridRotaryEmbedding:
        rotary = getattr(decoder, "rotary_emb", None)
        if rotary is None or not hasattr(rotary, "inv_freq"):
            raise ValueError(
                f"image_rope='2d' needs a decoder with a rotary embedding (rotary_emb.inv_freq, as Llama / Qwen2 "
                f"have); {type(decoder).__name__} has none: use image_rope='1d'"
            )
        if getattr(rotary, "rope_type", "default") != "default":
            raise ValueError(
                f"image_rope='2d' rotates with the LM's base frequencies; this LM uses rope_type="
                f"{rotary.rope_type!r}, whose frequencies change with the sequence: use image_rope='1d'"
            )
        if isinstance(rotary, GridRotaryEmbedding):
            return rotary
        decoder.rotary_emb = GridRotaryEmbedding(rotary, self.config.grid_size[1])
        return decoder.rotary_emb

    def read_slot_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, L, C)`` ids -> ``(B, L)``: each slot of an image the model reads, its index in the
        image (raster order); -1 elsewhere (text, boundaries, images being generated)."""
        read = self.read_image_blocks(input_ids) >= 0
        index = self.image_slot_index(input_ids)
        return torch.where(read, index, torch.full_like(index, -1))

    def _own_modules(self) -> list[nn.Module]:
        own = (
            self.visual_projector,
            self.image_rows,
            self.image_cols,
            self.image_position_gate,
            self.pixel_head,
            self.semantic_head,
        )
        return [m for m in own if m is not None]

    @property
    def layout(self) -> VocabLayout:
        return self.config.layout

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    # ------------------------------------------------------------------ inputs
    def is_image_slot(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` text ids or ``(B, L, C)`` slot ids -> ``(B, L)`` bool: the slot holds image codes."""
        layout = self.layout
        is_code = layout.is_semantic(input_ids) | layout.is_pixel(input_ids)
        return is_code.any(dim=-1) if input_ids.dim() == 3 else is_code

    def image_slot_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, L, C)`` ids -> ``(B, L)``: each image slot's index in its image (raster order), -1 elsewhere.

        An image is a contiguous run of image slots; a run longer than one image (two images
        back to back) restarts the count every ``grid_size`` slots.
        """
        is_image = self.is_image_slot(input_ids)
        count = is_image.long().cumsum(dim=-1)
        # The count just before each run starts: the running maximum of the count at non-image slots.
        before = torch.where(is_image, torch.zeros_like(count), count).cummax(dim=-1).values
        index = (count - before - 1) % self.config.image_slots
        return torch.where(is_image, index, torch.full_like(index, -1))

    def read_image_blocks(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, L, C)`` ids -> ``(B, L)``: for slots of an image the model *reads* (between
        ``<image>`` and ``</image>``) the number of that image in its row (0, 1, ...), -1 elsewhere
        (text, boundary tokens, images being generated)."""
        first = input_ids[..., 0] if input_ids.dim() == 3 else input_ids
        layout = self.layout
        starts = (first == layout.image_start_id).long().cumsum(dim=-1)
        ends = (first == layout.image_end_id).long().cumsum(dim=-1)
        inside = self.is_image_slot(input_ids) & (starts > ends)
        return torch.where(inside, starts - 1, torch.full_like(starts, -1))

    def prefill_attention_mask(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dtype: torch.dtype,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The additive ``(B, 1, L, L)`` mask of a prefill that is not plainly causal, else None.

        Causal with padding masked, and two rules on top. With ``image_attention="bidirectional"``
        every slot of a read image sees its whole image (a prefix-LM block, as PaLI / Gemma 3
        do). With ``segment_ids`` (independent turns, see
        :meth:`mllm.chat.SequenceBuilder.independent_turns`) a slot of segment k >= 1 sees the
        shared prefix (segment 0) and its own segment only."""
        bidirectional = self.config.image_attention == "bidirectional"
        blocks = self.read_image_blocks(input_ids) if bidirectional else None
        if blocks is not None and not bool((blocks >= 0).any()):
            blocks = None
        if blocks is None and segment_ids is None:
            return None
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device)
        allowed = (positions[None, :] <= positions[:, None]).unsqueeze(0)  # (1, q, k) causal
        if segment_ids is not None:
            seen = (segment_ids[:, None, :] == 0) | (segment_ids[:, None, :] == segment_ids[:, :, None])
            allowed = allowed & seen
        if blocks is not None:
            same_image = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
            allowed = allowed | same_image
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, :]  # padding rows stay finite (additive mask)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=input_ids.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)

    def embed_image_positions(self, embeds: torch.Tensor, slot_index: torch.Tensor) -> torch.Tensor:
        """Add the row and column embeddings to the image slots (``slot_index >= 0``).

        ``projector`` and ``gated`` positions are not added here: they depend on the slot's codes
        (:meth:`_fuse_slot_vectors`)."""
        mode = self.config.image_position_embedding
        if mode in ("none", "projector", "gated"):
            return embeds
        columns = self.config.grid_size[1]
        index = slot_index.clamp_min(0)
        if mode == "learned":
            positions = self.image_rows(index // columns) + self.image_cols(index % columns)
        else:
            positions = self._sincos_rows(index, embeds.shape[-1])
        return embeds + positions.to(embeds.dtype) * (slot_index >= 0).unsqueeze(-1).to(embeds.dtype)

    def _sincos_rows(self, index: torch.Tensor, width: int) -> torch.Tensor:
        table = sincos_grid_table(self.config.grid_size, width, self.config.image_position_scale)
        return table.to(index.device)[index]

    def embed_slots(self, input_ids: torch.Tensor, image_slot_index: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, L)`` or ``(B, L, C)`` ids (``-1`` = empty) -> ``(B, L, H)`` input embeddings.

        With ``image_position_embedding`` each image slot also gets its row and column
        embedding; ``image_slot_index`` (``(B, L)``, -1 off images) gives the slots' indices
        in their image, and is derived from the runs of image slots in ``input_ids`` when
        omitted (a sampler feeding one slot at a time with a KV cache must pass it).
        """
        embed = self.get_input_embeddings()
        if input_ids.dim() == 2:
            return embed(input_ids)
        if input_ids.dim() != 3 or input_ids.shape[-1] != self.config.slot_width:
            raise ValueError(
                f"input_ids has shape {tuple(input_ids.shape)}; expected (B, L) or (B, L, {self.config.slot_width}) "
                f"(semantic depth {self.config.semantic_depth} + pixel depth {self.config.pixel_depth})"
            )
        index = drawn = slots = None
        generated = self.config.generated_position_embedding != "none"
        if self.config.image_position_embedding != "none" or generated:
            index = slots = self.image_slot_index(input_ids) if image_slot_index is None else image_slot_index
            if generated:  # drawn slots get their own positions below; read ones keep image_position_embedding's
                drawn = (slots >= 0) & (self.read_image_blocks(input_ids) < 0)
                index = slots.masked_fill(drawn, -1)
        valid = (input_ids >= 0).unsqueeze(-1)
        embeds = self._fuse_slot_vectors(input_ids, embed(input_ids.clamp_min(0)) * valid, index)
        if index is not None:
            embeds = self.embed_image_positions(embeds, index)
        if drawn is not None:
            embeds = self.embed_generated_positions(embeds, drawn, slots)
        return embeds

    def embed_generated_positions(
        self, embeds: torch.Tensor, drawn: torch.Tensor, slot_index: torch.Tensor
    ) -> torch.Tensor:
        """Add the sine-cosine row and column features to the slots of images being drawn
        (``drawn``, ``(B, L)`` bool; ``slot_index``: their indices in their image).

        A slot the model writes is fed back as the input that predicts the next one, so its own
        place in the grid is what the LM needs to know which part of the caption to draw next.
        Under 1-D rotary positions alone it has to count slots since ``<image_gen_start>``
        modulo the grid width. Read images (between ``<image>`` and ``</image>``) are placed by
        ``image_position_embedding`` only (none by default: there a position added to every
        slot averages out of the answer's read-out, :meth:`_fuse_slot_vectors`). A sampler
        feeding one slot at a time passes its ``slot_index``; such a slot has no ``<image>``
        before it in the chunk, so it counts as drawn, which it is.
        """
        if not bool(drawn.any()):
            return embeds
        rows = self._sincos_rows(slot_index.clamp_min(0), embeds.shape[-1]).to(embeds.dtype)
        return embeds + rows * drawn.unsqueeze(-1).to(embeds.dtype)

    def _fuse_slot_vectors(
        self, input_ids: torch.Tensor, vectors: torch.Tensor, slot_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(B, L, C, H)`` per-column embeddings -> ``(B, L, H)`` slot inputs (``input_fusion``).

        Positions that depend on what a slot shows (``slot_index``: ``(B, L)``, -1 off images):

        - ``projector``: the sine-cosine table (as wide as the projector's input) is added to an
          image slot's input before the projector, so the slot's embedding is a nonlinear
          function of its codes *and* its place, as a ViT's patch feature is.
        - ``gated``: the slot's embedding is left as it is, and the sine-cosine table, scaled
          channel by channel by a linear map of the slot's code vectors, is added to it.

        A position added regardless of content (``learned``, ``sincos``) is the same on every
        slot whatever it shows, so it averages out of an even pooling of the image, which is
        how a freshly trained LM reads it: the answer cannot learn where anything is.
        """
        mode = self.config.image_position_embedding
        if self.visual_projector is None:
            fused = content = vectors.sum(dim=2)
        else:
            split = self.config.semantic_depth
            semantic, pixel = vectors[:, :, :split].sum(dim=2), vectors[:, :, split:].sum(dim=2)
            is_image = self.is_image_slot(input_ids).unsqueeze(-1)
            content = fused_in = (
                torch.cat([semantic, pixel], dim=-1) if self.config.input_fusion == "concat_mlp" else semantic + pixel
            )
            if mode == "projector" and slot_index is not None:
                rows = self._sincos_rows(slot_index.clamp_min(0), fused_in.shape[-1])
                fused_in = fused_in + rows.to(fused_in.dtype) * (slot_index >= 0).unsqueeze(-1).to(fused_in.dtype)
            fused = torch.where(is_image, self.visual_projector(fused_in), semantic + pixel)
        if mode == "gated" and slot_index is not None:
            rows = self._sincos_rows(slot_index.clamp_min(0), fused.shape[-1]).to(fused.dtype)
            on = (slot_index >= 0).unsqueeze(-1).to(fused.dtype)
            fused = fused + rows * self.image_position_gate(content) * on
        return fused

    def new_position_gate(self) -> nn.Linear:
        """The ``gated`` mode's gate: reads the slot's code vectors (the projector's input, so
        twice the width with concat fusion) and scales the sine-cosine table channel by channel
        (initialised at std 1 in ``_init_weights``)."""
        hidden = self.llm.config.hidden_size
        content = 2 * hidden if self.config.input_fusion == "concat_mlp" else hidden
        return nn.Linear(content, hidden)

    # ------------------------------------------------------------------ outputs
    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits over the whole (padded) vocabulary."""
        return self.get_output_embeddings()(hidden)

    def _lm_head_rows(self, hidden: torch.Tensor, start: int, size: int) -> torch.Tensor:
        head = self.get_output_embeddings()
        bias = head.bias[start : start + size] if getattr(head, "bias", None) is not None else None
        return F.linear(hidden, head.weight[start : start + size], bias)

    def pixel_logits(self, context: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced ``(N, Dp, Kp)`` pixel-code logits for target codes ``(N, Dp)``."""
        if self.pixel_head is None:
            return self._lm_head_rows(context, self.layout.pixel_offset, self.config.pixel_size).unsqueeze(1)
        return self.pixel_head(context, codes)

    def next_pixel_logits(self, context: torch.Tensor, codes: torch.Tensor | None) -> torch.Tensor:
        """``(N, Kp)`` logits of the next pixel depth given the codes chosen so far."""
        if self.pixel_head is None:
            return self._lm_head_rows(context, self.layout.pixel_offset, self.config.pixel_size)
        return self.pixel_head.next_logits(context, codes)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        loss_weights: dict[str, float] | None = None,
        image_slot_index: torch.Tensor | None = None,
        contrast_rows: torch.Tensor | None = None,
        contrast_beta: float = 0.1,
        pixel_depth_weights: Sequence[float] | None = None,
        segment_ids: torch.Tensor | None = None,
        grounding_index: torch.Tensor | None = None,
        grounding_slots: torch.Tensor | None = None,
        grounding_layer: int | None = None,
        grounding_heads: int = 1,
        object_slots: torch.Tensor | None = None,
        object_pixel_weight: float = 1.0,
        **kwargs: Any,
    ) -> DualTokenMLLMOutput:
        """Run the LM over slots; with ``labels`` (same shape as ``input_ids``) return the losses.

        ``losses`` holds ``text`` (cross-entropy on text/boundary targets), ``pixel`` and, when
        the model writes them, ``semantic`` (mean over slots and depths); ``loss`` is their
        sum weighted by ``loss_weights`` (default 1 each). A loss with no target is omitted.
        Diagnostics ride along: ``text_acc``, ``pixel_acc`` and, without grad, ``pixel_depth{d}``
        (the pixel CE at RVQ depth d).

        ``contrast_rows`` ``(K, 2)``: pairs ``(matched, mismatched)`` of batch rows holding the same
        image under its own caption and under another one. The mismatched rows give no likelihood
        loss; they give ``contrast`` = mean softplus(-beta * margin), where margin is the image's
        summed pixel log-likelihood under its caption minus under the other caption (logged as
        ``contrast_margin``). Background slots cancel in the margin, so its gradient falls on the
        slots that the caption decides, which the plain likelihood barely rewards.

        ``pixel_depth_weights`` (one per RVQ depth): ``pixel`` becomes the weighted mean of the
        per-depth cross-entropies instead of the plain mean (deeper depths carry fine residuals).

        ``segment_ids`` ``(B, L)`` (with their ``position_ids``, from
        :func:`mllm.chat.collate_sequences`): independent turns, each seeing the shared prefix
        and itself only. Training and prefills only (no KV cache).

        ``grounding_index`` ``(N, 2)`` (batch row, query position) and ``grounding_slots``
        ``(N, L)`` (from :func:`mllm.chat.collate_sequences`, for answers whose data gives the
        image regions they are about): with ``labels``, adds ``grounding``, the negative log of
        the attention mass that the first ``grounding_heads`` heads of decoder layer
        ``grounding_layer`` (default: the middle one) put on those slots from the query
        position, averaged over answers and heads (logged as ``grounding_mass``). An answer
        about one object has to single its slots out of the image first; a freshly trained LM
        pools the image evenly, where the object's position leaves no trace.

        ``object_slots`` ``(B, L)`` (True at generated slots under the caption's objects): their
        pixel cross-entropy counts ``object_pixel_weight`` times in the (weighted) mean. Those
        slots are where the caption decides the codes; the background is most of an image.
        """
        self.layout.check_ids(input_ids)
        if segment_ids is not None:
            if past_key_values is not None or position_ids is None:
                raise ValueError("segment_ids need their position_ids and no KV cache (training or a prefill)")
            impl = self.llm.config._attn_implementation
            if impl not in ("sdpa", "eager") or not self._full_attention_only:
                raise ValueError(
                    f"independent turns (segment_ids) need a mask: sdpa or eager attention on a full-attention LM, "
                    f"not {impl}; load the model with attn_implementation='sdpa' or use whole conversations"
                )
        if attention_mask is not None and position_ids is None and past_key_values is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        embeds = self.embed_slots(input_ids, image_slot_index)
        decoder = self.llm.get_decoder()
        grounding = labels is not None and grounding_index is not None and grounding_index.numel() > 0
        captured: dict[str, Any] = {}
        hook = self._capture_layer_input(decoder, grounding_layer, captured) if grounding else None
        mask = attention_mask
        if past_key_values is None or not past_key_values.get_seq_length():
            # A prefill (or training) reading images builds its own mask; later cached steps only
            # add text or generated slots, which attend causally as usual.
            mask = self.prefill_attention_mask(input_ids, attention_mask, embeds.dtype, segment_ids)
            mask = attention_mask if mask is None else {"full_attention": mask}
        if self._grid_rotary is not None and input_ids.dim() == 3:
            self._grid_rotary.slot_index = self.read_slot_index(input_ids)
        try:
            outputs = decoder(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=use_cache,
                **{self._cache_kwarg: past_key_values},
            )
        finally:
            if hook is not None:
                hook.remove()
            if self._grid_rotary is not None:
                self._grid_rotary.slot_index = None
        hidden = outputs.last_hidden_state
        cache = getattr(outputs, "past_key_values", None)
        if cache is None:
            cache = getattr(outputs, "cache", None)
        result = DualTokenMLLMOutput(hidden_states=hidden, past_key_values=cache)
        if labels is not None:
            slot_weights = None
            if object_slots is not None and object_pixel_weight != 1.0:
                slot_weights = 1.0 + (object_pixel_weight - 1.0) * object_slots.to(hidden.dtype)
            result.losses = self.compute_losses(
                hidden, labels, contrast_rows, contrast_beta, pixel_depth_weights, slot_weights
            )
            if grounding:
                allowed = (
                    attention_mask.bool()
                    if attention_mask is not None
                    else torch.ones_like(hidden[..., 0], dtype=torch.bool)
                )
                loss, mass = self._grounding_loss(
                    captured, grounding_index, grounding_slots, allowed, segment_ids, grounding_heads
                )
                result.losses.update(grounding=loss, grounding_mass=mass)
            weights = loss_weights or {}
            terms = [weights.get(name, 1.0) * value for name, value in result.losses.items() if name in LOSS_TERMS]
            result.loss = torch.stack(terms).sum() if terms else hidden.sum() * 0.0
        return result

    def _decoder_layer(self, decoder: nn.Module, index: int | None) -> nn.Module:
        layers = getattr(decoder, "layers", None)
        if layers is None:
            raise ValueError(f"the grounding loss needs a decoder with .layers; {type(decoder).__name__} has none")
        index = len(layers) // 2 if index is None else index
        if not 0 <= index < len(layers):
            raise ValueError(f"grounding_layer={index}; the LM has decoder layers 0..{len(layers) - 1}")
        layer = layers[index]
        attention = getattr(layer, "self_attn", None)
        needed = ("q_proj", "k_proj", "head_dim", "scaling")
        if attention is None or not all(hasattr(attention, name) for name in needed) or hasattr(attention, "q_norm"):
            raise ValueError(
                f"the grounding loss reads the attention of a Llama/Qwen2-style layer (self_attn with q_proj, "
                f"k_proj, rotary position embeddings, no q_norm); {type(layer).__name__} is not one"
            )
        return layer

    def _capture_layer_input(self, decoder: nn.Module, index: int | None, captured: dict[str, Any]) -> Any:
        """Keep the hidden states and rotary embeddings that decoder layer ``index`` receives."""
        layer = self._decoder_layer(decoder, index)
        captured["layer"] = layer

        def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if "hidden" not in captured:  # a checkpointed layer runs twice; the first call is the forward
                captured["hidden"] = args[0] if args else kwargs["hidden_states"]
                captured["rope"] = kwargs.get("position_embeddings")

        return layer.register_forward_pre_hook(grab, with_kwargs=True)

    def _grounding_loss(
        self,
        captured: dict[str, Any],
        index: torch.Tensor,
        slots: torch.Tensor,
        allowed: torch.Tensor,
        segment_ids: torch.Tensor | None,
        heads: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``-log`` of the attention mass on the answer's slots (mean over answers and heads), and the mass."""
        layer, hidden, rope = captured["layer"], captured["hidden"], captured.get("rope")
        attention = layer.self_attn
        text = self.config.text_config
        num_heads, num_kv = (
            text.num_attention_heads,
            getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        )
        if not 1 <= heads <= num_heads:
            raise ValueError(f"grounding_heads={heads}; the layer has {num_heads} attention heads")
        if rope is None:
            raise ValueError("the grounding loss needs the rotary embeddings that the decoder hands its layers")
        cos, sin = rope
        head_dim = attention.head_dim
        if cos.shape[-1] != head_dim:
            raise ValueError(f"rotary width {cos.shape[-1]} != head_dim {head_dim}: partial rotary is not supported")
        usable = (slots & allowed[index[:, 0]]).any(dim=-1)
        index, slots = index[usable], slots[usable]
        if not index.shape[0]:
            zero = hidden.sum() * 0.0
            return zero, zero.detach()
        rows, queries = index[:, 0], index[:, 1]
        normed = layer.input_layernorm(hidden)
        count, length = index.shape[0], hidden.shape[1]
        cos, sin = cos.expand(hidden.shape[0], -1, -1), sin.expand(hidden.shape[0], -1, -1)
        query = attention.q_proj(normed[rows, queries]).view(count, num_heads, head_dim)[:, :heads]
        query = query * cos[rows, queries][:, None] + _rotate_half(query) * sin[rows, queries][:, None]
        keys = attention.k_proj(normed).view(hidden.shape[0], length, num_kv, head_dim)  # once per batch row
        keys = keys * cos[:, :, None] + _rotate_half(keys) * sin[:, :, None]
        key = keys[rows][:, :, torch.arange(heads, device=keys.device) // (num_heads // num_kv)]  # (N, L, heads, hd)
        scores = torch.einsum("nhd,nlhd->nhl", query, key).float() * attention.scaling
        seen = allowed[rows] & (torch.arange(length, device=rows.device)[None] <= queries[:, None])
        if segment_ids is not None:
            own = segment_ids[rows, queries][:, None]
            seen &= (segment_ids[rows] == 0) | (segment_ids[rows] == own)
        log_attention = scores.masked_fill(~seen[:, None], float("-inf")).log_softmax(dim=-1)
        log_mass = log_attention.masked_fill(~(slots & seen)[:, None], float("-inf")).logsumexp(dim=-1)
        return -log_mass.mean(), log_mass.exp().mean().detach()

    def compute_losses(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        contrast_rows: torch.Tensor | None = None,
        contrast_beta: float = 0.1,
        pixel_depth_weights: Sequence[float] | None = None,
        slot_weights: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Next-slot losses: the hidden state at position t predicts the labels of slot t + 1.

        ``slot_weights`` ``(B, L)``: the weight of each slot's pixel cross-entropy (default 1).
        """
        if labels.dim() == 2:
            labels = labels.unsqueeze(-1)
        labels = labels.masked_fill(labels < 0, IGNORE)
        layout = self.layout
        split = self.config.semantic_depth
        mismatched = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
        if contrast_rows is not None and contrast_rows.numel():
            mismatched[contrast_rows[:, 1]] = True
        context, target = hidden[:, :-1], labels[:, 1:]
        pixel_target = target[..., split:]
        is_pixel_all = layout.is_pixel(pixel_target).all(dim=-1)
        target = target.masked_fill(mismatched[:, None, None], IGNORE)  # no likelihood from mismatched rows
        losses: dict[str, torch.Tensor] = {}

        first = target[..., 0]
        is_text = (first >= 0) & ~layout.is_semantic(first) & ~layout.is_pixel(first)
        if bool(is_text.any()):
            logits = self.text_logits(context[is_text]).float()
            truth = first[is_text]
            losses["text"] = F.cross_entropy(logits, truth)
            losses["text_acc"] = (logits.argmax(-1) == truth).float().mean().detach()

        is_pixel = is_pixel_all & ~mismatched[:, None]
        if bool(is_pixel_all.any()):
            codes = pixel_target[is_pixel_all] - layout.pixel_offset
            logits = self.pixel_logits(context[is_pixel_all], codes).float()
            nll = F.cross_entropy(logits.transpose(1, 2), codes, reduction="none")  # (slots, depth)
            rows = is_pixel_all.nonzero()[:, 0]  # the batch row of each slot
            kept = ~mismatched[rows]
            if bool(kept.any()):
                if slot_weights is None:
                    per_depth = nll[kept].mean(dim=0)
                else:
                    weight = slot_weights[:, 1:][is_pixel_all][kept].float()
                    per_depth = (nll[kept] * weight[:, None]).sum(dim=0) / weight.sum()
                if pixel_depth_weights is None:
                    losses["pixel"] = per_depth.mean()
                else:
                    losses["pixel"] = _depth_weighted_mean(per_depth, pixel_depth_weights)
                losses["pixel_acc"] = (logits[kept].argmax(-1) == codes[kept]).float().mean().detach()
                if codes.shape[1] > 1 and not torch.is_grad_enabled():  # held-out diagnostics: CE per RVQ depth
                    losses.update({f"pixel_depth{d + 1}": value for d, value in enumerate(per_depth)})
            if mismatched.any():
                image_nll = torch.zeros(labels.shape[0], device=nll.device).index_add(0, rows, nll.sum(dim=-1))
                margin = image_nll[contrast_rows[:, 1]] - image_nll[contrast_rows[:, 0]]
                losses["contrast"] = F.softplus(-contrast_beta * margin).mean()
                losses["contrast_margin"] = margin.mean().detach()

        if self.semantic_head is not None:
            semantic_target = target[..., :split]
            is_semantic = layout.is_semantic(semantic_target).all(dim=-1) & is_pixel
            if bool(is_semantic.any()):
                codes = semantic_target[is_semantic] - layout.semantic_offset
                logits = self.semantic_head(context[is_semantic], codes).float()
                losses["semantic"] = F.cross_entropy(logits.flatten(0, 1), codes.flatten())
        if torch.is_grad_enabled():
            idle = self._idle_heads_term(context, losses)
            if idle is not None:
                losses["idle_heads"] = idle
        return losses

    def _idle_heads_term(self, context: torch.Tensor, losses: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Zero times the output of every trainable head that had no target in this batch.

        A batch of VQA alone gives the depth heads no loss. Every engine must then treat them
        alike: DeepSpeed ZeRO-1/2 gives such parameters a zero gradient (AdamW still moves them
        with its momentum and decay), and ZeRO-3 (DeepSpeed 0.19) even re-applies their last
        real gradient. Running the idle head on one slot, times zero, gives it an exact zero
        gradient through its own forward (so ZeRO-3 gathers its weights), in every engine.
        """
        terms = []
        probe = context[:1, :1].reshape(1, -1)
        for name, head in (("pixel", self.pixel_head), ("semantic", self.semantic_head)):
            if head is None or name in losses or not any(p.requires_grad for p in head.parameters()):
                continue
            codes = torch.zeros(1, head.depth, dtype=torch.long, device=context.device)
            terms.append(head(probe, codes).float().sum() * 0.0)
        return torch.stack(terms).sum() if terms else None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The rotary-embedding pairing of Llama / Qwen2: (x1, x2) -> (-x2, x1) over the two halves."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def _depth_weighted_mean(per_depth: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """``sum(w_d * CE_d) / sum(w_d)`` over the RVQ depths; the weights are checked first."""
    if len(weights) != per_depth.shape[0]:
        raise ValueError(
            f"pixel_depth_weights has {len(weights)} entries; the model writes {per_depth.shape[0]} pixel depth(s)"
        )
    scale = torch.tensor(weights, dtype=per_depth.dtype, device=per_depth.device)
    if bool((scale < 0).any()) or float(scale.sum()) <= 0:
        raise ValueError(f"pixel_depth_weights={list(weights)}; expected >= 0, not all 0")
    return (per_depth * scale).sum() / scale.sum()


@torch.no_grad()
def init_code_embeddings(
    model: DualTokenMLLMForCausalLM,
    semantic_codebook: torch.Tensor | None,
    pixel_codebook: torch.Tensor | None,
    seed: int = 0,
) -> None:
    """Start the visual code rows as one fixed linear map of the tokenizer's code vectors.

    A slot's input sums its codes' rows over depths, so with these rows it is the same map
    applied to the slot's quantised feature (the sum of its code vectors): the LM sees the
    tokenizer's geometry from step 0 instead of 1024 unrelated random vectors per branch.
    The depth heads' code embeddings start the same way, and each depth's classifier starts
    as its head's code rows (scaled to unit-variance logits): a head state near a code's
    embedding scores that code and its codebook neighbours high, so the head starts out able
    to say "a code like the one to the left" instead of learning 1024 unrelated output rows
    (tiny config, 100 text-to-image steps: held-out depth-1 CE 4.07 against 5.28 from
    random classifiers). Rows are scaled to the text rows' standard deviation (relative code
    norms are kept). A branch whose codebook is None keeps its random rows.
    """
    embeddings = model.get_input_embeddings().weight
    layout = model.layout
    text_std = float(embeddings[: layout.text_size].float().std())
    generator = torch.Generator().manual_seed(seed)
    branches = (
        ("semantic", semantic_codebook, layout.semantic_offset, layout.semantic_size, model.semantic_head),
        ("pixel", pixel_codebook, layout.pixel_offset, layout.pixel_size, model.pixel_head),
    )
    for name, codebook, offset, size, head in branches:
        if codebook is None:
            continue
        if codebook.ndim != 2 or codebook.shape[0] != size:
            raise VocabularyError(
                f"the {name} codebook has shape {tuple(codebook.shape)}; the vocabulary expects ({size}, code_dim)"
            )
        codebook = codebook.detach().float().cpu()
        targets = [(embeddings, offset, text_std)]
        if head is not None:
            targets.append((head.code_embed.weight, 0, float(head.code_embed.weight.float().std())))
        for weight, start, std in targets:
            projection = torch.randn(codebook.shape[1], weight.shape[1], generator=generator)
            rows = codebook @ projection
            rows = rows * (std / float(rows.std().clamp_min(1e-12)))
            weight[start : start + size].copy_(rows.to(weight.dtype))
        if head is not None:
            rows = head.code_embed.weight.float()
            rows = rows / (float(rows.std().clamp_min(1e-12)) * math.sqrt(rows.shape[1]))
            head.classifier_weight.copy_(rows.T.expand_as(head.classifier_weight).to(head.classifier_weight.dtype))


def _cache_kwarg(decoder: nn.Module) -> str:
    """The decoder's KV-cache argument: ``cache`` in recent transformers, ``past_key_values`` before."""
    import inspect

    parameters = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _contains(parent: nn.Module, module: nn.Module) -> bool:
    return any(child is module for child in parent.modules())


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know the ``dualtoken_mllm`` model type."""
    try:
        AutoConfig.register(DualTokenMLLMConfig.model_type, DualTokenMLLMConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModelForCausalLM.register(DualTokenMLLMConfig, DualTokenMLLMForCausalLM)
    except ValueError:
        pass


register_auto_classes()
