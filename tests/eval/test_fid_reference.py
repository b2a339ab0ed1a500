"""FID against torch-fidelity: the same statistics and distance, and the same network on random weights.

torch-fidelity (a dev dependency) computes FID with the standard TF-FID Inception. Its weights
cannot be downloaded here, so both implementations load one random-weight state dict in that
network's layout; the features then agree only if the patched torchvision graph
(``InceptionFeatures`` with the ``pt_inception`` layout) is the same network.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eval.fid import InceptionFeatures, SmallConvFeatures, activation_statistics, frechet_distance

torch_fidelity = pytest.importorskip("torch_fidelity")


def test_statistics_and_distance_match_torch_fidelity() -> None:
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    generator = torch.Generator().manual_seed(0)
    real = torch.rand(40, 3, 32, 32, generator=generator) * 2 - 1
    fake = (real + 0.3 * torch.randn(40, 3, 32, 32, generator=generator)).clamp(-1, 1)
    extractor = SmallConvFeatures(seed=0, input_size=32, width=8)
    ours_real = activation_statistics(extractor, real, batch_size=16, progress=False)
    ours_fake = activation_statistics(extractor, fake, batch_size=16, progress=False)
    theirs_real = fid_features_to_statistics(extractor(real).double())
    theirs_fake = fid_features_to_statistics(extractor(fake).double())
    np.testing.assert_allclose(ours_real.mu, theirs_real["mu"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ours_real.sigma, theirs_real["sigma"], rtol=1e-5, atol=1e-9)
    ours = frechet_distance(ours_real.mu, ours_real.sigma, ours_fake.mu, ours_fake.sigma)
    theirs = fid_statistics_to_metric(theirs_real, theirs_fake, False)["frechet_inception_distance"]
    assert ours > 0.01
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_pt_inception_features_match_torch_fidelity_on_random_weights(tmp_path) -> None:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    network = inception_v3(weights=None, aux_logits=False, init_weights=True, num_classes=1008)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial running statistics
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    state_dict = {k: v for k, v in network.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "pt_inception_random.pth"
    torch.save(state_dict, path)

    ours = InceptionFeatures(path)
    assert ours.layout == "pt_inception" and ours.model.transform_input is False
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    theirs.eval()

    images = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    # The TF graph's input step is (x - 128) / 128; at 299 x 299 neither side resizes.
    with torch.inference_mode():
        expected = theirs(images)[0]
    features = ours((images.float() - 128) / 128)
    scale = expected.abs().max().item()
    assert scale > 1e-3
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4 * scale)
