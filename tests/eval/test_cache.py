"""The prediction cache is remade whenever anything a prediction depends on changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_fixtures import FIXTURES, ScriptedPipeline

from eval import harness
from eval.cache import folder_fingerprint
from eval.task import TASKS, EvalContext

PARQUET = str(FIXTURES / "seed_bench_test.parquet")


def _model_folder(root: Path) -> Path:
    model, tokenizer = root / "model", root / "visual_tokenizer"
    for folder in (model, tokenizer):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"hidden_size": 8}))
        (folder / "model.safetensors").write_bytes(b"weights-1")
    (model / "dualtoken.json").write_text(json.dumps({"tokenizer_path": str(tokenizer)}))
    return model


class Runner:
    """Runs seed_bench (3 questions) on a scripted pipeline, counting the answers actually made."""

    def __init__(self, root: Path):
        self.model = _model_folder(root)
        self.out = root / "out"
        self.settings = {"version": 1, "seed": 0}
        self.options = {"parquet": PARQUET}
        self.made = 0

    def __call__(self) -> int:
        context = EvalContext(self.model, dict(self.settings), self.out)
        context._pipeline = ScriptedPipeline(lambda prompt: "A")
        before = self.made
        task = TASKS["seed_bench"](context, dict(self.options))
        original = task.predict

        def counting(batch):
            self.made += len(batch)
            return original(batch)

        task.predict = counting
        harness.run_task(task, 8, self.out / "predictions" / "seed_bench.jsonl")
        return self.made - before


def _set_weights(runner: Runner) -> None:
    (runner.model / "model.safetensors").write_bytes(b"weights-2")


def _set_config(runner: Runner) -> None:
    (runner.model / "config.json").write_text(json.dumps({"hidden_size": 16}))


def _set_tokenizer_weights(runner: Runner) -> None:
    (runner.model.parent / "visual_tokenizer" / "model.safetensors").write_bytes(b"other")


def _set_sampling(runner: Runner) -> None:
    runner.options["max_new_tokens"] = 4


def _set_preprocessing(runner: Runner) -> None:
    runner.options["image_resize"] = "crop"


def _set_seed(runner: Runner) -> None:
    runner.settings["seed"] = 1


def _set_dataset(runner: Runner) -> None:
    runner.options["revision"] = "refs/convert/parquet@abc123"


@pytest.mark.parametrize(
    "change",
    [_set_weights, _set_config, _set_tokenizer_weights, _set_sampling, _set_preprocessing, _set_seed, _set_dataset],
)
def test_each_change_remakes_the_predictions(tmp_path: Path, change) -> None:
    runner = Runner(tmp_path)
    assert runner() == 3
    assert runner() == 0  # nothing changed: every answer comes from the cache
    change(runner)
    assert runner() == 3
    assert runner() == 0
    stale = list((runner.out / "predictions").glob("seed_bench.*.stale.jsonl"))
    assert len(stale) == 1  # the old answers are kept aside, never mixed in


def test_prompt_template_and_task_version_are_in_the_key(tmp_path: Path, monkeypatch) -> None:
    runner = Runner(tmp_path)
    assert runner() == 3
    monkeypatch.setattr(TASKS["seed_bench"], "prompt_template", "{question}\n{options}\nAnswer:")
    assert runner() == 3
    monkeypatch.setattr(TASKS["seed_bench"], "version", 2)
    assert runner() == 3
    assert runner() == 0


def test_fingerprint_reads_only_defining_files(tmp_path: Path) -> None:
    model = _model_folder(tmp_path)
    first = folder_fingerprint(model)
    (model / "train.log").write_text("step 1")
    (model / "metrics.json").write_text("{}")
    assert folder_fingerprint(model) == first
    (model / "sampling.json").write_text('{"cfg": 2}')
    assert folder_fingerprint(model) != first
