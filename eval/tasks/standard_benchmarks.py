"""The benchmarks the paper reports, read from local files: VQAv2, GQA, POPE, MME, MMBench, SEED-Bench.

Each reads the hub layout lmms-lab publishes (``parquet``: a parquet file or folder,
:mod:`eval.hf_benchmarks`) and, where the benchmark has one, its original release
(:mod:`eval.benchmarks`); nothing is downloaded. Scoring rules live in :mod:`eval.vqa_rules` and
:mod:`eval.scoring`; prompts follow LLaVA-1.5's evaluation prompts (as lmms-eval uses them).
Images are made square by ``image_resize``: ``pad`` (LLaVA's pad-to-square) or ``crop``; left out,
the mode the model folder records (how training made its images square), else ``pad``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from eval.task import Task, register
from tokenizer.config import ConfigError
from tokenizer.files import write_text_atomic

SHORT_ANSWER = "{question}\nAnswer the question using a single word or phrase."
OPTION_LETTER = "{hint}{question}\n{options}\nAnswer with the option's letter from the given choices directly."
_QUICK_DIGEST_BYTES = 1 << 20


def _quick_digest(path: Path) -> str:
    """sha256 of a data file's size, first and last MiB: cheap on multi-GB parquet, and a parquet
    file's footer (its schema and row-group statistics) changes with its content."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(_QUICK_DIGEST_BYTES))
        handle.seek(max(0, path.stat().st_size - _QUICK_DIGEST_BYTES))
        digest.update(handle.read())
    return digest.hexdigest()[:16]


class _LocalBenchmark(Task):
    """A benchmark read from local files named in the settings; answers come from the Pipeline."""

    prompt_template = SHORT_ANSWER
    data_options: tuple[str, ...] = ("parquet",)

    def _option(self, name: str) -> str:
        value = self.options.get(name)
        if not value:
            raise ConfigError(
                f"task {self.name} needs `{self.name}.{name}` in the settings file (a local path); "
                f"nothing is downloaded"
            )
        return str(value)

    def _image_resize(self) -> str:
        """The task's ``image_resize`` setting, else the model folder's recorded mode, else pad."""
        mode = self.options.get("image_resize")
        if mode is None:
            from mllm.model_folder import recorded_image_resize

            model_dir = self.context.model_dir
            mode = (recorded_image_resize(model_dir) if model_dir is not None else None) or "pad"
        if mode not in ("pad", "crop"):
            raise ConfigError(f"`{self.name}.image_resize` is {mode!r}; expected pad or crop")
        return mode

    def preprocessing(self) -> dict[str, Any]:
        return {"image_resize": self._image_resize()}

    def dataset_revision(self) -> dict[str, Any]:
        files = {}
        for name in self.data_options:
            value = self.options.get(name)
            if not value:
                continue
            path = Path(value)
            paths = sorted(path.glob("*.parquet")) if path.is_dir() else [path] if path.is_file() else []
            files.update({str(file): _quick_digest(file) for file in paths})
        return {"revision": self.options.get("revision"), "files": files}

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "dataset": self.dataset_revision()}

    def _samples(self) -> list[Any]:
        raise NotImplementedError

    def _prompt(self, key: str) -> str:
        return self.prompt_template.format(question=self._by_key[key].question)

    def _keys(self, samples: list[Any]) -> list[str]:
        return [str(sample.question_id) for sample in samples]

    def items(self) -> list[dict[str, Any]]:
        samples = self._samples()
        limit = self.options.get("limit")
        samples = samples[: int(limit)] if limit else samples
        self._samples_list = samples
        self._by_key = {str(sample.question_id): sample for sample in samples}
        return [{"key": key} for key in self._keys(samples)]

    def _sample_of(self, key: str) -> Any:
        return self._by_key[key]

    def predict(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from tokenizer.images import load_image

        pipe = self.context.pipeline
        mode = self._image_resize()
        pipe.image_resize = mode
        size = pipe.visual_tokenizer.backbone.image_size
        samples = [self._sample_of(item["key"]) for item in batch]
        images = [
            load_image(s.image_source, name=str(s.question_id), image_size=size, convert_to_rgb=True, resize=mode)
            for s in samples
        ]
        prompts = [self._prompt(item["key"]) for item in batch]
        answers = pipe.answer_batch(images, prompts, max_new_tokens=int(self.options.get("max_new_tokens", 16)))
        return [{"answer": answer} for answer in answers]


@register("vqav2")
class VQAv2(_LocalBenchmark):
    """VQAv2: val scored with the official rules; test-dev / test answers written for the server."""

    data_options = ("parquet", "questions", "annotations")

    def _samples(self) -> list[Any]:
        if self.options.get("parquet"):
            from eval.hf_benchmarks import read_vqav2_parquet

            return read_vqav2_parquet(self.options["parquet"])
        from eval.benchmarks import read_vqav2

        annotations = self.options.get("annotations")
        return read_vqav2(self._option("questions"), self._option("image_dir"), annotations or None)

    def score(self, items, predictions) -> dict[str, Any]:
        from eval.vqa_rules import vqav2_accuracy, vqav2_normalize, vqav2_upload_records

        samples = [self._by_key[it["key"]] for it in items]
        answers = [p["answer"] for p in predictions]
        upload = self.context.out_dir / "vqav2_answers.json"
        records = vqav2_upload_records([int(s.question_id) for s in samples], answers)
        write_text_atomic(upload, json.dumps(records))
        metrics: dict[str, Any] = {"questions": len(samples), "answer_file": upload.name}
        scored = [(s, a) for s, a in zip(samples, answers, strict=True) if s.answers]
        if not scored:
            return metrics  # test-dev / test: the server scores answer_file
        by_type: dict[str, list[float]] = {}
        values = []
        for sample, answer in scored:
            value = vqav2_accuracy(vqav2_normalize(answer), sample.answers)
            values.append(value)
            by_type.setdefault(str(sample.extra.get("answer_type", "all")), []).append(value)
        metrics["accuracy"] = sum(values) / len(values)
        metrics["scored"] = len(values)
        metrics.update({f"answer_type/{k}": sum(v) / len(v) for k, v in sorted(by_type.items())})
        return metrics


@register("gqa")
class GQA(_LocalBenchmark):
    """GQA testdev-balanced: exact match."""

    data_options = ("instructions", "images")

    def _samples(self) -> list[Any]:
        from eval.hf_benchmarks import read_gqa_parquet

        return read_gqa_parquet(self._option("instructions"), self._option("images"))

    def score(self, items, predictions) -> dict[str, Any]:
        from eval.scoring import gqa_accuracy

        truths = [self._by_key[it["key"]].answer for it in items]
        return gqa_accuracy([p["answer"] for p in predictions], truths)


@register("pope")
class POPE(_LocalBenchmark):
    """POPE: accuracy, precision, recall, F1 and yes-ratio per category (random, popular, adversarial)."""

    data_options = ("parquet", "questions")

    def _samples(self) -> list[Any]:
        if self.options.get("parquet"):
            from eval.hf_benchmarks import read_pope_parquet

            return read_pope_parquet(self.options["parquet"], self.options.get("categories"))
        from eval.benchmarks import read_pope

        return read_pope(self._option("questions"), self._option("image_dir"))

    def score(self, items, predictions) -> dict[str, Any]:
        from eval.scoring import pope_metrics

        groups: dict[str, tuple[list[str], list[str]]] = {}
        for item, pred in zip(items, predictions, strict=True):
            sample = self._by_key[item["key"]]
            label = getattr(sample, "label", None) or sample.answer
            answers, labels = groups.setdefault(str(sample.extra.get("category", "all")), ([], []))
            answers.append(pred["answer"])
            labels.append(label)
        metrics: dict[str, Any] = {}
        for category, (answers, labels) in sorted(groups.items()):
            for name, value in pope_metrics(answers, labels).items():
                metrics[f"{category}/{name}"] = value
        # LLaVA reports the mean over the three categories.
        for name in ("accuracy", "f1", "yes_ratio"):
            metrics[f"mean/{name}"] = sum(metrics[f"{c}/{name}"] for c in groups) / len(groups)
        return metrics


@register("mme")
class MME(_LocalBenchmark):
    """MME: per subtask acc, acc+ and score; perception and cognition totals."""

    prompt_template = SHORT_ANSWER
    data_options = ("parquet",)

    def _samples(self) -> list[Any]:
        if self.options.get("parquet"):
            from eval.hf_benchmarks import read_mme_parquet

            return read_mme_parquet(self.options["parquet"])
        from eval.benchmarks import read_mme

        return read_mme(self._option("root"), self.options.get("subtasks"))

    def score(self, items, predictions) -> dict[str, Any]:
        from eval.scoring import MMERecord, mme_scores

        records = []
        for item, pred in zip(items, predictions, strict=True):
            sample = self._by_key[item["key"]]
            label = getattr(sample, "label", None) or sample.answer
            image = str(sample.extra.get("image_id") or sample.image_path)
            records.append(MMERecord(sample.extra["subtask"], image, pred["answer"], label))
        scores = mme_scores(records)
        metrics: dict[str, Any] = {name: scores[name] for name in ("perception", "cognition", "total")}
        for name, subtask in scores["subtasks"].items():
            for field in ("score", "acc", "acc_plus"):
                metrics[f"{name}/{field}"] = subtask[field]
        metrics["missing_subtasks"] = len(scores["missing_subtasks"])
        return metrics


def _options_block(options: dict[str, str]) -> str:
    return "\n".join(f"{letter}. {text}" for letter, text in options.items())


@register("mmbench")
class MMBench(_LocalBenchmark):
    """MMBench: CircularEval (every rotation of the options must be answered right), hint in the prompt."""

    prompt_template = OPTION_LETTER
    data_options = ("parquet", "tsv")

    def _samples(self) -> list[Any]:
        if self.options.get("parquet"):
            from eval.hf_benchmarks import read_mmbench_parquet

            return read_mmbench_parquet(self.options["parquet"])
        from eval.benchmarks import read_multiple_choice_tsv

        return read_multiple_choice_tsv(self._option("tsv"), self.options.get("image_root"))

    def _keys(self, samples: list[Any]) -> list[str]:
        from eval.scoring import MMBENCH_CIRCULAR_STRIDE, circular_rotations

        self._rotations = {}
        keys = []
        for sample in samples:
            if int(sample.question_id) >= MMBENCH_CIRCULAR_STRIDE:
                continue  # a circular copy shipped in the file: the copies are made here
            copies = circular_rotations(sample.options, sample.answer)
            if not self.options.get("circular", True):
                copies = copies[:1]
            for shift, (options, answer) in enumerate(copies):
                key = f"{sample.question_id}@{shift}"
                self._rotations[key] = (sample, options, answer)
                keys.append(key)
        return keys

    def _sample_of(self, key: str) -> Any:
        return self._rotations[key][0]

    def _prompt(self, key: str) -> str:
        sample, options, _ = self._rotations[key]
        hint = str(sample.extra.get("hint") or "").strip()
        hint = "" if hint.lower() == "nan" else hint
        return self.prompt_template.format(
            hint=f"{hint}\n" if hint else "", question=sample.question, options=_options_block(options)
        )

    def score(self, items, predictions) -> dict[str, Any]:
        from eval.scoring import circular_by_category, extract_choice

        groups: dict[str, str] = {}
        hits: dict[str, list[bool]] = {}
        unparsed = 0
        for item, pred in zip(items, predictions, strict=True):
            sample, options, answer = self._rotations[item["key"]]
            if answer is None:
                continue  # hidden test answers: predictions are kept, not scored
            choice = extract_choice(pred["answer"], options)
            unparsed += choice is None
            question = str(sample.question_id)
            groups[question] = str(sample.extra.get("category") or "unknown")
            hits.setdefault(question, []).append(choice == answer)
        if not hits:
            return {"questions": len({self._rotations[it["key"]][0].question_id for it in items}), "scored": 0}
        return {**circular_by_category(groups, hits), "unparsed": unparsed}


@register("seed_bench")
class SEEDBench(_LocalBenchmark):
    """SEED-Bench image questions: accuracy overall and per evaluation dimension."""

    prompt_template = "{question}\n{options}\nAnswer with the option's letter from the given choices directly."
    data_options = ("parquet", "json")

    def _samples(self) -> list[Any]:
        if self.options.get("parquet"):
            from eval.hf_benchmarks import read_seed_bench_parquet

            return read_seed_bench_parquet(self.options["parquet"])
        from eval.benchmarks import read_seed_bench

        return read_seed_bench(self._option("json"), self._option("image_dir"))

    def _prompt(self, key: str) -> str:
        sample = self._by_key[key]
        return self.prompt_template.format(question=sample.question, options=_options_block(sample.options))

    def score(self, items, predictions) -> dict[str, Any]:
        from eval.scoring import extract_choice, seed_by_dimension

        dimensions, correct = [], []
        for item, pred in zip(items, predictions, strict=True):
            sample = self._by_key[item["key"]]
            dimension = sample.extra.get("dimension", sample.extra.get("question_type_id"))
            dimensions.append(int(dimension))
            correct.append(extract_choice(pred["answer"], sample.options) == sample.answer)
        return seed_by_dimension(dimensions, correct)


__all__ = ["GQA", "MME", "POPE", "MMBench", "SEEDBench", "VQAv2"]
