"""``dualtoken eval``: one command, a registry of tasks, cached predictions, versioned settings.

    dualtoken eval --model runs/tiny/mllm/joint/model --tasks shapes_vqa geneval --out runs/tiny/eval

- Every task is a class registered under a name (:func:`eval.task.register`); all tasks share one
  model loader (:class:`EvalContext` loads the :class:`~mllm.inference.Pipeline` once).
- Settings (seeds, sampling, splits, sizes) come from a versioned YAML in ``configs/eval/``,
  copied into the results, so a score can be rerun exactly.
- Predictions are appended to ``<out>/predictions/<task>.jsonl`` as they are made (one line
  per item, flushed); an interrupted run resumes after the last written line. A task's
  items are independent of the batch size (per-item seeds), so batch 1 and batch 8 give the
  same results.
- Results: ``<out>/results.json`` and ``<out>/results.md``, written through a temporary file
  and renamed, so a partial run never leaves a results file that looks complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from eval import tasks as _builtin_tasks  # noqa: F401  (registers the built-in tasks)
from eval.task import TASKS, EvalContext, Task
from tokenizer.config import ConfigError
from tokenizer.files import write_text_atomic
from training.config import read_yaml

logger = logging.getLogger(__name__)

SETTINGS_VERSION = 1
DEFAULT_SETTINGS = "configs/eval/shapes.yaml"


# ---------------------------------------------------------------------------------- cache
def _read_cache(path: Path) -> dict[str, dict[str, Any]]:
    """Predictions already made; a torn last line (killed mid-write) is dropped."""
    cached: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return cached
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        cached[record["key"]] = record["prediction"]
    return cached


def run_task(task: Task, batch_size: int, cache_path: Path) -> dict[str, float]:
    items = task.items()
    keys = [item["key"] for item in items]
    if len(set(keys)) != len(keys):
        raise ValueError(f"task {task.name} produced duplicate item keys")
    cached = _read_cache(cache_path)
    todo = [item for item in items if item["key"] not in cached]
    if cached:
        logger.info("%s: %d of %d predictions cached in %s", task.name, len(items) - len(todo), len(items), cache_path)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    # Rewrite the cache without a torn line before appending.
    with open(cache_path, "w") as handle:
        for item in items:
            if item["key"] in cached:
                handle.write(json.dumps({"key": item["key"], "prediction": cached[item["key"]]}) + "\n")
    with open(cache_path, "a") as handle, tqdm(total=len(todo), desc=task.name, unit="item") as progress:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            predictions = task.predict(batch)
            for item, prediction in zip(batch, predictions, strict=True):
                cached[item["key"]] = prediction
                handle.write(json.dumps({"key": item["key"], "prediction": prediction}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            progress.update(len(batch))
    return task.score(items, [cached[key] for key in keys])


# ---------------------------------------------------------------------------------- run
def load_settings(path: str | Path) -> dict[str, Any]:
    settings = read_yaml(path)
    version = settings.get("version")
    if version != SETTINGS_VERSION:
        raise ConfigError(f"{path}: settings version {version!r}; this harness reads version {SETTINGS_VERSION}")
    return settings


def results_markdown(results: dict[str, dict[str, float]]) -> str:
    lines = ["| task | metric | value |", "|---|---|---|"]
    for task, metrics in results.items():
        for metric, value in metrics.items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"| {task} | {metric} | {shown} |")
    return "\n".join(lines) + "\n"


def evaluate(
    tasks: list[str],
    out_dir: Path,
    model_dir: Path | None = None,
    settings_path: str | Path = DEFAULT_SETTINGS,
    batch_size: int | None = None,
    visual_tokenizer_path: str | None = None,
) -> dict[str, dict[str, float]]:
    unknown = [name for name in tasks if name not in TASKS]
    if unknown:
        raise ConfigError(f"unknown task {unknown[0]!r}; known tasks: {', '.join(sorted(TASKS))}")
    settings = load_settings(settings_path)
    if model_dir is not None:
        for name in ("config.json", "model.safetensors"):
            if not (Path(model_dir) / name).is_file():
                raise FileNotFoundError(f"model folder {model_dir} is missing {name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    context = EvalContext(Path(model_dir) if model_dir else None, settings, out_dir, visual_tokenizer_path)
    size = batch_size or int(settings.get("batch_size", 8))
    results: dict[str, dict[str, float]] = {}
    for name in tasks:
        task = TASKS[name](context, dict(settings.get(name) or {}))
        results[name] = run_task(task, size, out_dir / "predictions" / f"{name}.jsonl")
        logger.info("%s: %s", name, results[name])
    payload = {"results": results, "settings": settings, "settings_file": str(settings_path), "model": str(model_dir)}
    write_text_atomic(out_dir / "results.json", json.dumps(payload, indent=2))
    write_text_atomic(out_dir / "results.md", results_markdown(results))
    return results


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    from training.common import setup_logging

    parser = argparse.ArgumentParser(prog="dualtoken eval", description="Score a model on registered tasks.")
    parser.add_argument("--model", default=None, help="a unified-model folder (train-mllm's <output_dir>/model)")
    parser.add_argument("--tokenizer", default=None, help="DualToken tokenizer folder (tokenizer-only tasks)")
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="versioned settings YAML (configs/eval/)")
    parser.add_argument("--out", required=True, help="results folder (predictions are cached here)")
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args(argv)
    setup_logging()
    results = evaluate(
        args.tasks,
        Path(args.out),
        Path(args.model) if args.model else None,
        args.settings,
        args.batch_size,
        args.tokenizer,
    )
    print(results_markdown(results))
    return results


if __name__ == "__main__":
    main()
