"""Losses and image metrics of the DualToken tokenizer.

Pixel branch (docs/architecture.md, "The method"): MSE + perceptual (LPIPS-style) + PatchGAN hinge loss
whose generator term is scaled by an adaptive weight (the ratio of gradient norms at the
decoder's last layer, as in VQGAN). Semantic branch: (MSE - cosine) distillation towards a
frozen teacher. Plus the PSNR / SSIM metrics used by the evaluations.

All functions take raw tensors and return tensors; weighting and logging stay with the
training loop.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PerceptualLoss",
    "adaptive_generator_weight",
    "feature_distillation_loss",
    "generator_adversarial_loss",
    "hinge_discriminator_loss",
    "psnr",
    "ssim",
]


# --------------------------------------------------------------------------------------
# Adversarial losses
# --------------------------------------------------------------------------------------


def hinge_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Hinge loss of the discriminator: ``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))``.

    Args:
        real_logits: ``(B, 1, h, w)`` (any shape) logits on real images.
        fake_logits: logits on reconstructions (any shape; need not match ``real_logits``).

    The 0.5 (VQGAN's convention) keeps the loss on the scale of a single term, so it is 1.0
    at initialisation when all logits are 0.
    """
    real_term = F.relu(1.0 - real_logits.float()).mean()
    fake_term = F.relu(1.0 + fake_logits.float()).mean()
    return 0.5 * (real_term + fake_term)


def generator_adversarial_loss(fake_logits: Tensor) -> Tensor:
    """Generator side of the hinge GAN: ``-mean(fake_logits)`` (any shape -> scalar)."""
    return -fake_logits.float().mean()


def adaptive_generator_weight(
    reconstruction_loss: Tensor,
    generator_loss: Tensor,
    last_layer: Tensor,
    min_weight: float = 0.3,
    max_weight: float = 10.0,
) -> Tensor:
    """VQGAN's adaptive GAN weight: ``||d rec / d W|| / (||d gan / d W|| + 1e-4)``, clamped.

    ``W`` is the decoder's last layer (``PixelDecoder.last_layer_weight``). Balancing the two
    gradients where they meet keeps the adversarial term from swamping reconstruction early
    on, whatever the loss scales are; the clamp to ``[min_weight, max_weight]`` (DualToken:
    [0.3, 10]) stops it from vanishing or exploding when one gradient is tiny.

    Args:
        reconstruction_loss: scalar, the (already weighted) reconstruction + perceptual loss.
        generator_loss: scalar, :func:`generator_adversarial_loss` of the reconstructions.
        last_layer: the parameter both losses depend on.

    Returns:
        A detached scalar (float32). The gradients are taken with ``torch.autograd.grad`` and
        ``retain_graph=True``: nothing is accumulated into ``.grad`` and the graph stays
        usable, so the caller can still call ``backward()`` on the total loss.

    Under ZeRO-3 ``last_layer`` must be gathered (a partitioned parameter has no full
    gradient); the caller owns that.
    """
    if not (min_weight <= max_weight):
        raise ValueError(f"adaptive_generator_weight: min_weight={min_weight} > max_weight={max_weight}")
    if not last_layer.requires_grad:
        raise ValueError("adaptive_generator_weight: last_layer does not require grad; pass the trainable weight")
    for name, loss in (("reconstruction_loss", reconstruction_loss), ("generator_loss", generator_loss)):
        if loss.numel() != 1:
            raise ValueError(f"adaptive_generator_weight: {name} has shape {tuple(loss.shape)}; expected a scalar")
        if not loss.requires_grad:
            raise ValueError(
                f"adaptive_generator_weight: {name} has no autograd graph (computed under no_grad or in eval?); "
                "the adaptive weight needs gradients w.r.t. last_layer"
            )
    (reconstruction_grad,) = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)
    (generator_grad,) = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)
    weight = reconstruction_grad.float().norm() / (generator_grad.float().norm() + 1e-4)
    return weight.clamp(min_weight, max_weight).detach()


# --------------------------------------------------------------------------------------
# Semantic distillation
# --------------------------------------------------------------------------------------


def feature_distillation_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``MSE(student, teacher) - mean cosine(student, teacher)`` over the last dim.

    Args:
        student: ``(..., C)``, e.g. post-quantisation semantic features ``(B, N, C)`` or pooled ``(B, C)``.
        teacher: same shape, from the frozen teacher; detached here so no gradient reaches it.

    Returns a float32 scalar; -1 when the two are identical (MSE 0, cosine 1). MSE matches
    magnitudes, the cosine term matches directions, which is what zero-shot retrieval uses.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"feature_distillation_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
            "must have the same shape (..., C)"
        )
    if student.ndim < 1:
        raise ValueError("feature_distillation_loss: inputs must have at least one (channel) dimension")
    # float32: under bf16 autocast the cosine of 1000+-dim vectors loses most of its precision.
    student = student.float()
    teacher = teacher.detach().float()
    mse = F.mse_loss(student, teacher)
    cosine = F.cosine_similarity(student, teacher, dim=-1).mean()
    return mse - cosine


# --------------------------------------------------------------------------------------
# Perceptual loss
# --------------------------------------------------------------------------------------

# Outputs of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16().features
# (the layers LPIPS compares); their widths follow.
_VGG16_TAP_INDICES = (3, 8, 15, 22, 29)
_VGG16_TAP_CHANNELS = (64, 128, 256, 512, 512)
# ImageNet statistics of images in [0, 1]. Applied to [-1, 1] inputs this is the same affine
# map as LPIPS' "scaling layer" (shift -0.030/-0.088/-0.188, scale 0.458/0.448/0.450).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class _VGG16Features(nn.Module):
    """``images: (B, 3, H, W)`` ImageNet-normalised -> the five LPIPS feature maps of vgg16."""

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.tap_indices = frozenset(_VGG16_TAP_INDICES)

    def forward(self, images: Tensor) -> list[Tensor]:
        outputs = []
        hidden = images
        for index, layer in enumerate(self.features):
            hidden = layer(hidden)
            if index in self.tap_indices:
                # Safe despite vgg's in-place ReLUs: every tap is followed by a max-pool (not in place).
                outputs.append(hidden)
        return outputs


def _missing_file_error(kind: str, path: Path, how_to_get: str) -> FileNotFoundError:
    return FileNotFoundError(f"{kind} not found at '{path}'. PerceptualLoss never downloads anything; {how_to_get}")


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    # mmap: a full vgg16 file is 528 MB, of which only the 59 MB of conv weights are read.
    # Only files in torch's zip format can be memory-mapped; older (legacy) checkpoints are read whole.
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    if not isinstance(state, dict):
        raise ValueError(f"'{path}' holds a {type(state).__name__}; expected a state dict (name -> tensor)")
    return state


def _parse_layer_weights(state: dict[str, Tensor], path: Path, num_layers: int) -> list[Tensor]:
    """Per-layer channel weights from an LPIPS release file or a PerceptualLoss state dict.

    Accepted keys: ``lin{k}.model.1.weight`` (LPIPS v0.1 ``vgg.pth``, tensors ``(1, C, 1, 1)``)
    or ``layer_weight_{k}`` (this module's buffers, ``(C,)``).
    """
    by_layer: dict[int, Tensor] = {}
    for key, value in state.items():
        match = re.fullmatch(r"lin(\d+)\..*weight", key) or re.fullmatch(r"(?:.*\.)?layer_weight_(\d+)", key)
        if match:
            by_layer[int(match.group(1))] = value.detach().float().flatten()
    if sorted(by_layer) != list(range(num_layers)):
        raise ValueError(
            f"'{path}': expected per-layer weights for layers 0..{num_layers - 1} under keys 'lin<k>.model.1.weight' "
            f"or 'layer_weight_<k>', found layers {sorted(by_layer)}"
        )
    return [by_layer[layer] for layer in range(num_layers)]


class PerceptualLoss(nn.Module):
    """LPIPS-style perceptual distance computed with a frozen feature network.

    For each layer ``l`` of ``feature_extractor``: unit-normalise the features over the
    channel dimension, take the squared difference between reconstruction and target,
    weight the channels (LPIPS' learned linear layer when ``layer_weights`` is given, plain
    sum otherwise), average over positions; then sum over layers.

    Args:
        feature_extractor: maps preprocessed ``images: (B, 3, H, W)`` to a list of feature
            tensors. If it is an ``nn.Module`` it is registered, frozen (``requires_grad``
            False) and kept in eval mode. A plain callable (e.g. a lambda returning a frozen
            ViT teacher's hidden states) is used as is: keeping it frozen is the caller's job.
        input_mean, input_std: per-channel statistics of [0, 1] images that the network was
            trained with; inputs in [-1, 1] are mapped to ``((x + 1) / 2 - mean) / std``. With
            ``None`` the [-1, 1] images are passed unchanged (SigLIP's own normalisation).
        layer_weights: optional non-negative per-channel weights, one ``(C_l,)`` tensor per layer.
        channels_last: features are ``(B, ..., C)`` (ViT tokens ``(B, N, C)``) rather than
            ``(B, C, ...)`` (conv feature maps).

    ``forward(reconstructions, targets)``: both ``(B, 3, H, W)`` in [-1, 1]; gradients flow to
    ``reconstructions`` only. Returns the batch mean, or ``(B,)`` with ``reduction="none"``.
    """

    def __init__(
        self,
        feature_extractor: Callable[[Tensor], Sequence[Tensor]],
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
        layer_weights: Sequence[Tensor] | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if not callable(feature_extractor):
            raise TypeError(
                f"PerceptualLoss: feature_extractor must be callable, got {type(feature_extractor).__name__}"
            )
        if (input_mean is None) != (input_std is None):
            raise ValueError("PerceptualLoss: give both input_mean and input_std, or neither")
        self.feature_extractor: nn.Module | None = None
        self._feature_function: Callable[[Tensor], Sequence[Tensor]] | None = None
        if isinstance(feature_extractor, nn.Module):
            feature_extractor.requires_grad_(False)
            self.feature_extractor = feature_extractor
        else:
            # Not registered as a submodule: a plain callable has no parameters to move or freeze.
            self._feature_function = feature_extractor
        self.channels_last = channels_last

        self.normalize_input = input_mean is not None
        if input_mean is not None and input_std is not None:
            if len(input_mean) != 3 or len(input_std) != 3 or min(input_std) <= 0:
                raise ValueError(
                    f"PerceptualLoss: input_mean={input_mean}, input_std={input_std}; expected 3 values each, std > 0"
                )
            self.register_buffer("input_mean", torch.tensor(input_mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("input_std", torch.tensor(input_std).view(1, 3, 1, 1), persistent=False)

        self.num_weighted_layers = 0 if layer_weights is None else len(layer_weights)
        for layer, weight in enumerate(layer_weights or ()):
            # Buffers, not parameters: the weights were learned once (LPIPS calibration) and stay fixed.
            self.register_buffer(f"layer_weight_{layer}", weight.detach().float().flatten().clone())
        self.train(False)

    @classmethod
    def from_vgg16(cls, weights_path: str, lpips_weights_path: str | None = None) -> PerceptualLoss:
        """LPIPS(VGG16) from local files only.

        Args:
            weights_path: a torchvision ``vgg16`` state dict (``features.*`` keys are used;
                ``classifier.*`` keys may be present and are ignored).
            lpips_weights_path: optional LPIPS v0.1 linear-layer weights (``vgg.pth``); without
                it the five layers are compared with uniform channel weights.
        """
        path = Path(weights_path)
        if not path.is_file():
            raise _missing_file_error(
                "VGG16 weights",
                path,
                "on a machine with internet run `torch.save(torchvision.models.vgg16(weights='IMAGENET1K_V1')"
                f".state_dict(), '{path}')` (or copy torch hub's cached vgg16-397923af.pth) and point weights_path at it.",
            )
        # Imported here so that `import tokenizer.losses` does not pay for torchvision.
        import torchvision

        # Built on the meta device: the random init of vgg16's 138M parameters takes seconds
        # and is overwritten anyway; to_empty() then gives the kept layers real storage.
        with torch.device("meta"):
            vgg = torchvision.models.vgg16(weights=None)
        vgg.features.to_empty(device="cpu")
        state = _load_state_dict(path)
        feature_state = {
            key.removeprefix("features."): value for key, value in state.items() if key.startswith("features.")
        }
        if not feature_state:
            raise ValueError(f"'{path}' has no 'features.*' keys; expected a torchvision vgg16 state dict")
        vgg.features.load_state_dict(feature_state, strict=True)
        # Drop the layers after relu5_3 (last max-pool) and the 120M-parameter classifier.
        extractor = _VGG16Features(nn.Sequential(*list(vgg.features)[: _VGG16_TAP_INDICES[-1] + 1]))

        layer_weights = None
        if lpips_weights_path is not None:
            lpips_path = Path(lpips_weights_path)
            if not lpips_path.is_file():
                raise _missing_file_error(
                    "LPIPS linear-layer weights",
                    lpips_path,
                    "copy lpips/weights/v0.1/vgg.pth from the LPIPS release (github.com/richzhang/PerceptualSimilarity) "
                    "there, or pass lpips_weights_path=None for uniform channel weights.",
                )
            layer_weights = _parse_layer_weights(_load_state_dict(lpips_path), lpips_path, len(_VGG16_TAP_INDICES))
            for layer, (weight, channels) in enumerate(zip(layer_weights, _VGG16_TAP_CHANNELS, strict=True)):
                if weight.numel() != channels:
                    raise ValueError(
                        f"'{lpips_path}': layer {layer} has {weight.numel()} weights; vgg16 tap has {channels} channels"
                    )
        return cls(extractor, input_mean=_IMAGENET_MEAN, input_std=_IMAGENET_STD, layer_weights=layer_weights)

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Always eval: the feature network is a fixed metric, never trained (dropout/BN stay off)."""
        return super().train(False)

    def _features(self, images: Tensor) -> list[Tensor]:
        if self.normalize_input:
            images = ((images + 1.0) * 0.5 - self.input_mean) / self.input_std
        extractor = self.feature_extractor if self.feature_extractor is not None else self._feature_function
        return list(extractor(images))

    def _layer_distance(self, layer: int, reconstruction: Tensor, target: Tensor) -> Tensor:
        """Per-image distance ``(B,)`` at one layer."""
        channel_dim = -1 if self.channels_last else 1
        # float32 and eps 1e-10 (as LPIPS): unit-normalising bf16 features is too coarse.
        reconstruction = reconstruction.float()
        target = target.float()
        reconstruction = reconstruction / (reconstruction.norm(dim=channel_dim, keepdim=True) + 1e-10)
        target = target / (target.norm(dim=channel_dim, keepdim=True) + 1e-10)
        squared = (reconstruction - target).square()
        if self.num_weighted_layers:
            weight = getattr(self, f"layer_weight_{layer}")
            channels = squared.shape[channel_dim]
            if weight.numel() != channels:
                raise ValueError(
                    f"PerceptualLoss: layer {layer} has {channels} channels but layer_weight_{layer} has {weight.numel()}"
                )
            shape = [1] * squared.ndim
            shape[channel_dim] = channels
            squared = squared * weight.view(shape)
        per_position = squared.sum(dim=channel_dim)
        return per_position.flatten(1).mean(dim=1) if per_position.ndim > 1 else per_position

    def forward(self, reconstructions: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        """``reconstructions, targets: (B, 3, H, W)`` in [-1, 1] -> scalar (``"mean"``) or ``(B,)`` (``"none"``)."""
        if reconstructions.shape != targets.shape or reconstructions.ndim != 4 or reconstructions.shape[1] != 3:
            raise ValueError(
                f"PerceptualLoss: reconstructions {tuple(reconstructions.shape)} and targets {tuple(targets.shape)} "
                "must both be (B, 3, H, W)"
            )
        if reduction not in ("mean", "none"):
            raise ValueError(f"PerceptualLoss: reduction={reduction!r}; expected 'mean' or 'none'")
        reconstruction_features = self._features(reconstructions)
        with torch.no_grad():
            target_features = self._features(targets)
        if len(reconstruction_features) != len(target_features) or not reconstruction_features:
            raise ValueError("PerceptualLoss: feature_extractor must return the same non-empty list for every input")
        if self.num_weighted_layers and self.num_weighted_layers != len(reconstruction_features):
            raise ValueError(
                f"PerceptualLoss: {self.num_weighted_layers} layer weights but the extractor returned "
                f"{len(reconstruction_features)} feature tensors"
            )
        distance = sum(
            self._layer_distance(layer, reconstruction, target)
            for layer, (reconstruction, target) in enumerate(zip(reconstruction_features, target_features, strict=True))
        )
        return distance.mean() if reduction == "mean" else distance


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def _check_image_pair(name: str, images_a: Tensor, images_b: Tensor) -> None:
    if images_a.shape != images_b.shape or images_a.ndim != 4:
        raise ValueError(
            f"{name}: images_a {tuple(images_a.shape)} and images_b {tuple(images_b.shape)} must both be (B, C, H, W)"
        )


def psnr(images_a: Tensor, images_b: Tensor, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio per image, in dB: ``10 log10(data_range**2 / MSE)``.

    Args:
        images_a, images_b: ``(B, C, H, W)``; for images in [-1, 1] the range is 2.

    Returns ``(B,)`` float32; ``+inf`` for identical images (the exact value, left to the
    caller to handle rather than hidden behind an arbitrary epsilon).
    """
    _check_image_pair("psnr", images_a, images_b)
    mse = (images_a.float() - images_b.float()).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    offsets = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    window = torch.exp(-(offsets**2) / (2 * sigma**2))
    return window / window.sum()


def ssim(images_a: Tensor, images_b: Tensor, data_range: float = 2.0) -> Tensor:
    """Structural similarity (Wang et al., 2004) per image.

    Gaussian window of 11 taps with sigma 1.5, K1 = 0.01, K2 = 0.03, population
    (co)variances, statistics over 'valid' window positions only (no padding), averaged over
    positions and channels: the settings of skimage's ``structural_similarity(...,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.

    Args:
        images_a, images_b: ``(B, C, H, W)`` with ``H, W >= 11``; for images in [-1, 1]
            ``data_range`` is 2.

    Returns ``(B,)`` in [-1, 1] (1 for identical images), float32 (float64 for float64 input).
    """
    _check_image_pair("ssim", images_a, images_b)
    window_size, sigma = 11, 1.5
    if min(images_a.shape[-2:]) < window_size:
        raise ValueError(f"ssim: images are {tuple(images_a.shape[-2:])}; need H, W >= {window_size} (the window)")
    dtype = torch.float64 if images_a.dtype == torch.float64 else torch.float32
    images_a = images_a.to(dtype)
    images_b = images_b.to(dtype)
    channels = images_a.shape[1]
    window_1d = _gaussian_window(window_size, sigma, dtype, images_a.device)
    # Separable Gaussian as two depthwise convs (one per channel).
    kernel_rows = window_1d.view(1, 1, window_size, 1).expand(channels, 1, window_size, 1)
    kernel_cols = window_1d.view(1, 1, 1, window_size).expand(channels, 1, 1, window_size)

    def local_mean(images: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(images, kernel_rows, groups=channels), kernel_cols, groups=channels)

    mean_a, mean_b = local_mean(images_a), local_mean(images_b)
    variance_a = local_mean(images_a * images_a) - mean_a.square()
    variance_b = local_mean(images_b * images_b) - mean_b.square()
    covariance = local_mean(images_a * images_b) - mean_a * mean_b
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    ssim_map = ((2 * mean_a * mean_b + c1) * (2 * covariance + c2)) / (
        (mean_a.square() + mean_b.square() + c1) * (variance_a + variance_b + c2)
    )
    return ssim_map.flatten(1).mean(dim=1)
