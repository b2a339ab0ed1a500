"""What the tasks that look at images share: images as tensors and the FID feature network."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """image: (H, W, 3) in [0, 255] -> (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0


class FIDFeatures:
    """The FID feature network of a task: Inception from ``fid_weights`` (a local file), else the
    small fixed conv net; built once per task."""

    options: dict[str, Any]

    def _extractor(self) -> Any:
        if not hasattr(self, "_features"):
            from eval.fid import build_feature_extractor

            self._features = build_feature_extractor(self.options.get("fid_weights"))
        return self._features


def fid_from_features(real: list[list[float]], fake: list[list[float]]) -> float | None:
    """Frechet distance between two feature sets (None with fewer than 2 rows: no covariance)."""
    from eval.fid import frechet_distance

    if len(real) < 2:
        return None
    a, b = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


__all__ = ["FIDFeatures", "fid_from_features", "image_tensor"]
