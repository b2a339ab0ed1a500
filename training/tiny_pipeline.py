"""The embedded default end to end: teacher -> tokenizer -> LLM stages -> scores -> report.

    dualtoken tiny-pipeline [--run-dir runs/tiny] [--set-teacher k=v ...] [--set-tokenizer k=v ...]
                            [--t2i-world slots] [--no-decoder] [--set-decoder k=v ...] [--set-llm k=v ...]
                            [--tokenizer-only]

Stage 0 (SigLIP teacher) and stage 1 (DualToken) are followed by stage 1b and the LLM half
(training/tiny_mllm.py: Shapes data, code shards, the four LLM stages, VQA and
checker-judged text-to-image scores); ``report.md`` gathers every number and picture.
Stage 1b fine-tunes the pixel decoder alone, codes frozen, on the world the LLM learns to draw
(``--t2i-world``, slots by default; its config is ``DECODER_CONFIGS[world]`` unless
``--decoder-config`` names another): the codes, and so the LLM half's inputs, do not change, but
the drawings decode sharply (on the slots world the checker passes 92.6 % of its reconstructions
against 60.9 % through stage 1's decoder). ``--no-decoder`` skips it, and the LLM half then
draws through stage 1's decoder.

A finished stage is reused when its output is complete (model, weights and metrics all
present and loadable), so re-running after an interruption continues where it stopped;
an unfinished stage resumes from its last checkpoint. Each stage folder records the settings it
was started with (``pipeline_settings.json``); a re-run that asks for other settings (say
``--set-decoder loop.max_steps=...``) stops with an error naming the difference instead of
reusing, or resuming, a stage trained otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from tokenizer.devices import add_device_argument, resolve_device
from training import train_teacher, train_tokenizer
from training.common import run_or_reuse, setup_logging
from training.data.shapes import DEFAULT_T2I_WORLD, T2I_WORLDS

logger = logging.getLogger(__name__)

DEFAULT_TEACHER_CONFIG = "configs/tokenizer/tiny_teacher.yaml"
DEFAULT_TOKENIZER_CONFIG = "configs/tokenizer/tiny.yaml"
# Stage 1b's config for each world the LLM half can draw (`tiny-mllm --t2i-world`).
DECODER_CONFIGS = {
    "scenes": "configs/tokenizer/tiny_decoder_scenes.yaml",
    "grid": "configs/tokenizer/tiny_decoder_grid.yaml",
    "canonical": "configs/tokenizer/tiny_decoder_canonical.yaml",
    "slots": "configs/tokenizer/tiny_decoder_slots.yaml",
}
DECODER_DIRNAME = "stage1_decoder"
# Stage 1's overrides that stage 1b shares: it loads that tokenizer (same architecture) on the same data.
SHARED_WITH_DECODER = ("tokenizer.", "data.", "teacher_path")


def _stage_done(directory: Path, check) -> bool:
    if not check(directory):
        return False
    try:
        json.loads((directory / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return True


def run(args: argparse.Namespace) -> dict[str, float]:
    run_dir = Path(args.run_dir)
    stage0_dir, stage1_dir = run_dir / "stage0", run_dir / "stage1"
    teacher_dir = stage0_dir / train_teacher.TEACHER_DIRNAME
    timings: dict[str, float] = {}
    started = time.time()
    stage0_argv = ["--config", args.teacher_config, "--set", f"loop.output_dir={stage0_dir}", *_sets(args.set_teacher)]
    run_or_reuse(
        "stage 0",
        stage0_dir,
        stage0_argv,
        run_dir,
        lambda: _stage_done(teacher_dir, train_teacher.teacher_is_complete),
        train_teacher.main,
        f"the finished teacher in {teacher_dir}",
        ["--device", args.device],
    )
    timings["stage0_seconds"] = time.time() - started
    teacher_metrics = json.loads((teacher_dir / "metrics.json").read_text())

    visual_tokenizer_dir = stage1_dir / train_tokenizer.TOKENIZER_DIRNAME
    started = time.time()
    stage1_argv = ["--config", args.tokenizer_config, "--set", f"loop.output_dir={stage1_dir}"]
    stage1_argv += ["--set", f"teacher_path={teacher_dir}", *_sets(args.set_tokenizer)]
    stage1_reused, _ = run_or_reuse(
        "stage 1",
        stage1_dir,
        stage1_argv,
        run_dir,
        lambda: _stage_done(visual_tokenizer_dir, train_tokenizer.tokenizer_is_complete),
        train_tokenizer.main,
        f"the finished tokenizer in {visual_tokenizer_dir}",
        ["--device", args.device],
    )
    timings["stage1_seconds"] = time.time() - started
    metrics = json.loads((visual_tokenizer_dir / "metrics.json").read_text())
    decoder_metrics = None
    if args.decoder:
        visual_tokenizer_dir, decoder_metrics, timings["stage1b_seconds"] = _decoder_stage(
            args, run_dir / DECODER_DIRNAME, visual_tokenizer_dir, teacher_dir, stage1_reused
        )
    report = write_report(run_dir, teacher_metrics, metrics, timings, stage1_dir, decoder_metrics, args.t2i_world)
    print(report)
    summary = {**metrics, **{f"decoder_{key}": value for key, value in (decoder_metrics or {}).items()}}
    if args.tokenizer_only:
        return summary
    from training import tiny_mllm

    llm_argv = ["--tokenizer", str(visual_tokenizer_dir), "--run-dir", str(run_dir), "--t2i-world", args.t2i_world]
    llm_argv += ["--device", args.device]
    llm_argv += _sets(args.set_llm)
    llm_argv += [item for value in args.llm_option for item in value.split("=", 1)]
    llm_metrics = tiny_mllm.main(llm_argv)
    combined = report + "\n" + (run_dir / "mllm_report.md").read_text()
    model_dir = run_dir / "mllm" / "joint" / "model"
    combined += (
        "\n## Use it\n\n"
        f"    dualtoken chat --model {model_dir}\n"
        f'    dualtoken generate "a large red circle" -o red.png --model {model_dir} --cfg 1 --temperature 0.5 --seed 0\n'
        f"    dualtoken eval --model {model_dir} --tasks shapes_vqa geneval geneval_compositional "
        f"--out {run_dir / 'eval'}\n"
    )
    (run_dir / "report.md").write_text(combined)
    print(f"report: {run_dir / 'report.md'}\nchat with it:  dualtoken chat --model {model_dir}")
    return {**summary, **{f"llm_{key}": value for key, value in llm_metrics.items()}}


def _decoder_stage(
    args: argparse.Namespace,
    output_dir: Path,
    stage1_visual_tokenizer_dir: Path,
    teacher_dir: Path,
    stage1_reused: bool,
) -> tuple[Path, dict, float]:
    """Stage 1b: the decoder of the stage-1 tokenizer fine-tuned alone; returns its tokenizer, metrics, seconds."""
    visual_tokenizer_dir = output_dir / train_tokenizer.TOKENIZER_DIRNAME
    started = time.time()
    if not stage1_reused and output_dir.exists():
        # Stage 1 was trained again, so a decoder (or checkpoint) tuned on the old codes is stale.
        logger.info("stage 1b: removing %s, which fine-tuned the previous stage-1 tokenizer", output_dir)
        shutil.rmtree(output_dir)
    argv = ["--config", args.decoder_config, "--set", f"loop.output_dir={output_dir}"]
    argv += ["--set", f"init_tokenizer={stage1_visual_tokenizer_dir}", "--set", f"teacher_path={teacher_dir}"]
    argv += _sets([value for value in args.set_tokenizer if value.startswith(SHARED_WITH_DECODER)])
    argv += _sets(args.set_decoder)
    run_or_reuse(
        "stage 1b",
        output_dir,
        argv,
        output_dir.parent,
        lambda: _stage_done(visual_tokenizer_dir, train_tokenizer.tokenizer_is_complete),
        train_tokenizer.main,
        f"the fine-tuned decoder in {visual_tokenizer_dir}",
        ["--device", args.device],
    )
    return visual_tokenizer_dir, json.loads((visual_tokenizer_dir / "metrics.json").read_text()), time.time() - started


def _sets(values: list[str]) -> list[str]:
    return [item for value in values for item in ("--set", value)]


def write_report(
    run_dir: Path,
    teacher: dict,
    metrics: dict,
    timings: dict,
    stage1_dir: Path,
    decoder: dict | None = None,
    t2i_world: str = DEFAULT_T2I_WORLD,
) -> str:
    """The tokenizer half's report: stage 1's metrics (the default world's held-out images), then
    stage 1b's on the world the LLM draws (``decoder``, when it ran)."""
    rows = [
        ("reconstruction PSNR (dB), held-out test images", f"{metrics['test_psnr']:.2f}"),
        ("reconstruction SSIM, held-out test images", f"{metrics['test_ssim']:.3f}"),
        (
            "zero-shot accuracy, quantised semantic path (test)",
            f"{100 * metrics.get('test_zero_shot', float('nan')):.1f} %",
        ),
        ("zero-shot accuracy, teacher (test)", f"{100 * metrics.get('test_teacher_zero_shot', float('nan')):.1f} %"),
        (
            "pixel codebook usage (min over depths)",
            f"{100 * metrics['test_pixel_usage']:.1f} % ({100 * metrics['test_pixel_min_depth_usage']:.1f} %)",
        ),
        (
            "semantic codebook usage (min over depths)",
            f"{100 * metrics['test_semantic_usage']:.1f} % ({100 * metrics['test_semantic_min_depth_usage']:.1f} %)",
        ),
        (
            "checker on reconstructions (test)",
            f"{100 * metrics.get('test_checker_on_reconstructions', float('nan')):.1f} %",
        ),
    ]
    if decoder is not None:
        rows += [
            (
                f"stage 1b, the decoder fine-tuned on the {t2i_world} world the LLM draws: PSNR (dB) / SSIM (test)",
                f"{decoder['test_psnr']:.2f} / {decoder['test_ssim']:.3f}",
            ),
            (
                "stage 1b: checker on reconstructions (the text-to-image ceiling, test)",
                f"{100 * decoder.get('test_checker_on_reconstructions', float('nan')):.1f} %",
            ),
        ]
    rows += [
        (
            "stage 0 wall time (s)",
            f"{timings['stage0_seconds']:.0f} (teacher trained in {teacher.get('train_seconds', 0):.0f})",
        ),
        (
            "stage 1 wall time (s)",
            f"{timings['stage1_seconds']:.0f} (training loop {metrics.get('train_seconds', 0):.0f})",
        ),
    ]
    if decoder is not None and "stage1b_seconds" in timings:
        rows.append(
            (
                "stage 1b (decoder fine-tuning) wall time (s)",
                f"{timings['stage1b_seconds']:.0f} (training loop {decoder.get('train_seconds', 0):.0f})",
            )
        )
    lines = ["# DualToken tiny run", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    folders = [("", stage1_dir)]
    if decoder is not None:
        folders.append((f", stage 1b on the {t2i_world} world", run_dir / DECODER_DIRNAME))
    for title, folder in folders:
        grids = sorted((folder / "reconstructions").glob("test_step_*.png"))
        if grids:
            lines += ["", f"Reconstructions{title} (top: original, bottom: decoded from pixel codes): `{grids[-1]}`"]
    text = "\n".join(lines) + "\n"
    (run_dir / "report.md").write_text(text)
    summary = {"teacher": teacher, "tokenizer": metrics, **timings}
    if decoder is not None:
        summary["decoder"] = {"t2i_world": t2i_world, **decoder}
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    return text


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="dualtoken tiny-pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/tiny")
    parser.add_argument("--teacher-config", default=DEFAULT_TEACHER_CONFIG)
    parser.add_argument("--tokenizer-config", default=DEFAULT_TOKENIZER_CONFIG)
    parser.add_argument("--set-teacher", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--set-tokenizer", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--set-llm", action="append", default=[], metavar="KEY=VALUE", help="override for every LLM stage"
    )
    parser.add_argument(
        "--t2i-world",
        choices=T2I_WORLDS,
        default=DEFAULT_T2I_WORLD,
        help="the world the LLM learns to draw (`dualtoken tiny-mllm --t2i-world`) and stage 1b fine-tunes its decoder on",
    )
    parser.add_argument(
        "--decoder",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stage 1b (on by default): the pixel decoder alone fine-tuned on the --t2i-world world, codes frozen; "
        "the LLM half then draws through it (--no-decoder: through stage 1's decoder)",
    )
    parser.add_argument(
        "--decoder-config", default=None, help="stage 1b's config (default: DECODER_CONFIGS[--t2i-world])"
    )
    parser.add_argument("--set-decoder", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tokenizer-only", action="store_true", help="stop after the tokenizer (stage 0, 1 and 1b)")
    add_device_argument(parser)
    parser.add_argument(
        "--llm-option",
        action="append",
        default=[],
        metavar="--NAME=VALUE",
        help="an option of `dualtoken tiny-mllm`, e.g. --llm-option=--train-images=5000",
    )
    args = parser.parse_args(argv)
    if not args.decoder and (args.set_decoder or args.decoder_config):
        parser.error("--set-decoder / --decoder-config configure stage 1b, which --no-decoder skips")
    if any(value.split("=", 1)[0] == "--t2i-world" for value in args.llm_option):
        parser.error("--llm-option=--t2i-world: use tiny-pipeline's own --t2i-world, which stage 1b follows too")
    args.decoder_config = args.decoder_config or DECODER_CONFIGS[args.t2i_world]
    if any(value.split("=", 1)[0] == "--device" for value in args.llm_option):
        parser.error("--llm-option=--device: use tiny-pipeline's own --device, which every stage follows")
    resolve_device(args.device)  # a device this machine lacks fails before stage 0
    setup_logging()
    return run(args)


if __name__ == "__main__":
    main()
