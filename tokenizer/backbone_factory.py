"""The backbone a :class:`~tokenizer.config.BackboneConfig` describes, and its depth without building it."""

from __future__ import annotations

from tokenizer.backbone import VisionBackbone
from tokenizer.config import BackboneConfig, ConfigError
from tokenizer.siglip_backbone import SiglipBackbone, siglip_vision_config, vision_model_from_config
from tokenizer.timm_backbone import TimmBackbone


def build_backbone(config: BackboneConfig, load_weights: bool = True) -> VisionBackbone:
    """The backbone ``config`` describes.

    SigLIP (or SigLIP2): ``pretrained_path`` set -> :meth:`SiglipBackbone.from_pretrained`, else random
    init from the size fields. timm: :meth:`TimmBackbone.from_config`. With
    ``load_weights=False`` the architecture is built without reading weights (for loading a
    saved tokenizer over it): SigLIP reads only the checkpoint's config.json.
    """
    if config.kind == "siglip":
        if config.pretrained_path is None:
            return SiglipBackbone.from_config(config)
        # image_size matters only to a SigLIP2 NaFlex tower, whose checkpoint reads any grid.
        if load_weights:
            backbone = SiglipBackbone.from_pretrained(config.pretrained_path, image_size=config.image_size)
        else:
            vision_config = siglip_vision_config(config.pretrained_path)
            backbone = SiglipBackbone(vision_model_from_config(vision_config), image_size=config.image_size)
        backbone.set_gradient_checkpointing(config.gradient_checkpointing)
        return backbone
    if config.kind == "timm":
        if not load_weights and config.pretrained_path is not None:
            from dataclasses import replace

            config = replace(config, pretrained_path=None)
        return TimmBackbone.from_config(config)
    raise ConfigError(f"backbone.kind={config.kind!r}; expected 'siglip' or 'timm'")


def backbone_num_layers(config: BackboneConfig) -> int:
    """Number of blocks ``build_backbone(config)`` will have, without building it.

    A pretrained SigLIP is read from its config.json (defaults filled in by transformers);
    otherwise the size field ``num_layers`` applies (timm files carry no architecture).
    """
    if config.kind == "siglip" and config.pretrained_path is not None:
        return int(siglip_vision_config(config.pretrained_path).num_hidden_layers)
    return config.num_layers


__all__ = ["backbone_num_layers", "build_backbone"]
