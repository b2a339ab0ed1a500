"""PatchGAN discriminator for the pixel branch's adversarial loss.

The PatchGAN of pix2pix (Isola et al., 2017), as used by VQGAN and DualToken: a stack
of 4x4 convolutions whose output is a grid of logits, each judging one overlapping
patch of the image as real or reconstructed. Judging patches rather than whole images
pushes the decoder towards sharp local texture, which MSE and LPIPS alone blur.
"""

from __future__ import annotations

from torch import Tensor, nn

from tokenizer.config import DiscriminatorConfig
from tokenizer.decoder import group_norm

__all__ = ["PatchDiscriminator"]

# Channel widths stop doubling at 8 x base_channels (pix2pix's cap).
_MAX_CHANNEL_MULT = 8


def _conv_norm_act(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """4x4 conv (no bias: the norm's shift replaces it) -> GroupNorm -> LeakyReLU(0.2)."""
    # GroupNorm instead of pix2pix's BatchNorm: with ZeRO/DDP each rank sees a micro-batch
    # of a few large images, so batch statistics are noisy and differ between ranks (and
    # running buffers drift apart unless SyncBatchNorm is used); BatchNorm would also mix
    # real and fake images' statistics when both go through one call. GroupNorm
    # normalises each image on its own, so the result is independent of batch size and rank.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=4, stride=stride, padding=1, bias=False),
        group_norm(out_channels),
        nn.LeakyReLU(0.2, inplace=True),
    )


class PatchDiscriminator(nn.Module):
    """PatchGAN: ``images: (B, in_channels, H, W)`` in [-1, 1] -> ``logits: (B, 1, h', w')``.

    Layout for ``num_layers = n`` and ``base_channels = c``: conv4x4/2 (c) + LeakyReLU,
    then ``n - 1`` stride-2 conv + GroupNorm + LeakyReLU stages doubling the width (capped
    at 8c), one stride-1 stage, and a stride-1 conv to one logit channel. Each of the
    ``n`` stride-2 convs halves H and W; the two stride-1 4x4 convs (padding 1) each take
    one more pixel off, so a 64 x 64 image with ``n = 3`` gives 6 x 6 logits. The image
    side must be at least ``3 * 2 ** n`` for the output to be non-empty.
    """

    def __init__(self, config: DiscriminatorConfig, in_channels: int = 3) -> None:
        super().__init__()
        if in_channels <= 0:
            raise ValueError(f"PatchDiscriminator: in_channels={in_channels}; expected > 0")
        self.config = config
        self.in_channels = in_channels
        base = config.base_channels

        layers: list[nn.Module] = [
            # No norm on the first layer (pix2pix): normalising raw pixels would discard colour and contrast.
            nn.Conv2d(in_channels, base, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        channels = base
        for layer in range(1, config.num_layers):
            next_channels = base * min(2**layer, _MAX_CHANNEL_MULT)
            layers.append(_conv_norm_act(channels, next_channels, stride=2))
            channels = next_channels
        next_channels = base * min(2**config.num_layers, _MAX_CHANNEL_MULT)
        layers.append(_conv_norm_act(channels, next_channels, stride=1))
        layers.append(nn.Conv2d(next_channels, 1, kernel_size=4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """pix2pix init: conv weights ~ N(0, 0.02), norm scales ~ N(1, 0.02), biases 0.

        The small init keeps early logits near 0, so the hinge loss starts in its linear
        region for both real and fake images.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.normal_(module.weight, mean=1.0, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: Tensor) -> Tensor:
        """``images: (B, in_channels, H, W)`` in [-1, 1] -> ``logits: (B, 1, h', w')`` (real > 0)."""
        min_side = 3 * 2**self.config.num_layers
        if images.ndim != 4 or images.shape[1] != self.in_channels or min(images.shape[-2:]) < min_side:
            raise ValueError(
                f"PatchDiscriminator.forward: images has shape {tuple(images.shape)}; expected "
                f"(B, {self.in_channels}, H, W) with H, W >= {min_side} for num_layers={self.config.num_layers}"
            )
        return self.layers(images)
