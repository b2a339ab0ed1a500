"""Pixel decoder, PatchGAN discriminator, tokenizer losses and image metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokenizer.config import DecoderConfig, DiscriminatorConfig
from tokenizer.decoder import PixelDecoder, group_norm
from tokenizer.discriminator import PatchDiscriminator
from tokenizer.losses import (
    PerceptualLoss,
    adaptive_generator_weight,
    feature_distillation_loss,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    psnr,
    ssim,
)

# --------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "in_channels", "latent_hw", "expected_hw"),
    [
        # The tiny default: 8x8 tokens of width 128 -> 64x64 images.
        (DecoderConfig(), 128, (8, 8), (64, 64)),
        # Non-square grid, two res blocks per level, no attention.
        (
            DecoderConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=2, mid_attention=False),
            16,
            (5, 7),
            (10, 14),
        ),
        # Paper-style resize of a 27x27 grid to 24x24 before two x2 upsamplings.
        (DecoderConfig(base_channels=8, channel_mult=(1, 1, 2), latent_size=24), 12, (27, 27), (96, 96)),
        # A single level: no upsampling at all; one output channel.
        (DecoderConfig(base_channels=12, channel_mult=(2,), out_channels=1), 4, (6, 6), (6, 6)),
    ],
)
def test_decoder_output_shape(config: DecoderConfig, in_channels: int, latent_hw: tuple[int, int], expected_hw) -> None:
    decoder = PixelDecoder(config, in_channels=in_channels)
    images = decoder(torch.randn(2, in_channels, *latent_hw))
    assert images.shape == (2, config.out_channels, *expected_hw)
    assert torch.isfinite(images).all()


def test_decoder_resizes_latents_bilinearly_to_latent_size() -> None:
    torch.manual_seed(0)
    # 13 -> 12 rather than the paper's 27 -> 24 (covered by the shape test) to stay fast on CPU.
    decoder = PixelDecoder(DecoderConfig(base_channels=8, channel_mult=(1, 2), latent_size=12), in_channels=8)
    latents = torch.randn(1, 8, 13, 13)
    resized = F.interpolate(latents, size=(12, 12), mode="bilinear", align_corners=False)
    with torch.no_grad():
        decoded = decoder(latents)
        assert decoded.shape == (1, 3, 24, 24)
        torch.testing.assert_close(decoded, decoder(resized))
        # Nearest-neighbour resizing would give a different image.
        nearest = F.interpolate(latents, size=(12, 12), mode="nearest")
        assert not torch.allclose(decoded, decoder(nearest))


def test_decoder_gradients_reach_input_and_every_parameter() -> None:
    torch.manual_seed(0)
    decoder = PixelDecoder(DecoderConfig(base_channels=8, channel_mult=(1, 2)), in_channels=16)
    latents = torch.randn(2, 16, 4, 4, requires_grad=True)
    decoder(latents).square().mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert torch.isfinite(latents.grad).all()
    without_grad = [name for name, parameter in decoder.named_parameters() if parameter.grad is None]
    assert without_grad == []


def test_decoder_last_layer_and_attention() -> None:
    decoder = PixelDecoder(DecoderConfig(base_channels=8, channel_mult=(1, 2)), in_channels=16)
    assert decoder.last_layer_weight is decoder.conv_out.weight
    assert decoder.last_layer_weight.shape == (3, 8, 3, 3)
    assert isinstance(decoder.mid_attention, nn.Module) and not isinstance(decoder.mid_attention, nn.Identity)
    no_attention = PixelDecoder(DecoderConfig(base_channels=8, channel_mult=(1, 2), mid_attention=False), 16)
    assert isinstance(no_attention.mid_attention, nn.Identity)


def test_decoder_rejects_wrong_channel_count() -> None:
    decoder = PixelDecoder(DecoderConfig(base_channels=8, channel_mult=(1, 2)), in_channels=16)
    with pytest.raises(ValueError, match=r"expected \(B, 16, h, w\)"):
        decoder(torch.randn(1, 15, 4, 4))
    with pytest.raises(ValueError, match="latents"):
        decoder(torch.randn(16, 4, 4))


@pytest.mark.parametrize(("channels", "groups"), [(64, 32), (128, 32), (24, 24), (48, 24), (36, 18), (7, 7)])
def test_group_norm_picks_largest_divisor_up_to_32(channels: int, groups: int) -> None:
    assert group_norm(channels).num_groups == groups


# --------------------------------------------------------------------------------------
# Discriminator
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_layers", "size", "logits_size"),
    [(3, 64, 6), (2, 32, 6), (1, 16, 6), (3, 24, 1)],
)
def test_discriminator_logit_grid_shape(num_layers: int, size: int, logits_size: int) -> None:
    discriminator = PatchDiscriminator(DiscriminatorConfig(base_channels=8, num_layers=num_layers))
    logits = discriminator(torch.rand(2, 3, size, size) * 2 - 1)
    assert logits.shape == (2, 1, logits_size, logits_size)


def test_discriminator_structure_and_init() -> None:
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(DiscriminatorConfig(base_channels=4, num_layers=5))
    convs = [module for module in discriminator.modules() if isinstance(module, nn.Conv2d)]
    # first conv, 4 stride-2 stages, the stride-1 stage, the logit conv
    assert [conv.stride[0] for conv in convs] == [2, 2, 2, 2, 2, 1, 1]
    # widths double and stop at 8x base
    assert [conv.out_channels for conv in convs] == [4, 8, 16, 32, 32, 32, 1]
    assert not any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in discriminator.modules())
    assert sum(isinstance(module, nn.GroupNorm) for module in discriminator.modules()) == 5
    weights = torch.cat([conv.weight.flatten() for conv in convs])
    assert abs(weights.std().item() - 0.02) < 0.002 and abs(weights.mean().item()) < 0.002


def test_discriminator_rejects_bad_images() -> None:
    discriminator = PatchDiscriminator(DiscriminatorConfig(base_channels=4, num_layers=3))
    with pytest.raises(ValueError, match="H, W >= 24"):
        discriminator(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        discriminator(torch.zeros(1, 1, 64, 64))


# --------------------------------------------------------------------------------------
# Adversarial losses
# --------------------------------------------------------------------------------------


def test_hinge_losses_on_hand_made_logits() -> None:
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 0.5, 3.0])
    # relu(1 - real) = [0, 0.5, 2]; relu(1 + fake) = [0, 1, 1.5, 4]
    expected = 0.5 * ((0.0 + 0.5 + 2.0) / 3 + (0.0 + 1.0 + 1.5 + 4.0) / 4)
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(expected)
    # a perfectly confident discriminator pays nothing
    assert hinge_discriminator_loss(torch.full((2, 1, 3, 3), 5.0), torch.full((2, 1, 3, 3), -5.0)).item() == 0.0
    assert hinge_discriminator_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(1.0)
    assert generator_adversarial_loss(fake).item() == pytest.approx(-(-2.0 + 0.0 + 0.5 + 3.0) / 4)


def _linear_decoder_losses(weight: nn.Parameter, inputs: torch.Tensor, targets: torch.Tensor, gan_scale: float):
    outputs = weight @ inputs
    reconstruction = (outputs - targets).square().sum()
    generator = -gan_scale * outputs.sum()
    return outputs, reconstruction, generator


@pytest.mark.parametrize("gan_scale", [1.0, 1e3, 1e-3])
def test_adaptive_weight_is_clamped_gradient_norm_ratio(gan_scale: float) -> None:
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(4, 3))
    inputs, targets = torch.randn(3), torch.randn(4)
    outputs, reconstruction, generator = _linear_decoder_losses(weight, inputs, targets, gan_scale)

    # By hand: d rec/dW = 2 (Wx - t) x^T and d gan/dW = -s 1 x^T, so the Frobenius norms are
    # 2 ||Wx - t|| ||x|| and s sqrt(4) ||x||.
    with torch.no_grad():
        reconstruction_norm = 2 * (outputs - targets).norm() * inputs.norm()
        generator_norm = gan_scale * math.sqrt(4) * inputs.norm()
        expected = (reconstruction_norm / (generator_norm + 1e-4)).item()
    adaptive = adaptive_generator_weight(reconstruction, generator, weight, min_weight=0.3, max_weight=10.0)
    assert not adaptive.requires_grad
    assert adaptive.item() == pytest.approx(min(max(expected, 0.3), 10.0), rel=1e-5)
    if gan_scale == 1.0:
        assert 0.3 < expected < 10.0  # the unclamped case is really exercised
    else:
        assert adaptive.item() in (pytest.approx(0.3), pytest.approx(10.0))

    # The graph survives: backward on the total loss afterwards works and accumulates only the total's gradient.
    assert weight.grad is None
    (reconstruction + adaptive * generator).backward()
    expected_grad = 2 * torch.outer(outputs.detach() - targets, inputs) - adaptive * gan_scale * torch.outer(
        torch.ones(4), inputs
    )
    torch.testing.assert_close(weight.grad, expected_grad)


def test_adaptive_weight_needs_a_graph() -> None:
    weight = nn.Parameter(torch.randn(2, 2))
    with torch.no_grad():
        _, reconstruction, generator = _linear_decoder_losses(weight, torch.randn(2), torch.randn(2), 1.0)
    with pytest.raises(ValueError, match="reconstruction_loss has no autograd graph"):
        adaptive_generator_weight(reconstruction, generator, weight)


# --------------------------------------------------------------------------------------
# Distillation
# --------------------------------------------------------------------------------------


def test_distillation_loss_values_and_teacher_gets_no_gradient() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 16, requires_grad=True)
    student = teacher.detach().clone().requires_grad_(True)
    identical = feature_distillation_loss(student, teacher)
    assert identical.item() == pytest.approx(-1.0, abs=1e-6)  # MSE 0 - cosine 1

    different = feature_distillation_loss(student + torch.randn_like(student), teacher)
    assert different.item() > identical.item() + 0.1
    different.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0

    # By hand: orthogonal unit vectors have MSE (1 + 1) / 2 = 1 and cosine 0.
    orthogonal = feature_distillation_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert orthogonal.item() == pytest.approx(1.0)
    # Same direction, twice the length: MSE (1 + 1) / 2 = 1, cosine 1.
    scaled = feature_distillation_loss(torch.tensor([[2.0, 2.0]]), torch.tensor([[1.0, 1.0]]))
    assert scaled.item() == pytest.approx(0.0, abs=1e-6)

    with pytest.raises(ValueError, match="same shape"):
        feature_distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4))


# --------------------------------------------------------------------------------------
# Perceptual loss
# --------------------------------------------------------------------------------------


class _TinyFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.5))
        self.block2 = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        first = self.block1(images)
        return [first, self.block2(first)]


def test_perceptual_loss_with_tiny_extractor() -> None:
    torch.manual_seed(0)
    loss = PerceptualLoss(_TinyFeatures())
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert loss(images, images).item() == 0.0
    reconstructions = (images + 0.3 * torch.randn_like(images)).requires_grad_(True)
    distance = loss(reconstructions, images)
    assert distance.item() > 0
    distance.backward()
    assert reconstructions.grad is not None and reconstructions.grad.abs().sum() > 0

    # Frozen and always in eval mode (the dropout above would make it random otherwise).
    assert sum(parameter.requires_grad for parameter in loss.parameters()) == 0
    assert all(parameter.grad is None for parameter in loss.parameters())
    loss.train()
    assert not loss.training and not loss.feature_extractor.training
    torch.testing.assert_close(loss(reconstructions, images), distance)

    per_image = loss(reconstructions, images, reduction="none")
    assert per_image.shape == (2,)
    torch.testing.assert_close(per_image.mean(), distance)


def test_perceptual_loss_formula_by_hand() -> None:
    # Identity "network", no input mapping: the features are the pixels themselves.
    identity = PerceptualLoss(lambda images: [images])
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0
    green = torch.zeros(1, 3, 4, 4)
    green[:, 1] = 0.5  # the length does not matter after unit normalisation
    # unit vectors (1,0,0) and (0,1,0): squared difference summed over channels = 2 at every position
    assert identity(red, green).item() == pytest.approx(2.0)
    weighted = PerceptualLoss(lambda images: [images, images], layer_weights=[torch.tensor([1.0, 2.0, 3.0])] * 2)
    assert weighted(red, green).item() == pytest.approx(2 * (1.0 * 1 + 2.0 * 1 + 3.0 * 0))

    # ViT-style tokens (B, N, C) with channels_last.
    tokens = PerceptualLoss(lambda images: [images.flatten(2).transpose(1, 2)], channels_last=True)
    assert tokens(red, green).item() == pytest.approx(2.0)

    # Input mapping: ((x + 1) / 2 - mean) / std before the network.
    seen = []
    mapped = PerceptualLoss(
        lambda images: seen.append(images) or [images], input_mean=(0.5,) * 3, input_std=(0.25,) * 3
    )
    mapped(torch.ones(1, 3, 4, 4), torch.ones(1, 3, 4, 4))
    torch.testing.assert_close(seen[0], torch.full((1, 3, 4, 4), 2.0))


def test_perceptual_loss_rejects_mismatched_inputs() -> None:
    loss = PerceptualLoss(lambda images: [images], layer_weights=[torch.ones(4)])
    with pytest.raises(ValueError, match="must both be"):
        loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match="layer 0 has 3 channels but layer_weight_0 has 4"):
        loss(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_from_vgg16_missing_files_name_the_path(tmp_path) -> None:
    missing = tmp_path / "nowhere" / "vgg16.pth"
    with pytest.raises(FileNotFoundError, match="never downloads") as error:
        PerceptualLoss.from_vgg16(str(missing))
    assert str(missing) in str(error.value)


def _random_vgg16_features_state(torchvision) -> dict[str, torch.Tensor]:
    """A randomly initialised vgg16's conv weights, skipping the slow init of its 120M-parameter classifier."""
    with torch.device("meta"):
        vgg = torchvision.models.vgg16(weights=None)
    vgg.features.to_empty(device="cpu")
    for module in vgg.features:
        if isinstance(module, nn.Conv2d):
            module.reset_parameters()
    return {f"features.{key}": value for key, value in vgg.features.state_dict().items()}


def test_from_vgg16_loads_a_local_state_dict(tmp_path) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    state = _random_vgg16_features_state(torchvision)
    weights_path = tmp_path / "vgg16_features.pth"
    torch.save(state, weights_path)

    loss = PerceptualLoss.from_vgg16(str(weights_path))
    torch.testing.assert_close(loss.feature_extractor.features[28].weight, state["features.28.weight"])
    assert len(loss.feature_extractor.features) == 30  # cut after relu5_3
    assert sum(parameter.requires_grad for parameter in loss.parameters()) == 0
    # 16 x 16 is the smallest size with a 1 x 1 map at relu5_3 (four max-pools before it). Pair 0 is
    # identical, pair 1 differs; no_grad and one call per check because vgg is slow on 2 busy cores.
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    other = torch.cat([images[:1], torch.rand(1, 3, 16, 16) * 2 - 1])
    with torch.no_grad():
        uniform = loss(other, images, reduction="none")
    assert uniform[0].item() == 0.0 and uniform[1].item() > 0

    # LPIPS release layout: lin<k>.model.1.weight of shape (1, C, 1, 1); all-2 weights double the distance.
    channels = (64, 128, 256, 512, 512)
    lpips_path = tmp_path / "vgg_lin.pth"
    torch.save({f"lin{k}.model.1.weight": torch.full((1, c, 1, 1), 2.0) for k, c in enumerate(channels)}, lpips_path)
    weighted = PerceptualLoss.from_vgg16(str(weights_path), lpips_weights_path=str(lpips_path))
    with torch.no_grad():
        torch.testing.assert_close(weighted(other, images, reduction="none"), 2 * uniform)

    missing_lpips = tmp_path / "missing_lin.pth"
    with pytest.raises(FileNotFoundError, match="missing_lin.pth"):
        PerceptualLoss.from_vgg16(str(weights_path), lpips_weights_path=str(missing_lpips))
    bad_path = tmp_path / "not_vgg.pth"
    torch.save({"classifier.0.weight": torch.zeros(1)}, bad_path)
    with pytest.raises(ValueError, match="no 'features"):
        PerceptualLoss.from_vgg16(str(bad_path))


@pytest.mark.slow
def test_from_vgg16_loads_a_full_torchvision_state_dict(tmp_path) -> None:
    """The whole 528 MB state dict of torchvision's vgg16 (classifier keys included) loads."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)
    weights_path = tmp_path / "vgg16.pth"
    torch.save(vgg.state_dict(), weights_path)
    loss = PerceptualLoss.from_vgg16(str(weights_path))
    torch.testing.assert_close(loss.feature_extractor.features[0].weight, vgg.features[0].weight)
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    assert loss(images, images).item() == 0.0
    assert loss(images, -images).item() > 0


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def test_psnr_of_known_mse() -> None:
    images = torch.zeros(2, 3, 8, 8)
    noisy = images.clone()
    noisy[0] += 0.1  # MSE 0.01
    noisy[1, :, :4] += 0.2  # MSE 0.04 * 0.5 = 0.02
    values = psnr(noisy, images)
    assert values.shape == (2,)
    assert values[0].item() == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-5)
    assert values[1].item() == pytest.approx(10 * math.log10(4 / 0.02), rel=1e-5)
    assert psnr(images + 0.1, images, data_range=1.0).mean().item() == pytest.approx(20.0, rel=1e-5)
    assert torch.isinf(psnr(images, images)).all()


def test_ssim_hand_cases() -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(ssim(images, images), torch.ones(2))
    # Constant images: variances and covariance vanish, SSIM = (2 a b + C1) / (a^2 + b^2 + C1).
    c1 = (0.01 * 2.0) ** 2
    a, b = 0.5, -0.25
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    value = ssim(torch.full((1, 1, 12, 12), a), torch.full((1, 1, 12, 12), b))
    assert value.item() == pytest.approx(expected, rel=1e-5)
    noisy = images + 0.2 * torch.randn_like(images)
    assert (ssim(noisy, images) < 0.99).all()
    torch.testing.assert_close(ssim(noisy, images), ssim(images, noisy))
    with pytest.raises(ValueError, match="need H, W >= 11"):
        ssim(torch.zeros(1, 3, 10, 16), torch.zeros(1, 3, 10, 16))


def _ssim_reference(images_a: np.ndarray, images_b: np.ndarray, data_range: float) -> np.ndarray:
    """Window-by-window SSIM with centred (co)variances: an independent, slow implementation."""
    offsets = np.arange(11) - 5
    gaussian = np.exp(-(offsets**2) / (2 * 1.5**2))
    window = np.outer(gaussian, gaussian)
    window /= window.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    batch, channels, height, width = images_a.shape
    result = np.zeros(batch)
    for n in range(batch):
        values = []
        for c in range(channels):
            for i in range(height - 10):
                for j in range(width - 10):
                    patch_a = images_a[n, c, i : i + 11, j : j + 11]
                    patch_b = images_b[n, c, i : i + 11, j : j + 11]
                    mean_a, mean_b = (window * patch_a).sum(), (window * patch_b).sum()
                    var_a = (window * (patch_a - mean_a) ** 2).sum()
                    var_b = (window * (patch_b - mean_b) ** 2).sum()
                    cov = (window * (patch_a - mean_a) * (patch_b - mean_b)).sum()
                    values.append(
                        (2 * mean_a * mean_b + c1)
                        * (2 * cov + c2)
                        / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2))
                    )
        result[n] = np.mean(values)
    return result


def test_ssim_matches_window_by_window_reference() -> None:
    generator = np.random.default_rng(0)
    images_a = generator.uniform(-1, 1, size=(2, 3, 14, 15))
    images_b = np.clip(images_a + generator.normal(0, 0.3, size=images_a.shape), -1, 1)
    expected = _ssim_reference(images_a, images_b, data_range=2.0)
    actual = ssim(torch.from_numpy(images_a), torch.from_numpy(images_b)).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-12)
    # float32 input gives float32 output within float32 precision.
    actual32 = ssim(torch.from_numpy(images_a).float(), torch.from_numpy(images_b).float())
    assert actual32.dtype == torch.float32
    np.testing.assert_allclose(actual32.numpy(), expected, atol=1e-5)


def test_ssim_matches_skimage() -> None:
    metrics = pytest.importorskip("skimage.metrics")
    generator = np.random.default_rng(1)
    images_a = generator.uniform(-1, 1, size=(2, 3, 24, 20))
    images_b = np.clip(images_a + generator.normal(0, 0.2, size=images_a.shape), -1, 1)
    expected = [
        metrics.structural_similarity(
            images_a[n],
            images_b[n],
            channel_axis=0,
            data_range=2.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        for n in range(2)
    ]
    actual = ssim(torch.from_numpy(images_a), torch.from_numpy(images_b)).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-6)
