"""The built-in evaluation tasks (registered with :func:`eval.task.register`).

Shapes-world tasks render their scenes from the world's seed; images the model draws are
judged by :mod:`training.data.shapes.checker`, which never sees the model.

- ``shapes_vqa``: every question of the first ``scenes`` test scenes, by question type, next
  to the majority baseline of each type; ``shapes_vqa_by_form.json`` beside the results gives
  accuracy per question form with the most common answer given and true (a model answering
  from the prior shows there).
- ``geneval`` / ``geneval_compositional``: GenEval-style categories on the Shapes world
  (single object, two objects, counting, colours, position, colour attribution) from the
  world's own captions; the compositional variant uses the held-out attribute combinations
  that no training caption names.
- ``tokenizer``: PSNR, SSIM, rFID, the checker on reconstructions (the text-to-image ceiling)
  and codebook usage / perplexity of both vocabularies.
- ``zero_shot``: 18-way Shapes classification through the quantised semantic path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eval.shapes_tasks import majority_answers, score_vqa, vqa_by_form, vqa_items
from eval.task import Task, register
from mllm.inference import DEFAULT_SAMPLING
from tokenizer.config import ConfigError
from tokenizer.files import write_text_atomic
from training.data.shapes import relations
from training.data.shapes.checker import ObjectSpec, detect_objects, judge


def _tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0


@register("shapes_vqa")
class ShapesVQA(Task):
    def items(self) -> list[dict[str, Any]]:
        world = self.context.world()
        self._world = world
        found = vqa_items(world, self.options.get("split", "test"), int(self.options.get("scenes", 200)))
        return [{"key": it.key, "question": it.question, "answer": it.answer, "kind": it.kind} for it in found]

    def predict(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        world = self._world
        images = []
        for item in batch:
            split, index, _ = item["key"].split("/")
            images.append(world.sample(split, int(index)).image)
        answers = self.context.pipeline.answer_batch(images, [item["question"] for item in batch])
        return [{"answer": answer} for answer in answers]

    def score(self, items: list[dict[str, Any]], predictions: list[dict[str, Any]]) -> dict[str, float]:
        from eval.shapes_tasks import VQAItem

        records = [VQAItem(None, it["question"], it["answer"], it["kind"], it["key"]) for it in items]
        answers = [p["answer"] for p in predictions]
        write_text_atomic(
            self.context.out_dir / f"{self.name}_by_form.json", json.dumps(vqa_by_form(records, answers), indent=2)
        )
        return score_vqa(records, answers, majority_answers(self._world))


GENEVAL_CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


class _FIDFeatures:
    """The FID feature network of a task: Inception from ``fid_weights`` (a local file), else the
    small fixed conv net; built once per task."""

    options: dict[str, Any]

    def _extractor(self) -> Any:
        if not hasattr(self, "_features"):
            from eval.fid import build_feature_extractor

            self._features = build_feature_extractor(self.options.get("fid_weights"))
        return self._features


def _fid(real: list[list[float]], fake: list[list[float]]) -> float | None:
    """Frechet distance between two feature sets (None with fewer than 2 rows: no covariance)."""
    from eval.fid import frechet_distance

    if len(real) < 2:
        return None
    a, b = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


@register("geneval")
class ShapesGenEval(_FIDFeatures, Task):
    """GenEval-style categories judged by the checker (see the module docstring)."""

    default_split = "test"

    def items(self) -> list[dict[str, Any]]:
        world = self.context.world()
        split = self.options.get("split", self.default_split)
        per = int(self.options.get("per_category", 32))
        seed = int(self.context.settings.get("seed", 0))
        items: list[dict[str, Any]] = []
        for index in range(per):
            sample = world.sample_single(split, index)
            items.append(self._item(f"{split}/single/{index}", sample, "single", seed))
        wanted = {2: per, 3: max(per // 2, 1)}
        index = 0
        while any(wanted.values()) and index < world.split_size(split):
            sample = world.sample(split, index)
            count = len(sample.objects)
            if wanted.get(count, 0) > 0:
                items.append(self._item(f"{split}/scene/{index}", sample, {2: "two", 3: "three"}[count], seed))
                wanted[count] -= 1
            index += 1
        return items

    @staticmethod
    def _item(key: str, sample: Any, group: str, seed: int) -> dict[str, Any]:
        relation = None
        if len(sample.objects) == 2:
            found = relations(sample.objects[0], sample.objects[1])
            relation = [0, found[0], 1] if found else None
        return {
            "key": key,
            "prompt": sample.caption,
            "objects": [[obj.colour, obj.shape] for obj in sample.objects],
            "relation": relation,
            "group": group,
            "seed": seed * 1_000_003 + _stable_hash(key),
        }

    def predict(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        options = self.options
        images = self.context.pipeline.generate(
            [item["prompt"] for item in batch],
            seeds=[item["seed"] for item in batch],
            cfg=float(options.get("cfg", DEFAULT_SAMPLING["cfg"])),
            top_k=int(options.get("top_k", DEFAULT_SAMPLING["top_k"])),
            top_p=float(options.get("top_p", DEFAULT_SAMPLING["top_p"])),
            temperature=float(options.get("temperature", DEFAULT_SAMPLING["temperature"])),
            decode_depths=options.get("decode_depths"),
        )
        folder = self.context.out_dir / "images" / self.name
        folder.mkdir(parents=True, exist_ok=True)
        world = self.context.world()
        extractor = self._extractor()
        predictions = []
        for item, image in zip(batch, images, strict=True):
            from PIL import Image

            path = folder / (item["key"].replace("/", "_") + ".png")
            Image.fromarray(image).save(path)
            # FID features of the generated image and of the scene its prompt describes.
            reference = _tensor(_geneval_scene(world, item["key"]).image).unsqueeze(0)
            generated = _tensor(image).unsqueeze(0)
            predictions.append(
                {
                    "png": str(path.relative_to(self.context.out_dir)),
                    **judge_item(item, image),
                    "features": extractor(generated)[0].double().tolist(),
                    "ref_features": extractor(reference)[0].double().tolist(),
                }
            )
        return predictions

    def score(self, items: list[dict[str, Any]], predictions: list[dict[str, Any]]) -> dict[str, float]:
        hits: dict[str, list[int]] = {name: [] for name in GENEVAL_CATEGORIES}
        for item, pred in zip(items, predictions, strict=True):
            hits["counting"].append(int(pred["count_ok"]))
            if item["group"] == "single":
                hits["single_object"].append(int(pred["shapes_ok"]))
                hits["colors"].append(int(pred["correct"]))
            elif item["group"] == "two":
                hits["two_object"].append(int(pred["shapes_ok"]))
                hits["color_attr"].append(int(pred["correct"]))
                if item["relation"] is not None:
                    hits["position"].append(int(pred["correct"] and pred["relation_ok"]))
        metrics = {name: float(np.mean(values)) for name, values in hits.items() if values}
        metrics["overall"] = float(np.mean([metrics[name] for name in GENEVAL_CATEGORIES if name in metrics]))
        metrics["images"] = float(len(items))
        # Generated images against the scenes their prompts came from (same count); with the
        # default small conv net this tracks progress but is not comparable to published FID.
        fid = _fid([p["ref_features"] for p in predictions], [p["features"] for p in predictions])
        if fid is not None:
            metrics["fid"] = fid
            metrics["fid_features"] = self._extractor().name
        return metrics


@register("geneval_compositional")
class ShapesGenEvalCompositional(ShapesGenEval):
    """The same categories on attribute combinations held out of training."""

    default_split = "compositional"


def judge_item(item: dict[str, Any], image: np.ndarray) -> dict[str, Any]:
    specs = [ObjectSpec(colour, shape) for colour, shape in item["objects"]]
    shapes_only = [ObjectSpec(None, shape) for _, shape in item["objects"]]
    verdict = judge(image, specs)
    relation = tuple(item["relation"]) if item.get("relation") else None
    return {
        "correct": bool(verdict.correct),
        "shapes_ok": bool(judge(image, shapes_only, exact_count=False).correct),
        "count_ok": len(verdict.detections) == len(specs),
        "relation_ok": bool(judge(image, specs, relation).correct) if relation else None,
        "found": [f"{d.colour} {d.shape}" for d in verdict.detections],
        "reason": verdict.reason,
    }


def _stable_hash(text: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


@register("tokenizer")
class TokenizerMetrics(_FIDFeatures, Task):
    """PSNR / SSIM per image; codebook usage and perplexity of both branches over the set."""

    needs_model = False

    def items(self) -> list[dict[str, Any]]:
        self._world = self.context.world()
        split = self.options.get("split", "test")
        count = min(int(self.options.get("images", 256)), self._world.split_size(split))
        return [{"key": f"{split}/{index}"} for index in range(count)]

    @torch.no_grad()
    def predict(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from tokenizer.losses import psnr, ssim
        from training.evaluation import checker_verdicts

        tokenizer = self.context.dualtoken
        scenes = [self._world.sample(*_split_index(item["key"])) for item in batch]
        images = torch.stack([_tensor(scene.image) for scene in scenes])
        # One image at a time: convolution kernels pick different algorithms for different
        # batch sizes (last-bit differences), and the scores must not depend on the batch.
        encoded = [tokenizer.encode(images[row : row + 1]) for row in range(len(batch))]
        recon = torch.cat([tokenizer.decode(codes.pixel_codes) for codes in encoded]).clamp(-1, 1)
        codes = type(encoded[0])(
            pixel_codes=torch.cat([c.pixel_codes for c in encoded]),
            semantic_codes=torch.cat([c.semantic_codes for c in encoded]),
        )
        extractor = self._extractor()
        lpips = self._lpips()
        checked = checker_verdicts(recon, [[(o.colour, o.shape) for o in scene.objects] for scene in scenes])
        real = [extractor(images[row : row + 1])[0].double().tolist() for row in range(len(batch))]
        fake = [extractor(recon[row : row + 1])[0].double().tolist() for row in range(len(batch))]
        out = []
        for row in range(len(batch)):
            out.append(
                {
                    "features": real[row],
                    "recon_features": fake[row],
                    "psnr": float(psnr(recon[row : row + 1], images[row : row + 1])),
                    "ssim": float(ssim(recon[row : row + 1], images[row : row + 1])),
                    **(
                        {"lpips": float(lpips(recon[row : row + 1], images[row : row + 1], reduction="none")[0])}
                        if lpips is not None
                        else {}
                    ),
                    "checker": checked[row],
                    "pixel_codes": codes.pixel_codes[row].reshape(-1, codes.pixel_codes.shape[-1]).tolist(),
                    "semantic_codes": codes.semantic_codes[row].reshape(-1, codes.semantic_codes.shape[-1]).tolist(),
                }
            )
        return out

    def _lpips(self) -> Any:
        """LPIPS(VGG16) when ``lpips_weights`` (a local torchvision vgg16 state dict) is set, else None.

        ``lpips_linear`` optionally names the LPIPS v0.1 linear-layer weights; nothing is downloaded.
        """
        if not hasattr(self, "_lpips_net"):
            self._lpips_net = None
            if self.options.get("lpips_weights"):
                from tokenizer.losses import PerceptualLoss

                self._lpips_net = PerceptualLoss.from_vgg16(
                    self.options["lpips_weights"], self.options.get("lpips_linear")
                ).eval()
        return self._lpips_net

    def score(self, items: list[dict[str, Any]], predictions: list[dict[str, Any]]) -> dict[str, float]:

        tokenizer = self.context.dualtoken
        metrics = {
            "psnr": float(np.mean([p["psnr"] for p in predictions])),
            "ssim": float(np.mean([p["ssim"] for p in predictions])),
            # The text-to-image ceiling on these codes (see training.evaluation.tokenizer_metrics).
            "checker_on_reconstructions": float(np.mean([p["checker"] for p in predictions])),
        }
        if all("lpips" in p for p in predictions):
            metrics["lpips"] = float(np.mean([p["lpips"] for p in predictions]))
        rfid = _fid([p["features"] for p in predictions], [p["recon_features"] for p in predictions])
        if rfid is not None:
            metrics["rfid"] = rfid
        metrics["rfid_features"] = self._extractor().name
        for branch, quantizer in (("pixel", tokenizer.pixel_quantizer), ("semantic", tokenizer.semantic_quantizer)):
            if quantizer is None:
                continue
            size = quantizer.config.codebook_size
            codes = np.concatenate([np.asarray(p[f"{branch}_codes"]) for p in predictions])  # (N*h*w, D)
            counts = np.stack([np.bincount(codes[:, d], minlength=size) for d in range(codes.shape[1])])
            metrics[f"{branch}_usage"] = float((counts.sum(0) > 0).mean())
            metrics[f"{branch}_min_depth_usage"] = float((counts > 0).mean(1).min())
            probs = counts.sum(0) / counts.sum()
            metrics[f"{branch}_perplexity"] = float(math.exp(-(probs[probs > 0] * np.log(probs[probs > 0])).sum()))
        return metrics


@register("zero_shot")
class ZeroShot(Task):
    """18-way zero-shot classification of single-object scenes through the quantised semantic path."""

    needs_model = False

    def items(self) -> list[dict[str, Any]]:
        self._world = self.context.world()
        split = self.options.get("split", "test")
        count = min(int(self.options.get("images", 512)), self._world.split_size(split))
        return [
            {"key": f"{split}/{index}", "label": self._world.sample_single(split, index).label}
            for index in range(count)
        ]

    def _text_embeds(self) -> torch.Tensor:
        if not hasattr(self, "_embeds"):
            from transformers import AutoTokenizer

            from training.evaluation import class_text_embeddings

            tokenizer = self.context.dualtoken
            path = self._tokenizer_dir() / "text_tokenizer"
            if not path.is_dir():
                raise FileNotFoundError(
                    f"zero_shot needs the text tokenizer saved with the DualToken tokenizer ({path})"
                )
            self._embeds = class_text_embeddings(
                tokenizer.text_tower, AutoTokenizer.from_pretrained(path), self._world.zero_shot_prompts()
            )
        return self._embeds

    def _tokenizer_dir(self) -> Path:
        if self.context.tokenizer_path:
            return Path(self.context.tokenizer_path)
        import json

        from mllm.inference import resolve_tokenizer_path

        sidecar = json.loads((self.context.model_dir / "dualtoken.json").read_text())
        return resolve_tokenizer_path(self.context.model_dir, sidecar.get("tokenizer_path"))

    @torch.no_grad()
    def predict(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        tokenizer = self.context.dualtoken
        out = []
        for item in batch:  # one at a time, so the result does not depend on the batch size
            image = _tensor(self._world.sample_single(*_split_index(item["key"])).image)[None]
            logits = tokenizer.zero_shot_logits(tokenizer.encode(image).semantic_codes, self._text_embeds())
            out.append({"predicted": int(logits.argmax(-1)[0])})
        return out

    def score(self, items: list[dict[str, Any]], predictions: list[dict[str, Any]]) -> dict[str, float]:
        correct = [int(p["predicted"] == it["label"]) for it, p in zip(items, predictions, strict=True)]
        return {"accuracy": float(np.mean(correct)), "images": float(len(items))}


def _geneval_scene(world: Any, key: str) -> Any:
    """The world scene behind a geneval item key (``split/single/i`` or ``split/scene/i``)."""
    split, group, index = key.split("/")
    return (world.sample_single if group == "single" else world.sample)(split, int(index))


def _split_index(key: str) -> tuple[str, int]:
    split, index = key.split("/")[:2]
    return split, int(index)


__all__ = ["ShapesVQA", "ShapesGenEval", "ShapesGenEvalCompositional", "TokenizerMetrics", "ZeroShot", "detect_objects"]


# ---------------------------------------------------------------------------- standard benchmarks
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
        size = pipe.dualtoken.backbone.image_size
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
