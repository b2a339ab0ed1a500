"""Bad training data and the typed LLM config.

A bad image (truncated, missing, not an image) under ``data.on_bad_image``: ``error`` checkpoints
the steps trained so far and stops with one line naming the file, and the same command resumes
once the file is fixed; ``skip`` leaves it out, logs it once, counts and lists it, and a run that
is interrupted and resumed ends with the weights of one that is not. ``dualtoken check-data``
lists exactly the bad files; ``tokenize-codes --on-bad-image skip`` leaves them out of the code
shards. ``model.llm_config`` is checked against its transformers config class as the YAML loads.

The stage-1 runs are those of tests/training/test_training.py (a 3-layer, 32-wide ViT from a
2-step teacher, batch 8) on a 16-image image folder: two steps are one epoch.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import teacher_argv, tokenizer_argv

from tokenizer.config import ConfigError
from tokenizer.images import ImageLoadError
from tokenizer.model import DualTokenizer
from training import checkpointing, cli, train_teacher, train_tokenizer
from training.common import StepSampler
from training.config import load_config
from training.data import ShapesWorld, ShapesWorldConfig
from training.data.code_shards import META_NAME, CodeShardsMeta, tokenize_to_shards
from training.data.code_store import CodeStore
from training.mllm_config import MLLMStageConfig, validate_llm_config
from training.tokenizer_config import Stage1Config

TOKENIZER_CONFIG = "configs/tokenizer/tiny.yaml"
STAGE_CONFIG = "configs/stages/tiny/align.yaml"
NUM_TRAIN, NUM_HELD_OUT, BATCH = 16, 8, 8


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output_dir = tmp_path_factory.mktemp("stage0")
    train_teacher.main(teacher_argv(output_dir))
    return output_dir / train_teacher.TEACHER_DIRNAME


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/{train,val,test}/`` image folders of the Shapes world (16 / 8 / 8 PNGs of 64 px)."""
    root = tmp_path_factory.mktemp("clean_data")
    world = ShapesWorld(ShapesWorldConfig(seed=3, image_size=64, num_train=NUM_TRAIN, num_val=8, num_test=8))
    for split in ("train", "val", "test"):
        world.write_imagefolder(split, root / split, limit=NUM_TRAIN if split == "train" else NUM_HELD_OUT)
    return root


@pytest.fixture
def data(clean_data: Path, tmp_path: Path) -> Path:
    """A copy of ``clean_data`` that a test may break."""
    return Path(shutil.copytree(clean_data, tmp_path / "data"))


def data_sets(root: Path, *extra: str) -> list[str]:
    return ["data.kind=imagefolder", f"data.path={root}/{{split}}", *extra]


def files(folder: Path) -> list[Path]:
    """The images of an image folder, in the reader's (metadata) order."""
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    return [folder / json.loads(line)["file_name"] for line in lines]


def truncate(path: Path) -> bytes:
    """Cut ``path`` in half (a PNG that stops mid-stream); returns the original bytes."""
    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 2])
    return original


def second_batch_only(seed: int) -> int:
    """An index of the training folder read at step 2 but not at step 1 (so step 1 trains first)."""
    sampler = StepSampler(NUM_TRAIN, BATCH, seed, 0, 2)
    return next(i for i in sampler.batch_for_step(1) if i not in sampler.batch_for_step(0))


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / train_tokenizer.TOKENIZER_DIRNAME / "model.safetensors"))


def assert_same_weights(first: Path, second: Path) -> None:
    one, two = weights(first), weights(second)
    assert one.keys() == two.keys()
    different = [name for name in one if not torch.equal(one[name], two[name])]
    assert not different, different


def error_lines(capsys: pytest.CaptureFixture) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("dualtoken")]


@pytest.fixture(scope="module")
def clean_run(teacher: Path, clean_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stage 1 for two steps on the clean folder: the run a resumed one must match."""
    output_dir = tmp_path_factory.mktemp("clean_run")
    metrics = train_tokenizer.main(tokenizer_argv(output_dir, teacher, *data_sets(clean_data)))
    assert metrics["steps"] == 2 and "bad_images" not in metrics
    return output_dir


# ------------------------------------------------------------------ data.on_bad_image=error
def test_error_checkpoints_stops_with_one_line_and_resumes_once_fixed(
    teacher: Path, data: Path, clean_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    seed = load_config(Stage1Config, TOKENIZER_CONFIG).loop.seed
    bad = files(data / "train")[second_batch_only(seed)]
    original = truncate(bad)
    output_dir = tmp_path / "stage1"
    argv = tokenizer_argv(output_dir, teacher, *data_sets(data))  # data.on_bad_image=error is the default

    assert cli.main(["train-tokenizer", *argv]) == 2
    [line] = error_lines(capsys)
    assert str(bad) in line and "truncated" in line and "on_bad_image=skip" in line and "resume" in line
    # Step 1 trained on good images, and it is not lost: the checkpoint is the state before step 2.
    checkpoints = output_dir / "checkpoints"
    assert checkpointing.latest_checkpoint(checkpoints) == checkpoints / "step_0000001"
    assert not (output_dir / train_tokenizer.TOKENIZER_DIRNAME).exists()

    bad.write_bytes(original)
    metrics = train_tokenizer.main(argv)  # the same command, now that the file is fixed
    assert metrics["steps"] == 2
    assert_same_weights(output_dir, clean_run)


# ------------------------------------------------------------------ data.on_bad_image=skip
def test_skip_leaves_the_file_out_counts_it_and_resumes_exactly(
    teacher: Path, data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = files(data / "train")[5]
    truncate(bad)
    common = [*data_sets(data, "data.on_bad_image=skip"), "loop.save_every=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with caplog.at_level(logging.WARNING):
        metrics = train_tokenizer.main(tokenizer_argv(straight, teacher, *common, "loop.max_steps=4"))
    # Two epochs meet the file twice: it is logged once and counted once.
    assert len([r for r in caplog.records if "left out a bad image" in r.getMessage()]) == 1
    assert metrics["bad_images"] == 1
    listed = (straight / "bad_images.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == [str(bad)] and "truncated" in listed[0]
    assert json.loads((straight / "metrics.json").read_text())["bad_images"] == 1

    train_tokenizer.main(tokenizer_argv(resumed, teacher, *common, "loop.max_steps=2"))
    resumed_metrics = train_tokenizer.main(tokenizer_argv(resumed, teacher, *common, "loop.max_steps=4"))
    assert resumed_metrics["bad_images"] == 1
    assert_same_weights(straight, resumed)


# ------------------------------------------------------------------ dualtoken check-data
def test_check_data_lists_exactly_the_bad_files(data: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["check-data", TOKENIZER_CONFIG, *[item for value in data_sets(data) for item in ("--set", value)]]
    assert cli.main(argv) == 0
    assert "all 32 images decode" in capsys.readouterr().out

    truncated, missing, not_an_image = files(data / "train")[3], files(data / "val")[0], files(data / "test")[7]
    truncate(truncated)
    missing.unlink()
    not_an_image.write_text("not a PNG")
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    listed = {line.split("\t")[0]: line for line in captured.out.splitlines() if "\t" in line}
    assert set(listed) == {str(truncated), str(missing), str(not_an_image)}
    assert "file not found" in listed[str(missing)] and "cannot decode" in listed[str(not_an_image)]
    [line] = [line for line in captured.err.splitlines() if line.startswith("dualtoken")]
    assert "3 of 32 images are bad" in line


def test_check_data_reads_the_images_of_an_llm_stage(data: Path, tmp_path: Path, capsys) -> None:
    pairs = tmp_path / "t2i.jsonl"
    names = [path.relative_to(data).as_posix() for path in files(data / "train")[:4]]
    pairs.write_text("".join(json.dumps({"image": name, "caption": "a red circle"}) + "\n" for name in names))
    truncate(data / names[2])
    sets = [
        f"data.text_image=[{pairs}]",
        f"data.image_root={data}",
        "data.conversations=[]",
        "data.val_conversations=[]",
        "data.val_text_image=[]",
        f"data.codes={tmp_path / 'no_codes_yet'}",
    ]
    assert cli.main(["check-data", STAGE_CONFIG, *[item for value in sets for item in ("--set", value)]]) == 2
    captured = capsys.readouterr()
    assert [line.split("\t")[0] for line in captured.out.splitlines() if "\t" in line] == [names[2]]
    assert "1 of 4 images are bad" in captured.err


# ------------------------------------------------------------------ tokenize-codes
def test_tokenize_codes_skips_bad_images_and_encodes_them_once_fixed(
    clean_run: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tokenizer_dir = clean_run / train_tokenizer.TOKENIZER_DIRNAME
    visual_tokenizer = DualTokenizer.from_pretrained(tokenizer_dir)
    keys = [path.relative_to(data).as_posix() for path in files(data / "train")[:6]]
    bad_key = keys[4]  # in the second of two shards of 4: the first is written before it is met
    original = truncate(data / bad_key)

    with pytest.raises(ImageLoadError) as stopped:
        tokenize_to_shards(visual_tokenizer, keys, data, tmp_path / "stopped", batch_size=2, shard_size=4)
    message = str(stopped.value)
    assert "\n" not in message and bad_key in message and "--on-bad-image skip" in message
    assert CodeShardsMeta.from_file(tmp_path / "stopped" / META_NAME).shards == ["shard-00000"]

    pairs = tmp_path / "t2i.jsonl"
    pairs.write_text("".join(json.dumps({"image": key, "caption": "a red circle"}) + "\n" for key in keys))
    out = tmp_path / "codes"
    command = ["tokenize-codes", "--tokenizer", str(tokenizer_dir), "--t2i", str(pairs), "--image-root", str(data)]
    command += ["--out", str(out), "--batch-size", "2", "--shard-size", "4", "--on-bad-image", "skip"]
    assert cli.main(command) == 0, error_lines(capsys)
    store = CodeStore(out)
    assert sorted(store.keys()) == sorted(set(keys) - {bad_key})
    assert store.meta.bad_images == {"shard-00001": [bad_key]}
    [line] = (out / "bad_images.txt").read_text().splitlines()
    assert line.startswith(f"{bad_key}\t") and "truncated" in line
    # An LLM stage trains on the other records and leaves out the one whose image has no codes.
    from types import SimpleNamespace

    from training.mllm_data import check_images_tokenised, drop_skipped_images

    records = [SimpleNamespace(image_key=key, image=str(data / key)) for key in keys]
    kept = drop_skipped_images(store, records, str(out))
    assert [record.image_key for record in kept] == [key for key in keys if key != bad_key]
    check_images_tokenised(store, kept, str(out))

    (data / bad_key).write_bytes(original)
    assert cli.main(command) == 0, error_lines(capsys)  # the shard that left it out is encoded again
    store = CodeStore(out)
    assert sorted(store.keys()) == sorted(keys) and store.meta.bad_images == {}
    assert (out / "bad_images.txt").read_text() == ""


# ------------------------------------------------------------------ model.llm_config
def test_a_misspelt_llm_config_key_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(MLLMStageConfig, STAGE_CONFIG, ["model.llm_config.num_hiden_layers=2"])
    message = str(raised.value)
    assert "unknown key model.llm_config.num_hiden_layers" in message and "\n" not in message
    valid = message.split("valid keys: ")[1].split(", ")
    assert valid[0] == "num_hidden_layers"  # the closest match first
    assert {"hidden_size", "rms_norm_eps", "vocab_size", "tie_word_embeddings"} <= set(valid)
    # The keys come from the config class of the model type, not from a list: GPT-2 has its own.
    with pytest.raises(ConfigError, match=r"did you mean n_layer"):
        validate_llm_config({"model_type": "gpt2", "n_layers": 2})
    with pytest.raises(ConfigError, match=r"model_type='qwen' is not a transformers model type; did you mean"):
        validate_llm_config({"model_type": "qwen"})


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("num_hidden_layers=two", "model.llm_config.num_hidden_layers='two'; expected int"),
        ("rms_norm_eps=[0.1]", "model.llm_config.rms_norm_eps=[0.1]; expected float"),
        ("rms_norm_eps='1e-6'", "write it with a decimal point"),  # YAML 1.1 reads 1e-6 as text
        ("tie_word_embeddings=3", "model.llm_config.tie_word_embeddings=3; expected bool"),
    ],
)
def test_a_wrong_llm_config_type_is_one_line(override: str, expected: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(MLLMStageConfig, STAGE_CONFIG, [f"model.llm_config.{override}"])
    assert expected in str(raised.value) and "\n" not in str(raised.value)
    # The stage stops as the YAML loads, before any model is built.
    assert cli.main(["train-mllm", "--config", STAGE_CONFIG, "--set", f"model.llm_config.{override}"]) == 2
    [line] = error_lines(capsys)
    assert expected in line


def test_llm_config_keeps_converted_keys_and_makes_integers_floats() -> None:
    config = load_config(
        MLLMStageConfig, STAGE_CONFIG, ["model.llm_config.rms_norm_eps=1", "model.llm_config.rope_theta=500"]
    )
    llm_config = config.model.llm_config
    assert llm_config["rms_norm_eps"] == 1.0 and isinstance(llm_config["rms_norm_eps"], float)
    assert llm_config["rope_theta"] == 500  # transformers moves it into rope_parameters itself
