"""The LLM half of the embedded default: data -> code shards -> four stages -> Shapes scores.

    dualtoken tiny-mllm --tokenizer runs/tiny/stage1/tokenizer --run-dir runs/tiny

1. writes the Shapes world's train / val splits as LLaVA conversations + text-image pairs, and
   text-image pairs from a narrower world that the stages train on instead (``--t2i-world``:
   ``slots`` by default, every object at a fixed place; ``grid`` or ``canonical``; ``scenes``
   trains on the world's own pairs and writes no others);
2. tokenises their images once into code shards (the LLM never runs the ViT);
3. runs the stages of ``configs/stages/tiny/`` (align, understand, generate, joint), each
   from the previous stage's model;
4. scores the final model on held-out test scenes through :class:`mllm.inference.Pipeline`:
   VQA per question type next to the majority baseline, and text-to-image judged by the
   independent checker (:mod:`training.data.shapes.judge`); writes ``mllm_report.md``, ``mllm_metrics.json``
   and pictures (generated images with the checker's verdict, VQA samples).

Finished steps are reused when their outputs are complete; an unfinished stage resumes
from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from mllm.model_folder import model_folder_is_complete
from tokenizer.devices import add_device_argument, resolve_device
from tokenizer.files import write_text_atomic
from training import train_mllm
from training.common import run_or_reuse, setup_logging
from training.data.conversations import t2i_pairs_file
from training.data.shapes import (  # noqa: F401  (re-exported: the pipeline's names for the drawing worlds)
    CANONICAL_GREY,
    DEFAULT_T2I_WORLD,
    T2I_WORLDS,
    canonical_world_config,
    grid_world_config,
    slots_world_config,
    t2i_world_config,
)

logger = logging.getLogger(__name__)

STAGES = ("align", "understand", "generate", "joint")
EVAL_DIRNAME = "mllm_eval"
BY_FORM_FILE = "vqa_by_form.json"  # VQA accuracy per question form (eval.shapes_scoring.vqa_by_form)
STAGE_CONFIG = "configs/stages/tiny/{stage}.yaml"


def _pairs_ready(path: Path, count: int) -> bool:
    """Whether ``path`` holds ``count`` text-to-image pairs that carry their objects' boxes."""
    try:
        lines = path.read_text().splitlines()
        return len(lines) == count and (not count or "boxes" in json.loads(lines[0]))
    except (OSError, json.JSONDecodeError, TypeError):
        return False


def _data_ready(folder: Path, count: int) -> bool:
    from training.data.conversations import LLAVA_FILE_NAME, T2I_FILE_NAME

    llava = folder / LLAVA_FILE_NAME
    if not (llava.is_file() and _pairs_ready(folder / T2I_FILE_NAME, count)):
        return False
    try:
        records = json.loads(llava.read_text())
        # Data written before answers and pairs carried their objects' boxes is written again.
        return len(records) == count and (not count or any("boxes" in turn for turn in records[0]["conversations"]))
    except (OSError, json.JSONDecodeError, KeyError, IndexError, TypeError):
        return False


def prepare_data(
    visual_tokenizer_dir: Path,
    data_dir: Path,
    counts: dict[str, int],
    seed: int = 0,
    t2i_world: str = "scenes",
    device: str | torch.device | None = "cpu",
) -> dict[str, Path]:
    """Shapes splits + their code shards under ``data_dir/<split>`` (reused when complete).

    With ``t2i_world="grid"`` (or ``"canonical"``) each split also gets as many text-to-image
    pairs from :func:`t2i_world_config` (``t2i_grid.jsonl``, images under ``images/<split>_grid``;
    likewise ``_canonical``), coded into the same code store, so that one store serves both the
    conversations and those pairs. The images are coded on ``device``.
    """
    from tokenizer.model import DualTokenizer
    from training.data.code_shards import CodeShardsError, collect_image_paths, tokenize_to_shards
    from training.data.code_store import CodeStore
    from training.data.conversations import LLAVA_FILE_NAME, T2I_FILE_NAME, write_shapes, write_world_pairs
    from training.data.shapes import ShapesWorld, ShapesWorldConfig

    if t2i_world not in T2I_WORLDS:
        raise ValueError(f"t2i_world={t2i_world!r}; expected one of {list(T2I_WORLDS)}")
    visual_tokenizer = DualTokenizer.from_pretrained(visual_tokenizer_dir, device=device)
    image_size = visual_tokenizer.backbone.image_size
    world = ShapesWorld(ShapesWorldConfig(seed=seed, image_size=image_size))
    pairs_config = t2i_world_config(t2i_world, seed, image_size, visual_tokenizer.backbone.grid_size)
    pairs_world = ShapesWorld(pairs_config) if pairs_config is not None else None
    for split, count in counts.items():
        folder = data_dir / split
        if _data_ready(folder, count):
            logger.info("data: reusing %s", folder)
        else:
            write_shapes(world, split, folder, count, progress=True)
        pair_files = [folder / T2I_FILE_NAME]
        if pairs_world is not None:
            name = t2i_pairs_file(t2i_world)
            pair_files.append(folder / name)
            if _pairs_ready(pair_files[-1], count):
                logger.info("data: reusing %s", pair_files[-1])
            else:
                write_world_pairs(pairs_world, t2i_world, split, folder, count)
        codes = folder / "codes"
        keys, root = collect_image_paths([folder / LLAVA_FILE_NAME], pair_files)
        try:
            store = CodeStore(codes)
            missing = sum(key not in store for key in keys)
            if missing:
                raise CodeShardsError(f"{missing} of {len(keys)} images have no codes")
            logger.info("codes: reusing %s", codes)
        except (FileNotFoundError, CodeShardsError) as reason:
            if codes.exists():
                logger.info("codes: writing %s again (%s)", codes, reason)
            tokenize_to_shards(
                visual_tokenizer, keys, root, codes, visual_tokenizer_path=str(visual_tokenizer_dir), overwrite=True
            )
    return {split: data_dir / split for split in counts}


def data_overrides(data: dict[str, Path], t2i_world: str = "scenes") -> list[str]:
    train, val = data["train"], data["val"]
    pairs = t2i_pairs_file(t2i_world)
    return [
        f"data.codes={train / 'codes'}",
        f"data.val_codes={val / 'codes'}",
        f"data.conversations=[{train / 'llava.json'}]",
        f"data.text_image=[{train / pairs}]",
        f"data.val_conversations=[{val / 'llava.json'}]",
        f"data.val_text_image=[{val / pairs}]",
    ]


def run_stages(
    run_dir: Path,
    data: dict[str, Path],
    overrides: dict[str, list[str]],
    t2i_world: str = "scenes",
    device: str = "auto",
) -> tuple[Path, dict]:
    """The four stages in order, on ``device``; returns the last model folder and per-stage metrics."""
    previous: Path | None = None
    metrics: dict[str, Any] = {}
    for stage in STAGES:
        out = run_dir / "mllm" / stage
        model_dir = out / train_mllm.MODEL_DIRNAME
        argv = ["--config", STAGE_CONFIG.format(stage=stage)]
        sets = [f"stage.init={previous if previous else 'null'}", f"loop.output_dir={out}"]
        sets += data_overrides(data, t2i_world) + overrides.get("all", []) + overrides.get(stage, [])
        for value in sets:
            argv += ["--set", value]
        # A stage folder started with other settings is neither reused nor resumed (clear error).
        reused, trained = run_or_reuse(
            f"LLM stage {stage}",
            out,
            argv,
            run_dir,
            lambda model_dir=model_dir: model_folder_is_complete(model_dir),
            train_mllm.main,
            str(model_dir),
            ["--device", str(device)],
        )
        metrics[stage] = json.loads((model_dir / "metrics.json").read_text()) if reused else trained
        previous = model_dir
    return previous, metrics


def evaluate(
    model_dir: Path,
    out_dir: Path,
    vqa_scenes: int,
    t2i_prompts: int,
    cfg: float,
    seed: int,
    temperature: float = 1.0,
    decode_depths: int | None = None,
    device: str | torch.device | None = "auto",
) -> dict:
    from eval.report import save_labelled_grid
    from eval.shapes_scoring import shapes_t2i, shapes_vqa
    from mllm.inference import Pipeline, write_sampling
    from training.data.shapes import ShapesWorld, ShapesWorldConfig

    # The model draws with the settings it is scored with: `dualtoken generate` / `chat` and
    # Pipeline.generate read them from the folder when not told otherwise.
    write_sampling(model_dir, cfg=float(cfg), temperature=float(temperature))
    pipe = Pipeline.from_pretrained(model_dir, device=device)
    world = ShapesWorld(ShapesWorldConfig(image_size=pipe.visual_tokenizer.backbone.image_size))
    started = time.time()
    vqa = shapes_vqa(pipe, world, "test", vqa_scenes)
    vqa_seconds = time.time() - started
    started = time.time()
    t2i = shapes_t2i(
        pipe,
        world,
        "test",
        t2i_prompts,
        t2i_prompts,
        cfg=cfg,
        temperature=temperature,
        seed=seed,
        decode_depths=decode_depths,
    )
    t2i_seconds = time.time() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [
        f"{'OK' if verdict.correct else 'X'} {item.prompt[:28]}"
        for item, verdict in zip(t2i["items"], t2i["verdicts"], strict=True)
    ]
    save_labelled_grid(t2i["images"][:32], labels[:32], out_dir / "t2i_samples.png")
    vqa_labels = [
        f"{item.question[:30]} -> {pred}" for item, pred in zip(vqa["items"][:16], vqa["predictions"][:16], strict=True)
    ]
    save_labelled_grid([item.image for item in vqa["items"][:16]], vqa_labels, out_dir / "vqa_samples.png", columns=4)
    write_text_atomic(out_dir / BY_FORM_FILE, json.dumps(vqa["by_form"], indent=2))
    metrics = {**vqa["metrics"], **t2i["metrics"], "vqa_seconds": vqa_seconds, "t2i_seconds": t2i_seconds}
    metrics["t2i_prompts"] = float(len(t2i["items"]))
    metrics["t2i_cfg"], metrics["t2i_temperature"] = float(cfg), float(temperature)
    if decode_depths is not None:
        metrics["t2i_decode_depths"] = float(decode_depths)
    metrics["vqa_questions"] = float(len(vqa["items"]))
    return metrics


def write_report(run_dir: Path, metrics: dict, stage_metrics: dict, timings: dict) -> str:
    from training.data.shapes import QUESTION_KINDS

    lines = ["# DualToken tiny unified model", "", "## VQA on held-out test scenes", ""]
    lines += ["| question type | accuracy | majority baseline | questions |", "|---|---|---|---|"]
    for kind in QUESTION_KINDS:
        if f"vqa_{kind}" in metrics:
            lines.append(
                f"| {kind} | {100 * metrics[f'vqa_{kind}']:.1f} % | {100 * metrics[f'vqa_{kind}_baseline']:.1f} % "
                f"| {metrics[f'vqa_{kind}_n']:.0f} |"
            )
    lines.append(f"| **mean** | **{100 * metrics['vqa_mean']:.1f} %** | {100 * metrics['vqa_mean_baseline']:.1f} % | |")
    by_form_path = run_dir / EVAL_DIRNAME / BY_FORM_FILE
    if by_form_path.is_file():
        rows = json.loads(by_form_path.read_text())
        floor = min(20, max((row["questions"] for row in rows), default=0))  # a small evaluation lists all
        rows = [row for row in rows if row["questions"] >= floor]
        lines += ["", f"By question form (X = a colour, shape or size; forms asked {floor}+ times):", ""]
        lines += ["| form | questions | accuracy | most common answer given | most common true answer |"]
        lines += ["|---|---|---|---|---|"]
        lines += [
            f"| {row['form']} | {row['questions']} | {100 * row['accuracy']:.1f} % "
            f"| {row['top_prediction']} ({100 * row['top_prediction_share']:.0f} %) "
            f"| {row['top_answer']} ({100 * row['top_answer_share']:.0f} %) |"
            for row in rows
        ]
    lines += ["", "## Text-to-image, judged by the independent checker", ""]
    if "t2i_cfg" in metrics:
        depths = (
            f", first {metrics['t2i_decode_depths']:g} RVQ depth(s) drawn" if "t2i_decode_depths" in metrics else ""
        )
        lines += [f"CFG {metrics['t2i_cfg']:g}, temperature {metrics['t2i_temperature']:g}{depths}.", ""]
    lines += ["| prompts | fully correct (colour + shape + count) |", "|---|---|"]
    for name, label in (("single", "one object"), ("two", "two objects"), ("all", "all")):
        if f"t2i_{name}" in metrics:
            lines.append(f"| {label} | {100 * metrics[f't2i_{name}']:.1f} % |")
    if "t2i_two_relation_given_correct" in metrics:
        lines.append(
            f"| two objects: relation also right (of the correct ones) | "
            f"{100 * metrics['t2i_two_relation_given_correct']:.1f} % |"
        )
    partial = (
        ("object_recall", "named objects found (colour + shape; extras allowed)"),
        ("colour_recall", "named objects whose colour was drawn"),
        ("colour_precision", "drawn objects' area in a named colour"),
        ("count_ok", "images with the named number of objects"),
    )
    lines += [
        f"| {label} | {100 * metrics[f't2i_{name}']:.1f} % |" for name, label in partial if f"t2i_{name}" in metrics
    ]
    lines += ["", "Chance for a single object: 1/18 = 5.6 %.", "", "## Time", ""]
    lines += ["| step | seconds |", "|---|---|"]
    lines += [f"| {name} | {value:.0f} |" for name, value in timings.items()]
    lines += [
        "",
        f"Pictures: `{EVAL_DIRNAME}/t2i_samples.png` (OK = checker confirms), `{EVAL_DIRNAME}/vqa_samples.png`.",
    ]
    text = "\n".join(lines) + "\n"
    (run_dir / "mllm_report.md").write_text(text)
    payload = {"eval": metrics, "stages": stage_metrics, "timings": timings}
    (run_dir / "mllm_metrics.json").write_text(json.dumps(payload, indent=2))
    return text


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="dualtoken tiny-mllm", description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="a trained DualToken tokenizer folder")
    parser.add_argument("--run-dir", default="runs/tiny")
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--val-images", type=int, default=512)
    parser.add_argument("--vqa-scenes", type=int, default=200, help="test scenes (all their questions)")
    parser.add_argument("--t2i-prompts", type=int, default=64, help="one-object and two-object prompts each")
    # The default model trains on slots pairs with noisy image inputs; guidance then adds blobs
    # where no slot ever holds an object, and it draws best unguided at a low temperature (README).
    parser.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance of the text-to-image score")
    parser.add_argument("--temperature", type=float, default=0.5, help="sampling temperature of the same")
    parser.add_argument(
        "--decode-depths", type=int, default=None, help="draw only the first RVQ depths of the codes (default: all)"
    )
    parser.add_argument(
        "--t2i-world",
        choices=T2I_WORLDS,
        default=DEFAULT_T2I_WORLD,
        help="text-to-image training pairs: 'slots' (default): the canonical world with each object at a fixed "
        "slot (centre; left and right); 'scenes': the world's own scenes; 'grid': at most two objects on a plain "
        "background, placed on the code grid; 'canonical': the grid world without jitter or noise, on one grey "
        "(written beside them, one code store)",
    )
    parser.add_argument("--seed", type=int, default=0)
    add_device_argument(parser)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override for every stage"
    )
    for stage in STAGES:
        parser.add_argument(f"--set-{stage}", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.decode_depths is not None:  # checked now, not after the stages have trained
        from tokenizer.model import DualTokenizer

        depth = DualTokenizer.read_config(args.tokenizer).pixel_depth
        if not 1 <= args.decode_depths <= depth:
            parser.error(f"--decode-depths={args.decode_depths}; expected 1..{depth} (the tokenizer's pixel depth)")
    device = resolve_device(args.device)  # a device this machine lacks fails before the data is written
    setup_logging()
    run_dir = Path(args.run_dir)
    timings: dict[str, float] = {}
    started = time.time()
    counts = {"train": args.train_images, "val": args.val_images}
    data = prepare_data(Path(args.tokenizer), run_dir / "data", counts, t2i_world=args.t2i_world, device=device)
    timings["data_and_codes"] = time.time() - started
    started = time.time()
    overrides = {"all": args.overrides, **{stage: getattr(args, f"set_{stage}") for stage in STAGES}}
    model_dir, stage_metrics = run_stages(run_dir, data, overrides, args.t2i_world, str(device))
    timings["llm_stages"] = time.time() - started
    for stage in STAGES:
        timings[f"stage_{stage}_train"] = stage_metrics[stage].get("train_seconds", 0.0)
    started = time.time()
    torch.manual_seed(args.seed)
    metrics = evaluate(
        model_dir,
        run_dir / EVAL_DIRNAME,
        args.vqa_scenes,
        args.t2i_prompts,
        args.cfg,
        args.seed,
        args.temperature,
        args.decode_depths,
        device,
    )
    timings["evaluation"] = time.time() - started
    print(write_report(run_dir, metrics, stage_metrics, timings))
    return metrics


if __name__ == "__main__":
    main()
