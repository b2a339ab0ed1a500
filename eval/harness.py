"""``dualtoken eval``: one command, a registry of tasks, cached predictions, versioned settings.

    dualtoken eval --model runs/tiny/mllm/joint/model --tasks shapes_vqa geneval --out runs/tiny/eval

- Every task is a class registered under a name (:func:`register`); all tasks share one
  model loader (:class:`EvalContext` loads the :class:`~mllm.pipeline.Pipeline` once).
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
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from tqdm import tqdm

from tokenizer.config import ConfigError
from training.common import write_text_atomic
from training.config import read_yaml

logger = logging.getLogger(__name__)

SETTINGS_VERSION = 1
DEFAULT_SETTINGS = "configs/eval/shapes.yaml"
TASKS: dict[str, type[Task]] = {}


def register(name: str) -> Callable[[type[Task]], type[Task]]:
    def wrap(cls: type[Task]) -> type[Task]:
        if name in TASKS:
            raise ValueError(f"task {name!r} is registered twice")
        cls.name = name
        TASKS[name] = cls
        return cls

    return wrap


class EvalContext:
    """What tasks share: the settings, the output folder and one lazily loaded model."""

    def __init__(self, model_dir: Path | None, settings: dict[str, Any], out_dir: Path, tokenizer: str | None = None):
        self.model_dir = model_dir
        self.settings = settings
        self.out_dir = out_dir
        self.tokenizer_path = tokenizer
        self._pipeline = None
        self._dualtoken = None

    @property
    def pipeline(self) -> Any:
        if self._pipeline is None:
            if self.model_dir is None:
                raise ConfigError("this task needs a unified model: pass --model DIR")
            from mllm.pipeline import Pipeline

            self._pipeline = Pipeline.from_pretrained(self.model_dir, self.tokenizer_path)
        return self._pipeline

    @property
    def dualtoken(self) -> Any:
        """The DualToken tokenizer: the model's, or ``--tokenizer`` alone for tokenizer-only tasks."""
        if self._dualtoken is None:
            if self.model_dir is None and self.tokenizer_path is not None:
                from tokenizer.model import DualTokenizer

                self._dualtoken = DualTokenizer.from_pretrained(self.tokenizer_path).eval()
            else:
                self._dualtoken = self.pipeline.dualtoken
        return self._dualtoken

    def world(self) -> Any:
        from training.data.shapes import ShapesWorld, ShapesWorldConfig

        size = self.dualtoken.backbone.image_size
        return ShapesWorld(ShapesWorldConfig(seed=int(self.settings.get("world_seed", 0)), image_size=size))


class Task:
    """One benchmark: ``items`` -> ``predict`` (batched, cached) -> ``score``."""

    name: ClassVar[str] = ""
    needs_model: ClassVar[bool] = True

    def __init__(self, context: EvalContext, options: dict[str, Any]) -> None:
        self.context = context
        self.options = options

    def items(self) -> list[dict[str, Any]]:
        """JSON-serialisable items, each with a unique ``key``."""
        raise NotImplementedError

    def predict(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One JSON-serialisable prediction per item (same order)."""
        raise NotImplementedError

    def score(self, items: list[dict[str, Any]], predictions: list[dict[str, Any]]) -> dict[str, float]:
        raise NotImplementedError


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
    tokenizer: str | None = None,
) -> dict[str, dict[str, float]]:
    import eval.tasks  # noqa: F401  (registers the built-in tasks)

    unknown = [name for name in tasks if name not in TASKS]
    if unknown:
        raise ConfigError(f"unknown task {unknown[0]!r}; known tasks: {', '.join(sorted(TASKS))}")
    settings = load_settings(settings_path)
    if model_dir is not None:
        for name in ("config.json", "model.safetensors"):
            if not (Path(model_dir) / name).is_file():
                raise FileNotFoundError(f"model folder {model_dir} is missing {name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    context = EvalContext(Path(model_dir) if model_dir else None, settings, out_dir, tokenizer)
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
