"""FID: the Fréchet distance against closed forms, the statistics, the pinned resize, the extractors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eval.fid import (
    FeatureExtractor,
    InceptionFeatures,
    SmallConvFeatures,
    activation_statistics,
    fid,
    frechet_distance,
    resize_for_features,
    rfid,
)
from tokenizer.images import uint8_image_to_tensor
from training.data.shapes import ShapesWorld, ShapesWorldConfig

NUM_SHAPES_IMAGES = 128


@pytest.fixture(scope="module")
def shapes_images() -> torch.Tensor:
    """(128, 3, 64, 64) Shapes test images in [-1, 1]."""
    world = ShapesWorld(ShapesWorldConfig())
    return torch.stack([uint8_image_to_tensor(world.sample("test", index).image) for index in range(NUM_SHAPES_IMAGES)])


def random_covariance(rng: np.random.Generator, dim: int, samples: int) -> np.ndarray:
    features = rng.normal(size=(samples, dim)) @ rng.normal(size=(dim, dim))
    return np.cov(features, rowvar=False)


# ---------------------------------------------------------------------- frechet_distance


@pytest.mark.parametrize("samples", [200, 20], ids=["full-rank", "rank-deficient"])
def test_frechet_distance_of_identical_statistics_is_zero(samples: int) -> None:
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=32), random_covariance(rng, 32, samples)
    assert np.trace(sigma) > 10.0  # a non-trivial scale, so 1e-6 is a tight bound
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_matches_closed_form_for_diagonal_covariances() -> None:
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    var1, var2 = rng.uniform(0.1, 3.0, size=16), rng.uniform(0.1, 3.0, size=16)
    var2[:3] = 0.0  # degenerate directions are allowed
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2.0 * np.sqrt(var1 * var2))
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_closed_forms_for_full_covariances() -> None:
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=24), rng.normal(size=24)
    sigma1, sigma2 = random_covariance(rng, 24, 100), random_covariance(rng, 24, 100)
    # Scaled covariances: tr((S (c^2 S))^(1/2)) = c tr(S), so d = |mu1 - mu2|^2 + (1 - c)^2 tr(S).
    scale = 1.7
    expected = np.sum((mu1 - mu2) ** 2) + (1.0 - scale) ** 2 * np.trace(sigma1)
    assert frechet_distance(mu1, sigma1, mu2, scale**2 * sigma1) == pytest.approx(expected, rel=1e-9)
    # General covariances, against the eigenvalues of the non-symmetric product S1 S2 (another route).
    trace_sqrt = np.sum(np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).real))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_symmetric_and_rotation_invariant() -> None:
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=20), rng.normal(size=20)
    sigma1, sigma2 = random_covariance(rng, 20, 15), random_covariance(rng, 20, 60)
    forward = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert forward > 1.0
    assert frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(forward, rel=1e-9)
    rotation, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    rotated = frechet_distance(
        rotation @ mu1, rotation @ sigma1 @ rotation.T, rotation @ mu2, rotation @ sigma2 @ rotation.T
    )
    assert rotated == pytest.approx(forward, rel=1e-9)


def test_frechet_distance_rejects_bad_statistics() -> None:
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="covariances must be"):
        frechet_distance(mu, sigma, mu, np.eye(3))
    with pytest.raises(ValueError, match="means must be"):
        frechet_distance(mu, sigma, np.zeros(3), sigma)
    with pytest.raises(ValueError, match="sigma2 is not positive semi-definite"):
        frechet_distance(mu, sigma, mu, np.diag([1.0, 1.0, 1.0, -0.5]))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu, sigma, np.full(4, np.nan), sigma)


# ---------------------------------------------------------------------- the pinned resize


def test_resize_is_pinned_to_antialiased_bilinear() -> None:
    images = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2  # overshoots [-1, 1]
    clamped = images.clamp(-1.0, 1.0)
    for size in (29, 299):  # down- and upsampling
        expected = F.interpolate(clamped, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        assert torch.equal(resize_for_features(images, size), expected.clamp(-1.0, 1.0))
    # The settings matter: when downsampling, plain bilinear or align_corners=True give other pixels.
    for other in ({"antialias": False, "align_corners": False}, {"antialias": True, "align_corners": True}):
        unpinned = F.interpolate(clamped, size=(29, 29), mode="bilinear", **other)
        assert (resize_for_features(images, 29) - unpinned).abs().max() > 1e-2
    # At the target size the resize is the identity on clamped images.
    square = images[:, :, :48, :]
    assert torch.equal(resize_for_features(square, 48), square.clamp(-1.0, 1.0))
    assert torch.allclose(
        F.interpolate(square.clamp(-1, 1), size=(48, 48), mode="bilinear", antialias=True), square.clamp(-1, 1)
    )
    with pytest.raises(TypeError, match="uint8"):
        resize_for_features(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 4)


# ---------------------------------------------------------------------- statistics and FID


def test_small_conv_features_are_fixed_by_the_seed(shapes_images: torch.Tensor) -> None:
    batch = shapes_images[:4]
    torch.manual_seed(123)
    first = SmallConvFeatures(seed=0)
    torch.manual_seed(456)  # the global RNG does not enter the weights
    assert isinstance(first, FeatureExtractor)
    assert torch.equal(first(batch), SmallConvFeatures(seed=0)(batch))
    assert not torch.allclose(first(batch), SmallConvFeatures(seed=1)(batch))
    assert first(batch).shape == (4, first.feature_dim)


def test_activation_statistics_equal_numpy_for_any_batching(shapes_images: torch.Tensor) -> None:
    extractor = SmallConvFeatures(seed=0)
    images = shapes_images[:40]
    small = F.interpolate(images[30:], size=(32, 32), mode="bilinear", antialias=True)  # a different input size
    features = torch.cat([extractor(images[:30]), extractor(small)]).double().numpy()
    expected_mu, expected_sigma = features.mean(axis=0), np.cov(features, rowvar=False)

    mixed = torch.cat([images[:30], resize_for_features(small, 64)])
    streams = {
        "tensor, batch 7": (mixed, 7),
        "tensor, one batch": (mixed, 64),
        "single images and batches of two sizes": ([*images[:5], images[5:30], *small[:4], small[4:]], 8),
    }
    for label, (stream, batch_size) in streams.items():
        mu, sigma = activation_statistics(extractor, stream, batch_size=batch_size, progress=False)
        assert mu.dtype == sigma.dtype == np.float64, label
        np.testing.assert_allclose(mu, expected_mu, rtol=1e-6, atol=1e-9, err_msg=label)
        np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-6, atol=1e-9, err_msg=label)
    with pytest.raises(ValueError, match="at least 2 images"):
        activation_statistics(extractor, images[:1], progress=False)


def test_fid_is_zero_against_itself_and_grows_with_noise(shapes_images: torch.Tensor) -> None:
    extractor = SmallConvFeatures(seed=0)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(shapes_images.shape, generator=generator)
    assert fid(extractor, shapes_images, shapes_images, batch_size=32, progress=False) == pytest.approx(0.0, abs=1e-6)
    scores = [
        fid(extractor, shapes_images, shapes_images + level * noise, batch_size=32, progress=False)
        for level in (0.05, 0.15, 0.4)
    ]
    assert scores[0] > 1e-3, scores
    assert scores[0] < scores[1] < scores[2], scores


def test_rfid_pairs_originals_with_reconstructions(shapes_images: torch.Tensor) -> None:
    extractor = SmallConvFeatures(seed=0)
    originals = shapes_images[:64]
    # An overshooting decoder output scores as its clamped version.
    reconstructions = originals * 1.3 + 0.05
    score = rfid(extractor, originals, reconstructions, batch_size=32, progress=False)
    assert score > 1e-3
    clamped = fid(extractor, originals, reconstructions.clamp(-1, 1), batch_size=32, progress=False)
    assert score == pytest.approx(clamped, rel=1e-12)
    with pytest.raises(ValueError, match="63 reconstructions"):
        rfid(extractor, originals, reconstructions[:63], progress=False)


# ---------------------------------------------------------------------- Inception


def test_inception_features_name_a_missing_weight_file(tmp_path) -> None:
    missing = tmp_path / "pt_inception-2015-12-05.pth"
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05.pth"):
        InceptionFeatures(missing)


def test_inception_features_name_the_file_and_keys_when_they_do_not_match(tmp_path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 512)}, path)
    with pytest.raises(
        ValueError, match=r"resnet\.pth is not a torchvision inception_v3 state dict.*missing.*Conv2d_1a"
    ):
        InceptionFeatures(path)
    not_a_state_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], not_a_state_dict)
    with pytest.raises(ValueError, match="list.pth does not hold a state dict"):
        InceptionFeatures(not_a_state_dict)


def test_inception_features_from_a_torchvision_state_dict(tmp_path, shapes_images: torch.Tensor) -> None:
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    reference = inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path / "inception_v3_random.pth"
    torch.save(reference.state_dict(), path)

    extractor = InceptionFeatures(path)
    assert extractor.layout == "torchvision" and extractor.input_size == 299
    assert extractor.model.transform_input is False  # normalised once, by normalise()
    images = shapes_images[:2]
    features = extractor(images)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()

    # pool3 of the same network on the ImageNet-normalised 299 x 299 input, computed by hand.
    reference.fc = torch.nn.Identity()
    upsampled = F.interpolate(images, size=(299, 299), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = reference.eval()(((upsampled + 1) / 2 - mean) / std)
    # torchvision's default init leaves pool3 activations ~1e-6, so the tolerance follows their scale.
    scale = expected.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4 * scale)


def test_inception_features_from_a_pt_inception_layout(tmp_path) -> None:
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    path = tmp_path / "pt_inception_random.pth"
    state_dict = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008).state_dict()
    # Files saved by old torch versions lack the BatchNorm step counters.
    torch.save({key: value for key, value in state_dict.items() if not key.endswith("num_batches_tracked")}, path)
    extractor = InceptionFeatures(path)
    assert extractor.layout == "pt_inception" and "pt_inception" in extractor.name

    # pytorch-fid's blocks: 3x3 average pools that exclude the padding, and a max pool in Mixed_7c.
    model = extractor.model
    generator = torch.Generator().manual_seed(1)
    cases = [
        (model.Mixed_5b, torch.randn(1, 192, 9, 9, generator=generator), 32, "avg"),
        (model.Mixed_6e, torch.randn(1, 768, 5, 5, generator=generator), 192, "avg"),
        (model.Mixed_7b, torch.randn(1, 1280, 4, 4, generator=generator), 192, "avg"),
        (model.Mixed_7c, torch.randn(1, 2048, 4, 4, generator=generator), 192, "max"),
    ]
    for block, inputs, pool_channels, kind in cases:
        if kind == "avg":
            pooled = F.avg_pool2d(inputs, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        else:
            pooled = F.max_pool2d(inputs, kernel_size=3, stride=1, padding=1)
        # The conv and bn children are called directly, bypassing the hook on branch_pool.
        expected = F.relu(block.branch_pool.bn(block.branch_pool.conv(pooled)))
        torchvision_pool = F.relu(block.branch_pool.bn(block.branch_pool.conv(F.avg_pool2d(inputs, 3, 1, 1))))
        with torch.inference_mode():
            branch = block(inputs)[:, -pool_channels:]
        torch.testing.assert_close(branch, expected, rtol=1e-5, atol=1e-5)
        assert (branch - torchvision_pool).abs().max() > 1e-3  # the patch changes something

    features = extractor(torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
