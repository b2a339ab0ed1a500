"""``dualtoken eval``: one command, a registry of tasks, cached predictions, versioned settings.

    dualtoken eval --model runs/tiny/mllm/joint/model --tasks shapes_vqa geneval --out runs/tiny/eval
    dualtoken eval --compare runs/a/eval runs/b/eval

- Every task is a class registered under a name (:func:`eval.task.register`); all tasks share one
  model loader (:class:`EvalContext` loads the :class:`~mllm.inference.Pipeline` once, on
  ``--device``).
- Settings (seeds, sampling, splits, sizes, data files) come from a versioned YAML in
  ``configs/eval/``, copied into the results, so a score can be rerun exactly.
- Predictions are appended to ``<out>/predictions/<task>.jsonl`` as they are made (one line
  per item, flushed) under a cache key of everything they depend on (:mod:`eval.cache`); an
  interrupted run resumes after the last written line, a changed model or setting starts over.
  A task's items are independent of the batch size (per-item seeds), so batch 1 and batch 8
  give the same results.
- Results: ``<out>/results.json`` (metrics, per-task run records with the model fingerprint,
  settings and dataset revision, per-item answers) and ``<out>/results.md``, written through a
  temporary file and renamed, so a partial run never leaves a results file that looks complete.
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
from eval.cache import cache_key, header_line, read_cache
from eval.compare import compare_results
from eval.task import TASKS, EvalContext, Task
from tokenizer.config import ConfigError
from tokenizer.devices import add_device_argument, resolve_device
from tokenizer.files import write_text_atomic
from training.config import read_yaml

logger = logging.getLogger(__name__)

SETTINGS_VERSION = 1
DEFAULT_SETTINGS = "configs/eval/shapes.yaml"


# ---------------------------------------------------------------------------------- cache
def run_task(task: Task, batch_size: int, cache_path: Path) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Scores and per-item predictions; predictions cached under the task's :func:`eval.cache.cache_key`."""
    items = task.items()
    keys = [item["key"] for item in items]
    if len(set(keys)) != len(keys):
        raise ValueError(f"task {task.name} produced duplicate item keys")
    identity = task.identity()
    key = cache_key(identity)
    cached = read_cache(cache_path, key)
    todo = [item for item in items if item["key"] not in cached]
    if cached:
        logger.info("%s: %d of %d predictions cached in %s", task.name, len(items) - len(todo), len(items), cache_path)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    # Rewrite the cache without a torn line before appending.
    with open(cache_path, "w") as handle:
        handle.write(header_line(key, identity))
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
    predictions = [cached[key] for key in keys]
    per_item = [
        {"key": key, **{name: value for name, value in prediction.items() if name not in _BULKY_FIELDS}}
        for key, prediction in zip(keys, predictions, strict=True)
    ]
    return task.score(items, predictions), per_item


# Feature vectors kept in the cache for FID but left out of the per-item answers in results.json.
_BULKY_FIELDS = frozenset({"features", "ref_features"})


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
            shown = _shown(value)
            lines.append(f"| {task} | {metric} | {shown} |")
    return "\n".join(lines) + "\n"


def _shown(value: Any) -> str:
    """Counts as integers ("120", not "120.0000"), other scores to four decimals."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}"


def runs_markdown(runs: dict[str, dict[str, Any]]) -> str:
    """Per task: the model fingerprint, the cache key, preprocessing and the prompt template."""
    lines = ["| task | model | tokenizer | cache key | preprocessing | prompt |", "|---|---|---|---|---|---|"]
    for task, run in runs.items():
        fingerprint = run.get("fingerprint", {})
        model = (fingerprint.get("model") or "-")[:12]
        tokenizer = (fingerprint.get("tokenizer") or "-")[:12]
        preprocessing = ", ".join(f"{k}={v}" for k, v in run.get("preprocessing", {}).items()) or "-"
        prompt = (run.get("prompt_template") or "-").replace("\n", "\\n").replace("|", "\\|")
        lines.append(f"| {task} | {model} | {tokenizer} | {run.get('cache_key')} | {preprocessing} | {prompt} |")
    return "\n".join(lines) + "\n"


def evaluate(
    tasks: list[str],
    out_dir: Path,
    model_dir: Path | None = None,
    settings_path: str | Path = DEFAULT_SETTINGS,
    batch_size: int | None = None,
    visual_tokenizer_path: str | None = None,
    device: str = "cpu",
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
    context = EvalContext(Path(model_dir) if model_dir else None, settings, out_dir, visual_tokenizer_path, device)
    size = batch_size or int(settings.get("batch_size", 8))
    results: dict[str, dict[str, float]] = {}
    runs: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[dict[str, Any]]] = {}
    for name in tasks:
        task = TASKS[name](context, dict(settings.get(name) or {}))
        results[name], answers[name] = run_task(task, size, out_dir / "predictions" / f"{name}.jsonl")
        identity = task.identity()
        runs[name] = {**identity, "cache_key": cache_key(identity), "dataset": task.dataset_revision()}
        logger.info("%s: %s", name, results[name])
    payload = {
        "results": results,
        "runs": runs,
        "settings": settings,
        "settings_file": str(settings_path),
        "model": str(model_dir),
        "tokenizer": visual_tokenizer_path,
        "answers": answers,
    }
    write_text_atomic(out_dir / "results.json", json.dumps(payload, indent=2))
    write_text_atomic(out_dir / "results.md", results_markdown(results) + "\n" + runs_markdown(runs))
    return results


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    from training.common import setup_logging

    parser = argparse.ArgumentParser(prog="dualtoken eval", description="Score a model on registered tasks.")
    parser.add_argument("--model", default=None, help="a unified-model folder (train-mllm's <output_dir>/model)")
    parser.add_argument("--tokenizer", default=None, help="DualToken tokenizer folder (tokenizer-only tasks)")
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="versioned settings YAML (configs/eval/)")
    parser.add_argument("--out", default=None, help="results folder (predictions are cached here)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        default=None,
        help="print a table of two runs' results (folders or results.json)",
    )
    add_device_argument(parser)
    args = parser.parse_args(argv)
    setup_logging()
    if args.compare:
        table = compare_results(Path(args.compare[0]), Path(args.compare[1]))
        print(table)
        return {}
    missing = [flag for flag, value in (("--tasks", args.tasks), ("--out", args.out)) if not value]
    if missing:
        parser.error(f"{' and '.join(missing)} required (or --compare A B)")
    results = evaluate(
        args.tasks,
        Path(args.out),
        Path(args.model) if args.model else None,
        args.settings,
        args.batch_size,
        args.tokenizer,
        str(resolve_device(args.device)),
    )
    print(results_markdown(results))
    return results


if __name__ == "__main__":
    main()
