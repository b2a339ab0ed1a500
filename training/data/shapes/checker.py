"""The Shapes-world image checker measured on the world's own images, and its command line.

:func:`validate` judges scenes of the default world, clean or after :func:`degrade` (a stand-in
for a decoder's output), against the objects and relation their captions name (:mod:`.detect`,
:mod:`.judge`). The world is imported here only: it is what the checker is measured against,
detection and judging never touch it. ``python -m training.data.shapes.checker --validate N``
prints the report.
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from training.data.shapes.judge import judge, parse_caption
from training.data.shapes.spec import ShapesWorldConfig
from training.data.shapes.world import ShapesWorld

# ---------------------------------------------------------------------- degradation


def degrade(image: np.ndarray, blur_sigma: float, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 -> the same after a Gaussian blur (``blur_sigma`` px) and additive Gaussian
    noise (``noise_std`` RGB units): a stand-in for a decoder's output in robustness checks."""
    blurred = image.astype(np.float32)
    if blur_sigma > 0:
        radius = max(int(math.ceil(3 * blur_sigma)), 1)
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / blur_sigma) ** 2).astype(np.float32)
        taps /= taps.sum()
        for axis in (0, 1):
            padding = [(0, 0)] * 3
            padding[axis] = (radius, radius)
            padded = np.pad(blurred, padding, mode="reflect")
            length = blurred.shape[axis]
            blurred = sum(
                weight * np.take(padded, np.arange(offset, offset + length), axis=axis)
                for offset, weight in enumerate(taps)
            )
    if noise_std > 0:
        blurred = blurred + rng.normal(0.0, noise_std, blurred.shape).astype(np.float32)
    return (np.clip(blurred, 0, 255) + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------- validation on the world


@dataclass
class ValidationReport:
    """Hit counts of :func:`validate`: ``scenes[group] = (correct, total)`` for groups like
    ``"all"``, ``"objects=2"``, ``"split=test"``; ``objects[group]`` the same per ground-truth
    object (matched or not) for ``"shape=circle"``, ``"colour=red"``, ``"size=small"``;
    ``sizes`` counts matched objects whose detected size is right; ``failures`` holds
    ``"split/kind/index: caption -> reason"`` lines."""

    scenes: dict[str, list[int]] = field(default_factory=dict)
    objects: dict[str, list[int]] = field(default_factory=dict)
    sizes: list[int] = field(default_factory=lambda: [0, 0])
    failures: list[str] = field(default_factory=list)

    def rate(self, group: str = "all") -> float:
        correct, total = self.scenes[group]
        return correct / max(total, 1)

    def lines(self) -> list[str]:
        """The report as printable lines."""
        rows = [
            f"{group:>22}: {hits / max(total, 1):7.2%} ({hits}/{total})" for group, (hits, total) in self.scenes.items()
        ]
        rows.append("objects matched:")
        rows += [
            f"{group:>22}: {hits / max(total, 1):7.2%} ({hits}/{total})"
            for group, (hits, total) in self.objects.items()
        ]
        rows.append(f"{'size right (matched)':>22}: {self.sizes[0] / max(self.sizes[1], 1):7.2%} {tuple(self.sizes)}")
        return rows


def _tally(table: dict[str, list[int]], group: str, hit: bool) -> None:
    counts = table.setdefault(group, [0, 0])
    counts[0] += int(hit)
    counts[1] += 1


def validate(
    num_scenes: int,
    blur_sigma: float = 0.0,
    noise_std: float = 0.0,
    splits: Sequence[str] = ("test", "compositional"),
    seed: int = 0,
    image_size: int = 64,
) -> ValidationReport:
    """Judge ``num_scenes`` one-object scenes (``sample_single``) and ``num_scenes`` scenes of
    1..3 objects (``sample``), taken in turn from ``splits`` of the default world (at
    ``image_size``), against the objects and relation their captions name (through
    :func:`parse_caption`), optionally after :func:`degrade`."""
    per_split = -(-num_scenes // len(splits))
    world = ShapesWorld(
        ShapesWorldConfig(image_size=image_size, num_test=max(1024, per_split), num_compositional=max(512, per_split))
    )
    report = ValidationReport()
    for kind, number in itertools.product(("single", "multi"), range(num_scenes)):
        split, index = splits[number % len(splits)], number // len(splits)
        sample = (world.sample_single if kind == "single" else world.sample)(split, index)
        image = sample.image
        if blur_sigma > 0 or noise_std > 0:
            image = degrade(image, blur_sigma, noise_std, np.random.default_rng([seed, number, kind == "multi"]))
        specs, relation = parse_caption(sample.caption)
        verdict = judge(image, specs, relation)
        for group in ("all", f"kind={kind}", f"split={split}", f"objects={len(sample.objects)}"):
            _tally(report.scenes, group, verdict.correct)
        if not verdict.correct:
            report.failures.append(f"{split}/{kind}/{index}: {sample.caption} -> {verdict.reason}")
        for obj in sample.objects:
            # (colour, shape) is unique within a scene, so the caption's spec of obj is the one with its name.
            spec_index = next(i for i, spec in enumerate(specs) if (spec.colour, spec.shape) == (obj.colour, obj.shape))
            detection_index = verdict.assignment[spec_index]
            for group in (f"shape={obj.shape}", f"colour={obj.colour}", f"size={obj.size}"):
                _tally(report.objects, group, detection_index is not None)
            if detection_index is not None:
                report.sizes[0] += int(verdict.detections[detection_index].size == obj.size)
                report.sizes[1] += 1
    report.scenes = dict(sorted(report.scenes.items(), key=lambda item: (item[0] != "all", item[0])))
    report.objects = dict(sorted(report.objects.items()))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Validate the Shapes-world image checker on the world's own images.")
    parser.add_argument("--validate", type=int, metavar="N", required=True, help="scenes per kind (single, multi)")
    parser.add_argument("--blur", type=float, default=0.7, help="Gaussian blur sigma (px) of the degraded pass")
    parser.add_argument("--noise", type=float, default=8.0, help="noise std (RGB units) of the degraded pass")
    parser.add_argument("--image-size", type=int, default=64, help="side of the world's images (px)")
    parser.add_argument("--failures", type=int, default=10, help="failure lines to print per pass")
    args = parser.parse_args(argv)
    for title, blur, noise in (
        ("clean", 0.0, 0.0),
        (f"blur {args.blur} px + noise {args.noise}", args.blur, args.noise),
    ):
        report = validate(args.validate, blur, noise, image_size=args.image_size)
        print(f"== {title}: {args.validate} one-object + {args.validate} 1..3-object scenes of {args.image_size} px")
        print("\n".join(report.lines()))
        reasons = Counter(line.split(" -> ")[1] for line in report.failures)
        for line in report.failures[: args.failures]:
            print("  FAIL", line)
        if reasons:
            print("  most common reasons:", reasons.most_common(5))


if __name__ == "__main__":
    main()
