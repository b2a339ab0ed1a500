"""Sampling speed, side by side in one process: the sampler against the one it replaced, and text
answering against transformers' ``generate()``.

Model: the embedded default, configs/mllm/tiny.yaml as the first LLM stage builds it (random
weights; see test_bench_mllm.py). Cases, each at batch 1 and 8, timed interleaved (new and old
back to back, alternating which goes first) and reported as medians and the median of the
paired per-round ratios:

* ``image``: one 64-slot image per prompt, CFG 3 (the conditional and unconditional rows in one
  forward), temperature 1, one generator per image: :func:`mllm.generation.generate_image_codes`
  vs ``tests/benchmarks/reference_sampler.py`` (the sampler before the device-resident loop);
  both give the same codes, which the run checks;
* ``text``: 32 greedy tokens after a text-only Shapes question (no stop token):
  :func:`mllm.generation.generate_text` vs ``model.llm.generate()`` (transformers, the same
  Qwen2 weights, ``min_new_tokens = max_new_tokens = 32``, KV cache on);
* a per-slot breakdown of one batch-1 CFG image: LLM step, depth head (4 pixel depths),
  sampling (CFG mix, filter, draw), new vs old.

    python tests/benchmarks/test_bench_sampling.py [--rounds 5] [--threads 1] [--device cpu] [--compile default]
    pytest tests/benchmarks/test_bench_sampling.py -m benchmark -s
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import pytest
import torch

if __name__ == "__main__":  # run as a script from anywhere: the repo root and this folder importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import reference_sampler  # noqa: E402
from test_bench_mllm import build_tiny_model  # noqa: E402

from mllm.depth_head import DepthHead  # noqa: E402
from mllm.generation import SamplingConfig, generate_text, sample  # noqa: E402
from training.data.shapes import ShapesWorld, ShapesWorldConfig  # noqa: E402

pytestmark = pytest.mark.benchmark

CFG_SCALE = 3.0
TEXT_TOKENS = 32
IMAGE_SAMPLING = SamplingConfig(temperature=1.0)


def _prompts(batch_size: int, device: torch.device):
    model, builder = build_tiny_model(str(device))
    world = ShapesWorld(ShapesWorldConfig())
    samples = [world.sample("val", index) for index in range(batch_size)]
    images = [builder.generation(sample.caption, train=False) for sample in samples]
    questions = [
        builder.conversation([("user", sample.qa[0].question)], train=False, add_generation_prompt=True)
        for sample in samples
    ]
    return model, images, builder.generation("", train=False), questions


def make_cases(
    batch_size: int, device: torch.device, compile_mode: str | None = None
) -> dict[tuple[str, str], Callable[[], object]]:
    """``(section, variant)`` -> a zero-argument call; every call re-seeds, so every round does the same work.
    With ``compile_mode`` a third variant, ``compiled``, runs the new sampler's steps through ``torch.compile``."""
    model, images, uncond, questions = _prompts(batch_size, device)

    def generators():
        return [torch.Generator(device=device).manual_seed(seed) for seed in range(batch_size)]

    def image(sampler, **options):
        return lambda: sampler.generate_image_codes(
            model, images, uncond, CFG_SCALE, IMAGE_SAMPLING, generator=generators(), **options
        )

    # transformers' generate() on the same Qwen2 weights: the question's text ids, left-padded
    width = max(len(question) for question in questions)
    pad = 0
    ids = torch.full((batch_size, width), pad, dtype=torch.long)
    mask = torch.zeros(batch_size, width, dtype=torch.long)
    for row, question in enumerate(questions):
        ids[row, width - len(question) :] = question.ids[:, 0] if question.ids.dim() == 2 else question.ids
        mask[row, width - len(question) :] = 1
    ids, mask = ids.to(device), mask.to(device)

    def hf_generate():
        out = model.llm.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=TEXT_TOKENS,
            min_new_tokens=TEXT_TOKENS,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=None,
        )
        return out[:, width:].tolist()

    cases = {
        ("image", "new"): image(sys.modules["mllm.generation"]),
        ("image", "old"): image(reference_sampler),
        ("text", "new"): lambda: generate_text(model, questions, TEXT_TOKENS),
        ("text", "old"): hf_generate,
    }
    if compile_mode is not None:
        cases[("image", "compiled")] = image(sys.modules["mllm.generation"], compile_mode=compile_mode)
        cases[("text", "compiled")] = lambda: generate_text(model, questions, TEXT_TOKENS, compile_mode=compile_mode)
    return cases


def _seconds(call: Callable[[], object], device: torch.device) -> dict[str, float]:
    """Wall-clock and process CPU seconds of one call (with one thread, CPU time is the compute
    alone: immune to waiting for a core that other processes hold)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def slot_breakdown(device: torch.device, slots: int = 16) -> dict[str, dict[str, float]]:
    """Median milliseconds per slot of one batch-1 CFG image: LLM step, depth head, sampling
    (process CPU time on a CPU, wall clock on a GPU)."""
    from mllm.decoding import SlotRunner

    model, images, uncond, _ = _prompts(1, device)
    config = model.config
    head: DepthHead = model.pixel_head
    batch = reference_sampler.collate_sequences(images + [uncond], 0, left_pad=True)
    generators = [torch.Generator(device=device).manual_seed(0)]
    times = {variant: {"LLM step": [], "depth head": [], "sampling": []} for variant in ("new", "old")}

    def timed(variant, part, call):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter() if device.type == "cuda" else time.process_time()
        result = call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        end = time.perf_counter() if device.type == "cuda" else time.process_time()
        times[variant][part].append(1000 * (end - start))
        return result

    def mix(logits):
        return logits[:1].float() + CFG_SCALE * (logits[:1].float() - logits[1:].float())

    with torch.no_grad():
        runners = {"new": SlotRunner(model, batch, True, slots), "old": reference_sampler._Runner(model, batch, True)}
        hidden = {variant: runner.start() for variant, runner in runners.items()}
        for slot in range(slots):
            for variant in ("new", "old") if slot % 2 == 0 else ("old", "new"):
                context = hidden[variant]
                steps = head.steps(context) if variant == "new" else None
                chosen, code = None, None
                for _ in range(config.pixel_depth):
                    if variant == "new":
                        logits = timed(variant, "depth head", lambda c=code, st=steps: st.next_logits(c))
                        code = timed(variant, "sampling", lambda lg=logits: sample(mix(lg), IMAGE_SAMPLING, generators))
                    else:
                        logits = timed(variant, "depth head", lambda ch=chosen, cx=context: head.next_logits(cx, ch))
                        code = timed(
                            variant,
                            "sampling",
                            lambda lg=logits: reference_sampler.sample(mix(lg), IMAGE_SAMPLING, generators),
                        )
                    code = torch.cat([code, code])
                    chosen = code[:, None] if chosen is None else torch.cat([chosen, code[:, None]], dim=1)
                slot_ids = torch.full((2, config.slot_width), -1, dtype=torch.long, device=context.device)
                slot_ids[:, config.semantic_depth :] = chosen + model.layout.pixel_offset
                hidden[variant] = timed(
                    variant, "LLM step", lambda v=variant, s=slot_ids, n=slot: runners[v].feed(s, n)
                )
    depth = config.pixel_depth
    per_slot = {"LLM step": 1, "depth head": depth, "sampling": depth}
    return {
        variant: {part: per_slot[part] * statistics.median(values) for part, values in parts.items()}
        for variant, parts in times.items()
    }


def _load_average() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def run(
    rounds: int, batch_sizes: list[int], device: torch.device, compile_mode: str | None = None
) -> dict[str, list[dict[str, object]]]:
    """Per clock (``cpu``, ``wall``): one row per case and batch size, medians and paired ratios
    (with ``compile_mode``, also the compiled sampler's median and its ratios to the reference)."""
    cases = {batch_size: make_cases(batch_size, device, compile_mode) for batch_size in batch_sizes}
    variants = ["new", "old"] + (["compiled"] if compile_mode else [])
    for batch_size, calls in cases.items():  # warm-up (and compilation), and the check that all draw the same codes
        codes = calls[("image", "new")]()
        for variant in variants[1:]:
            start = time.perf_counter()
            assert torch.equal(codes, calls[("image", variant)]()), f"{variant} codes differ at batch {batch_size}"
            if variant == "compiled":  # its first image compiles (or loads inductor's on-disk cache)
                print(f"compiled: first image at batch {batch_size} took {time.perf_counter() - start:.1f} s")
        answers = calls[("text", "new")]()
        if compile_mode:
            assert calls[("text", "compiled")]() == answers, f"compiled answers differ at batch {batch_size}"
        calls[("text", "old")]()
    clocks = ("cpu", "wall") if device.type == "cpu" else ("wall",)
    times = {(clock, batch_size, key): [] for clock in clocks for batch_size, calls in cases.items() for key in calls}
    for round_index in range(rounds):
        for batch_size, calls in cases.items():
            for section in ("image", "text"):
                shift = round_index % len(variants)  # a different variant goes first each round
                for variant in variants[shift:] + variants[:shift]:
                    seconds = _seconds(calls[(section, variant)], device)
                    for clock in clocks:
                        times[(clock, batch_size, (section, variant))].append(seconds[clock])
    tables = {}
    for clock in clocks:
        rows = []
        for section, reference in (("image", "previous sampler"), ("text", "transformers generate()")):
            for batch_size in batch_sizes:
                new, old = times[(clock, batch_size, (section, "new"))], times[(clock, batch_size, (section, "old"))]
                ratios = [slow / quick for quick, slow in zip(new, old, strict=True)]
                row = {}
                if compile_mode:
                    compiled = times[(clock, batch_size, (section, "compiled"))]
                    compiled_ratios = [slow / quick for quick, slow in zip(compiled, old, strict=True)]
                    row = {
                        "compiled_s": statistics.median(compiled),
                        "compiled_ratio": statistics.median(compiled_ratios),
                        "compiled_range": (min(compiled_ratios), max(compiled_ratios)),
                    }
                rows.append(
                    row
                    | {
                        "section": section,
                        "batch_size": batch_size,
                        "reference": reference,
                        "new_s": statistics.median(new),
                        "old_s": statistics.median(old),
                        "ratio": statistics.median(ratios),
                        "range": (min(ratios), max(ratios)),
                    }
                )
        tables[clock] = rows
    return tables


def print_report(tables: dict[str, list[dict[str, object]]], breakdown: dict[str, dict[str, float]]) -> None:
    titles = {"cpu": "By process CPU time:", "wall": "By wall clock:"}
    for clock, rows in tables.items():
        print(f"\n{titles[clock]}\n")
        _print_rows(rows)
    print("\nPer slot, batch 1 with CFG (ms, medians; depth head and sampling summed over the 4 pixel depths):\n")
    print("| part | new | previous | speed-up |")
    print("|---|---:|---:|---:|")
    for part in breakdown["new"]:
        new, old = breakdown["new"][part], breakdown["old"][part]
        print(f"| {part} | {new:.2f} | {old:.2f} | {old / new:.2f}x |")


def _print_rows(rows: list[dict[str, object]]) -> None:
    compiled = "compiled_s" in rows[0]
    extra = " compiled (s, median) | compiled speed-up | its range |" if compiled else ""
    print(
        "| case | batch | new (s, median) | reference | reference (s, median) | speed-up | range over rounds |" + extra
    )
    print("|---|---:|---:|---|---:|---:|---:|" + ("---:|---:|---:|" if compiled else ""))
    for row in rows:
        low, high = row["range"]
        what = "image, 64 slots, CFG 3" if row["section"] == "image" else f"text, {TEXT_TOKENS} greedy tokens"
        line = (
            f"| {what} | {row['batch_size']} | {row['new_s']:.3f} | {row['reference']} | {row['old_s']:.3f} | "
            f"{row['ratio']:.2f}x | {low:.2f}-{high:.2f}x |"
        )
        if compiled:
            low, high = row["compiled_range"]
            line += f" {row['compiled_s']:.3f} | {row['compiled_ratio']:.2f}x | {low:.2f}-{high:.2f}x |"
        print(line)


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, object]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (see test_bench_mllm.py)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--compile",
        default=None,
        metavar="MODE",
        help="also time the sampler with its steps under torch.compile(mode=MODE), e.g. default",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = _load_average()
    tables = run(args.rounds, args.batch_sizes, device, args.compile)
    breakdown = slot_breakdown(device)
    print(
        f"configs/mllm/tiny.yaml model (random init), device {device}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; load average {load} before, {_load_average()} after; "
        f"{args.rounds} interleaved rounds; speed-up = median of the per-round paired ratios"
        f"{f'; compiled: torch.compile(mode={args.compile!r})' if args.compile else ''}\n"
    )
    print_report(tables, breakdown)
    return tables


def test_sampling_speed() -> None:
    rows = main(["--rounds", "3"])["wall"]
    assert {(row["section"], row["batch_size"]) for row in rows} == {
        ("image", 1),
        ("image", 8),
        ("text", 1),
        ("text", 8),
    }


if __name__ == "__main__":
    main()
