"""transformers' SigLIP vision tower behind :class:`~tokenizer.backbone.VisionBackbone`.

:class:`SiglipBackbone` wraps a ``SiglipVisionModel`` (or the image side of a ``SiglipModel``),
built at random from the size fields or loaded from a local checkpoint directory or hub id; the
functions below resolve and check those checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from tokenizer.backbone import VisionBackbone
from tokenizer.config import BackboneConfig, ConfigError

logger = logging.getLogger(__name__)

# "org/name" or "name": what the Hugging Face hub accepts as a repository id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


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
    """transformers' SigLIP vision tower (``SiglipVisionModel``) with layer taps.

    SigLIP is trained on pixels normalised with mean 0.5 / std 0.5, which maps [0, 1] to
    [-1, 1]: the tokenizer's images go in unchanged. The pooled output is
    ``post_layernorm`` then the multihead-attention pooling head (``vision_use_head``), or a
    mean over tokens when the checkpoint has no head.
    """

    def __init__(self, vision_model: nn.Module) -> None:
        # Keep the PreTrainedModel (not just the inner tower) so save_pretrained / config work.
        config = getattr(vision_model, "config", None)
        if getattr(config, "model_type", None) == "siglip":
            vision_model = vision_model.vision_model  # a full SiglipModel: keep only the image side
        tower = _siglip_tower(vision_model)
        config = vision_model.config
        super().__init__(
            num_layers=len(tower.encoder.layers),
            hidden_size=config.hidden_size,
            num_prefix_tokens=0,
            image_size=config.image_size,
            patch_size=config.patch_size,
        )
        self.vision_model = vision_model

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_siglip_model(cls, siglip_vision_model: nn.Module) -> SiglipBackbone:
        """Wrap an in-memory ``SiglipVisionModel`` (or the vision side of a ``SiglipModel``).

        The parameters are shared, not copied: ``copy.deepcopy`` the model first for an
        independent backbone (e.g. a tokenizer initialised from a frozen teacher).
        """
        return cls(siglip_vision_model)

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
    def from_pretrained(cls, path: str, **kwargs: Any) -> SiglipBackbone:
        """Load the vision tower of a SigLIP checkpoint: a local directory or a hub id.

        Accepts both a ``SiglipVisionModel`` and a full ``SiglipModel`` checkpoint (the text
        tower is skipped). ``kwargs`` go to ``SiglipVisionModel.from_pretrained`` (e.g.
        ``dtype``, ``attn_implementation``). Every vision weight must be present.
        """
        from transformers import SiglipVisionModel

        source = _resolve_pretrained_source(path)
        model_type = _siglip_model_type(source)
        if model_type not in ("siglip", "siglip_vision_model"):
            raise ValueError(
                f"{path!r} holds a {model_type!r} checkpoint; SiglipBackbone needs model_type 'siglip' "
                "or 'siglip_vision_model'"
            )
        kwargs = dict(kwargs)
        kwargs["output_loading_info"] = True
        if model_type == "siglip":
            # A full SiglipModel: its text weights are "unexpected" for the vision model, and
            # transformers would print a table of them; our own check below covers the vision side.
            with _transformers_quiet():
                model, info = SiglipVisionModel.from_pretrained(source, **kwargs)
            logger.info("loaded the vision tower of SiglipModel checkpoint %s (text tower skipped)", path)
        else:
            model, info = SiglipVisionModel.from_pretrained(source, **kwargs)
        missing = sorted(info.get("missing_keys", []))
        mismatched = sorted(str(item) for item in info.get("mismatched_keys", []))
        if missing or mismatched:
            raise ValueError(
                f"SigLIP checkpoint {path!r} does not match its config: missing weights {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}, shape mismatches {mismatched[:4]}"
            )
        return cls(model)

    # ------------------------------------------------------------------ properties
    @property
    def hf_config(self) -> Any:
        """The wrapped model's ``SiglipVisionConfig``."""
        return self.vision_model.config

    @property
    def _tower(self) -> nn.Module:
        return _siglip_tower(self.vision_model)

    # ------------------------------------------------------------------ hooks
    def normalize_images(self, images: torch.Tensor) -> torch.Tensor:
        # SigLIP's processor uses mean 0.5, std 0.5: (x01 - 0.5) / 0.5 is exactly [-1, 1].
        return images

    def _embed_normalised(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._tower.embeddings(pixel_values)

    def _patch_embed_normalised(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self._tower.embeddings.patch_embedding(
            pixel_values.to(self._tower.embeddings.patch_embedding.weight.dtype)
        )
        return patches.flatten(2).transpose(1, 2)

    def embed_with_patch_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # SiglipVisionEmbeddings without interpolation: patch projection + learned positions.
        patches = self.patch_features(images)
        embeddings = self._tower.embeddings
        return patches + embeddings.position_embedding(embeddings.position_ids), patches

    def _blocks(self) -> Sequence[nn.Module]:
        return self._tower.encoder.layers

    def _apply_block(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        # Full attention over all tokens (no mask). transformers 4 returns a tuple, 5 a tensor.
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


def _resolve_pretrained_source(path: str) -> str:
    """A local checkpoint directory, or a hub id; a missing local path raises naming it."""
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"SigLIP checkpoint {path!r} has no config.json (is it a save_pretrained dir?)")
        return str(local)
    if not _HUB_ID.match(path) or path.startswith((".", "~")):
        raise FileNotFoundError(f"SigLIP checkpoint directory {path!r} does not exist (backbone.pretrained_path)")
    return path


def _siglip_model_type(source: str) -> str:
    """``model_type`` of a local directory or hub id (downloads only config.json)."""
    local = Path(source)
    if local.is_dir():
        config_path = local / "config.json"
        try:
            return json.loads(config_path.read_text()).get("model_type", "<missing>")
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source).model_type
    except OSError as error:
        raise FileNotFoundError(
            f"SigLIP checkpoint {source!r} is neither a local directory nor a reachable hub id: {error}"
        ) from error


def siglip_vision_config(path: str) -> Any:
    """The ``SiglipVisionConfig`` of a checkpoint directory or hub id (reads only its config.json)."""
    from transformers import SiglipVisionConfig

    source = _resolve_pretrained_source(path)
    try:
        # base_config_key="vision_config": a full SiglipModel config yields its vision part.
        return SiglipVisionConfig.from_pretrained(source)
    except OSError as error:
        raise FileNotFoundError(f"cannot read the SigLIP config of {path!r}: {error}") from error


__all__ = ["SiglipBackbone", "siglip_vision_config"]
