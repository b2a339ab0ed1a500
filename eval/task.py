"""What an evaluation task is: the :class:`Task` interface, the registry, and the shared context."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from tokenizer.config import ConfigError

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

    def __init__(
        self, model_dir: Path | None, settings: dict[str, Any], out_dir: Path, visual_tokenizer_path: str | None = None
    ):
        self.model_dir = model_dir
        self.settings = settings
        self.out_dir = out_dir
        self.visual_tokenizer_path = visual_tokenizer_path
        self._pipeline = None
        self._visual_tokenizer = None

    @property
    def pipeline(self) -> Any:
        if self._pipeline is None:
            if self.model_dir is None:
                raise ConfigError("this task needs a unified model: pass --model DIR")
            from mllm.inference import Pipeline

            self._pipeline = Pipeline.from_pretrained(self.model_dir, self.visual_tokenizer_path)
        return self._pipeline

    @property
    def visual_tokenizer(self) -> Any:
        """The visual tokenizer: the model's, or ``--tokenizer`` alone for tokenizer-only tasks."""
        if self._visual_tokenizer is None:
            if self.model_dir is None and self.visual_tokenizer_path is not None:
                from tokenizer.model import DualTokenizer

                self._visual_tokenizer = DualTokenizer.from_pretrained(self.visual_tokenizer_path).eval()
            else:
                self._visual_tokenizer = self.pipeline.visual_tokenizer
        return self._visual_tokenizer

    def world(self) -> Any:
        from training.data.shapes import ShapesWorld, ShapesWorldConfig

        size = self.visual_tokenizer.backbone.image_size
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
