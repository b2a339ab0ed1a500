"""Fréchet distance between image sets (FID, rFID) with a pluggable feature extractor.

FID (Heusel et al. 2017, https://arxiv.org/abs/1706.08500) fits a Gaussian to the features of
each image set and reports the Fréchet distance between the two Gaussians::

    d^2 = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2))

rFID (the tokenizer metric of VQGAN / LlamaGen) is the same distance between a set of images and
its reconstructions.

The number depends on every step before the distance, so each step is fixed here:

* **Extractor.** Anything that follows :class:`FeatureExtractor`. :class:`InceptionFeatures` is
  Inception-v3 pool3 from a local weight file; :class:`SmallConvFeatures` is a tiny fixed-seed
  random network for tests and for CPU runs without weights. Numbers are comparable only between
  runs that used the same extractor (same ``name``): record it next to every score.
* **Resize.** Every image goes through :func:`resize_for_features` (bilinear, antialiased,
  ``align_corners=False``, after clamping to [-1, 1]) and through nothing else.
* **Statistics.** :func:`activation_statistics` accumulates the mean and the unbiased covariance
  (``ddof=1``, as ``np.cov``) in float64.
* **Distance.** :func:`frechet_distance` needs no scipy: the trace of the square root of
  ``S_1 S_2`` comes from the eigenvalues of the symmetric PSD matrix ``S_1^(1/2) S_2 S_1^(1/2)``
  (same spectrum), with rounding-level eigenvalues set to zero.

Inputs everywhere are float images ``(N, 3, H, W)`` in [-1, 1], the models' range. Decoder outputs
that overshoot are clamped, as saving them to PNG would; they are not quantised to uint8 levels
(do that first if the score must match one computed from saved files).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Literal, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_INPUT_SIZE = 299
INCEPTION_FEATURE_DIM = 2048
# The TF FID Inception (pt_inception-2015-12-05) classifies into 1008 classes, torchvision's into 1000:
# its fc shape tells the two weight layouts apart.
PT_INCEPTION_NUM_CLASSES = 1008
# Covariance eigenvalues below -rtol * (largest |eigenvalue|) mean the matrix is not a covariance;
# above that they are rounding error and are clipped to zero.
NEGATIVE_EIGENVALUE_RTOL = 1e-6

InceptionLayout = Literal["torchvision", "pt_inception"]


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps images to one feature vector each.

    ``name`` identifies the extractor (and its weights) in reports; ``input_size`` is the square
    side images are resized to (through :func:`resize_for_features`) before the network sees them.
    """

    name: str
    input_size: int

    def __call__(self, images: Tensor) -> Tensor:
        """``images``: (N, 3, H, W) float in [-1, 1] -> (N, D) float features."""
        ...


class ActivationStatistics(NamedTuple):
    """Gaussian fit of a feature set: ``mu`` (D,) and ``sigma`` (D, D), both float64."""

    mu: np.ndarray
    sigma: np.ndarray


def resize_for_features(images: Tensor, size: int) -> Tensor:
    """The one resize every FID input goes through.

    ``images``: (N, 3, H, W) float, nominally in [-1, 1] -> (N, 3, size, size) float32 in [-1, 1].

    Pinned settings: clamp to [-1, 1] (as saving to an image file would), then
    ``F.interpolate(mode="bilinear", antialias=True, align_corners=False)`` to a square
    ``size x size`` (non-square inputs are stretched, as in pytorch-fid). Antialiasing only
    matters when downsampling, where plain bilinear aliases and shifts FID (Parmar et al.,
    clean-fid, https://arxiv.org/abs/2104.11222); when upsampling (e.g. 64 or 256 -> 299) it equals
    pytorch-fid's ``antialias=False`` resize up to float rounding. An input already at
    ``size x size`` is only clamped (the antialiased bilinear filter is the identity there).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"expected float images in [-1, 1], got dtype {images.dtype} (convert uint8 first)")
    images = images.float().clamp(-1.0, 1.0)
    if images.shape[-2:] == (size, size):
        return images
    resized = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized.clamp_(-1.0, 1.0)


class SmallConvFeatures:
    """A tiny random convolutional network with fixed seed: the extractor for tests and CPU runs.

    Its weights come from ``seed`` alone (independent of the global RNG), so scores are
    reproducible across runs and machines with the same torch version, and comparable only
    among themselves. Three stride-2 conv + ReLU stages, then global average pooling:
    ``images`` (N, 3, H, W) -> (N, 2 * width) float32.
    """

    def __init__(self, seed: int = 0, input_size: int = 64, width: int = 32, device: str | torch.device = "cpu"):
        if width <= 0 or input_size < 8:
            raise ValueError(f"width={width} must be > 0 and input_size={input_size} >= 8")
        self.name = f"small-conv(seed={seed}, width={width}, input_size={input_size})"
        self.input_size = input_size
        self.feature_dim = 2 * width
        self.device = torch.device(device)
        generator = torch.Generator().manual_seed(seed)
        channels = [3, width, 2 * width, 2 * width]
        layers: list[nn.Module] = []
        for in_channels, out_channels in zip(channels[:-1], channels[1:], strict=True):
            conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)
            with torch.no_grad():
                # He initialisation keeps activations O(1) through the ReLUs; a small random bias
                # keeps units from all dying on dark images.
                conv.weight.copy_(
                    torch.randn(conv.weight.shape, generator=generator) * math.sqrt(2.0 / (in_channels * 9))
                )
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.1)
            layers += [conv, nn.ReLU()]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.model = nn.Sequential(*layers).eval().requires_grad_(False).to(self.device)

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> Tensor:
        """``images``: (N, 3, H, W) float in [-1, 1] -> (N, 2 * width) float32."""
        return self.model(resize_for_features(images.to(self.device), self.input_size))


class InceptionFeatures:
    """Inception-v3 pool3 features (2048-d) from a local weight file.

    **Comparability.** The standard FID, the one papers report, uses the TensorFlow Inception
    graph of 2015-12-05, whose PyTorch port is pytorch-fid's ``pt_inception-2015-12-05-*.pth``.
    torchvision's ImageNet ``inception_v3`` weights are a *different* network: FIDs computed with
    them are comparable among themselves but NOT with published FID numbers. Report which weights (``name``) produced a score.

    Both layouts load from ``weights_path`` (a ``state_dict`` saved with ``torch.save``; nothing
    is ever downloaded):

    * ``"torchvision"``: a state dict of ``torchvision.models.inception_v3`` (1000 classes, with or
      without the auxiliary head). Input is ImageNet-normalised.
    * ``"pt_inception"``: pytorch-fid's port of the TF graph (1008 classes, no auxiliary head).
      Its graph differs from torchvision's in two places, reproduced here with hooks on
      torchvision's blocks rather than a copy of them (see :func:`_patch_for_pt_inception`): the
      3x3 average pools of Mixed_5b..Mixed_7b exclude padding, and Mixed_7c pools with max.
      Input is [-1, 1] as is. With these weights and inputs of at most 299 pixels the features
      should match pytorch-fid's up to float rounding (its resize is the same bilinear without
      antialiasing, which differs only when downsampling; see :func:`resize_for_features`). The
      patched blocks are tested against pytorch-fid's block definitions with random weights; the
      real weight file and pytorch-fid itself were not available to compare against.

    ``layout="auto"`` picks ``pt_inception`` when the file's ``fc.weight`` has 1008 rows.
    """

    def __init__(
        self,
        weights_path: str | Path,
        layout: Literal["auto", "torchvision", "pt_inception"] = "auto",
        device: str | torch.device = "cpu",
    ):
        from torchvision.models import inception_v3

        path = Path(weights_path)
        state_dict = _load_state_dict(path)
        if layout == "auto":
            fc_weight = state_dict.get("fc.weight")
            is_pt_inception = fc_weight is not None and fc_weight.shape[0] == PT_INCEPTION_NUM_CLASSES
            layout = "pt_inception" if is_pt_inception else "torchvision"
        if layout not in ("torchvision", "pt_inception"):
            raise ValueError(f"layout={layout!r}; expected 'auto', 'torchvision' or 'pt_inception'")
        self.layout: InceptionLayout = layout

        if layout == "pt_inception":
            model = inception_v3(
                weights=None,
                aux_logits=False,
                init_weights=False,
                num_classes=PT_INCEPTION_NUM_CLASSES,
                transform_input=False,
            )
        else:
            fc_weight = state_dict.get("fc.weight")
            num_classes = int(fc_weight.shape[0]) if fc_weight is not None else 1000
            # torchvision's ImageNet weights carry the auxiliary head; accept files saved without it too.
            has_aux = any(key.startswith("AuxLogits.") for key in state_dict)
            # transform_input stays off: normalise() is the only normalisation the input gets.
            model = inception_v3(
                weights=None, aux_logits=has_aux, init_weights=False, num_classes=num_classes, transform_input=False
            )
        # BatchNorm step counters are unused in eval mode and absent from files saved by old torch versions.
        counters = {key: value for key, value in model.state_dict().items() if key.endswith("num_batches_tracked")}
        state_dict = {**counters, **state_dict}
        _check_keys(model, state_dict, path, layout)
        model.load_state_dict(state_dict, strict=True)
        if layout == "pt_inception":
            _patch_for_pt_inception(model)

        # pool3: everything up to the global average pool (dropout is inert in eval mode).
        model.fc = nn.Identity()
        model.AuxLogits = None
        model.aux_logits = False
        self.device = torch.device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.name = f"inception_v3[{layout}]:{path.name}"
        self.input_size = INCEPTION_INPUT_SIZE
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def normalise(self, images: Tensor) -> Tensor:
        """``images``: (N, 3, H, W) in [-1, 1] -> the network's input range for this layout."""
        if self.layout == "pt_inception":
            return images  # the TF graph takes [-1, 1] (pytorch-fid's 2 * x - 1 of [0, 1] input)
        return ((images + 1.0) / 2.0 - self._mean) / self._std

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> Tensor:
        """``images``: (N, 3, H, W) float in [-1, 1] -> (N, 2048) float32 pool3 features."""
        resized = resize_for_features(images.to(self.device), self.input_size)
        return self.model(self.normalise(resized))


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {path}: pass the path of a local state dict (torchvision's "
            f"inception_v3 ImageNet weights, or pytorch-fid's pt_inception-2015-12-05 file); nothing is downloaded"
        )
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated file, a pickle of arbitrary objects, not a torch file at all
        raise ValueError(f"{path} is not a loadable torch state dict: {error}") from error
    if not isinstance(state_dict, Mapping) or not all(isinstance(value, Tensor) for value in state_dict.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors); save model.state_dict()")
    return dict(state_dict)


def _check_keys(model: nn.Module, state_dict: Mapping[str, Tensor], path: Path, layout: str) -> None:
    """Raise a ValueError naming ``path`` and the offending keys when the file does not fit ``model``."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if state_dict[key].shape != expected[key].shape
    )
    if not (missing or unexpected or mismatched):
        return

    def first(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")

    problems = [
        f"{label}: {first(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if keys
    ]
    raise ValueError(f"{path} is not a {layout} inception_v3 state dict; " + "; ".join(problems))


def _patch_for_pt_inception(model: nn.Module) -> None:
    """Make torchvision's Inception3 compute the TF FID graph (pytorch-fid's ``fid_inception_v3``).

    torchvision's blocks compute ``branch_pool(F.avg_pool2d(x, 3, 1, 1))`` with the padding counted
    in the average. The TF graph (a) excludes the padding in Mixed_5b..5d, 6b..6e and 7b, and (b)
    uses ``F.max_pool2d(x, 3, 1, 1)`` in Mixed_7c. Forward pre-hooks on each block's
    ``branch_pool`` conv swap its input accordingly, leaving the weights' names untouched.
    """

    def exclude_padding(module: nn.Module, inputs: tuple[Tensor]) -> tuple[Tensor]:
        # avg with padding = window sum / 9; without = window sum / count of real pixels. The
        # ratio is avg_pool of a ones map with the padding counted.
        (pooled,) = inputs
        ones = torch.ones((1, 1, *pooled.shape[-2:]), dtype=pooled.dtype, device=pooled.device)
        return (pooled / F.avg_pool2d(ones, kernel_size=3, stride=1, padding=1),)

    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7b"):
        getattr(model, name).branch_pool.register_forward_pre_hook(exclude_padding)

    block_input: dict[str, Tensor] = {}

    def remember_input(module: nn.Module, inputs: tuple[Tensor]) -> None:
        block_input["x"] = inputs[0]

    def max_pool_instead(module: nn.Module, inputs: tuple[Tensor]) -> tuple[Tensor]:
        return (F.max_pool2d(block_input.pop("x"), kernel_size=3, stride=1, padding=1),)

    model.Mixed_7c.register_forward_pre_hook(remember_input)
    model.Mixed_7c.branch_pool.register_forward_pre_hook(max_pool_instead)


def build_feature_extractor(weights_path: str | Path | None, device: str | torch.device = "cpu") -> FeatureExtractor:
    """:class:`InceptionFeatures` from ``weights_path``, or :class:`SmallConvFeatures` without one."""
    if weights_path is None:
        logger.warning("no Inception weights given: FID uses SmallConvFeatures(seed=0), comparable only with itself")
        return SmallConvFeatures(seed=0, device=device)
    return InceptionFeatures(weights_path, device=device)


def _feature_batches(images: Tensor | Iterable[Tensor], batch_size: int, size: int) -> Iterator[Tensor]:
    """Regroup ``images`` into (<= batch_size, 3, size, size) batches, each item resized on the way.

    ``images``: an (N, 3, H, W) tensor, or an iterable of (3, H, W) images and/or (B, 3, H, W)
    batches whose sizes may differ.
    """
    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise ValueError(f"expected an (N, 3, H, W) tensor, got {tuple(images.shape)}")
        for batch in images.split(batch_size):
            yield resize_for_features(batch, size)
        return
    pending: list[Tensor] = []
    pending_count = 0
    for item in images:
        if not isinstance(item, Tensor) or item.ndim not in (3, 4):
            raise TypeError(f"expected (3, H, W) or (B, 3, H, W) tensors, got {type(item).__name__}")
        item = resize_for_features(item.unsqueeze(0) if item.ndim == 3 else item, size)
        pending.append(item)
        pending_count += item.shape[0]
        while pending_count >= batch_size:
            joined = torch.cat(pending)
            yield joined[:batch_size]
            pending, pending_count = [joined[batch_size:]], pending_count - batch_size
    if pending_count:
        yield torch.cat(pending)


def activation_statistics(
    extractor: FeatureExtractor,
    images: Tensor | Iterable[Tensor],
    batch_size: int = 50,
    progress: bool = True,
    description: str = "FID features",
) -> ActivationStatistics:
    """Mean (D,) and unbiased covariance (D, D), float64, of ``extractor`` features over ``images``.

    ``images``: an (N, 3, H, W) tensor in [-1, 1], or an iterable of (3, H, W) images and/or
    (B, 3, H, W) batches (e.g. a DataLoader over reconstructions), regrouped into ``batch_size``.
    The sums are accumulated in float64 around the first batch's mean, so the one-pass covariance
    does not lose precision to cancellation and no feature matrix is ever held in memory.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size}; expected > 0")
    total = images.shape[0] if isinstance(images, Tensor) else None
    shift: Tensor | None = None
    count = 0
    centred_sum = centred_outer = torch.zeros(0, dtype=torch.float64)
    with tqdm(total=total, desc=description, unit="img", disable=not progress) as bar:
        for batch in _feature_batches(images, batch_size, extractor.input_size):
            features = extractor(batch).detach().to("cpu", torch.float64)
            if features.ndim != 2 or features.shape[0] != batch.shape[0]:
                raise ValueError(
                    f"{extractor.name} returned features of shape {tuple(features.shape)} for {batch.shape[0]} images"
                )
            if not torch.isfinite(features).all():
                raise ValueError(f"{extractor.name} returned non-finite features")
            if shift is None:
                shift = features.mean(dim=0)
                centred_sum = torch.zeros_like(shift)
                centred_outer = torch.zeros((shift.shape[0], shift.shape[0]), dtype=torch.float64)
            centred = features - shift
            centred_sum += centred.sum(dim=0)
            centred_outer += centred.T @ centred
            count += features.shape[0]
            bar.update(features.shape[0])
    if shift is None or count < 2:
        raise ValueError(f"FID statistics need at least 2 images, got {count}")
    dim = shift.shape[0]
    if count <= dim:
        logger.warning(
            "%d images for %d-d features (%s): the covariance is rank-deficient and FID strongly biased; "
            "compare such numbers only at equal image counts",
            count,
            dim,
            extractor.name,
        )
    centred_mean = centred_sum / count
    mu = shift + centred_mean
    sigma = (centred_outer - count * torch.outer(centred_mean, centred_mean)) / (count - 1)
    return ActivationStatistics(mu=mu.numpy(), sigma=sigma.numpy())


def _clip_psd_eigenvalues(eigenvalues: np.ndarray, label: str) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with rounding-level ones set to 0; a ValueError if not PSD."""
    scale = max(float(np.abs(eigenvalues).max(initial=0.0)), np.finfo(np.float64).tiny)
    if eigenvalues.min(initial=0.0) < -NEGATIVE_EIGENVALUE_RTOL * scale:
        raise ValueError(
            f"{label} is not positive semi-definite (eigenvalue {eigenvalues.min():.3g}, largest {scale:.3g}); "
            "not a covariance matrix"
        )
    # Eigenvalues within the solver's rounding of zero are zero: the null space of a rank-deficient
    # covariance comes back as +-1e-16-scale noise, whose square roots (1e-8 scale) would add up.
    noise_floor = eigenvalues.shape[0] * np.finfo(np.float64).eps * scale
    return np.where(eigenvalues > noise_floor, eigenvalues, 0.0)


def _symmetric(matrix: np.ndarray) -> np.ndarray:
    return (matrix + matrix.T) / 2.0


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (the squared W2 distance).

    ``mu1``, ``mu2``: (D,); ``sigma1``, ``sigma2``: (D, D) covariances (array-likes, cast to
    float64). ``tr((S_1 S_2)^(1/2))`` is the sum of square roots of the eigenvalues of
    ``S_1^(1/2) S_2 S_1^(1/2)``, which is symmetric PSD and similar to ``S_1 S_2``, so a symmetric
    eigen-solver suffices and singular covariances (fewer images than dimensions) need no
    ``eps * I`` fix. The result is clipped at 0 against rounding.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be (D,) vectors of one size, got {mu1.shape} and {mu2.shape}")
    dim = mu1.shape[0]
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(f"covariances must be ({dim}, {dim}), got {sigma1.shape} and {sigma2.shape}")
    if not all(np.isfinite(array).all() for array in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("statistics contain NaN or inf")

    eigenvalues1, eigenvectors1 = np.linalg.eigh(_symmetric(sigma1))
    eigenvalues1 = _clip_psd_eigenvalues(eigenvalues1, "sigma1")
    _clip_psd_eigenvalues(np.linalg.eigvalsh(_symmetric(sigma2)), "sigma2")
    sqrt_sigma1 = (eigenvectors1 * np.sqrt(eigenvalues1)) @ eigenvectors1.T
    product = _symmetric(sqrt_sigma1 @ sigma2 @ sqrt_sigma1)
    product_eigenvalues = _clip_psd_eigenvalues(np.linalg.eigvalsh(product), "sqrt(sigma1) sigma2 sqrt(sigma1)")
    trace_sqrt_product = float(np.sqrt(product_eigenvalues).sum())

    difference = mu1 - mu2
    distance = float(difference @ difference) + float(np.trace(sigma1) + np.trace(sigma2)) - 2.0 * trace_sqrt_product
    return max(distance, 0.0)


def fid(
    extractor: FeatureExtractor,
    images_a: Tensor | Iterable[Tensor],
    images_b: Tensor | Iterable[Tensor],
    batch_size: int = 50,
    progress: bool = True,
) -> float:
    """FID between two image sets, each an (N, 3, H, W) tensor in [-1, 1] or an iterable of them.

    To score many sets against one reference, call :func:`activation_statistics` on the reference
    once and :func:`frechet_distance` per set.
    """
    stats_a = activation_statistics(extractor, images_a, batch_size, progress, "FID features (a)")
    stats_b = activation_statistics(extractor, images_b, batch_size, progress, "FID features (b)")
    return frechet_distance(stats_a.mu, stats_a.sigma, stats_b.mu, stats_b.sigma)


def rfid(
    extractor: FeatureExtractor,
    originals: Tensor | Iterable[Tensor],
    reconstructions: Tensor | Iterable[Tensor],
    batch_size: int = 50,
    progress: bool = True,
) -> float:
    """Reconstruction FID: FID between ``originals`` and the tokenizer's ``reconstructions`` of them.

    Both are (N, 3, H, W) in [-1, 1] (or iterables of such); reconstructions that overshoot are
    clamped by :func:`resize_for_features`. When both are tensors they must hold the same number
    of images (one reconstruction per original).
    """
    if isinstance(originals, Tensor) and isinstance(reconstructions, Tensor):
        if originals.shape[0] != reconstructions.shape[0]:
            raise ValueError(
                f"rFID pairs each original with its reconstruction: {originals.shape[0]} originals, "
                f"{reconstructions.shape[0]} reconstructions"
            )
    stats_originals = activation_statistics(extractor, originals, batch_size, progress, "rFID features (originals)")
    stats_reconstructions = activation_statistics(
        extractor, reconstructions, batch_size, progress, "rFID features (reconstructions)"
    )
    return frechet_distance(
        stats_originals.mu, stats_originals.sigma, stats_reconstructions.mu, stats_reconstructions.sigma
    )
