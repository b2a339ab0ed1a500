"""The vision transformer that DualToken taps: the interface every backbone implements.

DualToken reads one ViT at two depths (paper: the outputs of blocks 6 and 26 of 27) and
later re-enters it after the semantic tap to run the remaining blocks and the pooling
head. :class:`VisionBackbone` therefore exposes the trunk in pieces rather than as one
``forward``:

``embed`` -> ``run_blocks(h, 0, k)`` -> ``run_blocks(h, k, L)`` -> ``head``

Blocks are counted from 1 as in the paper: "layer k" is the output of block k, so
``run_blocks(h, start, end)`` applies the 0-based ``blocks[start:end]``, and layer 0 is the
embedding output (``hidden_states[0]`` in transformers).

The implementations (:mod:`tokenizer.siglip_backbone`, :mod:`tokenizer.timm_backbone`) call
the submodules of the wrapped library model and never copy its code, so pretrained weights,
attention kernels (SDPA / FlashAttention) and ``save_pretrained`` keep working. Images always
enter in [-1, 1]; each backbone maps them to the normalisation it was trained with, so callers
treat every backbone alike. :func:`tokenizer.backbone_factory.build_backbone` builds the one a
:class:`~tokenizer.config.BackboneConfig` names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


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


__all__ = ["BackboneOutput", "VisionBackbone"]
