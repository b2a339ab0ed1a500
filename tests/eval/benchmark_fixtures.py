"""What the benchmark tests share: the hub-layout fixtures and a scripted pipeline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from eval import harness
from eval.task import TASKS, EvalContext

FIXTURES = Path(__file__).parent / "fixtures"


class _Backbone:
    image_size = 16


class _VisualTokenizer:
    backbone = _Backbone()


class ScriptedPipeline:
    """Answers ``answer_batch`` with ``script(prompt)`` and keeps the prompts and images it saw."""

    def __init__(self, script: Callable[[str], str]):
        self.script = script
        self.visual_tokenizer = _VisualTokenizer()
        self.prompts: list[str] = []
        self.images: list[torch.Tensor] = []

    def answer_batch(self, images, prompts, max_new_tokens=16):
        self.images += list(images)
        self.prompts += list(prompts)
        return [self.script(prompt) for prompt in prompts]


def run(tmp_path: Path, task: str, options: dict, script: Callable[[str], str]) -> tuple[dict, ScriptedPipeline]:
    context = EvalContext(None, {"version": 1, "seed": 0}, tmp_path)
    context._pipeline = ScriptedPipeline(script)
    metrics, _ = harness.run_task(TASKS[task](context, options), 2, tmp_path / "predictions" / f"{task}.jsonl")
    return metrics, context._pipeline
