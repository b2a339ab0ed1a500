"""A teacher or an LLM named by a local folder or by a hub id found in the Hugging Face cache.

The hub cache here is a temporary folder (``HF_HOME``) laid out as ``huggingface_hub`` lays it
out (``models--org--name/snapshots/<revision>/`` and ``refs/main``), and ``HF_HUB_OFFLINE`` is
set, so nothing is downloaded: an id that is not there must fail with one line saying how to get it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from real_format_models import IMAGE_SIZE, VISION_LAYERS, place_in_hub_cache, save_siglip

from tokenizer.pretrained import resolve_pretrained
from tokenizer.siglip_backbone import SiglipBackbone, siglip_vision_config
from training import cli
from training.train_tokenizer import load_teacher

HUB_ID = "tiny-org/siglip-tiny"


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_siglip(tmp_path_factory.mktemp("siglip") / "model")


@pytest.fixture
def hub_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face home under ``tmp_path``, offline."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_a_local_folder_is_used_as_it_is(siglip_dir: Path, hub_home: Path) -> None:
    assert resolve_pretrained(str(siglip_dir), "teacher_path") == siglip_dir
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_pretrained(str(siglip_dir.parent), "teacher_path")


def test_a_hub_id_resolves_to_its_cached_snapshot(siglip_dir: Path, hub_home: Path) -> None:
    snapshot = place_in_hub_cache(siglip_dir, hub_home / "hub", HUB_ID)
    assert resolve_pretrained(HUB_ID, "teacher_path") == snapshot
    assert siglip_vision_config(HUB_ID).num_hidden_layers == VISION_LAYERS
    direct = SiglipBackbone.from_pretrained(str(siglip_dir)).eval()
    by_id = SiglipBackbone.from_pretrained(HUB_ID).eval()
    images = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(by_id(images).pooled, direct(images).pooled)
    trainable, teacher = load_teacher(HUB_ID)
    assert teacher.text_tower is not None and teacher.text_tokenizer is not None
    assert trainable.num_layers == VISION_LAYERS


def test_an_absent_hub_id_says_how_to_get_it(hub_home: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        resolve_pretrained("tiny-org/not-downloaded", "model.llm_pretrained")
    message = str(error.value)
    assert (
        "model.llm_pretrained='tiny-org/not-downloaded' is neither a folder nor in the local Hugging Face cache"
        in message
    )
    assert f"HF_HOME={hub_home}" in message and "hf download tiny-org/not-downloaded" in message


def test_the_paper_tokenizer_config_names_a_missing_teacher_in_one_line(
    hub_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = [
        "train-tokenizer",
        "--config",
        "configs/tokenizer/so400m_384_rvq8.yaml",
        "--set",
        f"loop.output_dir={tmp_path / 'stage1'}",
        "--set",
        "deepspeed.enabled=false",
    ]
    assert cli.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dualtoken")]
    assert len(lines) == 1
    assert (
        "teacher_path='google/siglip-so400m-patch14-384' is neither a folder nor in the local Hugging Face cache"
        in lines[0]
    )
