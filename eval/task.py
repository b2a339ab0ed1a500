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
            from mllm.inference import Pipeline

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
