"""transformers' SigLIP and SigLIP2 vision towers behind :class:`~tokenizer.backbone.VisionBackbone`.

:class:`SiglipBackbone` wraps a ``SiglipVisionModel`` or ``Siglip2VisionModel`` (or the image side
of a ``SiglipModel`` / ``Siglip2Model``), built at random from the size fields or loaded from a
local checkpoint folder or a hub id (:func:`tokenizer.pretrained.resolve_pretrained`); the
functions below resolve and check those checkpoints.

SigLIP2 comes in two layouts. The fixed-resolution checkpoints (``siglip2-so400m-patch14-384``
...) are ``model_type: siglip`` and load as SigLIP. The NaFlex ones (``model_type: siglip2``)
take pre-cut patches with their grid (``spatial_shapes``) and a ``pixel_attention_mask``, and
resize their learned position grid to each image's grid. DualToken reads square images of one
size, so here every image is one full ``g x g`` grid: the mask is all ones (the same as no mask)
and the position grid is resized once to ``g x g`` with transformers' own resize.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from tokenizer.backbone import VisionBackbone
from tokenizer.config import BackboneConfig, ConfigError
from tokenizer.pretrained import resolve_pretrained

logger = logging.getLogger(__name__)

# model_type values of the checkpoints SiglipBackbone loads: full models (image + text towers)
# and vision-only ones.
FULL_MODEL_TYPES = ("siglip", "siglip2")
VISION_MODEL_TYPES = ("siglip_vision_model", "siglip2_vision_model")
NAFLEX_MODEL_TYPES = ("siglip2", "siglip2_vision_model")


def _siglip_tower(module: nn.Module) -> nn.Module:
    """The module holding ``embeddings`` / ``encoder`` / ``post_layernorm``.

    transformers 5 puts them on ``SiglipVisionModel`` itself; transformers 4 nests a
    ``SiglipVisionTransformer`` under ``.vision_model``; ``SiglipModel`` nests either.
    """
    current = module
    for _ in range(3):
        if all(hasattr(current, name) for name in ("embeddings", "encoder", "post_layernorm", "config")):
            return current
        if not hasattr(current, "vision_model"):
            break
        current = current.vision_model
    raise TypeError(
        f"{type(module).__name__} is not a SigLIP vision model: expected a transformers SiglipVisionModel "
        "or SiglipModel (with modules embeddings, encoder, post_layernorm and a .config)"
    )


class SiglipBackbone(VisionBackbone):
    """transformers' SigLIP / SigLIP2 vision tower with layer taps.

    SigLIP is trained on pixels normalised with mean 0.5 / std 0.5, which maps [0, 1] to
    [-1, 1]: the tokenizer's images go in unchanged (SigLIP2 uses the same normalisation). The
    pooled output is ``post_layernorm`` then the multihead-attention pooling head
    (``vision_use_head``), or a mean over tokens when the checkpoint has no head.

    ``image_size`` is the side of the square images a NaFlex SigLIP2 tower reads (its config
    has no image size: it reads any grid; default: the grid of its position table,
    ``sqrt(num_patches) * patch_size``); it is recorded in the wrapped config as ``image_size``
    so that a saved tokenizer rebuilds the same grid. Fixed-resolution towers take theirs from
    their config.
    """

    def __init__(self, vision_model: nn.Module, image_size: int | None = None) -> None:
        # Keep the PreTrainedModel (not just the inner tower) so save_pretrained / config work.
        config = getattr(vision_model, "config", None)
        if getattr(config, "model_type", None) in FULL_MODEL_TYPES:
            vision_model = vision_model.vision_model  # a full SiglipModel: keep only the image side
        tower = _siglip_tower(vision_model)
        config = vision_model.config
        naflex = isinstance(tower.embeddings.patch_embedding, nn.Linear)
        if naflex:
            # Default: the grid its position table was trained at (sqrt(num_patches) patches a side).
            native = int(round(config.num_patches**0.5)) * config.patch_size
            config.image_size = int(image_size or getattr(config, "image_size", None) or native)
        super().__init__(
            num_layers=len(tower.encoder.layers),
            hidden_size=config.hidden_size,
            num_prefix_tokens=0,
            image_size=config.image_size,
            patch_size=config.patch_size,
        )
        self.vision_model = vision_model
        self.naflex = naflex

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_siglip_model(cls, siglip_vision_model: nn.Module, image_size: int | None = None) -> SiglipBackbone:
        """Wrap an in-memory ``SiglipVisionModel`` / ``Siglip2VisionModel`` (or the vision side of a full model).

        The parameters are shared, not copied: ``copy.deepcopy`` the model first for an
        independent backbone (e.g. a tokenizer initialised from a frozen teacher).
        """
        return cls(siglip_vision_model, image_size=image_size)

    @classmethod
    def from_hf_config(cls, vision_config: dict[str, Any], image_size: int | None = None) -> SiglipBackbone:
        """A random tower from a vision config's ``to_dict()`` (SigLIP or SigLIP2, by its ``model_type``)."""
        return cls(vision_model_from_config(vision_config), image_size=image_size)

    @classmethod
    def from_config(cls, config: BackboneConfig) -> SiglipBackbone:
        """A randomly initialised SigLIP vision tower with the sizes in ``config`` (no weights)."""
        from transformers import SiglipVisionConfig, SiglipVisionModel

        if config.pretrained_path is not None:
            raise ConfigError(
                f"backbone.pretrained_path={config.pretrained_path!r} is set; SiglipBackbone.from_config builds a "
                "random model from the size fields. Use build_backbone(config) or SiglipBackbone.from_pretrained"
            )
        hf_config = SiglipVisionConfig(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            image_size=config.image_size,
            patch_size=config.patch_size,
            num_channels=3,
            vision_use_head=True,
        )
        backbone = cls(SiglipVisionModel(hf_config))
        backbone.set_gradient_checkpointing(config.gradient_checkpointing)
        return backbone

    @classmethod
    def from_pretrained(cls, path: str, image_size: int | None = None, **kwargs: Any) -> SiglipBackbone:
        """Load the vision tower of a SigLIP or SigLIP2 checkpoint: a local folder or a hub id.

        Accepts a vision-only and a full (image + text) checkpoint (the text tower is skipped).
        ``image_size`` is needed for a NaFlex SigLIP2 tower (see the class). ``kwargs`` go to
        ``from_pretrained`` (e.g. ``dtype``, ``attn_implementation``). Every vision weight must
        be present.
        """
        source = str(resolve_pretrained(path, "backbone.pretrained_path"))
        model_type = _siglip_model_type(source)
        if model_type not in FULL_MODEL_TYPES + VISION_MODEL_TYPES:
            raise ValueError(
                f"{path!r} holds a {model_type!r} checkpoint; SiglipBackbone needs model_type "
                f"{' or '.join(repr(name) for name in FULL_MODEL_TYPES + VISION_MODEL_TYPES)}"
            )
        model_class = _vision_model_class(model_type)
        kwargs = dict(kwargs)
        kwargs["output_loading_info"] = True
        if model_type in FULL_MODEL_TYPES:
            # A full model: its text weights are "unexpected" for the vision model, and
            # transformers would print a table of them; our own check below covers the vision side.
            with _transformers_quiet():
                model, info = model_class.from_pretrained(source, **kwargs)
            logger.info("loaded the vision tower of %s checkpoint %s (text tower skipped)", model_type, path)
        else:
            model, info = model_class.from_pretrained(source, **kwargs)
        missing = sorted(info.get("missing_keys", []))
        mismatched = sorted(str(item) for item in info.get("mismatched_keys", []))
        if missing or mismatched:
            raise ValueError(
                f"SigLIP checkpoint {path!r} does not match its config: missing weights {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}, shape mismatches {mismatched[:4]}"
            )
        return cls(model, image_size=image_size)

    # ------------------------------------------------------------------ properties
    @property
    def hf_config(self) -> Any:
        """The wrapped model's ``SiglipVisionConfig`` / ``Siglip2VisionConfig``."""
        return self.vision_model.config

    @property
    def _tower(self) -> nn.Module:
        return _siglip_tower(self.vision_model)

    # ------------------------------------------------------------------ hooks
    def normalize_images(self, images: torch.Tensor) -> torch.Tensor:
        # SigLIP's processor uses mean 0.5, std 0.5: (x01 - 0.5) / 0.5 is exactly [-1, 1].
        return images

    def _embed_normalised(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.naflex:
            return self._patch_embed_normalised(pixel_values) + self._naflex_positions()
        return self._tower.embeddings(pixel_values)

    def _patch_embed_normalised(self, pixel_values: torch.Tensor) -> torch.Tensor:
        projection = self._tower.embeddings.patch_embedding
        pixel_values = pixel_values.to(projection.weight.dtype)
        if self.naflex:
            return projection(self._cut_patches(pixel_values))
        return projection(pixel_values).flatten(2).transpose(1, 2)

    def _cut_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, g * g, p * p * 3) in raster order, each patch as (row, column, channel):
        the layout of ``Siglip2ImageProcessor``. A remainder beyond ``g * p`` is dropped, as
        SigLIP's stride-p convolution drops it."""
        grid, patch = self.grid_size, self.patch_size
        batch, channels = pixel_values.shape[:2]
        pixels = pixel_values[:, :, : grid * patch, : grid * patch]
        pixels = pixels.reshape(batch, channels, grid, patch, grid, patch).permute(0, 2, 4, 3, 5, 1)
        return pixels.reshape(batch, grid * grid, patch * patch * channels)

    def _naflex_positions(self) -> torch.Tensor:
        """(1, g * g, C): the learned position grid resized to ``g x g`` (transformers' resize)."""
        embeddings = self._tower.embeddings
        side = embeddings.position_embedding_size
        table = embeddings.position_embedding.weight.reshape(side, side, -1)
        shapes = torch.tensor([[self.grid_size, self.grid_size]], device=table.device)
        return embeddings.resize_positional_embeddings(table, shapes, max_length=self.num_patches)

    def embed_with_patch_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The embeddings without interpolation: patch projection + learned positions.
        patches = self.patch_features(images)
        if self.naflex:
            return patches + self._naflex_positions(), patches
        embeddings = self._tower.embeddings
        return patches + embeddings.position_embedding(embeddings.position_ids), patches

    def _blocks(self) -> Sequence[nn.Module]:
        return self._tower.encoder.layers

    def _apply_block(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        # Full attention over all tokens (no mask: every image is one full grid). transformers 4
        # returns a tuple, 5 a tensor.
        output = block(hidden, attention_mask=None)
        return output[0] if isinstance(output, (tuple, list)) else output

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (B, N, C) output of the last block -> (B, C): post_layernorm + MAP head (else mean pool)."""
        self._check_tokens(hidden)
        tower = self._tower
        hidden = tower.post_layernorm(hidden)
        pooling_head = getattr(tower, "head", None)
        if pooling_head is not None and getattr(tower, "use_head", True):
            return pooling_head(hidden)
        # No pooling head in the checkpoint: transformers returns no pooled output, so use the token mean.
        return hidden.mean(dim=1)


@contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    """Silence transformers' warnings for the duration of the block, then restore the level."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def _vision_model_class(model_type: str) -> type:
    """``SiglipVisionModel`` or ``Siglip2VisionModel`` for a checkpoint's ``model_type``."""
    from transformers import Siglip2VisionModel, SiglipVisionModel

    return Siglip2VisionModel if model_type in NAFLEX_MODEL_TYPES else SiglipVisionModel


def vision_model_from_config(vision_config: Any) -> nn.Module:
    """A random vision tower from a vision config or its ``to_dict()``, SigLIP or SigLIP2 by ``model_type``."""
    from transformers import Siglip2VisionConfig, SiglipVisionConfig

    if isinstance(vision_config, dict):
        naflex = vision_config.get("model_type") in NAFLEX_MODEL_TYPES
        payload = {key: value for key, value in vision_config.items() if key != "model_type"}
        vision_config = (Siglip2VisionConfig if naflex else SiglipVisionConfig)(**payload)
    return _vision_model_class(vision_config.model_type)(vision_config)


def _siglip_model_type(source: str) -> str:
    """``model_type`` of a resolved local checkpoint folder."""
    config_path = Path(source) / "config.json"
    try:
        return json.loads(config_path.read_text()).get("model_type", "<missing>")
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None


def siglip_vision_config(path: str) -> Any:
    """The vision config (SigLIP or SigLIP2) of a checkpoint folder or hub id (reads only its config.json)."""
    from transformers import Siglip2VisionConfig, SiglipVisionConfig

    source = resolve_pretrained(path, "backbone.pretrained_path")
    config_class = Siglip2VisionConfig if _siglip_model_type(str(source)) in NAFLEX_MODEL_TYPES else SiglipVisionConfig
    try:
        # base_config_key="vision_config": a full model's config yields its vision part.
        return config_class.from_pretrained(str(source))
    except OSError as error:
        raise FileNotFoundError(f"cannot read the SigLIP config of {path!r}: {error}") from error


__all__ = ["SiglipBackbone", "siglip_vision_config", "vision_model_from_config"]
