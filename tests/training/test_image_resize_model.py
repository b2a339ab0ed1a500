"""``image_resize`` from the code shards to the model folder, the Pipeline and the evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mllm_fixtures import REPO, stage_overrides

from eval import harness
from mllm.inference import Pipeline
from mllm.model_folder import SIDECAR, load_model_folder, recorded_image_resize
from training import train_mllm
from training.cli import main as cli_main
from training.data.code_shards import META_NAME, CodeShardsMeta


@pytest.fixture(scope="module")
def cropped_model(data, tmp_path_factory) -> Path:
    """A 2-step align stage trained on codes written with ``tokenize-codes --image-resize crop``."""
    root = tmp_path_factory.mktemp("cropped")
    codes = root / "codes"
    cli_main(
        [
            "tokenize-codes",
            "--tokenizer",
            str(data["visual_tokenizer"]),
            "--llava",
            str(data["train_llava"]),
            "--t2i",
            str(data["train_t2i"]),
            "--out",
            str(codes),
            "--device",
            "cpu",
            "--image-resize",
            "crop",
        ]
    )
    argv = ["--config", str(REPO / "configs" / "stages" / "tiny" / "align.yaml")]
    for override in [*stage_overrides(data, root / "align"), f"data.codes={codes}"]:
        argv += ["--set", override]
    train_mllm.main(argv)
    return root / "align" / "model"


def test_tokenize_codes_records_image_resize(data, cropped_model: Path) -> None:
    cropped = CodeShardsMeta.from_file(cropped_model.parent.parent / "codes" / META_NAME)
    assert cropped.image_resize == "crop" and cropped.generation_keys_sha256  # the --t2i images, hashed
    assert CodeShardsMeta.from_file(data["train_codes"] / META_NAME).image_resize == "pad"  # the default


def test_model_folder_records_the_mode_and_the_pipeline_follows_it(cropped_model: Path) -> None:
    _, _, sidecar = load_model_folder(cropped_model)
    assert sidecar["image_resize"] == "crop" == recorded_image_resize(cropped_model)
    assert Pipeline.from_pretrained(cropped_model, device="cpu").image_resize == "crop"
    assert Pipeline.from_pretrained(cropped_model, device="cpu", image_resize="pad").image_resize == "pad"
    pipe = Pipeline.from_pretrained(cropped_model, device="cpu")
    # built directly, a Pipeline pads unless told otherwise (LLaVA's choice for answering)
    assert Pipeline(pipe.model, pipe.text_tokenizer, pipe.visual_tokenizer).image_resize == "pad"
    with pytest.raises(ValueError, match=r"image_resize='stretch'; expected one of crop\|pad"):
        Pipeline(pipe.model, pipe.text_tokenizer, pipe.visual_tokenizer, image_resize="stretch")
    with pytest.raises(ValueError, match=r"image_resize='stretch'; expected one of crop\|pad"):
        Pipeline.from_pretrained(cropped_model, device="cpu", image_resize="stretch")


def test_a_bad_recorded_mode_is_named_with_its_file(tmp_path: Path) -> None:
    (tmp_path / SIDECAR).write_text(json.dumps({"tokenizer_path": "x", "image_resize": "stretch"}))
    with pytest.raises(ValueError, match=rf"{SIDECAR}: image_resize='stretch'; expected one of crop\|pad"):
        Pipeline.from_pretrained(tmp_path, device="cpu")  # refused before any weights load
    (tmp_path / SIDECAR).write_text(json.dumps({"tokenizer_path": "x"}))
    assert recorded_image_resize(tmp_path) is None  # a folder from before the setting: answered with pad


@pytest.mark.parametrize(("setting", "expected"), [(None, "crop"), ("pad", "pad")])
def test_evaluation_uses_the_recorded_mode_unless_its_settings_say(
    cropped_model: Path, tmp_path: Path, setting: str | None, expected: str
) -> None:
    pope = {
        "parquet": str(REPO / "tests" / "eval" / "fixtures" / "pope_test.parquet"),
        "categories": ["random"],
        "limit": 1,
    }
    if setting is not None:
        pope["image_resize"] = setting
    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump({"version": 1, "seed": 0, "world_seed": 0, "pope": pope}))
    harness.evaluate(["pope"], tmp_path / "out", cropped_model, settings, device="cpu")
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    assert payload["runs"]["pope"]["preprocessing"] == {"image_resize": expected}
