"""The evaluation harness: registry, cached predictions and resume, batch-size invariance, bad input."""

from __future__ import annotations

import json

import pytest
import yaml

from eval import harness
from training.cli import main as cli_main


@pytest.fixture()
def settings(tmp_path):
    data = yaml.safe_load((harness.Path(harness.__file__).parents[1] / "configs/eval/shapes.yaml").read_text())
    data.update(
        shapes_vqa={"split": "test", "scenes": 3},
        geneval={"split": "test", "per_category": 2, "cfg": 2.0},
        geneval_compositional={"split": "compositional", "per_category": 2, "cfg": 2.0},
        tokenizer={"split": "test", "images": 6},
    )
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


TASKS = ["shapes_vqa", "geneval", "tokenizer"]


def test_results_are_identical_for_batch_size_1_and_8(chain, settings, tmp_path):
    one = harness.evaluate(TASKS, tmp_path / "b1", chain["joint"], settings, batch_size=1)
    eight = harness.evaluate(TASKS, tmp_path / "b8", chain["joint"], settings, batch_size=8)
    assert one == eight
    assert set(one["geneval"]) >= {"single_object", "two_object", "counting", "colors", "color_attr", "overall", "fid"}
    assert one["geneval"]["fid"] > 0  # micro-model drawings are far from the scenes
    assert 0.0 <= one["tokenizer"]["checker_on_reconstructions"] <= 1.0
    assert one["shapes_vqa"]["vqa_mean_baseline"] > 0
    by_form = json.loads((tmp_path / "b1" / "shapes_vqa_by_form.json").read_text())
    # Every question is in one form; forms name no colour, and the per-form hits add up to the total.
    vqa = one["shapes_vqa"]
    kinds = [key[4:-2] for key in vqa if key.endswith("_n")]
    assert sum(row["questions"] for row in by_form) == sum(vqa[f"vqa_{kind}_n"] for kind in kinds)
    assert not any(word in row["form"].split() for row in by_form for word in ("red", "blue", "circle"))
    hits = sum(row["accuracy"] * row["questions"] for row in by_form)
    assert hits == pytest.approx(sum(vqa[f"vqa_{kind}"] * vqa[f"vqa_{kind}_n"] for kind in kinds))
    payload = json.loads((tmp_path / "b1" / "results.json").read_text())
    assert payload["settings"]["version"] == 1 and payload["results"] == one
    assert "| geneval | overall |" in (tmp_path / "b1" / "results.md").read_text()
    assert len(list((tmp_path / "b1" / "images" / "geneval").glob("*.png"))) == one["geneval"]["images"]


def test_interrupted_run_resumes_from_the_cache(chain, settings, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = []
    original = harness.run_task

    def counting_predict(task_cls):
        real = task_cls.predict

        def predict(self, batch):
            calls.append(len(batch))
            if sum(calls) > 4:
                raise KeyboardInterrupt  # killed after the first batches
            return real(self, batch)

        return predict

    import eval.tasks

    monkeypatch.setattr(eval.tasks.ShapesVQA, "predict", counting_predict(eval.tasks.ShapesVQA))
    with pytest.raises(KeyboardInterrupt):
        harness.evaluate(["shapes_vqa"], out, chain["joint"], settings, batch_size=2)
    assert not (out / "results.json").exists()  # no results file that looks complete
    cached = (out / "predictions" / "shapes_vqa.jsonl").read_text().splitlines()
    assert len(cached) == 4
    with open(out / "predictions" / "shapes_vqa.jsonl", "a") as handle:
        handle.write('{"key": "torn')  # a line cut off by the kill
    monkeypatch.undo()
    calls.clear()
    monkeypatch.setattr(eval.tasks.ShapesVQA, "predict", _recorder(calls))
    resumed = harness.evaluate(["shapes_vqa"], out, chain["joint"], settings, batch_size=2)
    made_on_resume = sum(calls)
    straight = harness.evaluate(["shapes_vqa"], tmp_path / "straight", chain["joint"], settings, batch_size=2)
    assert resumed == straight
    assert made_on_resume == sum(calls) - made_on_resume - 4  # only the missing predictions were made
    assert original is harness.run_task


def _recorder(calls):
    import eval.tasks

    real = eval.tasks.ShapesVQA.predict

    def predict(self, batch):
        calls.append(len(batch))
        return real(self, batch)

    return predict


def test_bad_input_is_named(chain, settings, tmp_path, capsys):
    out = tmp_path / "bad"
    code = cli_main(
        ["eval", "--model", str(chain["joint"]), "--tasks", "nope", "--out", str(out), "--settings", str(settings)]
    )
    assert code == 2 and "unknown task 'nope'" in capsys.readouterr().err
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    code = cli_main(
        ["eval", "--model", str(broken), "--tasks", "shapes_vqa", "--out", str(out), "--settings", str(settings)]
    )
    assert code == 2 and "missing model.safetensors" in capsys.readouterr().err
    old = tmp_path / "old.yaml"
    old.write_text("version: 0\n")
    code = cli_main(
        ["eval", "--model", str(chain["joint"]), "--tasks", "shapes_vqa", "--out", str(out), "--settings", str(old)]
    )
    assert code == 2 and "settings version 0" in capsys.readouterr().err
    assert not (out / "results.json").exists()


def test_standard_benchmarks_from_local_files(chain, settings, tmp_path, capsys):
    from PIL import Image

    from training.data.shapes import ShapesWorld, ShapesWorldConfig

    world = ShapesWorld(ShapesWorldConfig(image_size=32))
    images = tmp_path / "images"
    images.mkdir()
    pope_lines, vqa_questions, vqa_annotations, tsv = [], [], [], ["index\tquestion\tA\tB\tanswer\timage_path"]
    for index in range(4):
        sample = world.sample("test", index)
        name = f"COCO_val2014_{index:012d}.jpg"
        Image.fromarray(sample.image).save(images / name, format="JPEG")
        label = "yes" if index % 2 == 0 else "no"
        pope_lines.append(
            json.dumps({"question_id": index, "image": name, "text": "is there a circle?", "label": label})
        )
        vqa_questions.append({"question_id": index, "image_id": index, "question": "what colour is it?"})
        vqa_annotations.append(
            {"question_id": index, "image_id": index, "answers": [{"answer": "red", "answer_id": k} for k in range(10)]}
        )
        tsv.append(f"{index}\twhat shape?\tcircle\tsquare\tA\t{images / name}")
    (tmp_path / "pope.jsonl").write_text("\n".join(pope_lines) + "\n")
    (tmp_path / "q.json").write_text(json.dumps({"data_subtype": "val2014", "questions": vqa_questions}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": vqa_annotations}))
    (tmp_path / "mc.tsv").write_text("\n".join(tsv) + "\n")
    data = yaml.safe_load(settings.read_text())
    data["pope"] = {"questions": str(tmp_path / "pope.jsonl"), "image_dir": str(images)}
    data["vqav2"] = {
        "questions": str(tmp_path / "q.json"),
        "annotations": str(tmp_path / "a.json"),
        "image_dir": str(images),
    }
    data["multiple_choice"] = {"tsv": str(tmp_path / "mc.tsv")}
    settings.write_text(yaml.safe_dump(data))
    results = harness.evaluate(["pope", "vqav2", "multiple_choice"], tmp_path / "out", chain["joint"], settings)
    assert results["pope"]["num_questions"] == 4 and 0 <= results["pope"]["f1"] <= 1
    assert results["vqav2"]["questions"] == 4 and 0 <= results["vqav2"]["accuracy"] <= 1
    assert results["multiple_choice"]["num_questions"] == 4

    del data["pope"]
    settings.write_text(yaml.safe_dump(data))
    out = tmp_path / "missing"
    code = cli_main(
        ["eval", "--model", str(chain["joint"]), "--tasks", "pope", "--out", str(out), "--settings", str(settings)]
    )
    assert code == 2 and "needs `pope.questions`" in capsys.readouterr().err


def test_tokenizer_task_adds_lpips_from_local_vgg_weights(chain, tmp_path):
    """LPIPS appears only when a local VGG16 state dict is named, and is 0 only for a perfect decoder."""
    import torch
    import torchvision
    from torch import nn

    with torch.device("meta"):
        vgg = torchvision.models.vgg16(weights=None)
    vgg.features.to_empty(device="cpu")
    torch.manual_seed(0)
    for module in vgg.features:
        if isinstance(module, nn.Conv2d):
            module.reset_parameters()
    weights = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in vgg.features.state_dict().items()}, weights)
    data = yaml.safe_load((harness.Path(harness.__file__).parents[1] / "configs/eval/shapes.yaml").read_text())
    data["tokenizer"] = {"split": "test", "images": 3, "lpips_weights": str(weights)}
    settings = tmp_path / "lpips.yaml"
    settings.write_text(yaml.safe_dump(data))
    results = harness.evaluate(["tokenizer"], tmp_path / "out", chain["joint"], settings, batch_size=2)
    assert results["tokenizer"]["lpips"] > 0  # a micro tokenizer's reconstructions differ from the scenes
