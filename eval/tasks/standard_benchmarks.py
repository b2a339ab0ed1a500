"""Standard benchmarks read from local files: VQAv2, POPE, MME and multiple choice (MMBench / SEED-Bench).

The readers live in :mod:`eval.benchmarks` and the scoring rules in :mod:`eval.scoring`;
nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eval.task import Task, register
from tokenizer.config import ConfigError


class _LocalBenchmark(Task):
    """A benchmark read from local files named in the settings; answers come from the Pipeline."""

    required: tuple[str, ...] = ()

    def _option(self, name: str) -> str:
        value = self.options.get(name)
        if not value:
            raise ConfigError(
                f"task {self.name} needs `{self.name}.{name}` in the settings file (a local path); "
                f"nothing is downloaded"
            )
        return str(value)

    def _samples(self) -> list[Any]:
        raise NotImplementedError

    def _prompt(self, sample: Any) -> str:
        return sample.question

    def items(self) -> list[dict[str, Any]]:
        samples = self._samples()
        limit = self.options.get("limit")
        samples = samples[: int(limit)] if limit else samples
        self._by_key = {str(sample.question_id): sample for sample in samples}
        return [{"key": str(sample.question_id)} for sample in samples]

    def predict(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from tokenizer.images import load_image

        pipe = self.context.pipeline
        size = pipe.visual_tokenizer.backbone.image_size
        samples = [self._by_key[item["key"]] for item in batch]
        images = [
            load_image(s.image_source, name=str(s.question_id), image_size=size, convert_to_rgb=True) for s in samples
        ]
        answers = pipe.answer_batch(
            images, [self._prompt(s) for s in samples], max_new_tokens=int(self.options.get("max_new_tokens", 16))
        )
        return [{"answer": answer} for answer in answers]


@register("vqav2")
class VQAv2(_LocalBenchmark):
    def _samples(self) -> list[Any]:
        from eval.benchmarks import read_vqav2

        return read_vqav2(self._option("questions"), self._option("image_dir"), self._option("annotations"))

    def _prompt(self, sample: Any) -> str:
        return f"{sample.question} answer with a single word or phrase."

    def score(self, items, predictions) -> dict[str, float]:
        from eval.scoring import vqav2_accuracy

        values = [
            vqav2_accuracy(p["answer"], self._by_key[it["key"]].answers)
            for it, p in zip(items, predictions, strict=True)
        ]
        return {"accuracy": float(np.mean(values)), "questions": float(len(values))}


@register("pope")
class POPE(_LocalBenchmark):
    def _samples(self) -> list[Any]:
        from eval.benchmarks import read_pope

        return read_pope(self._option("questions"), self._option("image_dir"))

    def score(self, items, predictions) -> dict[str, float]:
        from eval.scoring import pope_metrics

        labels = [self._by_key[it["key"]].label for it in items]
        return {k: float(v) for k, v in pope_metrics([p["answer"] for p in predictions], labels).items()}


@register("mme")
class MME(_LocalBenchmark):
    def _samples(self) -> list[Any]:
        from eval.benchmarks import read_mme

        return read_mme(self._option("root"), self.options.get("subtasks"))

    def score(self, items, predictions) -> dict[str, float]:
        from eval.scoring import MMERecord, mme_scores

        records = []
        for item, pred in zip(items, predictions, strict=True):
            sample = self._by_key[item["key"]]
            records.append(MMERecord(sample.extra["subtask"], str(sample.image_path), pred["answer"], sample.label))
        scores = mme_scores(records)
        flat = {key: float(value) for key, value in scores.items() if isinstance(value, (int, float))}
        return flat


@register("multiple_choice")
class MultipleChoice(_LocalBenchmark):
    """MMBench-style TSV (``tsv``) or SEED-Bench JSON (``seed_json`` + ``image_dir``)."""

    def _samples(self) -> list[Any]:
        from eval.benchmarks import read_multiple_choice_tsv, read_seed_bench

        if self.options.get("seed_json"):
            return read_seed_bench(self.options["seed_json"], self._option("image_dir"))
        return read_multiple_choice_tsv(self._option("tsv"), self.options.get("image_root"))

    def _prompt(self, sample: Any) -> str:
        options = "\n".join(f"{letter}. {text}" for letter, text in sample.options.items())
        return f"{sample.question}\n{options}\nanswer with the option's letter."

    def score(self, items, predictions) -> dict[str, float]:
        from eval.scoring import multiple_choice_accuracy

        samples = [self._by_key[it["key"]] for it in items]
        scored = [(s, p) for s, p in zip(samples, predictions, strict=True) if s.answer is not None]
        result = multiple_choice_accuracy(
            [p["answer"] for _, p in scored], [s.answer for s, _ in scored], [s.options for s, _ in scored]
        )
        return {k: float(v) for k, v in result.items()}


__all__ = ["MME", "POPE", "MultipleChoice", "VQAv2"]
