"""The paper configs' own code path, end to end, on tiny models saved in the Hugging Face layout.

The teacher is a NaFlex ``Siglip2Model`` folder (what the official tokenizer configs use), the
LLM a ``Qwen2ForCausalLM`` and its tokenizer a Qwen2 fast BPE with Qwen's special tokens and
chat template, both named by a hub id that resolves in a temporary Hugging Face cache (offline).
Each step runs the paper YAML (``configs/tokenizer/so400m_384_rvq8.yaml``,
``configs/stages/qwen2_5_3b/*.yaml``) with only the model paths and the sizes, steps and batch
changed through ``--set``: stage 1 of the tokenizer, ``dualtoken tokenize-codes``, the four
LLM stages, then ``Pipeline.answer`` / ``Pipeline.generate`` and ``dualtoken eval``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from real_format_models import (
    IMAGE_SIZE,
    PATCH_SIZE,
    build_qwen_tokenizer,
    place_in_hub_cache,
    save_qwen2,
    save_siglip,
    save_siglip2,
)

from mllm.chat import QWEN_TEMPLATE
from mllm.model_folder import load_model_folder
from mllm.vocab import row_ranges
from training import cli, train_mllm, train_tokenizer
from training.data.conversations import write_shapes
from training.data.shapes import ShapesWorld, ShapesWorldConfig

REPO = Path(__file__).resolve().parents[2]
LLM_ID = "tiny-org/qwen2.5-tiny-instruct"
STAGES = ("align", "understand", "generate", "joint")
PAPER_SAMPLING = {"cfg": 3.0, "top_k": 900, "top_p": 0.96, "temperature": 1.0}
TRAIN_IMAGES, VAL_IMAGES = 24, 8


def _sets(*overrides: str) -> list[str]:
    return [item for override in overrides for item in ("--set", override)]


def _write_webdataset(world: ShapesWorld, split: str, count: int, shard: Path) -> None:
    """``count`` Shapes images with their captions as one WebDataset tar shard (``<key>.png`` + ``<key>.txt``)."""
    import io

    shard.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(shard, "w") as archive:
        for index in range(count):
            sample = world.sample(split, index)
            image, caption = io.BytesIO(), sample.caption.encode()
            Image.fromarray(sample.image).save(image, format="PNG")
            for suffix, payload in (("png", image.getvalue()), ("txt", caption)):
                member = tarfile.TarInfo(f"{index:05d}.{suffix}")
                member.size = len(payload)
                archive.addfile(member, io.BytesIO(payload))


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory: pytest.TempPathFactory):
    """An offline Hugging Face home holding the tiny Qwen2 LLM and tokenizer under one hub id."""
    root = tmp_path_factory.mktemp("hf")
    text_tokenizer = build_qwen_tokenizer()
    text_tokenizer.save_pretrained(root / "qwen")
    save_qwen2(root / "qwen", len(text_tokenizer))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(root / "home"))
        patch.delenv("HF_HUB_CACHE", raising=False)
        patch.setenv("HF_HUB_OFFLINE", "1")
        place_in_hub_cache(root / "qwen", root / "home" / "hub", LLM_ID)
        yield {"llm_dir": root / "qwen"}


def _stage1_argv(teacher: Path, data_root: Path, output_dir: Path, steps: int = 3) -> list[str]:
    return [
        "--config",
        str(REPO / "configs" / "tokenizer" / "so400m_384_rvq8.yaml"),
        *_sets(
            f"teacher_path={teacher}",
            f"data.path={data_root}/{{split}}/shard-*.tar",
            f"data.image_size={IMAGE_SIZE}",
            f"tokenizer.backbone.image_size={IMAGE_SIZE}",
            f"tokenizer.backbone.patch_size={PATCH_SIZE}",
            "tokenizer.backbone.hidden_size=32",
            "tokenizer.backbone.num_layers=4",
            "tokenizer.backbone.num_heads=2",
            "tokenizer.backbone.intermediate_size=64",
            "tokenizer.taps.pixel_layer=2",
            "tokenizer.taps.semantic_layer=3",
            "tokenizer.taps.pixel_aux_layer=1",
            "tokenizer.projection.hidden_dim=32",
            "tokenizer.pixel_quantizer.codebook_size=64",
            "tokenizer.pixel_quantizer.code_dim=8",
            "tokenizer.semantic_quantizer.codebook_size=64",
            "tokenizer.semantic_quantizer.code_dim=8",
            "tokenizer.decoder.base_channels=8",
            "tokenizer.decoder.channel_mult=[1,1,2,2]",
            "tokenizer.decoder.num_res_blocks=1",
            "tokenizer.decoder.latent_size=null",
            # No VGG16 weights offline: the teacher's own features are the perceptual network.
            "loss.perceptual_network=teacher",
            "loss.gan_start_step=2",
            "discriminator.base_channels=8",
            "optim.warmup_steps=1",
            "discriminator_optim.warmup_steps=1",
            f"loop.output_dir={output_dir}",
            f"loop.max_steps={steps}",
            "loop.batch_size=4",
            "loop.precision=fp32",
            f"loop.eval_every={steps}",
            "loop.eval_images=8",
            f"loop.save_every={steps}",
            "loop.num_workers=0",
            "loop.num_threads=1",
            "deepspeed.enabled=false",
        ),
    ]


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shapes images as WebDataset shards (stage 1) and as LLaVA + text-to-image files (the LLM stages)."""
    root = tmp_path_factory.mktemp("shapes")
    world = ShapesWorld(ShapesWorldConfig(seed=5, image_size=IMAGE_SIZE))
    paths = {"webdataset": root / "wds"}
    for split, count in (("train", TRAIN_IMAGES), ("val", VAL_IMAGES), ("test", VAL_IMAGES)):
        _write_webdataset(world, split, count, root / "wds" / split / "shard-00000.tar")
        if split == "test":
            continue
        written = write_shapes(world, split, root / split, count)
        paths[f"{split}_llava"], paths[f"{split}_t2i"] = written["llava"], written["t2i"]
    return paths


@pytest.fixture(scope="module")
def stage1(shapes_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Stage 1 of the paper tokenizer config with a SigLIP2 teacher, then its code shards."""
    root = tmp_path_factory.mktemp("stage1")
    # A position table of 8 x 8 patches read at 4 x 4 (backbone.image_size): the resize runs in stage 1.
    teacher = save_siglip2(root / "siglip2", position_grid=8)
    metrics = train_tokenizer.main(_stage1_argv(teacher, shapes_data["webdataset"], root / "run"))
    assert metrics["steps"] == 3 and metrics["val_psnr"] > 0
    tokenizer_dir = root / "run" / "tokenizer"
    folders = {"tokenizer": tokenizer_dir}
    for split in ("train", "val"):
        argv = [
            "tokenize-codes",
            "--tokenizer",
            str(tokenizer_dir),
            "--llava",
            str(shapes_data[f"{split}_llava"]),
            "--t2i",
            str(shapes_data[f"{split}_t2i"]),
            "--out",
            str(root / split / "codes"),
            "--batch-size",
            "8",
            "--device",
            "cpu",
        ]
        assert cli.main(argv) == 0
        folders[f"{split}_codes"] = root / split / "codes"
    return folders


def _stage_argv(name: str, data: dict[str, Path], codes: dict[str, Path], root: Path, init: Path | None) -> list[str]:
    return [
        "--config",
        str(REPO / "configs" / "stages" / "qwen2_5_3b" / f"{name}.yaml"),
        *_sets(
            f"stage.init={init if init is not None else 'null'}",
            f"model.llm_pretrained={LLM_ID}",
            f"model.text_tokenizer={LLM_ID}",
            "model.dtype=float32",
            "model.depth_head_heads=2",
            "model.depth_head_hidden=32",
            "model.loss_chunk_size=16",
            f"data.codes={codes['train_codes']}",
            f"data.val_codes={codes['val_codes']}",
            f"data.conversations=[{data['train_llava']}]",
            f"data.text_image=[{data['train_t2i']}]",
            f"data.val_conversations=[{data['val_llava']}]",
            f"data.val_text_image=[{data['val_t2i']}]",
            f"loop.output_dir={root / name}",
            "loop.max_steps=2",
            "loop.batch_size=2",
            "loop.precision=fp32",
            "loop.log_every=1",
            "loop.save_every=2",
            "loop.eval_every=2",
            "loop.num_workers=0",
            "loop.num_threads=1",
            "optim.warmup_steps=1",
            "deepspeed.enabled=false",
            "eval.vqa_samples=4",
            "eval.batch_size=4",
        ),
    ]


@pytest.fixture(scope="module")
def mllm_stages(hub_env, shapes_data, stage1, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The four paper LLM stages, 2 steps each, each from the previous stage's model folder."""
    root = tmp_path_factory.mktemp("mllm")
    folders: dict[str, Path] = {}
    previous = None
    for name in STAGES:
        metrics = train_mllm.main(_stage_argv(name, shapes_data, stage1, root, previous))
        assert metrics["steps"] == 2 and metrics["trainable_parameters"] > 0
        previous = folders[name] = root / name / "model"
    return folders


# ------------------------------------------------------------------------------------- tests
def test_the_qwen_chat_template_matches_the_tokenizers_own() -> None:
    """QWEN_TEMPLATE (how sequences are built) renders a conversation exactly as the Qwen tokenizer's Jinja template."""
    text_tokenizer = build_qwen_tokenizer()
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What colour is the circle?"},
        {"role": "assistant", "content": "red"},
    ]
    ours = QWEN_TEMPLATE.system + QWEN_TEMPLATE.user + "What colour is the circle?" + QWEN_TEMPLATE.end
    ours += QWEN_TEMPLATE.assistant + "red" + QWEN_TEMPLATE.end
    assert text_tokenizer.apply_chat_template(messages, tokenize=False) == ours
    prompt = text_tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(QWEN_TEMPLATE.assistant)
    end_ids = text_tokenizer(QWEN_TEMPLATE.end)["input_ids"]
    assert end_ids[0] == text_tokenizer.convert_tokens_to_ids("<|im_end|>")  # one special token: the stop id


def test_stage1_with_a_siglip_teacher(shapes_data: dict[str, Path], tmp_path: Path) -> None:
    """The same paper config with a (v1) SiglipModel teacher, as the so400m checkpoint ships."""
    teacher = save_siglip(tmp_path / "siglip")
    metrics = train_tokenizer.main(_stage1_argv(teacher, shapes_data["webdataset"], tmp_path / "run", steps=2))
    assert metrics["steps"] == 2 and (tmp_path / "run" / "tokenizer" / "model.safetensors").is_file()
    assert all(value == value for value in metrics.values())  # no NaN


def test_stage1_and_codes_from_a_siglip2_teacher(stage1: dict[str, Path]) -> None:
    from tokenizer.model import DualTokenizer

    visual_tokenizer = DualTokenizer.from_pretrained(stage1["tokenizer"])
    assert visual_tokenizer.backbone.naflex and visual_tokenizer.text_tower is not None
    meta = json.loads((stage1["train_codes"] / "meta.json").read_text())
    grid = IMAGE_SIZE // PATCH_SIZE
    assert list(meta["grid"]) == [grid, grid] and meta["pixel_depth"] == 8 and meta["semantic_depth"] == 8


def test_the_stages_train_only_the_rows_the_recipe_says(hub_env, mllm_stages: dict[str, Path]) -> None:
    """Tied embeddings: align and generate train new rows only; the pretrained text rows stay exact."""
    from safetensors.torch import load_file

    original = load_file(hub_env["llm_dir"] / "model.safetensors")["model.embed_tokens.weight"]
    rows = {}
    for name in STAGES:
        model, _, _ = load_model_folder(mllm_stages[name])
        rows[name] = model.get_input_embeddings().weight.detach().clone()
        assert model.config.text_config.tie_word_embeddings
    ranges = row_ranges(model.layout)
    text, semantic, pixel = (slice(ranges[key].start, ranges[key].stop) for key in ("text", "semantic", "pixel"))
    mean = original[text].mean(dim=0)
    assert torch.equal(rows["align"][text], original[text])  # frozen LLM: the text rows (= LM head) do not move
    assert not torch.allclose(rows["align"][semantic], mean.expand_as(rows["align"][semantic]))  # read: trained
    torch.testing.assert_close(rows["align"][pixel], mean.expand_as(rows["align"][pixel]))  # mean init, untouched
    assert not torch.equal(rows["understand"][text], rows["align"][text])  # the LLM trains here
    assert torch.equal(rows["generate"][text], rows["understand"][text])  # LLM frozen again
    assert not torch.equal(rows["generate"][pixel], rows["understand"][pixel])  # pixel inputs learn here


def test_the_final_model_answers_draws_and_evaluates(mllm_stages: dict[str, Path], tmp_path: Path) -> None:
    from mllm.inference import Pipeline

    final = mllm_stages["joint"]
    assert json.loads((final / "sampling.json").read_text()) == PAPER_SAMPLING
    pipeline = Pipeline.from_pretrained(final, device="cpu")
    assert pipeline.sampling.top_k == 900 and pipeline.sampling.cfg == 3.0
    world = ShapesWorld(ShapesWorldConfig(seed=5, image_size=IMAGE_SIZE))
    answer = pipeline.answer(world.sample("val", 0).image, "What colour is the circle?", max_new_tokens=4)
    assert isinstance(answer, str)
    images = pipeline.generate(["a red circle"], seed=0)
    assert len(images) == 1 and images[0].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)

    settings = tmp_path / "settings.yaml"
    settings.write_text(
        "version: 1\nseed: 0\nworld_seed: 0\nbatch_size: 4\n"
        "shapes_vqa:\n  split: test\n  scenes: 2\n"
        "geneval:\n  split: test\n  per_category: 1\n  cfg: 3.0\n  top_k: 900\n  top_p: 0.96\n"
        "  temperature: 1.0\n  decode_depths: null\n"
    )
    argv = ["eval", "--model", str(final), "--tasks", "shapes_vqa", "geneval", "--settings", str(settings)]
    assert cli.main([*argv, "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    questions = sum(value for key, value in results["shapes_vqa"].items() if key.endswith("_n"))
    assert questions >= 2 and 0.0 <= results["shapes_vqa"]["vqa_mean"] <= 1.0
    assert results["geneval"], "geneval scored no prompt"


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_align_keeps_the_text_rows_under_deepspeed(
    zero_stage: int, hub_env, shapes_data, stage1, tmp_path: Path
) -> None:
    """The zero-gradient rows hold under ZeRO-2 and under ZeRO-3 with every parameter partitioned."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    argv = _stage_argv("align", shapes_data, stage1, tmp_path, None)
    argv += _sets("deepspeed.enabled=true", f"deepspeed.zero_stage={zero_stage}")
    if zero_stage == 3:
        # By default ZeRO-3 keeps tensors under 1e5 elements whole, which is all of this model.
        config = tmp_path / "zero3.json"
        zero = {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": True}
        config.write_text(json.dumps({"zero_optimization": zero}))
        argv += _sets(f"deepspeed.config_path={config}")
    # A process of its own, as every DeepSpeed run of the suite: DeepSpeed keeps process-group state
    # across initialisations in one process.
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    command = [sys.executable, "-m", "training.train_mllm", *argv]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    model, _, _ = load_model_folder(tmp_path / "align" / "model")
    original = load_file(hub_env["llm_dir"] / "model.safetensors")["model.embed_tokens.weight"]
    ranges = row_ranges(model.layout)
    text, semantic = (slice(ranges[key].start, ranges[key].stop) for key in ("text", "semantic"))
    rows = model.get_input_embeddings().weight.detach()
    assert torch.equal(rows[text], original[text])
    assert not torch.allclose(rows[semantic], original[text].mean(dim=0).expand_as(rows[semantic]))
