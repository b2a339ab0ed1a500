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
        self,
        model_dir: Path | None,
        settings: dict[str, Any],
        out_dir: Path,
        visual_tokenizer_path: str | None = None,
        device: str = "cpu",
    ):
        self.model_dir = model_dir
        self.settings = settings
        self.out_dir = out_dir
        self.visual_tokenizer_path = visual_tokenizer_path
        self.device = device
        self._pipeline = None
        self._visual_tokenizer = None
        self._fingerprints: dict[str, str] = {}

    def fingerprint(self, needs_model: bool) -> dict[str, str | None]:
        """What the task's outputs depend on in the model: the folders' fingerprints.

        The model folder's fingerprint covers its weights, configs and sampling defaults; the
        visual tokenizer's is added when given separately (``--tokenizer``).
        """
        from eval.cache import folder_fingerprint

        found: dict[str, str | None] = {"model": None, "tokenizer": None}
        for name, folder in (("model", self.model_dir), ("tokenizer", self.visual_tokenizer_path)):
            if folder is None or (name == "model" and not needs_model and self.visual_tokenizer_path):
                continue
            if str(folder) not in self._fingerprints:
                self._fingerprints[str(folder)] = folder_fingerprint(folder)
            found[name] = self._fingerprints[str(folder)]
        if self.model_dir is not None and self.visual_tokenizer_path is None:
            import json

            from mllm.inference import resolve_visual_tokenizer_path
            from mllm.model_folder import SIDECAR

            sidecar = Path(self.model_dir) / SIDECAR
            recorded = json.loads(sidecar.read_text()).get("tokenizer_path") if sidecar.is_file() else None
            folder = resolve_visual_tokenizer_path(Path(self.model_dir), recorded)
            if str(folder) not in self._fingerprints:
                self._fingerprints[str(folder)] = folder_fingerprint(folder)
            found["tokenizer"] = self._fingerprints[str(folder)]
        return found

    @property
    def pipeline(self) -> Any:
        if self._pipeline is None:
            if self.model_dir is None:
                raise ConfigError("this task needs a unified model: pass --model DIR")
            from mllm.inference import Pipeline

            self._pipeline = Pipeline.from_pretrained(self.model_dir, self.visual_tokenizer_path, device=self.device)
        return self._pipeline

    @property
    def visual_tokenizer(self) -> Any:
        """The visual tokenizer: the model's, or ``--tokenizer`` alone for tokenizer-only tasks."""
        if self._visual_tokenizer is None:
            if self.model_dir is None and self.visual_tokenizer_path is not None:
                from tokenizer.model import DualTokenizer

                tokenizer = DualTokenizer.from_pretrained(self.visual_tokenizer_path)
                self._visual_tokenizer = tokenizer.to(self.device).eval()
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
    # Raise when the task's items, prompts or scoring change: cached predictions are then remade.
    version: ClassVar[int] = 1
    # The text around each question, as sent to the model ("" where the task asks no question).
    prompt_template: ClassVar[str] = ""

    def __init__(self, context: EvalContext, options: dict[str, Any]) -> None:
        self.context = context
        self.options = options

    def preprocessing(self) -> dict[str, Any]:
        """How images are prepared for the model (recorded in the results and the cache key)."""
        return {}

    def identity(self) -> dict[str, Any]:
        """Everything the predictions depend on; its hash keys the prediction cache."""
        return {
            "task": self.name,
            "task_version": self.version,
            "options": self.options,
            "prompt_template": self.prompt_template,
            "preprocessing": self.preprocessing(),
            "fingerprint": self.context.fingerprint(self.needs_model),
            "seeds": {"seed": self.context.settings.get("seed"), "world_seed": self.context.settings.get("world_seed")},
        }

    def dataset_revision(self) -> dict[str, Any]:
        """Which data the items came from (recorded in the results); the Shapes world is its seed."""
        return {"world_seed": self.context.settings.get("world_seed", 0)}

    def items(self) -> list[dict[str, Any]]:
        """JSON-serialisable items, each with a unique ``key``."""
        raise NotImplementedError

    def predict(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One JSON-serialisable prediction per item (same order)."""
        raise NotImplementedError

    def score(self, items: list[dict[str, Any]], predictions: list[dict[str, Any]]) -> dict[str, float]:
        raise NotImplementedError
