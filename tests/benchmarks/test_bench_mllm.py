"""Sampling throughput of the unified model at the sizes of configs/mllm/tiny.yaml: KV cache and batched CFG.

Setup: the model the first LLM stage builds from ``configs/mllm/tiny.yaml`` (Qwen2, hidden
256, 4 layers, 4 heads, 2 KV heads, MLP 768; sum fusion; a 2-layer, 4-head depth head) with
random weights and a sentencepiece tokenizer trained on the Shapes world's text, sized by
``configs/tokenizer/tiny.yaml`` (64x64 images in 8x8 patches = 64 image slots; semantic and
pixel RVQ depth 4 with 1024 codes each). Three comparisons, each at batch 1 and 8:

* ``image``: one image per prompt (64 slots x 4 pixel codes = 256 codes), sampled at
  temperature 1 without guidance, with the KV cache vs ``use_cache=False`` (the whole sequence
  re-run at every slot);
* ``image+cfg``: the same with classifier-free guidance (scale 3, the empty-caption prompt),
  KV cache on, conditional and unconditional rows in one forward (``batch_cfg=True``) vs two
  model calls per slot (``batch_cfg=False``); only the conditional images count as output;
* ``text``: 32 greedy tokens (no stop token, so always 32) after a prompt holding a 64-slot
  image and a Shapes question, with vs without the KV cache.

Throughput = output codes (or tokens) per second of one whole call, prompt prefill included.
Every prompt in a batch is the same Shapes caption / question (no padding); every call
re-seeds its generator, so a case does the same work in every round.

    pytest tests/benchmarks/test_bench_mllm.py -m benchmark -s       # pytest-benchmark tables + median ratios
    python tests/benchmarks/test_bench_mllm.py [--threads 1] [--rounds 5]   # Markdown tables

torch runs on one thread by default: on the 2 shared cores of the embedded default, two
OpenMP threads competing with other processes spend most of their time waiting at barriers
(the small depth-head ops became ~20x slower at load 6), which measures the neighbours.
For the same reason the script times every call twice: by process CPU time (with one thread,
the compute alone; on an idle machine it equals the wall clock) and by wall clock. The
pytest run uses wall clock unless given ``--benchmark-timer time.process_time``.
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
from types import SimpleNamespace

import pytest
import torch

if __name__ == "__main__":  # run as a script from anywhere: make the repo root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from mllm.chat import SequenceBuilder  # noqa: E402
from mllm.generation import SamplingConfig, generate_image_codes, generate_text  # noqa: E402
from mllm.modeling import DualTokenMLLMForCausalLM  # noqa: E402
from tokenizer.config import DualTokenizerConfig, config_from_dict  # noqa: E402
from training.config import load_config, read_yaml  # noqa: E402
from training.data.shapes import ShapesWorld, ShapesWorldConfig  # noqa: E402
from training.mllm_config import MLLMStageConfig  # noqa: E402
from training.mllm_model import build_model  # noqa: E402

pytestmark = pytest.mark.benchmark

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY_MLLM = REPO / "configs" / "mllm" / "tiny.yaml"
TINY_TOKENIZER = REPO / "configs" / "tokenizer" / "tiny.yaml"
THREADS = 1
BATCH_SIZES = (1, 8)
CFG_SCALE = 3.0
TEXT_TOKENS = 32
IMAGE_SAMPLING = SamplingConfig(temperature=1.0)
# (section, faster-by-design variant, reference variant, what the row compares)
COMPARISONS = (
    ("image", "cache", "no cache", "image codes, KV cache vs none"),
    ("image+cfg", "one forward", "two passes", f"image codes, CFG {CFG_SCALE:g} batched vs 2 passes (cached)"),
    ("text", "cache", "no cache", f"text, {TEXT_TOKENS} greedy tokens, KV cache vs none"),
)
CASES = tuple((section, variant) for section, *variants, _ in COMPARISONS for variant in variants)


def tiny_code_layout() -> SimpleNamespace:
    """The code-shard facts ``build_model`` reads (``store.meta``), taken from the tiny tokenizer config."""
    config = config_from_dict(DualTokenizerConfig, read_yaml(TINY_TOKENIZER)["tokenizer"], "tokenizer")
    side = config.backbone.image_size // config.backbone.patch_size
    return SimpleNamespace(
        grid=(side, side),
        semantic_depth=config.semantic_quantizer.depth,
        pixel_depth=config.pixel_quantizer.depth,
        semantic_codebook_size=config.semantic_quantizer.codebook_size,
        pixel_codebook_size=config.pixel_quantizer.codebook_size,
    )


@functools.cache
def build_tiny_model(device_name: str = "cpu") -> tuple[DualTokenMLLMForCausalLM, SequenceBuilder]:
    """The tiny.yaml model as the first stage builds it (random weights), in eval mode, and its builder."""
    # Random code rows: the codebook start needs a trained tokenizer, and speed does not depend on it.
    stage = load_config(MLLMStageConfig, TINY_MLLM, ["model.code_embedding_init=random"])
    torch.manual_seed(0)
    model, text_tokenizer = build_model(stage.model, SimpleNamespace(meta=tiny_code_layout()))
    model = model.to(device_name).eval()
    return model, SequenceBuilder.for_model(text_tokenizer, model.config)


def make_step(
    section: str, variant: str, batch_size: int, device: torch.device
) -> tuple[Callable[[], torch.Tensor | list[list[int]]], int]:
    """A zero-argument callable running one generation call, and the codes / tokens it outputs."""
    model, builder = build_tiny_model(str(device))
    config = model.config
    sample = ShapesWorld(ShapesWorldConfig()).sample("val", 0)

    def generator() -> torch.Generator:
        return torch.Generator(device=device).manual_seed(0)

    if section in ("image", "image+cfg"):
        prompts = [builder.generation(sample.caption, train=False)] * batch_size
        codes = batch_size * config.image_slots * config.pixel_depth
        if section == "image":
            use_cache = {"cache": True, "no cache": False}[variant]
            return lambda: generate_image_codes(
                model, prompts, sampling=IMAGE_SAMPLING, generator=generator(), use_cache=use_cache
            ), codes
        unconditional = builder.generation("", train=False)
        batch_cfg = {"one forward": True, "two passes": False}[variant]
        return lambda: generate_image_codes(
            model, prompts, unconditional, CFG_SCALE, IMAGE_SAMPLING, generator=generator(), batch_cfg=batch_cfg
        ), codes
    if section == "text":
        height, width = config.grid_size
        semantic = torch.randint(
            0, config.semantic_size, (height, width, config.semantic_depth), generator=torch.Generator().manual_seed(1)
        )
        prompt = builder.conversation(
            [("user", f"<image>\n{sample.qa[0].question}")], semantic=semantic, train=False, add_generation_prompt=True
        )
        prompts = [prompt] * batch_size
        use_cache = {"cache": True, "no cache": False}[variant]
        return lambda: generate_text(model, prompts, TEXT_TOKENS, use_cache=use_cache), batch_size * TEXT_TOKENS
    raise ValueError(f"section={section!r}; expected one of {[comparison[0] for comparison in COMPARISONS]}")


def _check_output(output: torch.Tensor | list[list[int]], section: str, batch_size: int, device: torch.device) -> None:
    """The call produced what the throughput counts: full images, or exactly TEXT_TOKENS per row."""
    config = build_tiny_model(str(device))[0].config
    if section == "text":
        assert [len(tokens) for tokens in output] == [TEXT_TOKENS] * batch_size
    else:
        assert tuple(output.shape) == (batch_size, *config.grid_size, config.pixel_depth)


# --------------------------------------------------------------------------- pytest-benchmark

_medians: dict[tuple[str, str, int], float] = {}


@pytest.fixture(scope="module", autouse=True)
def fixed_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize(("section", "variant"), CASES)
def test_generation_throughput(benchmark, section: str, variant: str, batch_size: int) -> None:
    step, produced = make_step(section, variant, batch_size, torch.device("cpu"))
    benchmark.group = f"mllm-{section}-batch{batch_size}"
    benchmark.extra_info.update(batch_size=batch_size, outputs_per_call=produced, threads=torch.get_num_threads())
    output = benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    _check_output(output, section, batch_size, torch.device("cpu"))
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        _medians[(section, variant, batch_size)] = median
        benchmark.extra_info["outputs_per_second"] = produced / median
        print(f"\n{section} {variant} batch {batch_size}: {produced / median:.0f} outputs/s (median of 3)")


def test_report_median_ratios() -> None:
    """Print fast / reference throughput from the medians above (runs after them in file order)."""
    lines = [
        f"{label}, batch {batch_size}: {fast} / {reference} = "
        f"{_medians[(section, reference, batch_size)] / _medians[(section, fast, batch_size)]:.2f}x"
        for section, fast, reference, label in COMPARISONS
        for batch_size in BATCH_SIZES
        if (section, fast, batch_size) in _medians and (section, reference, batch_size) in _medians
    ]
    if not lines:
        pytest.skip("no benchmark medians recorded (benchmarks disabled or deselected)")
    print("\n" + "\n".join(lines))


# --------------------------------------------------------------------------- script


def _seconds(step: Callable[[], object], device: torch.device) -> dict[str, float]:
    """Wall-clock and process CPU seconds of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def _load_average() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def _rows(
    times: dict[tuple[str, str, int], list[float]], produced: dict[tuple[str, str, int], int], batch_sizes: list[int]
) -> list[dict[str, object]]:
    """One row per comparison and batch size: median outputs/s of both sides, paired per-round ratios."""
    rows = []
    for section, fast, reference, label in COMPARISONS:
        for batch_size in batch_sizes:
            fast_case, reference_case = (section, fast, batch_size), (section, reference, batch_size)
            ratios = [slow / quick for quick, slow in zip(times[fast_case], times[reference_case], strict=True)]
            rows.append(
                {
                    "comparison": label,
                    "batch_size": batch_size,
                    "outputs_per_call": produced[fast_case],
                    "fast": fast,
                    "reference": reference,
                    "fast_per_second": produced[fast_case] / statistics.median(times[fast_case]),
                    "reference_per_second": produced[reference_case] / statistics.median(times[reference_case]),
                    "ratio": statistics.median(ratios),
                    "ratio_range": (min(ratios), max(ratios)),
                }
            )
    return rows


def _print_table(rows: list[dict[str, object]]) -> None:
    print(
        "| comparison | batch | outputs / call | fast variant | outputs / s | reference | outputs / s | speed-up "
        "| range over rounds |"
    )
    print("|---|---:|---:|---|---:|---|---:|---:|---:|")
    for row in rows:
        low, high = row["ratio_range"]
        print(
            f"| {row['comparison']} | {row['batch_size']} | {row['outputs_per_call']} | {row['fast']} | "
            f"{row['fast_per_second']:.0f} | {row['reference']} | {row['reference_per_second']:.0f} | "
            f"{row['ratio']:.2f}x | {low:.2f}-{high:.2f}x |"
        )


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, object]]]:
    """Print Markdown tables (process CPU time, then wall clock): median outputs/s and paired ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (wall clock only)")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per case, interleaved across cases")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch CPU threads")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clocks = ("cpu", "wall") if device.type == "cpu" else ("wall",)
    load_before = _load_average()

    cases = [(section, variant, batch_size) for section, variant in CASES for batch_size in args.batch_sizes]
    steps = {case: make_step(*case, device) for case in cases}
    for case, (step, _) in steps.items():
        _check_output(step(), case[0], case[2], device)  # warm-up, and a check of what is counted
    times = {clock: {case: [] for case in cases} for clock in ("cpu", "wall")}
    for round_index in range(args.rounds):
        # Every case once per round, each pair back to back (alternating which goes first), so
        # drifting machine load hits both sides of a comparison alike.
        for section, fast, reference, _ in COMPARISONS:
            for batch_size in args.batch_sizes:
                pair = [(section, fast, batch_size), (section, reference, batch_size)]
                for case in pair[:: 1 if round_index % 2 == 0 else -1]:
                    for clock, seconds in _seconds(steps[case][0], device).items():
                        times[clock][case].append(seconds)
    produced = {case: outputs for case, (_, outputs) in steps.items()}
    tables = {clock: _rows(times[clock], produced, args.batch_sizes) for clock in clocks}

    model, _ = build_tiny_model(str(device))
    config = model.config
    text = config.text_config
    print(
        f"DualToken MLLM, configs/mllm/tiny.yaml sizes: Qwen2 hidden {text.hidden_size}, {text.num_hidden_layers} "
        f"layers, {text.num_attention_heads} heads / {text.num_key_value_heads} KV, MLP {text.intermediate_size}, "
        f"{config.image_slots} image slots, pixel / semantic RVQ depth {config.pixel_depth} / {config.semantic_depth} "
        f"x {config.pixel_size} codes, depth head {config.depth_head_layers} layers / {config.depth_head_heads} heads, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, random init, "
        f"{text._attn_implementation} attention; device {device}, {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}; load average {load_before} before, "
        f"{_load_average()} after; median of {args.rounds} interleaved rounds; "
        f"speed-up = median of the per-round paired ratios"
    )
    titles = {
        "cpu": "By process CPU time (what the code costs; immune to waiting for a shared core):",
        "wall": "By wall clock (what a user waits; includes time the process was not scheduled):",
    }
    for clock in clocks:
        print(f"\n{titles[clock]}\n")
        _print_table(tables[clock])
    return tables


if __name__ == "__main__":
    main()
