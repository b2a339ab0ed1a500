"""The Shapes-world tasks of a unified model: VQA and GenEval-style text-to-image.

The scenes are rendered from the world's seed; images the model draws are judged by
:mod:`training.data.shapes.judge`, which never sees the model. The scoring rules live in
:mod:`eval.shapes_scoring`.

- ``shapes_vqa``: every question of the first ``scenes`` test scenes, by question type, next
  to the majority baseline of each type; ``shapes_vqa_by_form.json`` beside the results gives
  accuracy per question form with the most common answer given and true (a model answering
  from the prior shows there).
- ``geneval`` / ``geneval_compositional``: GenEval-style categories on the Shapes world
  (single object, two objects, counting, colours, position, colour attribution) from the
  world's own captions; the compositional variant uses the held-out attribute combinations
  that no training caption names.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from eval.geneval_rules import geneval_relation_holds
from eval.shapes_scoring import VQAItem, majority_answers, score_vqa, vqa_by_form, vqa_items
from eval.task import Task, register
from eval.tasks.image_features import FIDFeatures, fid_from_features, image_tensor
from mllm.generation import SamplingConfig
from tokenizer.files import write_text_atomic
from training.data.shapes import relations
from training.data.shapes.judge import ObjectSpec, judge


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
        records = [VQAItem(None, it["question"], it["answer"], it["kind"], it["key"]) for it in items]
        answers = [p["answer"] for p in predictions]
        write_text_atomic(
            self.context.out_dir / f"{self.name}_by_form.json", json.dumps(vqa_by_form(records, answers), indent=2)
        )
        return score_vqa(records, answers, majority_answers(self._world))


GENEVAL_CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@register("geneval")
class ShapesGenEval(FIDFeatures, Task):
    """GenEval-style categories judged by the checker (see the module docstring)."""

    version = 2  # predictions record relation_geneval_ok

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
        # Options the settings leave out take the library defaults, not the model folder's sampling.json.
        defaults = SamplingConfig()
        images = self.context.pipeline.generate(
            [item["prompt"] for item in batch],
            seeds=[item["seed"] for item in batch],
            cfg=float(options.get("cfg", defaults.cfg)),
            top_k=int(options.get("top_k", defaults.top_k)),
            top_p=float(options.get("top_p", defaults.top_p)),
            temperature=float(options.get("temperature", defaults.temperature)),
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
            reference = image_tensor(_geneval_scene(world, item["key"]).image).unsqueeze(0)
            generated = image_tensor(image).unsqueeze(0)
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
        position_geneval: list[int] = []
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
                    position_geneval.append(int(bool(pred["correct"] and pred["relation_geneval_ok"])))
        metrics = {name: float(np.mean(values)) for name, values in hits.items() if values}
        metrics["overall"] = float(np.mean([metrics[name] for name in GENEVAL_CATEGORIES if name in metrics]))
        if position_geneval:
            # GenEval's own relation rule beside the checker's centre rule; not part of overall.
            metrics["position_geneval_rule"] = float(np.mean(position_geneval))
        metrics["images"] = len(items)
        # Generated images against the scenes their prompts came from (same count); with the
        # default small conv net this tracks progress but is not comparable to published FID.
        fid = fid_from_features([p["ref_features"] for p in predictions], [p["features"] for p in predictions])
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
    geneval_ok = None
    if relation and verdict.correct:
        first, name, second = relation
        box_a = verdict.detections[verdict.assignment[first]].box
        box_b = verdict.detections[verdict.assignment[second]].box
        geneval_ok = geneval_relation_holds(box_a, name, box_b)
    return {
        "correct": bool(verdict.correct),
        "shapes_ok": bool(judge(image, shapes_only, exact_count=False).correct),
        "count_ok": len(verdict.detections) == len(specs),
        "relation_ok": bool(judge(image, specs, relation).correct) if relation else None,
        "relation_geneval_ok": geneval_ok,
        "found": [f"{d.colour} {d.shape}" for d in verdict.detections],
        "reason": verdict.reason,
    }


def _stable_hash(text: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def _geneval_scene(world: Any, key: str) -> Any:
    """The world scene behind a geneval item key (``split/single/i`` or ``split/scene/i``)."""
    split, group, index = key.split("/")
    return (world.sample_single if group == "single" else world.sample)(split, int(index))


__all__ = ["GENEVAL_CATEGORIES", "ShapesGenEval", "ShapesGenEvalCompositional", "ShapesVQA", "judge_item"]
