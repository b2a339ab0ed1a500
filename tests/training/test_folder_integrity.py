"""Finished folders are the ones whose manifest verifies (tokenizer/files.py), for every writer.

An LLM model folder, a stage-0 teacher, a stage-1 tokenizer folder, a checkpoint and a code
shard: each carries a manifest written last; completeness, reuse and loading refuse a folder
with a missing or truncated file by name, and a kill between the two renames of a replacement is
recovered by the next load or write. The LLM folders are copies of the ``chain`` fixture's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from mllm.model_folder import load_model_folder, model_folder_is_complete
from tokenizer import files
from tokenizer.config import BackboneConfig
from tokenizer.files import MANIFEST_NAME, ManifestError, verify_manifest
from training import checkpointing, distributed, train_teacher, train_tokenizer
from training.common import run_or_reuse
from training.mllm_model import save_model_folder


class SimulatedKill(BaseException):
    """Stands for a kill -9 between the two renames of tokenizer.files.replace_directory."""


def kill_between_renames(monkeypatch: pytest.MonkeyPatch) -> None:
    real_replace = os.replace
    folder_renames = []

    def replace(source, target):
        if Path(source).is_dir():
            folder_renames.append(source)
            if len(folder_renames) == 2:  # the old folder is aside, the new one not yet in place
                raise SimulatedKill
        real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", replace)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def model_dir(chain: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(chain["align"], tmp_path / "align" / "model"))


# ------------------------------------------------------------------------------ LLM model folders
def test_a_model_folder_without_its_tokenizer_json_is_not_complete_and_does_not_load(model_dir: Path) -> None:
    assert model_folder_is_complete(model_dir)
    (model_dir / "tokenizer.json").unlink()
    assert not model_folder_is_complete(model_dir)
    with pytest.raises(ManifestError, match="tokenizer.json is missing") as error:
        load_model_folder(model_dir)
    assert str(model_dir) in one_line(error)


def test_a_truncated_weights_file_is_refused_by_name(model_dir: Path) -> None:
    weights = model_dir / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    assert not model_folder_is_complete(model_dir)
    with pytest.raises(ManifestError, match=r"model\.safetensors is \d+ bytes.*truncated") as error:
        load_model_folder(model_dir)
    one_line(error)


def test_a_killed_replacement_of_a_model_folder_is_recovered_on_load_and_on_write(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, text_tokenizer, sidecar = load_model_folder(model_dir)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with monkeypatch.context() as patch:
        kill_between_renames(patch)
        with pytest.raises(SimulatedKill):
            save_model_folder(model, text_tokenizer, model_dir, sidecar, {"loss": 1.0})
    assert not model_dir.exists()
    reloaded, _, _ = load_model_folder(model_dir)  # the old folder is back
    assert all(torch.equal(before[name], tensor) for name, tensor in reloaded.state_dict().items())
    with monkeypatch.context() as patch:
        kill_between_renames(patch)
        with pytest.raises(SimulatedKill):
            save_model_folder(model, text_tokenizer, model_dir, sidecar, {"loss": 1.0})
    save_model_folder(model, text_tokenizer, model_dir, sidecar, {"loss": 2.0})  # the next write recovers first
    assert model_folder_is_complete(model_dir)
    assert json.loads((model_dir / "metrics.json").read_text()) == {"loss": 2.0}
    assert sorted(path.name for path in model_dir.parent.iterdir()) == ["model"]


def test_a_model_folder_without_a_manifest_loads_with_a_warning_but_is_trained_again(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (model_dir / MANIFEST_NAME).unlink()
    with caplog.at_level(logging.WARNING, logger="tokenizer.files"):
        load_model_folder(model_dir)
    assert any(f"{model_dir} has no manifest.json" in record.getMessage() for record in caplog.records)
    trained = []
    reused, _ = run_or_reuse(
        "LLM stage align",
        model_dir.parent,
        ["--config", "align.yaml"],
        None,
        lambda: model_folder_is_complete(model_dir),
        trained.append,
        str(model_dir),
    )
    assert not reused and trained == [["--config", "align.yaml"]]


# ------------------------------------------------------------------------------ stage 0 / stage 1
def tiny_teacher_folder(directory: Path) -> Path:
    from tokenizer.text_tower import build_word_tokenizer

    text_tokenizer = build_word_tokenizer(["a red circle", "a blue square"], max_length=8)
    config = train_teacher.TeacherConfig(
        vision=BackboneConfig(
            image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64
        ),
        text=train_teacher.TextTowerConfig(num_layers=1, num_heads=2, intermediate_size=64, max_length=8),
    )
    model = train_teacher.build_teacher(config, vocab_size=len(text_tokenizer))
    train_teacher.save_teacher(model, text_tokenizer, directory, {"teacher_zero_shot_val": 0.5})
    return directory


def test_a_teacher_without_its_text_tokenizer_is_refused_with_one_line(tmp_path: Path) -> None:
    teacher = tiny_teacher_folder(tmp_path / "teacher")
    assert train_teacher.teacher_is_complete(teacher)
    train_tokenizer.load_teacher(str(teacher))
    (teacher / "tokenizer.json").unlink()
    assert not train_teacher.teacher_is_complete(teacher)
    with pytest.raises(ManifestError, match="tokenizer.json is missing") as error:
        train_tokenizer.load_teacher(str(teacher))
    assert str(teacher) in one_line(error)
    # A checkpoint without a manifest (a downloaded SigLIP) is checked by name before loading.
    (teacher / MANIFEST_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"has no text tokenizer \(tokenizer.json or spiece.model\)") as error:
        train_tokenizer.load_teacher(str(teacher))
    one_line(error)


def test_a_tokenizer_folder_holds_its_metrics_in_the_manifest(tmp_path: Path) -> None:
    from mllm_fixtures import tiny_visual_tokenizer

    from tokenizer.model import DualTokenizer

    visual_tokenizer = tiny_visual_tokenizer()
    directory = tmp_path / "stage1" / train_tokenizer.TOKENIZER_DIRNAME

    def write_metrics(staging: Path) -> None:
        (staging / "metrics.json").write_text('{"val_psnr": 10.0}')

    visual_tokenizer.save_pretrained(directory)
    assert not train_tokenizer.tokenizer_is_complete(directory)  # no metrics: the stage did not finish
    visual_tokenizer.save_pretrained(directory, write_metrics)
    assert train_tokenizer.tokenizer_is_complete(directory)
    (directory / "metrics.json").write_text('{"val_psnr": 99.0}')  # same size, edited
    assert not train_tokenizer.tokenizer_is_complete(directory)
    with open(directory / "model.safetensors", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ManifestError, match=r"model\.safetensors is \d+ bytes") as error:
        DualTokenizer.from_pretrained(directory)
    one_line(error)


# ------------------------------------------------------------------------------ checkpoints, code shards
def test_a_checkpoint_carries_a_manifest_and_a_killed_resave_is_recovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = torch.nn.Linear(4, 2)
    engine = distributed.TrainEngine(model, torch.optim.AdamW(model.parameters()), None, grad_clip=1.0)
    root = tmp_path / "checkpoints"
    step = checkpointing.save_checkpoint(root, 3, {"model": engine}, {"seen": 12})
    listed = {entry["path"] for entry in verify_manifest(step, full=True)["files"]}
    assert {"trainer_state.json", "rng_rank0.pt"} <= listed and any(name.startswith("model/") for name in listed)
    with monkeypatch.context() as patch:
        kill_between_renames(patch)
        with pytest.raises(SimulatedKill):
            checkpointing.save_checkpoint(root, 3, {"model": engine}, {"seen": 24})
    assert not step.exists()  # the kill left the finished staging folder and the old one aside
    checkpointing.save_checkpoint(root, 4, {"model": engine}, {"seen": 32})
    checkpointing.save_checkpoint(root, 3, {"model": engine}, {"seen": 36})  # recovers, then replaces
    assert json.loads((step / "trainer_state.json").read_text())["seen"] == 36
    assert sorted(path.name for path in root.iterdir()) == ["latest", "step_0000003", "step_0000004"]


def test_code_shards_carry_a_manifest(data: dict[str, Path]) -> None:
    shards = sorted(data["train_codes"].glob("shard-*"))
    assert shards
    for shard in shards:
        assert any(entry["path"].endswith(".arrow") for entry in verify_manifest(shard, full=True)["files"])
