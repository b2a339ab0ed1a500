"""The DualToken tokenizer: one ViT, two taps, two residual-VQ vocabularies.

Pixel branch (generation): tap ``taps.pixel_layer`` (0: the patch embedding before the
position embedding) -> down projection -> residual VQ ->
up projection -> conv decoder -> image. Semantic branch (understanding): tap
``taps.semantic_layer`` -> down projection -> residual VQ -> up projection -> the
remaining ViT blocks and the pooling head, so the pooled embedding still matches the
frozen text tower (docs/architecture.md, "The method"; paper §3).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tokenizer.backbone import VisionBackbone
from tokenizer.backbone_factory import build_backbone
from tokenizer.config import ConfigError, DualTokenizerConfig, config_from_dict, config_to_dict
from tokenizer.decoder import PixelDecoder
from tokenizer.devices import resolve_device
from tokenizer.files import atomic_directory, verify_folder
from tokenizer.projection import TokenProjection
from tokenizer.quantizer import ResidualVectorQuantizer
from tokenizer.siglip_backbone import SiglipBackbone
from tokenizer.text_tower import TextTower

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class DualTokenizerCodes:
    """Discrete codes of a batch of images.

    pixel_codes: (B, h, w, D_pixel); semantic_codes: (B, h, w, D_semantic), int64.
    """

    pixel_codes: torch.Tensor
    semantic_codes: torch.Tensor


@dataclass
class SemanticFeatures:
    """tap_features: (B, N, C) post-quantisation features at the semantic tap;
    pooled: (B, D) the backbone's pooled embedding computed from them."""

    tap_features: torch.Tensor
    pooled: torch.Tensor


@dataclass
class DualTokenizerOutput:
    """Everything a training step needs from one forward pass."""

    reconstruction: torch.Tensor  # (B, 3, H, W), unclamped
    pixel_codes: torch.Tensor  # (B, h, w, D_pixel)
    semantic_codes: torch.Tensor  # (B, h, w, D_semantic)
    semantic_tap_features: torch.Tensor  # (B, N, C)
    semantic_pooled: torch.Tensor  # (B, D)
    pixel_commitment_loss: torch.Tensor
    semantic_commitment_loss: torch.Tensor


class DualTokenizer(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] <-> pixel and semantic codes.

    Build with a config (random init, or a backbone copied from a teacher), or load a
    trained one with :meth:`from_pretrained`. ``text_tower`` (frozen) is optional; it is
    needed only for :meth:`zero_shot_logits` with text prompts.
    """

    def __init__(
        self,
        config: DualTokenizerConfig,
        backbone: VisionBackbone | None = None,
        text_tower: TextTower | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone if backbone is not None else build_backbone(config.backbone)
        config.taps.check_against(self.backbone.num_layers)
        width = self.backbone.hidden_size
        taps = config.taps

        self.semantic_down = TokenProjection(config.projection, width, config.semantic_quantizer.code_dim)
        self.semantic_quantizer = ResidualVectorQuantizer(config.semantic_quantizer)
        self.semantic_up = TokenProjection(config.projection, config.semantic_quantizer.code_dim, width)
        if config.shared_codebook:
            # Ablation (paper Table 5): the decoder reads the semantic codes.
            pixel_code_dim = config.semantic_quantizer.code_dim
            self.pixel_down = None
            self.pixel_quantizer = None
        else:
            pixel_code_dim = config.pixel_quantizer.code_dim
            self.pixel_down = TokenProjection(config.projection, width, pixel_code_dim)
            self.pixel_quantizer = ResidualVectorQuantizer(config.pixel_quantizer)
        self.pixel_up = TokenProjection(config.projection, pixel_code_dim, width)
        self.pixel_aux = nn.Linear(width, width) if taps.pixel_aux_layer is not None else None
        self.decoder = PixelDecoder(config.decoder, in_channels=width)
        # Backbones with prefix (CLS) tokens: when the semantic path restarts from codes alone
        # the prefix tokens at the tap are unknown, so a learned vector stands in for them.
        prefix = self.backbone.num_prefix_tokens
        self.semantic_prefix = nn.Parameter(torch.zeros(1, prefix, width)) if prefix > 0 else None
        self.text_tower = text_tower

    # ------------------------------------------------------------------ helpers
    @property
    def grid_size(self) -> int:
        return self.backbone.grid_size

    def _check_images(self, images: torch.Tensor) -> None:
        size = self.backbone.image_size
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, {size}, {size}); got {tuple(images.shape)}")
        if images.shape[-2:] != (size, size):
            raise ValueError(
                f"images are {images.shape[-2]}x{images.shape[-1]} but the tokenizer expects {size}x{size}; "
                "resize them first (the data readers do this)"
            )

    def _patch_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, self.backbone.num_prefix_tokens :]

    def _tokens_to_grid_codes(self, codes: torch.Tensor) -> torch.Tensor:
        grid = self.grid_size
        return codes.reshape(codes.shape[0], grid, grid, codes.shape[-1])

    def _run_trunk(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (pixel features (B, N, C) incl. the aux tap, semantic-tap hidden (B, P+N, C))."""
        taps = self.config.taps
        if taps.pixel_layer == 0:  # position-free: the patch projection alone
            hidden, patches = self.backbone.embed_with_patch_features(images)
            return patches, self.backbone.run_blocks(hidden, 0, taps.semantic_layer)
        hidden = self.backbone.embed(images)
        aux = None
        if taps.pixel_aux_layer is not None:
            hidden = self.backbone.run_blocks(hidden, 0, taps.pixel_aux_layer)
            aux = self._patch_tokens(hidden)
            hidden = self.backbone.run_blocks(hidden, taps.pixel_aux_layer, taps.pixel_layer)
        else:
            hidden = self.backbone.run_blocks(hidden, 0, taps.pixel_layer)
        pixel_features = self._patch_tokens(hidden)
        if aux is not None:
            pixel_features = pixel_features + taps.pixel_aux_weight * self.pixel_aux(aux)
        semantic_hidden = self.backbone.run_blocks(hidden, taps.pixel_layer, taps.semantic_layer)
        return pixel_features, semantic_hidden

    def _finish_semantic(self, tap_features: torch.Tensor) -> torch.Tensor:
        """tap_features: (B, N, C) patch tokens at the semantic tap -> pooled (B, D)."""
        hidden = tap_features
        if self.semantic_prefix is not None:
            hidden = torch.cat([self.semantic_prefix.expand(hidden.shape[0], -1, -1), hidden], dim=1)
        hidden = self.backbone.run_blocks(hidden, self.config.taps.semantic_layer, self.backbone.num_layers)
        return self.backbone.head(hidden)

    def _decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """latents: (B, N, code_dim) quantised -> reconstruction (B, 3, H, W)."""
        features = self.pixel_up(latents)
        grid = self.grid_size
        features = features.transpose(1, 2).reshape(features.shape[0], -1, grid, grid)
        return self.decoder(features)

    # ------------------------------------------------------------------ training forward
    def forward(self, images: torch.Tensor) -> DualTokenizerOutput:
        """images: (B, 3, H, W) in [-1, 1] -> reconstruction, codes, semantic features, losses."""
        self._check_images(images)
        pixel_features, semantic_hidden = self._run_trunk(images)
        semantic = self.semantic_quantizer(self.semantic_down(self._patch_tokens(semantic_hidden)))
        semantic_tap = self.semantic_up(semantic.quantized)
        pooled = self._finish_semantic(semantic_tap)
        if self.pixel_quantizer is None:
            pixel = semantic
        else:
            pixel = self.pixel_quantizer(self.pixel_down(pixel_features))
        reconstruction = self._decode_latents(pixel.quantized)
        return DualTokenizerOutput(
            reconstruction=reconstruction,
            pixel_codes=self._tokens_to_grid_codes(pixel.codes),
            semantic_codes=self._tokens_to_grid_codes(semantic.codes),
            semantic_tap_features=semantic_tap,
            semantic_pooled=pooled,
            pixel_commitment_loss=pixel.commitment_loss
            if self.pixel_quantizer is not None
            else pixel.commitment_loss * 0,
            semantic_commitment_loss=semantic.commitment_loss,
        )

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> DualTokenizerCodes:
        """images: (B, 3, H, W) in [-1, 1] -> codes (B, h, w, D) for each vocabulary."""
        self._check_images(images)
        pixel_features, semantic_hidden = self._run_trunk(images)
        semantic_codes = self.semantic_quantizer.encode(self.semantic_down(self._patch_tokens(semantic_hidden)))
        if self.pixel_quantizer is None:
            pixel_codes = semantic_codes
        else:
            pixel_codes = self.pixel_quantizer.encode(self.pixel_down(pixel_features))
        return DualTokenizerCodes(
            pixel_codes=self._tokens_to_grid_codes(pixel_codes),
            semantic_codes=self._tokens_to_grid_codes(semantic_codes),
        )

    def _check_codes(self, codes: torch.Tensor, name: str, depth: int) -> torch.Tensor:
        grid = self.grid_size
        if codes.ndim != 4 or codes.shape[1:] != (grid, grid, depth):
            raise ValueError(f"{name} must have shape (B, {grid}, {grid}, {depth}); got {tuple(codes.shape)}")
        return codes.reshape(codes.shape[0], grid * grid, depth)

    @property
    def pixel_depth(self) -> int:
        return self.config.pixel_depth

    @torch.no_grad()
    def decode(self, pixel_codes: torch.Tensor, depths: int | None = None) -> torch.Tensor:
        """pixel_codes: (B, h, w, D) -> images (B, 3, H, W) in [-1, 1].

        ``depths``: decode only the first ``depths`` RVQ levels (coarse to fine; None = all D).
        A model's later depths can be the ones it predicts worst, and dropping them trades detail
        for fewer sampled mistakes.
        """
        quantizer = self.pixel_quantizer or self.semantic_quantizer
        depth = quantizer.config.depth
        flat = self._check_codes(pixel_codes, "pixel_codes", depth)
        if depths is None:
            depths = depth
        if isinstance(depths, bool) or not isinstance(depths, int) or not 1 <= depths <= depth:
            raise ValueError(f"depths={depths!r}; expected None (all) or an integer in [1, {depth}]")
        return self._decode_latents(quantizer.lookup_partial(flat, depths)).clamp(-1, 1)

    def semantic_features(self, semantic_codes: torch.Tensor) -> SemanticFeatures:
        """semantic_codes: (B, h, w, D) -> post-quantisation tap features and pooled embedding."""
        flat = self._check_codes(semantic_codes, "semantic_codes", self.semantic_quantizer.config.depth)
        tap = self.semantic_up(self.semantic_quantizer.lookup(flat))
        return SemanticFeatures(tap_features=tap, pooled=self._finish_semantic(tap))

    @torch.no_grad()
    def zero_shot_logits(self, semantic_codes: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """semantic_codes: (B, h, w, D); text_embeds: (T, D') normalised (``text_tower.encode``) -> (B, T)."""
        if self.text_tower is None:
            raise RuntimeError("this tokenizer has no text tower; build it with one (see training/train_tokenizer.py)")
        return self.text_tower.logits(self.semantic_features(semantic_codes).pooled, text_embeds)

    # ------------------------------------------------------------------ save / load
    def _serialisable_config(self) -> dict:
        payload = {"tokenizer": config_to_dict(self.config), "format_version": 1}
        if isinstance(self.backbone, SiglipBackbone):
            payload["backbone_hf_config"] = self.backbone.hf_config.to_dict()
        if self.text_tower is not None:
            payload["text_config"] = self.text_tower.text_model.config.to_dict()
        return payload

    def save_pretrained(self, directory: str | os.PathLike, write_extra: Callable[[Path], None] | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` atomically (:func:`tokenizer.files.atomic_directory`).

        ``write_extra(staging)`` adds files that belong to the finished folder (a stage's metrics,
        the text tokenizer) before its manifest is written, so they are part of what verifies.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        with atomic_directory(directory) as staging:
            state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
            save_file(state, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
            (staging / CONFIG_NAME).write_text(json.dumps(self._serialisable_config(), indent=2))
            if write_extra is not None:
                write_extra(staging)
        return directory

    @staticmethod
    def _saved_payload(directory: Path) -> tuple[dict, DualTokenizerConfig]:
        """``config.json``'s payload and its typed config; errors name the missing or bad file."""
        config_path = directory / CONFIG_NAME
        for path in (config_path, directory / WEIGHTS_NAME):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: {directory} is not a saved DualTokenizer")
        try:
            payload = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"{config_path} is not valid JSON: {error}") from None
        if "tokenizer" not in payload:
            raise ConfigError(f"{config_path} has no 'tokenizer' section: not a DualTokenizer config")
        return payload, config_from_dict(DualTokenizerConfig, payload["tokenizer"], "tokenizer")

    @classmethod
    def read_config(cls, directory: str | os.PathLike) -> DualTokenizerConfig:
        """The config of a tokenizer written by :meth:`save_pretrained`, without building it."""
        return cls._saved_payload(Path(directory))[1]

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, map_location: str = "cpu", device: str | torch.device | None = None
    ) -> DualTokenizer:
        """Load a tokenizer written by :meth:`save_pretrained`; errors name the missing or bad file.

        The weights are read to ``map_location``; the model is then moved to ``device`` when given
        (``auto``: CUDA when available, :func:`tokenizer.devices.resolve_device`)."""
        from safetensors.torch import load_file
        from transformers import SiglipTextConfig

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        with contextlib.suppress(FileNotFoundError):  # a missing folder: _saved_payload names the file
            verify_folder(directory, required=(CONFIG_NAME, WEIGHTS_NAME))  # recovers; sizes against the manifest
        payload, config = cls._saved_payload(directory)
        backbone = None
        if "backbone_hf_config" in payload:
            # Rebuild the exact architecture that was saved; the weights follow below.
            backbone = SiglipBackbone.from_hf_config(payload["backbone_hf_config"])
        elif config.backbone.pretrained_path is not None:
            config.backbone.pretrained_path = None  # the architecture is in the config; weights are ours
        text_tower = None
        if "text_config" in payload:
            text_tower = TextTower.from_config(SiglipTextConfig(**payload["text_config"]))
        model = cls(config, backbone=backbone, text_tower=text_tower)
        state = load_file(str(weights_path), device=map_location)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{weights_path} does not match {config_path}: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        if device is not None:
            model.to(resolve_device(device))
        return model.eval()
