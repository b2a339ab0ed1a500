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
    # The reported FID is the Fréchet distance of the cached features; the categories are the
    # per-image verdicts recorded in results.json.
    from eval.tasks.image_features import fid_from_features

    lines = (tmp_path / "b1" / "predictions" / "geneval.jsonl").read_text().splitlines()[1:]
    cached = [json.loads(line)["prediction"] for line in lines]
    fid = fid_from_features([p["ref_features"] for p in cached], [p["features"] for p in cached])
    assert one["geneval"]["fid"] == pytest.approx(fid)
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
    answers = {row["key"]: row for row in payload["answers"]["geneval"]}
    singles = [row for key, row in answers.items() if "/single/" in key]
    assert one["geneval"]["colors"] == pytest.approx(sum(row["correct"] for row in singles) / len(singles))
    assert "features" not in singles[0]  # feature vectors stay in the cache
    run = payload["runs"]["shapes_vqa"]
    assert len(run["fingerprint"]["model"]) == 64 and len(run["fingerprint"]["tokenizer"]) == 64
    assert run["dataset"] == {"world_seed": 0}
    markdown = (tmp_path / "b1" / "results.md").read_text()
    assert "| geneval | overall |" in markdown and run["cache_key"] in markdown
    assert f"| geneval | images | {one['geneval']['images']} |" in markdown  # counts print as integers
    assert len(list((tmp_path / "b1" / "images" / "geneval").glob("*.png"))) == one["geneval"]["images"]


def test_interrupted_run_resumes_from_the_cache(chain, settings, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = []

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
    assert len(cached) == 1 + 4  # the cache key header, then one line per prediction
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
    args = ["eval", "--model", str(chain["joint"]), "--tasks", "shapes_vqa", "--out", str(out)]
    code = cli_main([*args, "--settings", str(settings), "--device", "nonsense"])
    assert code == 2 and "--device 'nonsense': not a device" in capsys.readouterr().err


def test_standard_benchmarks_through_the_model(chain, settings, tmp_path, capsys):
    """The real Pipeline on the hub-layout fixtures: scores are those of the recorded answers."""
    from benchmark_fixtures import FIXTURES

    from eval.scoring import pope_metrics

    data = yaml.safe_load(settings.read_text())
    data["pope"] = {"parquet": str(FIXTURES / "pope_test.parquet"), "categories": ["random"]}
    data["mmbench"] = {"parquet": str(FIXTURES / "mmbench_dev_en.parquet")}
    settings.write_text(yaml.safe_dump(data))
    results = harness.evaluate(["pope", "mmbench"], tmp_path / "out", chain["joint"], settings)
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    answers = [row["answer"] for row in payload["answers"]["pope"]]
    assert [row["key"] for row in payload["answers"]["pope"]] == ["random/1", "random/2"]
    expected = {f"random/{k}": v for k, v in pope_metrics(answers, ["yes", "no"]).items()}
    assert {k: v for k, v in results["pope"].items() if k.startswith("random/")} == expected
    assert len(payload["answers"]["mmbench"]) == 3 + 2  # every rotation was asked
    assert payload["runs"]["pope"]["preprocessing"] == {"image_resize": "pad"}
    assert payload["runs"]["pope"]["dataset"]["files"].keys() == {str(FIXTURES / "pope_test.parquet")}

    del data["pope"]
    settings.write_text(yaml.safe_dump(data))
    out = tmp_path / "missing"
    code = cli_main(
        ["eval", "--model", str(chain["joint"]), "--tasks", "pope", "--out", str(out), "--settings", str(settings)]
    )
    assert code == 2 and "needs `pope.questions`" in capsys.readouterr().err


def test_compare_two_runs(tmp_path, capsys):
    for name, accuracy, resize in (("a", 0.5, "pad"), ("b", 0.75, "crop")):
        folder = tmp_path / name
        folder.mkdir()
        payload = {
            "results": {"gqa": {"accuracy": accuracy, "num_questions": 4}},
            "runs": {"gqa": {"preprocessing": {"image_resize": resize}, "cache_key": name}},
        }
        (folder / "results.json").write_text(json.dumps(payload))
    assert cli_main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    table = capsys.readouterr().out
    assert "| gqa | accuracy | 0.5000 | 0.7500 | 0.2500 |" in table
    assert "| gqa | num_questions | 4 | 4 | 0 |" in table
    assert 'gqa: preprocessing differs: A {"image_resize": "pad"} / B {"image_resize": "crop"}' in table
    assert cli_main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "none")]) == 2
    assert "no results.json" in capsys.readouterr().err


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
