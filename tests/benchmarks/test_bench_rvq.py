"""Speed of our residual VQ against vector-quantize-pytorch's ``ResidualVQ`` at equal settings.

Settings (both sides): 4096 vectors per call (batch 64 x 64 tokens) of dim 16, one shared
codebook of 1024 codes, depth 4, squared-L2 nearest neighbour, EMA updates (decay 0.99,
eps 1e-5), dead-code restart below an EMA count of 1, k-means initialisation (done by a
warm-up call, outside the timing), plain straight-through gradient (their default
rotation trick is switched off, since ours has none), commitment weight 1. Training mode
times one forward on an input that requires grad (the EMA update included, no backward);
eval mode times one forward under ``torch.no_grad``.

    pytest tests/benchmarks/test_bench_rvq.py -s          # pytest-benchmark tables + median ratios
    python tests/benchmarks/test_bench_rvq.py [--device cuda] [--repeats 15]   # Markdown table
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import pytest
import torch

if __name__ == "__main__":  # run as a script from anywhere: make the repo root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from tokenizer.config import QuantizerConfig  # noqa: E402
from tokenizer.quantizer import ResidualVectorQuantizer  # noqa: E402

pytestmark = pytest.mark.benchmark

CODE_DIM, CODEBOOK_SIZE, DEPTH = 16, 1024, 4
BATCH, TOKENS = 64, 64
DECAY, EPS, DEAD_CODE_THRESHOLD, KMEANS_ITERS = 0.99, 1e-5, 1.0, 10
IMPLEMENTATIONS = ("ours", "theirs")
MODES = ("train", "eval")


def build_ours(device: torch.device) -> torch.nn.Module:
    config = QuantizerConfig(
        codebook_size=CODEBOOK_SIZE,
        code_dim=CODE_DIM,
        depth=DEPTH,
        ema=True,
        decay=DECAY,
        eps=EPS,
        dead_code_threshold=DEAD_CODE_THRESHOLD,
        kmeans_init=True,
    )
    return ResidualVectorQuantizer(config, kmeans_iters=KMEANS_ITERS).to(device)


def build_theirs(device: torch.device) -> torch.nn.Module:
    from vector_quantize_pytorch import ResidualVQ

    return ResidualVQ(
        dim=CODE_DIM,
        num_quantizers=DEPTH,
        codebook_size=CODEBOOK_SIZE,
        shared_codebook=True,
        decay=DECAY,
        eps=EPS,
        threshold_ema_dead_code=DEAD_CODE_THRESHOLD,
        kmeans_init=True,
        kmeans_iters=KMEANS_ITERS,
        rotation_trick=False,
        commitment_weight=1.0,
    ).to(device)


def make_step(implementation: str, mode: str, device: torch.device) -> Callable[[], object]:
    """A zero-argument callable running one forward of ``implementation`` in ``mode``.

    Both sides are built from the same seed, see the same input and are warmed up (k-means
    initialisation) by one training call first.
    """
    torch.manual_seed(0)
    quantizer = (build_ours if implementation == "ours" else build_theirs)(device)
    latents = torch.randn(BATCH, TOKENS, CODE_DIM, device=device)
    quantizer.train()
    quantizer(latents)
    if mode == "train":
        trainable_latents = latents.clone().requires_grad_(True)
        return lambda: quantizer(trainable_latents)
    quantizer.eval()

    def eval_step() -> object:
        with torch.no_grad():
            return quantizer(latents)

    return eval_step


# --------------------------------------------------------------------------- pytest-benchmark

_medians: dict[tuple[str, str], float] = {}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_rvq_forward(benchmark, implementation: str, mode: str) -> None:
    if implementation == "theirs":
        pytest.importorskip("vector_quantize_pytorch")
    step = make_step(implementation, mode, torch.device("cpu"))
    benchmark.group = f"rvq-{mode}"
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=2)
    if benchmark.stats is not None:  # None under --benchmark-disable
        _medians[(implementation, mode)] = benchmark.stats.stats.median


def test_report_median_ratios() -> None:
    """Print ours / theirs from the medians measured above (runs after them in file order)."""
    ratios = {
        mode: _medians[("ours", mode)] / _medians[("theirs", mode)]
        for mode in MODES
        if ("ours", mode) in _medians and ("theirs", mode) in _medians
    }
    if not ratios:
        pytest.skip("no benchmark medians recorded (benchmarks disabled or vector_quantize_pytorch missing)")
    for mode, ratio in ratios.items():
        print(f"\nrvq {mode}: median ours / theirs = {ratio:.2f}")


# --------------------------------------------------------------------------- script


def _time_block(step: Callable[[], object], calls: int, device: torch.device) -> float:
    """Mean milliseconds per call over ``calls`` back-to-back calls."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000 / calls


def main(argv: list[str] | None = None) -> None:
    """Print a Markdown table of median milliseconds per forward, ours vs theirs, side by side."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--repeats", type=int, default=15, help="timed blocks per implementation and mode")
    parser.add_argument("--calls", type=int, default=3, help="forwards per timed block")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    rows = []
    for mode in MODES:
        steps = {implementation: make_step(implementation, mode, device) for implementation in IMPLEMENTATIONS}
        for step in steps.values():
            _time_block(step, args.calls, device)  # warm-up
        times: dict[str, list[float]] = {implementation: [] for implementation in IMPLEMENTATIONS}
        # Interleave the two so drifting machine load hits both alike.
        for _ in range(args.repeats):
            for implementation, step in steps.items():
                times[implementation].append(_time_block(step, args.calls, device))
        ours, theirs = (statistics.median(times[implementation]) for implementation in IMPLEMENTATIONS)
        rows.append((mode, ours, theirs))

    print(
        f"RVQ forward, {BATCH}x{TOKENS} vectors of dim {CODE_DIM}, codebook {CODEBOOK_SIZE} shared over depth {DEPTH}, "
        f"EMA; device {device}, {torch.get_num_threads()} threads, median of {args.repeats} x {args.calls} calls\n"
    )
    print("| mode | ours (ms) | vector-quantize-pytorch (ms) | ours / theirs |")
    print("|---|---:|---:|---:|")
    for mode, ours, theirs in rows:
        print(f"| {mode} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f} |")


if __name__ == "__main__":
    main()
