"""The ``dualtoken`` command: exit codes, one-line errors, and ``tokenize`` / ``reconstruct`` on files.

A tiny random DualTokenizer (32x32 images, 4x4 tokens), initialised by one training forward
and saved with ``save_pretrained``, stands in for a trained one; the images are PNGs written
from the Shapes world.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from tokenizer.config import (
    BackboneConfig,
    DecoderConfig,
    DualTokenizerConfig,
    ProjectionConfig,
    QuantizerConfig,
    TapsConfig,
)
from tokenizer.model import DualTokenizer
from tokenizer.text_tower import build_word_tokenizer
from training import cli, train_teacher
from training.data import ShapesWorld, ShapesWorldConfig
from training.train_teacher import TeacherConfig, TextTowerConfig

TOKENIZER_SIZE, GRID, DEPTH, CODEBOOK_SIZE = 32, 4, 2, 16
NUM_IMAGES = 3


def _error_lines(captured: pytest.CaptureFixture) -> list[str]:
    """The ``dualtoken ...: error: ...`` lines on stderr (logging may add others)."""
    err = captured.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("dualtoken")]


def _assert_one_error(capsys: pytest.CaptureFixture, *fragments: str) -> str:
    errors = _error_lines(capsys)
    assert len(errors) == 1, errors
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def visual_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = DualTokenizerConfig(
        backbone=BackboneConfig(
            image_size=TOKENIZER_SIZE, patch_size=8, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64
        ),
        taps=TapsConfig(pixel_layer=1, semantic_layer=2),
        projection=ProjectionConfig(kind="linear", hidden_dim=32),
        pixel_quantizer=QuantizerConfig(codebook_size=CODEBOOK_SIZE, code_dim=8, depth=DEPTH),
        semantic_quantizer=QuantizerConfig(codebook_size=CODEBOOK_SIZE, code_dim=8, depth=DEPTH),
        decoder=DecoderConfig(base_channels=8, channel_mult=(1, 1, 1, 1), num_res_blocks=1, mid_attention=False),
    )
    visual_tokenizer = DualTokenizer(config).train()
    visual_tokenizer(torch.rand(8, 3, TOKENIZER_SIZE, TOKENIZER_SIZE) * 2 - 1)  # k-means-initialises both codebooks
    return visual_tokenizer.save_pretrained(tmp_path_factory.mktemp("cli") / "tokenizer")


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three 64x64 RGB PNGs of the Shapes world's test split (resized to 32x32 on load)."""
    world = ShapesWorld(ShapesWorldConfig(seed=0, image_size=64, num_train=8))
    folder = world.write_imagefolder("test", tmp_path_factory.mktemp("images"), limit=NUM_IMAGES)
    paths = sorted(folder.glob("*.png"))
    assert len(paths) == NUM_IMAGES
    return paths


# ------------------------------------------------------------------------------ dispatch
def test_help_lists_every_command(capsys: pytest.CaptureFixture) -> None:
    for argv in ([], ["--help"], ["-h"]):
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        for command in cli.SUBCOMMANDS:
            assert command in out


def test_subcommand_help_returns_zero(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["tokenize", "--help"]) == 0
    assert "--tokenizer" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["train-teacher", "train-tokenizer", "train-mllm"])
@pytest.mark.parametrize("flag", [["--local_rank", "1"], ["--local_rank=1"], ["--local-rank=1"]])
def test_trainers_take_the_deepspeed_launchers_local_rank(
    command: str, flag: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # The deepspeed launcher starts `python -m training.<trainer> --local_rank=N --config ...`.
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert cli.main([command, *flag, "--help"]) == 0
    assert "--local_rank" in capsys.readouterr().out
    assert os.environ["LOCAL_RANK"] == "1"  # read by init_distributed, where no launcher exported it
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert cli.main([command, *flag, "--help"]) == 0
    assert os.environ["LOCAL_RANK"] == "0"  # what a launcher exports wins


def test_unknown_subcommand(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["train-everything"]) == 2
    assert "unknown command 'train-everything'" in capsys.readouterr().err


def test_missing_required_flag_returns_two(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["tokenize", "--images", "a.png"]) == 2
    assert "--tokenizer" in capsys.readouterr().err


# ------------------------------------------------------------------------------ config errors
def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nope.yaml"
    assert cli.main(["train-teacher", "--config", str(missing)]) == 2
    _assert_one_error(capsys, "dualtoken train-teacher: error:", str(missing), "does not exist")


def test_unknown_config_key(capsys: pytest.CaptureFixture) -> None:
    argv = ["train-tokenizer", "--config", "configs/tokenizer/tiny.yaml", "--set", "loop.max_stepz=3"]
    assert cli.main(argv) == 2
    _assert_one_error(capsys, "unknown config key loop.max_stepz", "max_steps")


def test_out_of_range_tap_in_the_config(capsys: pytest.CaptureFixture) -> None:
    argv = ["train-tokenizer", "--config", "configs/tokenizer/tiny.yaml", "--set", "tokenizer.taps.semantic_layer=9"]
    assert cli.main(argv) == 2
    _assert_one_error(capsys, "tokenizer.taps.semantic_layer=9", "3 layers")


def test_out_of_range_tap_for_the_teacher(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The overridden YAML says 6 layers; the teacher on disk has 3, and only it decides."""
    vision = BackboneConfig(
        image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64
    )
    text_tokenizer = build_word_tokenizer(["a photo of a red circle."], max_length=8)
    teacher_config = TeacherConfig(
        vision=vision, text=TextTowerConfig(num_layers=1, num_heads=2, intermediate_size=64, max_length=8)
    )
    teacher = train_teacher.build_teacher(teacher_config, vocab_size=len(text_tokenizer))
    teacher_dir = tmp_path / "teacher"
    train_teacher.save_teacher(teacher, text_tokenizer, teacher_dir, {})
    argv = [
        "train-tokenizer",
        "--config",
        "configs/tokenizer/tiny.yaml",
        "--set",
        f"teacher_path={teacher_dir}",
        "--set",
        f"loop.output_dir={tmp_path / 'stage1'}",
        "--set",
        "tokenizer.backbone.num_layers=6",
        "--set",
        "tokenizer.taps.semantic_layer=5",
    ]
    assert cli.main(argv) == 2
    _assert_one_error(capsys, "taps.semantic_layer=5", "3 layers")


# ------------------------------------------------------------------------------ tokenize / reconstruct
def test_tokenize_writes_codes(visual_tokenizer_dir: Path, image_paths: list[Path], tmp_path: Path) -> None:
    output = tmp_path / "out" / "codes.safetensors"
    argv = ["tokenize", "--tokenizer", str(visual_tokenizer_dir), "--images", *map(str, image_paths), "-o", str(output)]
    assert cli.main(argv) == 0
    payload = load_file(output)
    with safe_open(str(output), "pt") as stored:
        assert json.loads(stored.metadata()["files"]) == [str(path) for path in image_paths]
    for key in ("pixel_codes", "semantic_codes"):
        codes = payload[key]
        assert codes.shape == (NUM_IMAGES, GRID, GRID, DEPTH) and codes.dtype == torch.int64
        assert 0 <= int(codes.min()) and int(codes.max()) < CODEBOOK_SIZE
    # The codes decode back to images the reconstruct command would show.
    visual_tokenizer = DualTokenizer.from_pretrained(visual_tokenizer_dir)
    assert visual_tokenizer.decode(payload["pixel_codes"]).shape == (NUM_IMAGES, 3, TOKENIZER_SIZE, TOKENIZER_SIZE)


def test_reconstruct_writes_a_grid(visual_tokenizer_dir: Path, image_paths: list[Path], tmp_path: Path) -> None:
    output = tmp_path / "grid.png"
    argv = [
        "reconstruct",
        "--tokenizer",
        str(visual_tokenizer_dir),
        "--images",
        *map(str, image_paths),
        "-o",
        str(output),
    ]
    assert cli.main(argv) == 0
    with Image.open(output) as grid:
        # Two rows (original, decoded) of NUM_IMAGES tiles, 2-px padding, an 80-px label column.
        assert grid.size == (80 + NUM_IMAGES * (TOKENIZER_SIZE + 2) + 2, 2 * (TOKENIZER_SIZE + 2) + 2)
        pixels = np.asarray(grid.convert("RGB"))
    first_original = pixels[2 : 2 + TOKENIZER_SIZE, 82 : 82 + TOKENIZER_SIZE]
    assert first_original.std() > 0  # a real image was pasted, not the white canvas


def test_awkward_modes_convert_unless_strict(
    visual_tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    grey = tmp_path / "grey.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48), dtype=np.uint8), mode="L").save(grey)
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (40, 40), (255, 0, 0, 128)).save(rgba)
    output = tmp_path / "codes.safetensors"
    argv = ["tokenize", "--tokenizer", str(visual_tokenizer_dir), "--images", str(grey), str(rgba), "-o", str(output)]
    assert cli.main(argv) == 0
    assert load_file(output)["pixel_codes"].shape == (2, GRID, GRID, DEPTH)
    assert cli.main([*argv, "--convert-to-rgb"]) == 0  # the older opt-in flag still runs
    output.unlink()
    capsys.readouterr()
    assert cli.main([*argv, "--strict"]) == 2
    _assert_one_error(capsys, str(grey), "mode 'L'", "leave out --strict")
    assert not output.exists()


def _write_bad_image(kind: str, path: Path) -> None:
    if kind == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG body")
    elif kind == "tiny":
        Image.new("RGB", (1, 1), (255, 0, 0)).save(path)
    elif kind == "folder":
        path.mkdir()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "file not found"),
        ("corrupt", "cannot decode"),
        ("tiny", "1x1 pixels"),
        ("folder", "is a directory, not an image"),
    ],
)
@pytest.mark.parametrize("command", ["tokenize", "reconstruct"])
def test_bad_image_gives_exit_two_naming_the_file(
    command: str,
    kind: str,
    message: str,
    visual_tokenizer_dir: Path,
    image_paths: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    bad = tmp_path / f"{kind}.png"
    _write_bad_image(kind, bad)
    output = tmp_path / ("out.png" if command == "reconstruct" else "out.safetensors")
    # The bad file comes after a good one: the whole call fails, and nothing is written.
    argv = [
        command,
        "--tokenizer",
        str(visual_tokenizer_dir),
        "--images",
        str(image_paths[0]),
        str(bad),
        "-o",
        str(output),
    ]
    assert cli.main(argv) == 2
    _assert_one_error(capsys, f"dualtoken {command}: error:", str(bad), message)
    assert not output.exists()


def test_missing_tokenizer_directory(image_paths: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "no-tokenizer"
    argv = [
        "tokenize",
        "--tokenizer",
        str(missing),
        "--images",
        str(image_paths[0]),
        "-o",
        str(tmp_path / "c.safetensors"),
    ]
    assert cli.main(argv) == 2
    _assert_one_error(capsys, str(missing), "config.json")
