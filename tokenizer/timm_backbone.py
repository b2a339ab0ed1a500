"""A timm ``VisionTransformer`` behind :class:`~tokenizer.backbone.VisionBackbone`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from tokenizer.backbone import VisionBackbone
from tokenizer.config import BackboneConfig

# timm's default when a model carries no pretrained_cfg (the ImageNet statistics).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class TimmBackbone(VisionBackbone):
    """A timm ``VisionTransformer`` with layer taps (CLS / register prefix tokens supported).

    Images in [-1, 1] are mapped to the model's ``pretrained_cfg`` mean / std (ImageNet
    statistics when it has none). The pooled output is timm's
    ``forward_head(forward_features(x), pre_logits=True)``: final norm, pooling, fc_norm.
    """

    def __init__(self, model: nn.Module) -> None:
        required = ("patch_embed", "_pos_embed", "norm_pre", "blocks", "norm", "forward_head", "num_prefix_tokens")
        absent = [name for name in required if not hasattr(model, name)]
        if absent:
            raise TypeError(
                f"{type(model).__name__} is not a timm VisionTransformer (missing {', '.join(absent)}); "
                "pick a vit_* / deit_* model name"
            )
        image_size = _square(model.patch_embed.img_size, "img_size")
        patch_size = _square(model.patch_embed.patch_size, "patch_size")
        super().__init__(
            num_layers=len(model.blocks),
            hidden_size=model.embed_dim,
            num_prefix_tokens=model.num_prefix_tokens,
            image_size=image_size,
            patch_size=patch_size,
        )
        self.model = model
        pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = torch.tensor(pretrained_cfg.get("mean", _IMAGENET_MEAN), dtype=torch.float32)
        std = torch.tensor(pretrained_cfg.get("std", _IMAGENET_STD), dtype=torch.float32)
        # Not persistent: they derive from the model name, and state dicts stay timm-compatible.
        self.register_buffer("pixel_mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", std.view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, config: BackboneConfig) -> TimmBackbone:
        """``timm.create_model(config.timm_model_name)`` resized to the config's fields.

        timm weight files hold no architecture, so the size fields always apply; with
        ``config.pretrained_path`` set, that local ``.safetensors`` / ``.pth`` file is loaded
        strictly (its classifier ``head.*`` is dropped: DualToken uses the pre-logits features).
        """
        import timm

        model = timm.create_model(
            config.timm_model_name,
            pretrained=False,
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.hidden_size,
            depth=config.num_layers,
            num_heads=config.num_heads,
            mlp_ratio=config.intermediate_size / config.hidden_size,
            num_classes=0,
        )
        backbone = cls(model)
        if config.pretrained_path is not None:
            backbone.load_weights(config.pretrained_path)
        backbone.set_gradient_checkpointing(config.gradient_checkpointing)
        return backbone

    def load_weights(self, path: str) -> None:
        """Load a timm state dict (``.safetensors`` or ``.pth``) into the wrapped model, strictly."""
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"timm weights file {path!r} does not exist (backbone.pretrained_path)")
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file), device="cpu")
        else:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
            for wrapper_key in ("state_dict", "model"):
                if isinstance(state, dict) and isinstance(state.get(wrapper_key), dict):
                    state = state[wrapper_key]
        if not isinstance(state, dict):
            raise ValueError(f"{path!r} does not contain a state dict (got {type(state).__name__})")
        state = {key.removeprefix("module."): value for key, value in state.items()}
        # The backbone is built with num_classes=0; a classifier in the file is not an error.
        state = {key: value for key, value in state.items() if not key.startswith("head.")}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"timm weights {path!r} do not fit {type(self.model).__name__} built from the backbone config: "
                f"missing keys {sorted(missing)[:8]}, unexpected keys {sorted(unexpected)[:8]} "
                "(check timm_model_name and the size fields)"
            )

    def normalize_images(self, images: torch.Tensor) -> torch.Tensor:
        unit = (images + 1.0) * 0.5
        return (unit - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

    def _embed_normalised(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._embed_patches(self.model.patch_embed(pixel_values))

    def _embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """The output of ``patch_embed`` -> (B, P + N, C): prefix tokens, positions, pre-norm."""
        model = self.model
        # patch_drop is skipped on purpose: dropping tokens would break the g x g grid that the
        # pixel decoder and the taps rely on (it is the identity in eval mode anyway).
        return model.norm_pre(model._pos_embed(patches))

    @staticmethod
    def _flat_patches(patches: torch.Tensor) -> torch.Tensor:
        return patches.flatten(1, 2) if patches.ndim == 4 else patches  # NHWC when the model keeps the grid

    def _patch_embed_normalised(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._flat_patches(self.model.patch_embed(pixel_values))

    def embed_with_patch_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_images(images)
        patches = self.model.patch_embed(self.normalize_images(images))
        return self._embed_patches(patches), self._flat_patches(patches)

    def _blocks(self) -> Sequence[nn.Module]:
        return self.model.blocks

    def _apply_block(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return block(hidden)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (B, P + N, C) output of the last block -> (B, D): final norm, pooling, fc_norm."""
        self._check_tokens(hidden)
        return self.model.forward_head(self.model.norm(hidden), pre_logits=True)


def _square(value: int | Sequence[int], name: str) -> int:
    if isinstance(value, int):
        return value
    values = tuple(value)
    if len(values) != 2 or values[0] != values[1]:
        raise ValueError(f"timm model has {name}={values}; DualToken needs square images and patches")
    return int(values[0])


__all__ = ["TimmBackbone"]
