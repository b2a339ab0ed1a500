"""The training applications end to end on CPU: stage 0, stage 1, exact resume, checkpoints, the tiny pipeline.

Every run uses the real YAML files (configs/tokenizer/tiny_teacher.yaml, tiny.yaml) with
`--set` overrides that shrink it to seconds: a 3-layer, 32-wide ViT, 2-step runs, batch 8,
8 evaluation images and a 64-image training split. One tiny teacher is trained per module
(fixture ``teacher_dir``) and every stage-1 test starts from it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tokenizer.config import ConfigError
from tokenizer.model import DualTokenizer
from training import checkpointing, cli, tiny_pipeline, train_teacher, train_tokenizer
from training.config import CheckpointWriteError
from training.data import ShapesImageDataset, ShapesWorld, ShapesWorldConfig
from training.evaluation import tokenizer_metrics

TEACHER_CONFIG = "configs/tokenizer/tiny_teacher.yaml"
TOKENIZER_CONFIG = "configs/tokenizer/tiny.yaml"
IMAGE_SIZE, GRID, CODEBOOK_SIZE, DEPTH, EVAL_IMAGES, NUM_TRAIN = 64, 8, 32, 2, 8, 64

# One thread: on a shared 2-core machine torch's default of 2 threads is ~10x slower for
# these tiny matrices (measured: 0.9 s vs 0.05 s per stage-0 backward).
LOOP_SETS = [
    "loop.max_steps=2",
    "loop.batch_size=8",
    f"loop.eval_images={EVAL_IMAGES}",
    "loop.eval_every=1000",
    "loop.log_every=1",
    "loop.num_threads=1",
    f"data.shapes.num_train={NUM_TRAIN}",
]
TEACHER_SETS = [
    "teacher.vision.hidden_size=32",
    "teacher.vision.num_layers=3",
    "teacher.vision.num_heads=2",
    "teacher.vision.intermediate_size=64",
    "teacher.text.num_layers=1",
    "teacher.text.num_heads=2",
    "teacher.text.intermediate_size=64",
]
# The backbone is built from the teacher; its section here only documents the same sizes.
TOKENIZER_SETS = [
    "tokenizer.backbone.hidden_size=32",
    "tokenizer.backbone.num_layers=3",
    "tokenizer.backbone.num_heads=2",
    "tokenizer.backbone.intermediate_size=64",
    "tokenizer.taps.pixel_layer=1",
    "tokenizer.taps.semantic_layer=2",
    "tokenizer.projection.hidden_dim=32",
    f"tokenizer.pixel_quantizer.codebook_size={CODEBOOK_SIZE}",
    "tokenizer.pixel_quantizer.code_dim=8",
    f"tokenizer.pixel_quantizer.depth={DEPTH}",
    f"tokenizer.semantic_quantizer.codebook_size={CODEBOOK_SIZE}",
    "tokenizer.semantic_quantizer.code_dim=8",
    f"tokenizer.semantic_quantizer.depth={DEPTH}",
    "tokenizer.decoder.base_channels=8",
    "tokenizer.decoder.channel_mult=[1,1,2,2]",  # 8x8 tokens -> 64x64 pixels
    "tokenizer.decoder.mid_attention=false",
    "discriminator.base_channels=8",
    "discriminator.num_layers=2",
]
GAN_SETS = ["loss.gan=0.5", "loss.gan_start_step=0"]
# Warm-up of one step, so the cosine (which depends on loop.max_steps) shapes the LR from
# step 2 on and the resume tests cover the schedule too.
SHORT_WARMUP_SETS = ["optim.warmup_steps=1", "discriminator_optim.warmup_steps=1"]


def _sets(values: list[str]) -> list[str]:
    return [item for value in values for item in ("--set", value)]


def teacher_argv(output_dir: Path, *extra: str) -> list[str]:
    return [
        "--config",
        TEACHER_CONFIG,
        *_sets([*LOOP_SETS, *TEACHER_SETS, f"loop.output_dir={output_dir}", *extra]),
    ]


def tokenizer_argv(output_dir: Path, teacher: Path, *extra: str) -> list[str]:
    return [
        "--config",
        TOKENIZER_CONFIG,
        *_sets([*LOOP_SETS, *TOKENIZER_SETS, f"teacher_path={teacher}", f"loop.output_dir={output_dir}", *extra]),
    ]


def train_records(output_dir: Path, loss_key: str) -> list[dict]:
    """The per-step training records of metrics.jsonl (those carrying ``loss_key``), in file order."""
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if loss_key in record]


def staging_leftovers(root: Path) -> list[Path]:
    """Hidden staging / temporary entries that an atomic save must not leave behind."""
    return [path for path in root.rglob(".*") if "staging" in path.name or ".tmp" in path.name]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stage 0 for 2 steps; returns the ``teacher/`` directory it wrote."""
    output_dir = tmp_path_factory.mktemp("stage0")
    metrics = train_teacher.main(teacher_argv(output_dir))
    assert 0.0 <= metrics["teacher_zero_shot_val"] <= 1.0
    return output_dir / train_teacher.TEACHER_DIRNAME


# ------------------------------------------------------------------------------ stage 0
def test_stage0_writes_a_loadable_teacher(teacher_dir: Path) -> None:
    from transformers import AutoTokenizer, SiglipModel

    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json"):
        assert (teacher_dir / name).is_file(), name
    assert train_teacher.teacher_is_complete(teacher_dir)
    metrics = json.loads((teacher_dir / "metrics.json").read_text())
    assert set(metrics) >= {"teacher_zero_shot_val", "train_seconds"}
    model = SiglipModel.from_pretrained(teacher_dir)
    assert model.config.vision_config.num_hidden_layers == 3 and model.config.vision_config.hidden_size == 32
    text_tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    assert len(text_tokenizer) == model.config.text_config.vocab_size
    records = train_records(teacher_dir.parent, "stage0/loss")
    assert [record["step"] for record in records] == [1, 2]
    assert all(torch.isfinite(torch.tensor(record["stage0/loss"])) for record in records)
    assert staging_leftovers(teacher_dir.parent) == []


def test_stage0_class_loss_trains_the_head_and_saves_siglip_only(tmp_path: Path) -> None:
    """teacher.class_loss_weight > 0: the auxiliary class head trains, the saved teacher is plain SigLIP."""
    from safetensors import safe_open

    output_dir = tmp_path / "stage0"
    train_teacher.main(teacher_argv(output_dir, "teacher.class_loss_weight=1.0", "teacher.single_object_fraction=1.0"))
    records = train_records(output_dir, "stage0/loss")
    assert [record["step"] for record in records] == [1, 2]
    teacher = output_dir / train_teacher.TEACHER_DIRNAME
    with safe_open(str(teacher / "model.safetensors"), framework="pt") as handle:
        assert not any("class_head" in key for key in handle.keys())
    reference = tmp_path / "no_class_loss"
    train_teacher.main(teacher_argv(reference, "teacher.class_loss_weight=0.0", "teacher.single_object_fraction=1.0"))
    # the class cross-entropy adds to the loss of the same batch at step 1 (same weights, same data)
    assert records[0]["stage0/loss"] > train_records(reference, "stage0/loss")[0]["stage0/loss"]


# ------------------------------------------------------------------------------ stage 1
def test_stage1_with_gan_writes_a_loadable_tokenizer(teacher_dir: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "stage1"
    metrics = train_tokenizer.main(tokenizer_argv(output_dir, teacher_dir, *GAN_SETS, "loop.save_every=2"))

    # Both engines ran: the generator saw the adversarial term with its adaptive weight, and the
    # discriminator took optimizer steps of its own.
    records = train_records(output_dir, "train/total")
    assert [record["step"] for record in records] == [1, 2]
    for record in records:
        assert {"train/generator_adversarial", "train/discriminator", "train/grad_norm"} <= set(record)
        assert 0.3 <= record["train/adaptive_weight"] <= 10.0  # loss.adaptive_min / adaptive_max
    checkpoint = output_dir / "checkpoints" / "step_0000002"
    for engine in ("tokenizer", "discriminator"):
        optimizer_state = torch.load(checkpoint / engine / "state.pt", weights_only=False)["optimizer"]["state"]
        assert optimizer_state and all(float(state["step"]) == 2 for state in optimizer_state.values()), engine

    assert {
        "test_psnr",
        "test_ssim",
        "test_zero_shot",
        "test_teacher_zero_shot",
        "test_pixel_usage",
        "test_semantic_usage",
        "val_psnr",
        "test_checker_on_reconstructions",
        "steps",
    } <= set(metrics)
    assert metrics["steps"] == 2
    for key in (
        "test_zero_shot",
        "test_teacher_zero_shot",
        "test_pixel_usage",
        "test_semantic_usage",
        "test_checker_on_reconstructions",
    ):
        assert 0.0 <= metrics[key] <= 1.0, key
    saved = json.loads((output_dir / train_tokenizer.TOKENIZER_DIRNAME / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)

    visual_tokenizer_dir = output_dir / train_tokenizer.TOKENIZER_DIRNAME
    assert train_tokenizer.tokenizer_is_complete(visual_tokenizer_dir)
    visual_tokenizer = DualTokenizer.from_pretrained(visual_tokenizer_dir)
    world = ShapesWorld(ShapesWorldConfig(seed=0, image_size=IMAGE_SIZE, num_train=NUM_TRAIN))
    images = torch.stack([ShapesImageDataset(world, "test")[index]["image"] for index in range(3)])
    codes = visual_tokenizer.encode(images)
    assert codes.pixel_codes.shape == (3, GRID, GRID, DEPTH)
    assert codes.semantic_codes.shape == (3, GRID, GRID, DEPTH)
    for branch in (codes.pixel_codes, codes.semantic_codes):
        assert branch.dtype == torch.int64 and 0 <= int(branch.min()) and int(branch.max()) < CODEBOOK_SIZE
    assert visual_tokenizer.decode(codes.pixel_codes).shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    # The saved weights are the evaluated ones: the loaded tokenizer reproduces the test PSNR.
    reloaded, _, _ = tokenizer_metrics(
        visual_tokenizer, ShapesImageDataset(world, "test"), None, None, limit=EVAL_IMAGES
    )
    assert reloaded["psnr"] == pytest.approx(metrics["test_psnr"], rel=1e-5)

    grid = output_dir / "reconstructions" / "test_step_0000002.png"
    with Image.open(grid) as image:
        # save_image_grid: 80-px label column, 2-px padding, originals above reconstructions.
        assert image.size == (80 + EVAL_IMAGES * (IMAGE_SIZE + 2) + 2, 2 * (IMAGE_SIZE + 2) + 2)
    assert staging_leftovers(output_dir) == []


def test_decoder_only_fine_tuning_keeps_every_code(teacher_dir: Path, tmp_path: Path) -> None:
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    # A dead-code threshold above any EMA count would restart codes at every training step.
    restart = "tokenizer.pixel_quantizer.dead_code_threshold=1e6"
    train_tokenizer.main(tokenizer_argv(base, teacher_dir, restart))
    start = base / train_tokenizer.TOKENIZER_DIRNAME
    metrics = train_tokenizer.main(
        tokenizer_argv(tuned, teacher_dir, restart, f"init_tokenizer={start}", "decoder_only=true", "optim.lr=1e-2")
    )
    assert metrics["steps"] == 2
    before = DualTokenizer.from_pretrained(start).state_dict()
    after = DualTokenizer.from_pretrained(tuned / train_tokenizer.TOKENIZER_DIRNAME).state_dict()
    decoder = [name for name in before if name.split(".")[0] in train_tokenizer.DECODER_MODULES]
    assert decoder and all(not torch.equal(before[name], after[name]) for name in decoder if "weight" in name)
    for name in set(before) - set(decoder):  # encoder, projections, codebooks and their EMA state
        assert torch.equal(before[name], after[name]), name
    world = ShapesWorld(ShapesWorldConfig(seed=0, image_size=IMAGE_SIZE, num_train=NUM_TRAIN))
    images = torch.stack([ShapesImageDataset(world, "test")[index]["image"] for index in range(3)])
    old, new = (DualTokenizer.from_pretrained(path).encode(images) for path in (start, tuned / "tokenizer"))
    assert torch.equal(old.pixel_codes, new.pixel_codes) and torch.equal(old.semantic_codes, new.semantic_codes)


def test_decoder_only_fine_tuning_rejects_bad_starts(teacher_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="set init_tokenizer"):
        train_tokenizer.main(tokenizer_argv(tmp_path / "a", teacher_dir, "decoder_only=true"))
    with pytest.raises(FileNotFoundError, match="is not a saved DualTokenizer"):
        train_tokenizer.main(tokenizer_argv(tmp_path / "b", teacher_dir, f"init_tokenizer={tmp_path}"))
    train_tokenizer.main(tokenizer_argv(tmp_path / "c", teacher_dir))
    start = tmp_path / "c" / train_tokenizer.TOKENIZER_DIRNAME
    with pytest.raises(ConfigError, match=r"tokenizer.pixel_quantizer=.*make them equal"):
        train_tokenizer.main(
            tokenizer_argv(tmp_path / "d", teacher_dir, f"init_tokenizer={start}", "tokenizer.pixel_quantizer.depth=3")
        )


def test_stage1_rejects_taps_beyond_the_teacher(teacher_dir: Path, tmp_path: Path) -> None:
    # The YAML's own backbone section has 6 layers, so only the 3-layer teacher can catch this.
    argv = tokenizer_argv(
        tmp_path / "stage1", teacher_dir, "tokenizer.backbone.num_layers=6", "tokenizer.taps.semantic_layer=5"
    )
    with pytest.raises(ValueError, match=r"taps.semantic_layer=5 .* 3 layers"):
        train_tokenizer.main(argv)


# ------------------------------------------------------------------------------ exact resume
# The resumed run executes the same single-threaded CPU kernels on the same inputs and the same
# restored state, so its losses match bit for bit; the tolerance (1e-6 relative, a few float32
# ulps) only allows for formatting. Each bug this test caught (no checkpoint at the last step,
# the LR of the old schedule, a shifted global RNG) moved the step-4 losses by 1e-3 or more.
RESUME_TOLERANCE = 1e-6


def _assert_resume_is_exact(uninterrupted: Path, resumed: Path, loss_key: str) -> None:
    straight = {record["step"]: record for record in train_records(uninterrupted, loss_key)}
    continued = train_records(resumed, loss_key)
    # The second call resumed at step 2 instead of starting over: every step is logged once.
    assert [record["step"] for record in continued] == [1, 2, 3, 4]
    assert sorted(straight) == [1, 2, 3, 4]
    for record in continued[2:]:
        expected = straight[record["step"]]
        assert set(record) == set(expected)
        for key, value in record.items():
            assert value == pytest.approx(expected[key], rel=RESUME_TOLERANCE, abs=1e-9), (record["step"], key)


def test_stage1_resume_is_exact(teacher_dir: Path, tmp_path: Path) -> None:
    # A dead-code threshold above any EMA count restarts every pixel code at every step, so each
    # step draws from the global torch RNG and a shifted RNG stream after resuming would show.
    common = [*GAN_SETS, *SHORT_WARMUP_SETS, "loop.save_every=2", "tokenizer.pixel_quantizer.dead_code_threshold=1e6"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_tokenizer.main(tokenizer_argv(straight, teacher_dir, *common, "loop.max_steps=4"))
    train_tokenizer.main(tokenizer_argv(resumed, teacher_dir, *common, "loop.max_steps=2"))
    assert checkpointing.latest_checkpoint(resumed / "checkpoints") == resumed / "checkpoints" / "step_0000002"
    train_tokenizer.main(tokenizer_argv(resumed, teacher_dir, *common, "loop.max_steps=4"))
    _assert_resume_is_exact(straight, resumed, "train/total")


def test_stage0_resume_is_exact(tmp_path: Path) -> None:
    common = [*SHORT_WARMUP_SETS[:1], "loop.save_every=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_teacher.main(teacher_argv(straight, *common, "loop.max_steps=4"))
    train_teacher.main(teacher_argv(resumed, *common, "loop.max_steps=2"))
    train_teacher.main(teacher_argv(resumed, *common, "loop.max_steps=4"))
    _assert_resume_is_exact(straight, resumed, "stage0/loss")


# ------------------------------------------------------------------------------ checkpoints
def test_corrupt_checkpoint_is_reported(teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    output_dir = tmp_path / "stage1"
    checkpoints = output_dir / "checkpoints"
    (checkpoints / "step_0000002" / "tokenizer").mkdir(parents=True)  # a folder without trainer_state.json
    (checkpoints / "latest").write_text("step_0000002")
    argv = tokenizer_argv(output_dir, teacher_dir)
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        train_tokenizer.main(argv)
    capsys.readouterr()
    assert cli.main(["train-tokenizer", *argv]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dualtoken")]
    assert len(errors) == 1 and "corrupt checkpoint" in errors[0] and "step_0000002" in errors[0]


@pytest.mark.parametrize(
    "failure",
    [
        OSError(28, "No space left on device (simulated)"),
        # what torch's zip writer raises when the disk fills in the middle of torch.save
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 15853888 vs 15853840 (simulated)"),
    ],
    ids=["enospc", "torch-zip-writer"],
)
def test_checkpoint_save_is_atomic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, failure: Exception
) -> None:
    """A failed step-4 save (a full disk) says so plainly, leaves ``latest`` on step 2 and no
    partial folder behind, and the same command resumes from step 2."""
    output_dir = tmp_path / "stage0"
    checkpoints = output_dir / "checkpoints"
    argv = teacher_argv(output_dir, "loop.max_steps=4", "loop.save_every=2")
    real_rng_state, saves = checkpointing._rng_state, []

    def crash_on_second_save() -> dict:
        saves.append(1)
        if len(saves) == 2:  # the engine's state is already in the staging folder by now
            raise failure
        return real_rng_state()

    monkeypatch.setattr(checkpointing, "_rng_state", crash_on_second_save)
    with pytest.raises(CheckpointWriteError, match="simulated") as raised:
        train_teacher.main(argv)
    message = str(raised.value)
    assert f"could not write checkpoint {checkpoints / 'step_0000004'}" in message
    assert f"the last complete checkpoint, {checkpoints / 'step_0000002'}, is untouched" in message
    assert "MiB free there now" in message
    assert raised.value.__cause__ is failure
    assert checkpointing.latest_checkpoint(checkpoints) == checkpoints / "step_0000002"
    assert not (checkpoints / "step_0000004").exists()
    assert not (checkpoints / ".step_0000004.staging").exists()  # the partial folder is removed: it only took space
    assert not (output_dir / train_teacher.TEACHER_DIRNAME).exists()

    # Through the command line: one line naming the checkpoint, no traceback (status 2).
    saves.clear()
    shutil.rmtree(output_dir)
    capsys.readouterr()
    assert cli.main(["train-teacher", *argv]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dualtoken")]
    assert len(errors) == 1 and "could not write checkpoint" in errors[0] and "step_0000004" in errors[0]

    monkeypatch.setattr(checkpointing, "_rng_state", real_rng_state)
    train_teacher.main(argv)
    records = train_records(output_dir, "stage0/loss")
    # Steps 3 and 4 were logged before the crash and again after resuming from step 2, identically.
    assert [record["step"] for record in records] == [1, 2, 3, 4, 3, 4]
    assert records[2:4] == records[4:6]
    assert checkpointing.latest_checkpoint(checkpoints) == checkpoints / "step_0000004"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["latest", "step_0000002", "step_0000004"]
    assert staging_leftovers(output_dir) == []
    assert train_teacher.teacher_is_complete(output_dir / train_teacher.TEACHER_DIRNAME)


# ------------------------------------------------------------------------------ pipeline
def test_pipeline_reuses_finished_stages(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    plain = ["--run-dir", str(run_dir), "--tokenizer-only"]
    plain += [item for value in [*LOOP_SETS, *TEACHER_SETS] for item in ("--set-teacher", value)]
    plain += [item for value in [*LOOP_SETS, *TOKENIZER_SETS] for item in ("--set-tokenizer", value)]
    # Stage 1b takes stage 1's architecture and data overrides itself; only its loop is set here.
    argv = [*plain, "--decoder", *[item for value in LOOP_SETS for item in ("--set-decoder", value)]]
    teacher_weights = run_dir / "stage0" / "teacher" / "model.safetensors"
    visual_tokenizer_weights = run_dir / "stage1" / "tokenizer" / "model.safetensors"
    decoder_weights = run_dir / "stage1_decoder" / "tokenizer" / "model.safetensors"

    metrics = tiny_pipeline.main(argv)
    # Stage 1's metrics, then stage 1b's under decoder_: its encoder and codebooks are stage 1's,
    # its decoder fine-tuned on the slots world the LLM half draws (the default --t2i-world).
    stage1_metrics = json.loads((visual_tokenizer_weights.parent / "metrics.json").read_text())
    decoder_metrics = json.loads((decoder_weights.parent / "metrics.json").read_text())
    assert metrics == {**stage1_metrics, **{f"decoder_{key}": value for key, value in decoder_metrics.items()}}
    assert json.loads((run_dir / "stage1_decoder" / "pipeline_settings.json").read_text())["argv"][1] == (
        "configs/tokenizer/tiny_decoder_slots.yaml"
    )
    stage1_state, decoder_state = load_file(visual_tokenizer_weights), load_file(decoder_weights)
    assert decoder_state.keys() == stage1_state.keys()
    for name in decoder_state:
        same = torch.equal(decoder_state[name], stage1_state[name])
        assert same != name.startswith(("decoder.", "pixel_up.")), name
    report = (run_dir / "report.md").read_text()
    assert f"reconstruction PSNR (dB), held-out test images | {stage1_metrics['test_psnr']:.2f} |" in report
    assert (
        f"decoder fine-tuned on the slots world the LLM draws: PSNR (dB) / SSIM (test) | "
        f"{decoder_metrics['test_psnr']:.2f} / {decoder_metrics['test_ssim']:.3f}"
    ) in report
    assert "stage 1b (decoder fine-tuning) wall time" in report
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["tokenizer"] == pytest.approx(stage1_metrics) and "teacher_zero_shot_val" in summary["teacher"]
    assert summary["decoder"] == pytest.approx({"t2i_world": "slots", **decoder_metrics})
    mtimes = {path: path.stat().st_mtime_ns for path in (teacher_weights, visual_tokenizer_weights, decoder_weights)}
    trained_weights = load_file(visual_tokenizer_weights)

    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert tiny_pipeline.main(argv) == pytest.approx(metrics)
    assert "stage 0: reusing" in caplog.text and "stage 1: reusing" in caplog.text
    assert "stage 1b: reusing" in caplog.text
    assert {path: path.stat().st_mtime_ns for path in mtimes} == mtimes
    assert len(train_records(run_dir / "stage1", "train/total")) == 2  # no training step ran again
    assert len(train_records(run_dir / "stage1_decoder", "train/total")) == 2

    # Other settings for a finished stage: a clear error naming the difference, nothing retrained.
    for flag, value, stage in [
        ("--set-decoder", "loop.max_steps=3", "stage 1b"),
        ("--set-tokenizer", "loop.seed=7", "stage 1"),
        ("--set-teacher", "loop.seed=7", "stage 0"),
    ]:
        with pytest.raises(ConfigError, match=rf"{stage} in .* other settings .*only now: \['{value}'\]"):
            tiny_pipeline.main([*argv, flag, value])
    assert {path: path.stat().st_mtime_ns for path in mtimes} == mtimes
    assert cli.main(["tiny-pipeline", *argv, "--set-decoder", "loop.max_steps=3"]) == 2
    # The same folder named by a relative path (or moved) is the same run: reused, not refused.
    relative = [os.path.relpath(run_dir) if item == str(run_dir) else item for item in argv]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert tiny_pipeline.main(relative) == pytest.approx(metrics)
    assert "stage 0: reusing" in caplog.text and "stage 1b: reusing" in caplog.text
    assert {path: path.stat().st_mtime_ns for path in mtimes} == mtimes

    # --no-decoder: stage 1's tokenizer alone (stages 0 and 1 reused), no stage-1b rows.
    assert tiny_pipeline.main([*plain, "--no-decoder"]) == pytest.approx(stage1_metrics)
    assert "stage 1b" not in (run_dir / "report.md").read_text()
    assert "decoder" not in json.loads((run_dir / "metrics.json").read_text())
    assert {path: path.stat().st_mtime_ns for path in mtimes} == mtimes
    # Stage-1b options for a skipped stage 1b, or the drawing world set past stage 1b: refused up front.
    assert cli.main(["tiny-pipeline", *plain, "--no-decoder", "--set-decoder", "loop.max_steps=3"]) == 2
    assert cli.main(["tiny-pipeline", *plain, "--llm-option=--t2i-world=grid"]) == 2

    visual_tokenizer_weights.unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        tiny_pipeline.main(argv)
    assert "stage 0: reusing" in caplog.text and "stage 1: reusing" not in caplog.text
    assert "stage 1 done" in caplog.text
    # A decoder tuned on the previous stage-1 tokenizer is stale: removed and trained afresh.
    assert "stage 1b: removing" in caplog.text and "stage 1b: reusing" not in caplog.text
    assert "stage 1b done" in caplog.text
    assert [record["step"] for record in train_records(run_dir / "stage1_decoder", "train/total")] == [1, 2]
    assert teacher_weights.stat().st_mtime_ns == mtimes[teacher_weights]
    # Stage 1 trained again (no checkpoint: save_every=250 > max_steps) with the same seed and
    # batches, so the same weights come back.
    assert [record["step"] for record in train_records(run_dir / "stage1", "train/total")] == [1, 2, 1, 2]
    retrained = load_file(visual_tokenizer_weights)
    assert retrained.keys() == trained_weights.keys()
    assert all(torch.equal(retrained[name], trained_weights[name]) for name in trained_weights)
    assert (run_dir / "report.md").is_file()


def test_ablation_runs_every_variant_side_by_side(teacher_dir: Path, tmp_path: Path) -> None:
    from training import ablation

    output = tmp_path / "ablation"
    argv = ["--config", TOKENIZER_CONFIG, "--teacher", str(teacher_dir), "--output-dir", str(output)]
    results = ablation.main([*argv, *_sets([*LOOP_SETS, *TOKENIZER_SETS])])
    assert list(results) == ["dual", "shared", "recon_only"]
    # The shared variant really decodes from the semantic codebook: it has no pixel quantizer.
    shared = json.loads((output / "shared" / "tokenizer" / "config.json").read_text())
    assert shared["tokenizer"]["shared_codebook"] is True
    assert not any(key.startswith("pixel_quantizer.") for key in _saved_keys(output / "shared"))
    assert any(key.startswith("pixel_quantizer.") for key in _saved_keys(output / "dual"))
    table = (output / "ablation.md").read_text()
    for name in results:
        assert f"| {name} | {results[name]['test_psnr']:.2f} |" in table
    # A second call reuses the finished variants instead of training them again.
    mtime = (output / "dual" / "tokenizer" / "model.safetensors").stat().st_mtime_ns
    ablation.main([*argv, "--variants", "dual"])
    assert (output / "dual" / "tokenizer" / "model.safetensors").stat().st_mtime_ns == mtime


def _saved_keys(run_dir: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(run_dir / "tokenizer" / "model.safetensors"), "pt") as weights:
        return list(weights.keys())


def test_each_drawing_world_has_a_decoder_config_on_that_world() -> None:
    """Stage 1b's default config for each --t2i-world fine-tunes the decoder on that very world."""
    from dataclasses import replace

    from training.config import load_config
    from training.data.shapes import T2I_WORLDS, t2i_world_config
    from training.tokenizer_config import Stage1Config

    assert set(tiny_pipeline.DECODER_CONFIGS) == set(T2I_WORLDS)
    for world, path in tiny_pipeline.DECODER_CONFIGS.items():
        config = load_config(Stage1Config, Path(__file__).resolve().parents[2] / path)
        assert config.decoder_only, path
        shapes = config.data.shapes
        scenes = ShapesWorldConfig(seed=shapes.seed, image_size=shapes.image_size)  # the world's own
        expected = t2i_world_config(world, shapes.seed, shapes.image_size, 8) or scenes
        # The pairs' world, up to the training split's size (num_train is the tokenizer's own).
        assert replace(shapes, num_train=expected.num_train) == expected, (world, path)


def test_pipeline_runs_the_whole_system(tmp_path: Path) -> None:
    """tiny-pipeline without --tokenizer-only: teacher, tokenizer, the LLM half, one report."""
    run_dir = tmp_path / "run"
    argv = ["--run-dir", str(run_dir)]
    argv += [item for value in [*LOOP_SETS, *TEACHER_SETS] for item in ("--set-teacher", value)]
    argv += [item for value in [*LOOP_SETS, *TOKENIZER_SETS] for item in ("--set-tokenizer", value)]
    micro = [
        "loop.max_steps=2",
        "loop.batch_size=4",
        "loop.num_threads=1",
        "model.llm_config.hidden_size=32",
        "model.llm_config.intermediate_size=64",
        "model.llm_config.num_hidden_layers=1",
        "model.llm_config.num_attention_heads=2",
        "model.llm_config.num_key_value_heads=1",
        "model.depth_head_layers=1",
        "model.depth_head_heads=2",
        "eval.vqa_samples=4",
        "stage.pixel_depth_weights=[1.0,0.1]",  # the tiny stages weigh 4 pixel depths; DEPTH = 2 here
    ]
    argv += [item for value in micro for item in ("--set-llm", value)]
    argv += [item for value in LOOP_SETS for item in ("--set-decoder", value)]
    argv += ["--llm-option=--train-images=12", "--llm-option=--val-images=4"]
    argv += ["--llm-option=--vqa-scenes=1", "--llm-option=--t2i-prompts=1"]
    metrics = tiny_pipeline.main(argv)
    assert "test_psnr" in metrics and "llm_vqa_mean" in metrics and "llm_t2i_all" in metrics
    report = (run_dir / "report.md").read_text()
    assert "reconstruction PSNR" in report and "majority baseline" in report and "dualtoken chat --model" in report
    assert (run_dir / "mllm" / "joint" / "model" / "model.safetensors").is_file()
    # Stage 1b runs by default, on the world the LLM half draws: the model draws through its decoder.
    sidecar = json.loads((run_dir / "mllm" / "joint" / "model" / "dualtoken.json").read_text())
    assert Path(sidecar["tokenizer_path"]) == run_dir / "stage1_decoder" / "tokenizer"
    assert "decoder fine-tuned on the slots world" in report and "decoder_test_psnr" in metrics
    assert (run_dir / "data" / "train" / "t2i_slots.jsonl").is_file()


def test_evaluation_leaves_the_training_rng_alone() -> None:
    """A mid-run evaluation must not shift the random draws of the training that follows it."""
    from training.evaluation import zero_shot_accuracy

    world = ShapesWorld(ShapesWorldConfig(seed=0, image_size=64))
    dataset = ShapesImageDataset(world, "val", single_object=True)
    text_embeds = torch.nn.functional.normalize(torch.randn(18, 12), dim=-1)
    state = torch.random.get_rng_state()
    accuracy = zero_shot_accuracy(lambda images: images.mean(dim=(2, 3)).repeat(1, 4), text_embeds, dataset, 4, 8)
    assert 0.0 <= accuracy <= 1.0
    assert torch.equal(torch.random.get_rng_state(), state)


def test_checker_on_reconstructions_scores_what_the_decoder_draws() -> None:
    """Originals pass the checker, a flat grey image does not, a swapped scene does not."""
    from training.evaluation import checker_verdicts

    world = ShapesWorld(ShapesWorldConfig(seed=0, image_size=64))
    dataset = ShapesImageDataset(world, "test")
    images = torch.stack([dataset[index]["image"] for index in range(6)])
    scenes = [dataset.objects(index) for index in range(6)]
    assert checker_verdicts(images, scenes) == [1] * 6
    assert checker_verdicts(torch.zeros_like(images), scenes) == [0] * 6
    assert sum(checker_verdicts(images, scenes[1:] + scenes[:1])) < 6


def test_stage_settings_round_trip_and_an_unreadable_file_is_named(tmp_path: Path) -> None:
    """Settings are recorded relative to the run folder; a torn settings file stops the rerun with its name."""
    from training.common import SETTINGS_FILENAME, check_stage_settings, record_stage_settings

    run_dir = tmp_path / "run"
    stage_dir = run_dir / "stage0"
    argv = ["--set", f"loop.output_dir={stage_dir}", "--set", "loop.max_steps=3"]
    record_stage_settings(stage_dir, argv, run_dir)
    assert "{run_dir}" in (stage_dir / SETTINGS_FILENAME).read_text()
    check_stage_settings(stage_dir, argv, "stage 0", run_dir)  # same settings: no error
    with pytest.raises(ConfigError, match=r"only there: \['loop.max_steps=3'\]; only now: \['loop.max_steps=4'\]"):
        check_stage_settings(stage_dir, argv[:3] + ["loop.max_steps=4"], "stage 0", run_dir)
    (stage_dir / SETTINGS_FILENAME).write_text('{"argv": ["--set", "loop.')  # torn
    with pytest.raises(ConfigError, match=rf"{SETTINGS_FILENAME}: unreadable stage settings .*delete {stage_dir}"):
        check_stage_settings(stage_dir, argv, "stage 0", run_dir)
    (stage_dir / SETTINGS_FILENAME).write_text('{"args": []}')  # no argv
    with pytest.raises(ConfigError, match="unreadable stage settings"):
        check_stage_settings(stage_dir, argv, "stage 0", run_dir)


def test_atomic_output_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    from tokenizer.files import atomic_output, write_text_atomic

    target = tmp_path / "results.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_output(target) as partial:
        partial.write_text("half of the ne")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no partial file left behind
    write_text_atomic(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
