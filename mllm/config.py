"""The MLLM's configuration: :class:`DualTokenMLLMConfig` and the option values it accepts."""

from __future__ import annotations

import math
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from mllm.vocab import VocabLayout

BRANCHES = ("semantic", "pixel")
FUSIONS = ("sum", "sum_mlp", "concat_mlp")
IMAGE_ATTENTIONS = ("causal", "bidirectional")
IMAGE_POSITIONS = ("none", "learned", "sincos", "projector", "gated")
IMAGE_ROPES = ("1d", "2d")
GENERATED_POSITIONS = ("none", "sincos")


def _position_mode(value: bool | str | None) -> str:
    """``image_position_embedding`` as one of IMAGE_POSITIONS (``True`` / ``False`` from older configs)."""
    if value is True:
        return "learned"
    if value is False or value is None:
        return "none"
    return str(value)


class DualTokenMLLMConfig(PretrainedConfig):
    """Config of :class:`~mllm.modeling.DualTokenMLLMForCausalLM`: the base LM's config plus the visual layout."""

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
        loss_chunk_size: int = 0,
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
        # > 0: the losses run over this many targets at a time, checkpointed (mllm.losses.chunked_nll).
        self.loss_chunk_size = int(loss_chunk_size)
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
        if not math.isfinite(self.image_position_scale) or self.image_position_scale <= 0:
            raise ValueError(f"image_position_scale={self.image_position_scale}; expected a finite number > 0")
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
        if self.loss_chunk_size < 0:
            raise ValueError(f"loss_chunk_size={self.loss_chunk_size}; expected >= 0 (0 = no chunking)")
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
