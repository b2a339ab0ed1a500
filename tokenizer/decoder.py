"""VQGAN-style convolutional pixel decoder: pixel-token latents -> RGB images.

DualToken renders images from the de-quantised pixel features with the decoder of
VQGAN (Esser et al., 2021): a post-quant residual block, a middle block with one
self-attention layer over all positions, then one level per entry of ``channel_mult``
from the deepest to the shallowest, with a nearest x2 upsampling between levels.
The paper's 384-px model first resizes the 27 x 27 SigLIP grid to 24 x 24 so that four
x2 upsamplings land exactly on 384 (docs/architecture.md, "The method"); ``DecoderConfig.latent_size``
does that resize.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from tokenizer.config import DecoderConfig

__all__ = ["PixelDecoder", "group_norm"]


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``max_groups`` that divides ``channels``.

    VQGAN uses 32 groups; tiny configs have channel counts (e.g. 24) that 32 does not divide,
    so we fall back to the nearest divisor instead of failing.
    """
    if channels <= 0:
        raise ValueError(f"group_norm: channels={channels}; expected > 0")
    num_groups = next(groups for groups in range(min(max_groups, channels), 0, -1) if channels % groups == 0)
    # eps 1e-6 as in VQGAN: activations after SiLU can be small and 1e-5 visibly biases them.
    return nn.GroupNorm(num_groups, channels, eps=1e-6, affine=True)


class ResidualBlock(nn.Module):
    """Two (GroupNorm -> SiLU -> conv3x3) stages plus a skip (1x1 conv when widths differ).

    ``features: (B, in_channels, H, W) -> (B, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.skip = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, features: Tensor) -> Tensor:
        hidden = self.conv1(F.silu(self.norm1(features)))
        hidden = self.conv2(F.silu(self.norm2(hidden)))
        return self.skip(features) + hidden


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection.

    ``features: (B, C, H, W) -> (B, C, H, W)``. Placed only at the lowest resolution,
    where H*W is small, so the quadratic cost stays negligible.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.to_qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, features: Tensor) -> Tensor:
        batch, channels, height, width = features.shape
        query, key, value = self.to_qkv(self.norm(features)).chunk(3, dim=1)
        # (B, C, H, W) -> (B, 1 head, H*W, C) for scaled_dot_product_attention.
        query, key, value = (t.flatten(2).transpose(1, 2).unsqueeze(1) for t in (query, key, value))
        attended = F.scaled_dot_product_attention(query, key, value)
        attended = attended.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return features + self.proj_out(attended)


class Upsample(nn.Module):
    """Nearest x2 upsampling followed by a conv3x3.

    The conv smooths the blocky nearest-neighbour copies; nearest (not transposed conv)
    avoids checkerboard artefacts. ``(B, C, H, W) -> (B, C, 2H, 2W)``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, features: Tensor) -> Tensor:
        return self.conv(F.interpolate(features, scale_factor=2.0, mode="nearest"))


class DecoderLevel(nn.Module):
    """``num_res_blocks`` residual blocks at one resolution, then optionally an upsampling."""

    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, upsample: bool) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_res_blocks
        self.blocks = nn.ModuleList(ResidualBlock(widths[i], widths[i + 1]) for i in range(num_res_blocks))
        self.upsample = Upsample(out_channels) if upsample else nn.Identity()

    def forward(self, features: Tensor) -> Tensor:
        for block in self.blocks:
            features = block(features)
        return self.upsample(features)


class PixelDecoder(nn.Module):
    """Decode pixel-branch latents into images.

    Args:
        config: the decoder's sub-config (widths, depth, ``latent_size``).
        in_channels: channel count of the latents fed to :meth:`forward` (the width of the
            up-projected pixel features).

    ``forward(latents: (B, in_channels, h, w)) -> images: (B, out_channels, s * f, s * f)``
    where ``s`` is ``config.latent_size`` (or ``h``, ``w`` when it is ``None``) and
    ``f = config.upsample_factor``. Images target [-1, 1] but are not clamped: losses see
    the raw output, and callers clamp for display.
    """

    def __init__(self, config: DecoderConfig, in_channels: int) -> None:
        super().__init__()
        if in_channels <= 0:
            raise ValueError(f"PixelDecoder: in_channels={in_channels}; expected > 0")
        self.config = config
        self.in_channels = in_channels
        level_channels = [config.base_channels * mult for mult in config.channel_mult]
        top_channels = level_channels[-1]

        self.conv_in = nn.Conv2d(in_channels, top_channels, kernel_size=3, padding=1)
        self.post_quant_block = ResidualBlock(top_channels, top_channels)
        self.mid_block_1 = ResidualBlock(top_channels, top_channels)
        self.mid_attention = SpatialSelfAttention(top_channels) if config.mid_attention else nn.Identity()
        self.mid_block_2 = ResidualBlock(top_channels, top_channels)

        # Deepest level first; every level but the shallowest ends with an x2 upsampling.
        levels = []
        current_channels = top_channels
        for level in reversed(range(len(level_channels))):
            levels.append(
                DecoderLevel(current_channels, level_channels[level], config.num_res_blocks, upsample=level > 0)
            )
            current_channels = level_channels[level]
        self.levels = nn.ModuleList(levels)

        self.norm_out = group_norm(current_channels)
        self.conv_out = nn.Conv2d(current_channels, config.out_channels, kernel_size=3, padding=1)

    @property
    def last_layer_weight(self) -> Tensor:
        """``conv_out.weight``: the layer whose gradients set the adaptive GAN weight."""
        return self.conv_out.weight

    def forward(self, latents: Tensor) -> Tensor:
        """``latents: (B, in_channels, h, w)`` -> ``images: (B, out_channels, H, W)``, unclamped."""
        if latents.ndim != 4 or latents.shape[1] != self.in_channels:
            raise ValueError(
                f"PixelDecoder.forward: latents has shape {tuple(latents.shape)}; "
                f"expected (B, {self.in_channels}, h, w)"
            )
        latent_size = self.config.latent_size
        if latent_size is not None and tuple(latents.shape[-2:]) != (latent_size, latent_size):
            # Paper: the 27x27 ViT grid is resized to 24x24 so that 2**4 upsampling gives 384 px.
            latents = F.interpolate(latents, size=(latent_size, latent_size), mode="bilinear", align_corners=False)

        features = self.post_quant_block(self.conv_in(latents))
        features = self.mid_block_2(self.mid_attention(self.mid_block_1(features)))
        for level in self.levels:
            features = level(features)
        return self.conv_out(F.silu(self.norm_out(features)))
