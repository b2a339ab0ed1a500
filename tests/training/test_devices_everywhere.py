"""Every model-running path keeps its tensors on the model's device.

Each trainer runs one step (with its evaluation) and each inference path runs once with the model
on ``meta`` while the data starts on the CPU, under :class:`device_guard.DeviceGuard`: an op that
meets a tensor left on the CPU raises :class:`device_guard.MixedDevices`, as a CUDA run would
raise "Expected all tensors to be on the same device". Meta tensors hold no data, so the guard
answers reads of them with zeros: what these tests check is placement, not numbers (the CPU
tests elsewhere check the numbers).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from device_guard import META, DeviceGuard, MixedDevices
from test_training import GAN_SETS, LOOP_SETS, TEACHER_SETS, TOKENIZER_SETS, teacher_argv, tokenizer_argv

from training import tiny_pipeline, train_teacher, train_tokenizer


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step tiny teacher trained on the CPU (the one stage 1 below starts from)."""
    torch.set_num_threads(1)
    output_dir = tmp_path_factory.mktemp("stage0")
    train_teacher.main(teacher_argv(output_dir, "loop.max_steps=1") + ["--device", "cpu"])
    return output_dir / train_teacher.TEACHER_DIRNAME


def _zero_vgg16_features() -> dict[str, torch.Tensor]:
    """A torchvision vgg16 state dict's ``features.*`` entries (zeros: only their shapes matter on meta)."""
    import torchvision

    with torch.device("meta"):
        features = torchvision.models.vgg16(weights=None).features
    return {f"features.{key}": torch.zeros(value.shape) for key, value in features.state_dict().items()}


def test_guard_catches_a_tensor_left_on_the_cpu() -> None:
    """The guard itself: meta alone lets F.linear(cpu input, meta weight) answer on the CPU."""
    weight = torch.zeros(4, 3, device=META)
    with DeviceGuard(), pytest.raises(MixedDevices, match=r"aten\.\w+.* got tensors on \['cpu', 'meta'\]"):
        torch.nn.functional.linear(torch.zeros(2, 3), weight)
    with DeviceGuard() as guard:
        moved = torch.nn.functional.linear(torch.zeros(2, 3).to(META), weight)
        assert moved.is_meta and float(moved.sum()) == 0.0 and guard.ops_on_meta >= 2
        assert torch.zeros(3, device=META).cpu().device.type == "cpu"  # an explicit move is fine


def test_stage0_teacher_runs_on_the_model_device(tmp_path: Path) -> None:
    with DeviceGuard() as guard:
        metrics = train_teacher.main(
            teacher_argv(tmp_path, "loop.max_steps=1", "teacher.class_loss_weight=1.0") + ["--device", "meta"]
        )
    assert "teacher_zero_shot_val" in metrics and guard.ops_on_meta > 100


@pytest.mark.parametrize("perceptual_network", ["teacher", "vgg16"])
def test_stage1_trains_and_evaluates_on_the_model_device(
    teacher_dir: Path, tmp_path: Path, perceptual_network: str
) -> None:
    """One stage-1 step with the GAN and the perceptual term (the teacher's features, or LPIPS on
    VGG16), then its val/test evaluation, the teacher's zero-shot and the save (``finish``)."""
    perceptual = ["loss.perceptual=0.5", f"loss.perceptual_network={perceptual_network}"]
    if perceptual_network == "vgg16":
        weights = tmp_path / "vgg16.pth"
        torch.save(_zero_vgg16_features(), weights)
        perceptual.append(f"loss.perceptual_weights_path={weights}")
    argv = tokenizer_argv(tmp_path, teacher_dir, *GAN_SETS, *perceptual, "loop.max_steps=1", "loop.eval_images=4")
    with DeviceGuard() as guard:
        metrics = train_tokenizer.main(argv + ["--device", "meta"])
    assert {"val_psnr", "test_zero_shot", "test_teacher_zero_shot"} <= set(metrics)
    assert guard.ops_on_meta > 100


# ------------------------------------------------------------------------------ inference on files
def test_tokenize_and_reconstruct_run_on_the_model_device(data: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from training.tokenize_images import reconstruct_main, tokenize_main

    images = sorted((data["val_llava"].parent).rglob("*.png"))[:2]
    common = ["--tokenizer", str(data["visual_tokenizer"]), "--images", *map(str, images), "--device", "meta"]
    with DeviceGuard() as guard:
        tokenize_main([*common, "-o", str(tmp_path / "codes.safetensors")])
        reconstruct_main([*common, "-o", str(tmp_path / "grid.png")])
    assert guard.ops_on_meta > 50
    codes = load_file(tmp_path / "codes.safetensors")
    assert codes["pixel_codes"].shape[0] == 2 and codes["pixel_codes"].device.type == "cpu"
    assert (tmp_path / "grid.png").is_file()


# ------------------------------------------------------------------------------ the LLM half
@pytest.fixture(scope="module")
def joint_model(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A unified model folder from one CPU step of the joint stage (understanding and drawing)."""
    from mllm_fixtures import REPO, stage_overrides

    from training import train_mllm

    output_dir = tmp_path_factory.mktemp("joint")
    argv = ["--config", str(REPO / "configs" / "stages" / "tiny" / "joint.yaml"), "--device", "cpu"]
    for override in stage_overrides(data, output_dir, steps=1):
        argv += ["--set", override]
    train_mllm.main(argv)
    return output_dir / "model"


def test_mllm_stage_trains_and_evaluates_on_the_model_device(
    data: dict[str, Path], joint_model: Path, tmp_path: Path
) -> None:
    """One step of an LLM stage started from a model folder, with its validation and VQA."""
    from mllm_fixtures import REPO, stage_overrides

    from training import train_mllm

    argv = ["--config", str(REPO / "configs" / "stages" / "tiny" / "joint.yaml"), "--device", "meta"]
    # The tiny stages autocast to bf16 on the CPU; meta has no autocast, and auto there is fp32.
    for override in [*stage_overrides(data, tmp_path, init=joint_model, steps=1), "loop.precision=auto"]:
        argv += ["--set", override]
    with DeviceGuard() as guard:
        metrics = train_mllm.main(argv)
    assert metrics["steps"] == 1 and guard.ops_on_meta > 100


_Generator = torch.Generator


class _GeneratorOffMeta(_Generator):
    """``torch.Generator(device=...)``, with a CPU generator where meta is asked for: torch has no
    meta generator ("META device type not an accelerator"), and the guard answers the sampling
    ops on meta without drawing. On CUDA the pipeline's generators are CUDA generators."""

    def __new__(cls, device: str | torch.device = "cpu") -> torch.Generator:
        return _Generator.__new__(cls, device="cpu" if torch.device(device) == META else device)


@pytest.fixture
def generators_off_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "Generator", _GeneratorOffMeta)


@pytest.mark.usefixtures("generators_off_meta")
def test_pipeline_answers_and_draws_on_the_model_device(joint_model: Path) -> None:
    from mllm.inference import Pipeline
    from training.data.shapes import ShapesWorld, ShapesWorldConfig

    image = ShapesWorld(ShapesWorldConfig(seed=1, image_size=32)).sample("test", 0).image
    with DeviceGuard() as guard:
        pipe = Pipeline.from_pretrained(joint_model, device="meta")
        assert pipe.device == META and next(pipe.visual_tokenizer.parameters()).is_meta
        assert isinstance(pipe.answer(image, "what colour is the circle?", max_new_tokens=3), str)
        drawn = pipe.generate("a large red circle", n=2, cfg=3.0, top_k=8, seed=3)
    assert len(drawn) == 2 and drawn[0].shape == (32, 32, 3) and guard.ops_on_meta > 100


# ------------------------------------------------------------------------------ the embedded default
def test_tiny_pipeline_trains_the_tokenizer_on_the_model_device(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``tiny-pipeline --device``: stages 0, 1 and 1b on meta. The device is not a setting of a
    stage: a re-run on the CPU reuses them. (The LLM half's parts run on meta in the tests above.)"""
    import json
    import logging

    run_dir = tmp_path / "run"
    argv = ["--run-dir", str(run_dir), "--tokenizer-only"]
    argv += [item for value in [*LOOP_SETS, *TEACHER_SETS, "loop.max_steps=1"] for item in ("--set-teacher", value)]
    argv += [item for value in [*LOOP_SETS, *TOKENIZER_SETS, "loop.max_steps=1"] for item in ("--set-tokenizer", value)]
    argv += [item for value in [*LOOP_SETS, "loop.max_steps=1"] for item in ("--set-decoder", value)]
    with DeviceGuard() as guard:
        metrics = tiny_pipeline.main([*argv, "--device", "meta"])
    assert "decoder_test_psnr" in metrics and guard.ops_on_meta > 1000
    for stage in ("stage0", "stage1", "stage1_decoder"):
        recorded = json.loads((run_dir / stage / "pipeline_settings.json").read_text())["argv"]
        assert "--device" not in recorded and "meta" not in recorded, stage
    with caplog.at_level(logging.INFO):
        tiny_pipeline.main([*argv, "--device", "cpu"])
    assert all(f"{stage}: reusing" in caplog.text for stage in ("stage 0", "stage 1", "stage 1b"))


def test_tiny_mllm_codes_its_data_on_the_model_device(data: dict[str, Path], tmp_path: Path) -> None:
    """``tiny-mllm --device``: the Shapes splits are coded into shards by the tokenizer on that device."""
    from training import tiny_mllm
    from training.data.code_store import CodeStore

    with DeviceGuard() as guard:
        written = tiny_mllm.prepare_data(
            data["visual_tokenizer"], tmp_path, {"train": 4, "val": 2}, t2i_world="slots", device="meta"
        )
    assert guard.ops_on_meta > 100
    assert len(CodeStore(written["train"] / "codes")) >= 4


def test_a_model_on_the_cpu_gets_sdpa_where_flash_attention_is_installed(
    joint_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CUDA machine with flash-attn, a model loaded onto (or built on) the CPU still gets SDPA;
    FlashAttention-2 only for fp16/bf16 weights on CUDA."""
    from tokenizer import devices

    monkeypatch.setattr(devices, "flash_attention_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.pick_attn_implementation("auto", "cuda", torch.bfloat16) == "flash_attention_2"
    from mllm.model_folder import load_model_folder
    from mllm.modeling import DualTokenMLLMForCausalLM

    model, _, _ = load_model_folder(joint_model, device="cpu", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "sdpa" and model.llm.config._attn_implementation == "sdpa"
    config = model.config
    config._attn_implementation = None  # as when built from a config: the LM's weights decide
    assert DualTokenMLLMForCausalLM(config, llm=model.llm).llm.config._attn_implementation == "sdpa"


def test_auto_precision_is_exactly_fp32_on_the_cpu(tmp_path: Path) -> None:
    """``loop.precision: auto`` (the default) changes nothing on the CPU: the same losses, bit for bit."""
    from test_training import train_records

    for precision in ("fp32", "auto"):
        train_teacher.main(teacher_argv(tmp_path / precision, f"loop.precision={precision}") + ["--device", "cpu"])
    fp32, auto = (train_records(tmp_path / name, "stage0/loss") for name in ("fp32", "auto"))
    assert [record["stage0/loss"] for record in fp32] == [record["stage0/loss"] for record in auto]
    assert len(fp32) == 2
