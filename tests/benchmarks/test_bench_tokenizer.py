"""Encode / decode throughput (images per second) of a DualTokenizer at the sizes of configs/tokenizer/tiny.yaml.

Setup: the ``tokenizer:`` section of tiny.yaml (a 6-layer, 128-wide SigLIP ViT on 64x64
images with 8x8 patches, taps 2 and 5, MLP projections, two residual quantizers of 1024 x 16
at depth 4, a 32-channel conv decoder), random weights with both codebooks k-means-initialised
by one training-mode forward, then eval mode. Batch 64. ``encode`` runs the ViT up to the
semantic tap and both quantizers; ``decode`` looks up pixel codes and runs the decoder;
``encode+decode`` is a full reconstruction.

    pytest tests/benchmarks/test_bench_tokenizer.py -m benchmark -s      # pytest-benchmark tables
    python tests/benchmarks/test_bench_tokenizer.py [--device cuda] [--repeats 10]   # Markdown table
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import pytest
import torch

if __name__ == "__main__":  # run as a script from anywhere: make the repo root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from tokenizer.config import DualTokenizerConfig, config_from_dict  # noqa: E402
from tokenizer.model import DualTokenizer  # noqa: E402
from training.config import read_yaml  # noqa: E402

pytestmark = pytest.mark.benchmark

TINY_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "tokenizer" / "tiny.yaml"
BATCH = 64
OPERATIONS = ("encode", "decode", "encode+decode")


@functools.cache
def build_visual_tokenizer(device_name: str = "cpu") -> DualTokenizer:
    """The tiny.yaml visual tokenizer with random weights, codebooks initialised, in eval mode."""
    config = config_from_dict(DualTokenizerConfig, read_yaml(TINY_CONFIG)["tokenizer"], "tokenizer")
    torch.manual_seed(0)
    visual_tokenizer = DualTokenizer(config).to(device_name)
    visual_tokenizer.train()
    with torch.no_grad():
        visual_tokenizer(torch.rand(BATCH, 3, 64, 64, device=device_name) * 2 - 1)  # k-means initialisation
    return visual_tokenizer.eval()


def make_operation(operation: str, device: torch.device, batch_size: int = BATCH) -> Callable[[], object]:
    """A zero-argument callable running ``operation`` on one batch of ``batch_size`` images."""
    visual_tokenizer = build_visual_tokenizer(str(device))
    size = visual_tokenizer.backbone.image_size
    generator = torch.Generator().manual_seed(1)
    images = (torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1).to(device)
    pixel_codes = visual_tokenizer.encode(images).pixel_codes
    if operation == "encode":
        return lambda: visual_tokenizer.encode(images)
    if operation == "decode":
        return lambda: visual_tokenizer.decode(pixel_codes)
    if operation == "encode+decode":
        return lambda: visual_tokenizer.decode(visual_tokenizer.encode(images).pixel_codes)
    raise ValueError(f"operation={operation!r}; expected one of {OPERATIONS}")


# --------------------------------------------------------------------------- pytest-benchmark


@pytest.mark.parametrize("operation", OPERATIONS)
def test_tokenizer_throughput(benchmark, operation: str) -> None:
    step = make_operation(operation, torch.device("cpu"))
    benchmark.group = "dualtoken-tiny"
    benchmark.extra_info["batch_size"] = BATCH
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        images_per_second = BATCH / benchmark.stats.stats.median
        benchmark.extra_info["images_per_second"] = images_per_second
        print(f"\n{operation}: {images_per_second:.0f} images/s (median of 5 batches of {BATCH})")
        assert images_per_second > 0


# --------------------------------------------------------------------------- script


def _seconds(step: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[tuple[str, float, float]]:
    """Print a Markdown table: median milliseconds per batch and images/s for each operation."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--repeats", type=int, default=10, help="timed batches per operation")
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    steps = {operation: make_operation(operation, device, args.batch_size) for operation in OPERATIONS}
    for step in steps.values():
        _seconds(step, device)  # warm-up
    times: dict[str, list[float]] = {operation: [] for operation in OPERATIONS}
    # Interleave the operations so drifting machine load hits all of them alike.
    for _ in range(args.repeats):
        for operation, step in steps.items():
            times[operation].append(_seconds(step, device))
    rows = [
        (operation, 1000 * statistics.median(times[operation]), args.batch_size / statistics.median(times[operation]))
        for operation in OPERATIONS
    ]

    load = ", ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(
        f"DualToken tiny.yaml sizes, random init, eval mode, batch {args.batch_size} of 64x64; device {device}, "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, load average {load}; "
        f"median of {args.repeats} batches\n"
    )
    print("| operation | median ms / batch | images / s |")
    print("|---|---:|---:|")
    for operation, milliseconds, images_per_second in rows:
        print(f"| {operation} | {milliseconds:.1f} | {images_per_second:.0f} |")
    return rows


if __name__ == "__main__":
    main()
