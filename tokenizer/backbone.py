"""The vision transformer that DualToken taps, behind one interface for SigLIP and timm ViTs.

DualToken reads one ViT at two depths (paper: the outputs of blocks 6 and 26 of 27) and
later re-enters it after the semantic tap to run the remaining blocks and the pooling
head. :class:`VisionBackbone` therefore exposes the trunk in pieces rather than as one
``forward``:

``embed`` -> ``run_blocks(h, 0, k)`` -> ``run_blocks(h, k, L)`` -> ``head``

Blocks are counted from 1 as in the paper: "layer k" is the output of block k, so
``run_blocks(h, start, end)`` applies the 0-based ``blocks[start:end]``, and layer 0 is the
embedding output (``hidden_states[0]`` in transformers).

The wrappers call the submodules of the wrapped library model and never copy its code, so
pretrained weights, attention kernels (SDPA / FlashAttention) and ``save_pretrained`` keep
working. Images always enter in [-1, 1]; each backbone maps them to the normalisation it
was trained with, so callers treat every backbone alike.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from tokenizer.config import BackboneConfig, ConfigError

logger = logging.getLogger(__name__)

# timm's default when a model carries no pretrained_cfg (the ImageNet statistics).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

# "org/name" or "name": what the Hugging Face hub accepts as a repository id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass
class BackboneOutput:
    """Result of a full pass through the backbone.

    last_hidden_state: (B, P + N, C) output of the last block, before the final norm.
    pooled: (B, D) the pooled image embedding (final norm + pooling head).
    """

    last_hidden_state: torch.Tensor
    pooled: torch.Tensor


class VisionBackbone(nn.Module):
    """A ViT exposed block by block, with layer taps.

    Attributes:
        num_layers: number of transformer blocks L.
        hidden_size: token width C.
        num_prefix_tokens: P, tokens before the patch tokens (CLS / registers; 0 for SigLIP).
        image_size: side of the square input image, in pixels.
        patch_size: side of one patch, in pixels.
        grid_size: g = image_size // patch_size; N = g * g patch tokens.
    """

    def __init__(
        self, *, num_layers: int, hidden_size: int, num_prefix_tokens: int, image_size: int, patch_size: int
    ) -> None:
        super().__init__()
        # No divisibility check: SigLIP so400m/14 at 384 px has 27 x 27 patches (the patch conv
        # drops the 6-pixel remainder), so the grid is the floor of the ratio.
        if not 0 < patch_size <= image_size:
            raise ValueError(f"patch_size={patch_size} must lie in [1, image_size={image_size}]")
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.num_prefix_tokens = num_prefix_tokens
        self.image_size = image_size
        self.patch_size = patch_size
        self.gradient_checkpointing = False

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    # ------------------------------------------------------------------ subclass hooks
    def _blocks(self) -> Sequence[nn.Module]:
        """The transformer blocks, in order."""
        raise NotImplementedError

    def _apply_block(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Run one block: (B, P + N, C) -> (B, P + N, C)."""
        raise NotImplementedError

    def _embed_normalised(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (B, 3, H, W) in the model's own normalisation -> (B, P + N, C)."""
        raise NotImplementedError

    def normalize_images(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in [-1, 1] -> the pixel normalisation the model was trained with."""
        raise NotImplementedError

    def _patch_embed_normalised(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (B, 3, H, W) normalised -> (B, N, C): the patch projection alone."""
        raise NotImplementedError

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (B, P + N, C) output of the last block -> pooled (B, D): final norm + pooling head."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared trunk
    def _check_images(self, images: torch.Tensor) -> None:
        size = self.image_size
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must have shape (B, 3, {size}, {size}); got {shape}")
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"images are {images.shape[-2]}x{images.shape[-1]} but the backbone expects {size}x{size}")

    def _check_tokens(self, hidden: torch.Tensor, name: str = "hidden") -> None:
        expected = self.num_prefix_tokens + self.num_patches
        if hidden.ndim != 3 or hidden.shape[1] != expected or hidden.shape[2] != self.hidden_size:
            raise ValueError(
                f"{name} must have shape (B, {expected}, {self.hidden_size}) "
                f"({self.num_prefix_tokens} prefix + {self.num_patches} patch tokens); got {tuple(hidden.shape)}"
            )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in [-1, 1] -> (B, P + N, C), the input of block 1 (layer 0)."""
        self._check_images(images)
        return self._embed_normalised(self.normalize_images(images))

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in [-1, 1] -> (B, N, C): each patch's linear projection, before any
        position embedding, prefix token or attention (layer 0 of ``taps.pixel_layer``).

        A patch's features depend on its own pixels only, so the same content gives the same
        features wherever it sits in the image.
        """
        self._check_images(images)
        return self._patch_embed_normalised(self.normalize_images(images))

    def embed_with_patch_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embed(images), patch_features(images))``; backbones that can share the patch
        projection between the two run it once (``taps.pixel_layer: 0`` needs both)."""
        return self.embed(images), self.patch_features(images)

    def run_blocks(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Apply blocks ``start + 1 .. end`` (1-based), i.e. the 0-based ``blocks[start:end]``.

        hidden: (B, P + N, C), the output of layer ``start`` -> (B, P + N, C), the output of layer ``end``.
        With gradient checkpointing on (and in training mode with grad enabled) each block's
        activations are recomputed in the backward pass instead of stored.
        """
        if not 0 <= start <= end <= self.num_layers:
            raise ValueError(
                f"run_blocks(start={start}, end={end}): expected 0 <= start <= end <= num_layers={self.num_layers}"
            )
        self._check_tokens(hidden)
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        blocks = self._blocks()
        for index in range(start, end):
            block = blocks[index]
            if use_checkpoint:
                hidden = checkpoint(self._apply_block, block, hidden, use_reentrant=False)
            else:
                hidden = self._apply_block(block, hidden)
        return hidden

    def forward_taps(self, images: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Hidden states after each requested layer, in one pass that stops at the deepest one.

        images: (B, 3, H, W) in [-1, 1]; layers: 1-based block outputs (0 = the embeddings).
        Returns {layer: (B, P + N, C)}.
        """
        wanted = sorted(set(int(layer) for layer in layers))
        if not wanted:
            raise ValueError("forward_taps needs at least one layer")
        if wanted[0] < 0 or wanted[-1] > self.num_layers:
            raise ValueError(f"forward_taps layers={list(layers)}; each must lie in [0, {self.num_layers}]")
        hidden = self.embed(images)
        taps: dict[int, torch.Tensor] = {}
        done = 0
        for layer in wanted:
            hidden = self.run_blocks(hidden, done, layer)
            done = layer
            taps[layer] = hidden
        return taps

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        """images: (B, 3, H, W) in [-1, 1] -> the last block's tokens and the pooled embedding."""
        hidden = self.run_blocks(self.embed(images), 0, self.num_layers)
        return BackboneOutput(last_hidden_state=hidden, pooled=self.head(hidden))

    def tokens_to_grid(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (B, P + N, C) -> (B, C, g, g), the patch tokens in raster order (prefix dropped)."""
        self._check_tokens(hidden)
        patches = hidden[:, self.num_prefix_tokens :]
        batch, _, width = patches.shape
        return patches.transpose(1, 2).reshape(batch, width, self.grid_size, self.grid_size)

    def grid_to_tokens(self, grid: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`tokens_to_grid`.

        grid: (B, C, g, g); like: (B, P + N, C) whose prefix tokens are re-inserted -> (B, P + N, C).
        """
        g = self.grid_size
        if grid.ndim != 4 or tuple(grid.shape[1:]) != (self.hidden_size, g, g):
            raise ValueError(f"grid must have shape (B, {self.hidden_size}, {g}, {g}); got {tuple(grid.shape)}")
        self._check_tokens(like, "like")
        if like.shape[0] != grid.shape[0]:
            raise ValueError(f"grid has batch {grid.shape[0]} but like has batch {like.shape[0]}")
        patches = grid.flatten(2).transpose(1, 2)
        return torch.cat([like[:, : self.num_prefix_tokens].to(patches.dtype), patches], dim=1)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each block in the backward pass (``run_blocks``, training mode only)."""
        self.gradient_checkpointing = bool(enabled)


# --------------------------------------------------------------------------------------
# SigLIP (transformers)
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# pretrained sources and dispatch
# --------------------------------------------------------------------------------------


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


def build_backbone(config: BackboneConfig, load_weights: bool = True) -> VisionBackbone:
    """The backbone ``config`` describes.

    SigLIP: ``pretrained_path`` set -> :meth:`SiglipBackbone.from_pretrained`, else random
    init from the size fields. timm: :meth:`TimmBackbone.from_config`. With
    ``load_weights=False`` the architecture is built without reading weights (for loading a
    saved tokenizer over it): SigLIP reads only the checkpoint's config.json.
    """
    if config.kind == "siglip":
        if config.pretrained_path is None:
            return SiglipBackbone.from_config(config)
        if load_weights:
            backbone = SiglipBackbone.from_pretrained(config.pretrained_path)
        else:
            from transformers import SiglipVisionModel

            backbone = SiglipBackbone(SiglipVisionModel(_siglip_vision_config(config.pretrained_path)))
        backbone.set_gradient_checkpointing(config.gradient_checkpointing)
        return backbone
    if config.kind == "timm":
        if not load_weights and config.pretrained_path is not None:
            from dataclasses import replace

            config = replace(config, pretrained_path=None)
        return TimmBackbone.from_config(config)
    raise ConfigError(f"backbone.kind={config.kind!r}; expected 'siglip' or 'timm'")


def _siglip_vision_config(path: str) -> Any:
    from transformers import SiglipVisionConfig

    source = _resolve_pretrained_source(path)
    try:
        # base_config_key="vision_config": a full SiglipModel config yields its vision part.
        return SiglipVisionConfig.from_pretrained(source)
    except OSError as error:
        raise FileNotFoundError(f"cannot read the SigLIP config of {path!r}: {error}") from error


def backbone_num_layers(config: BackboneConfig) -> int:
    """Number of blocks ``build_backbone(config)`` will have, without building it.

    A pretrained SigLIP is read from its config.json (defaults filled in by transformers);
    otherwise the size field ``num_layers`` applies (timm files carry no architecture).
    """
    if config.kind == "siglip" and config.pretrained_path is not None:
        return int(_siglip_vision_config(config.pretrained_path).num_hidden_layers)
    return config.num_layers


__all__ = [
    "BackboneOutput",
    "SiglipBackbone",
    "TimmBackbone",
    "VisionBackbone",
    "backbone_num_layers",
    "build_backbone",
]
