"""LLM stages through their ``main([...])``: the four stages, exact resume, LoRA, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mllm_fixtures import REPO, stage_overrides

from mllm.chat import SequenceBuilder, collate_sequences
from mllm.model_folder import load_model_folder, model_folder_is_complete
from training import distributed, train_mllm
from training.cli import main as cli_main
from training.config import load_config
from training.data.code_store import CodeStore
from training.mllm_config import LoraConfig, MLLMStageConfig
from training.mllm_data import MixtureSampler, check_images_tokenised
from training.mllm_model import apply_lora, build_model, merge_lora

STAGES = ("align", "understand", "generate", "joint")


def _config(stage: str) -> str:
    return str(REPO / "configs" / "stages" / "tiny" / f"{stage}.yaml")


def _run(stage: str, overrides: list[str]) -> dict[str, float]:
    argv = ["--config", _config(stage)]
    for override in overrides:
        argv += ["--set", override]
    return train_mllm.main(argv)


def _train_records(output_dir: Path) -> dict[int, dict[str, float]]:
    records = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            records[record["step"]] = {k: v for k, v in record.items() if k.startswith("train/")}
    return records


def test_every_stage_runs_and_writes_a_loadable_model(chain):
    for stage, folder in chain.items():
        assert model_folder_is_complete(folder), stage
        model, text_tokenizer, sidecar = load_model_folder(folder)
        assert sidecar["stage"] == stage and Path(sidecar["tokenizer_path"]).is_dir()
        assert len(text_tokenizer) == model.config.layout.used_size
        records = _train_records(folder.parent)
        assert sorted(records) == [1, 2]
        assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in records.values())
    # the generate stage trains text-image pairs only; the others' losses show in their logs
    assert "train/pixel" in _train_records(chain["generate"].parent)[1]
    assert "train/pixel" not in _train_records(chain["understand"].parent)[1]


def test_frozen_parameters_do_not_move(chain, data, tmp_path):
    # The paper's generate stage (configs/stages/qwen2_5_3b/generate.yaml): the depth head and
    # the embeddings train, the LM's layers stay frozen.
    out = tmp_path / "generate"
    _run(
        "generate",
        stage_overrides(data, out, chain["understand"]) + ["stage.trainable=[pixel_head.*, llm.model.embed_tokens.*]"],
    )
    before, _, _ = load_model_folder(chain["understand"])
    after, _, _ = load_model_folder(out / "model")
    frozen = dict(before.named_parameters())
    for name, param in after.named_parameters():
        if name.startswith("llm.model.layers"):
            torch.testing.assert_close(param, frozen[name], rtol=0, atol=0)
    assert not torch.equal(after.pixel_head.in_proj.weight, frozen["pixel_head.in_proj.weight"])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_exactly(data, tmp_path, optimizer):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    chosen = [f"optim.name={optimizer}"]
    _run("joint", stage_overrides(data, straight, steps=4) + chosen)
    _run("joint", stage_overrides(data, resumed, steps=2) + chosen)
    _run("joint", stage_overrides(data, resumed, steps=4) + chosen)  # same output_dir: continues from step 2
    a, b = _train_records(straight), _train_records(resumed)
    for step in (3, 4):
        for key in ("train/loss", "train/lr", "train/grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-6, abs=1e-9), (step, key)
    first, _, _ = load_model_folder(straight / "model")
    second, _, _ = load_model_folder(resumed / "model")
    for (name, x), (_, y) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=name)


def test_lora_save_resume_merge(data, tmp_path):
    out = tmp_path / "lora"
    lora = ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "stage.trainable=[pixel_head.*]"]
    _run("joint", stage_overrides(data, out, steps=2) + lora)
    _run("joint", stage_overrides(data, out, steps=3) + lora)  # resumes with the adapters in place
    assert sorted(_train_records(out)) == [1, 2, 3]
    assert (out / "model" / "adapter" / "adapter_config.json").is_file()
    merged, text_tokenizer, _ = load_model_folder(out / "model")
    assert not any("lora_" in name for name, _ in merged.named_parameters())

    # merging is exact: the adapted model and its merged copy give the same outputs
    model, text_tokenizer, _ = load_model_folder(out / "model")
    apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)  # a non-zero adapter (B starts at zero)
    store = CodeStore(data["val_codes"])
    builder = SequenceBuilder.for_model(text_tokenizer, model.config)
    pixel, semantic = store.get(store.keys()[0])
    batch = collate_sequences([builder.generation("a red circle", pixel, semantic)], pad_id=0)
    model.eval()
    with torch.no_grad():
        adapted = model(**batch)
        merge_lora(model)
        folded = model(**batch)
    assert not any("lora_" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(folded.hidden_states, adapted.hidden_states, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_step(data, tmp_path):
    plain, checkpointed = tmp_path / "plain", tmp_path / "ckpt"
    _run("joint", stage_overrides(data, plain, steps=2))
    _run("joint", stage_overrides(data, checkpointed, steps=2) + ["model.gradient_checkpointing=true"])
    a, b = _train_records(plain), _train_records(checkpointed)
    for step in (1, 2):
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-5)


def test_bf16_autocast_on_the_cpu_follows_fp32_and_keeps_fp32_weights(data, tmp_path):
    # The tiny recipe trains under CPU bf16 autocast: matmuls in bf16, master weights, optimizer
    # state and the saved model in fp32. Its losses must track the fp32 run's, not just be finite.
    plain, mixed = tmp_path / "fp32", tmp_path / "bf16"
    _run("joint", stage_overrides(data, plain, steps=3) + ["loop.precision=fp32"])
    _run("joint", stage_overrides(data, mixed, steps=3) + ["loop.precision=bf16"])
    a, b = _train_records(plain), _train_records(mixed)
    for step in (1, 2, 3):
        assert b[step].keys() == a[step].keys()
        for key in ("train/loss", "train/text", "train/pixel"):
            if key in a[step]:
                assert b[step][key] == pytest.approx(a[step][key], rel=0.02), (step, key)
    assert b[1]["train/loss"] != a[1]["train/loss"]  # the autocast really ran in bf16
    model, _, _ = load_model_folder(mixed / "model")
    assert {param.dtype for param in model.parameters()} == {torch.float32}


def _pairs_trainer(data, output_dir: Path, settings: list[str]):
    """A 2-step joint trainer on text-to-image pairs only, and the keys of its first batch of 8."""
    overrides = stage_overrides(data, output_dir, steps=2) + settings + ["data.mix={vqa: 0.0, t2i: 1.0}"]
    config = load_config(MLLMStageConfig, _config("joint"), overrides)
    trainer = train_mllm.MLLMStageTrainer(config, distributed.init_distributed(False))
    return trainer, MixtureSampler(trainer.dataset, 8, 0, 0, 1, 0, 1).batch_for_step(0)


def test_caption_contrast_pairs_each_captioned_image_with_another_caption(data, tmp_path):
    trainer, keys = _pairs_trainer(
        data, tmp_path / "contrast", ["stage.loss_weights.contrast=1.0", "stage.uncond_prob=0.5"]
    )
    items = [trainer.dataset[key] for key in keys]
    paired = [row for row, item in enumerate(items) if isinstance(item, tuple)]
    assert 0 < len(paired) < len(items)  # captioned items are paired; dropped captions are not
    trainer.dataset.contrast = False
    plain = [trainer.dataset[key] for key in keys]
    trainer.dataset.contrast = True

    def split(sequence):  # (image slots, text slots)
        image = (sequence.ids >= trainer.model.layout.semantic_offset).any(-1)
        return sequence.ids[image], sequence.ids[~image]

    for item, reference in zip(items, plain, strict=True):  # the matched row is the plain stage's sequence
        matched = item[0] if isinstance(item, tuple) else item
        assert torch.equal(matched.ids, reference.ids)
        if isinstance(item, tuple):  # same image codes, other caption
            (image, text), (other_image, other_text) = split(matched), split(item[1])
            assert image.shape[0] == 4 * 4 and torch.equal(image, other_image)
            assert not torch.equal(text, other_text)
    batch = trainer._collate(items)
    assert batch["input_ids"].shape[0] == len(items) + len(paired)
    assert batch["contrast_rows"].tolist() == [[row, len(items) + k] for k, row in enumerate(paired)]

    metrics = trainer.fit()
    records = _train_records(tmp_path / "contrast")
    assert all("train/contrast" in r and "train/contrast_margin" in r for r in records.values())
    assert "val_t2i_contrast_margin" in metrics and "val_t2i_contrast" not in metrics


def test_image_input_noise_changes_the_generated_slots_inputs_not_their_targets(data, tmp_path):
    """``stage.image_input_noise``: that fraction of a text-to-image item's generated slots read
    random pixel codes; labels, text and the other slots stay as they were; the same item gets
    the same noise every time (exact resume), and its contrast partner the same noise too."""
    trainer, keys = _pairs_trainer(
        data, tmp_path / "noise", ["stage.image_input_noise=0.5", "stage.loss_weights.contrast=1.0"]
    )
    dataset, layout = trainer.dataset, trainer.model.layout
    split = trainer.model.config.semantic_depth
    noisy = [dataset[key] for key in keys]
    dataset.image_input_noise = 0.0
    plain = [dataset[key] for key in keys]
    dataset.image_input_noise = 0.5
    changed = total = 0
    for item, reference, key in zip(noisy, plain, keys, strict=True):
        first, clean = (item[0], reference[0]) if isinstance(item, tuple) else (item, reference)
        assert torch.equal(first.labels, clean.labels)
        generated = layout.is_pixel(clean.labels[:, split])
        assert torch.equal(first.ids[~generated], clean.ids[~generated])  # text and boundaries untouched
        differs = (first.ids[generated] != clean.ids[generated]).any(-1)
        assert layout.is_pixel(first.ids[generated][:, split:]).all()
        changed, total = changed + int(differs.sum()), total + int(generated.sum())
        again = dataset[key]
        assert torch.equal((again[0] if isinstance(again, tuple) else again).ids, first.ids)
        if isinstance(item, tuple):  # the same image under another caption reads the same noise
            other_generated = layout.is_pixel(item[1].labels[:, split])
            assert torch.equal(item[1].ids[other_generated], first.ids[generated])
    assert 0.3 < changed / total < 0.7, (changed, total)
    trainer.fit()
    assert all("train/pixel" in record for record in _train_records(tmp_path / "noise").values())


# ---------------------------------------------------------------------------- bad input
def _cli(stage: str, overrides: list[str], capsys) -> tuple[int, str]:
    argv = ["train-mllm", "--config", _config(stage)]
    for override in overrides:
        argv += ["--set", override]
    code = cli_main(argv)
    return code, capsys.readouterr().err


def test_missing_codes_are_named(data, tmp_path, capsys):
    code, err = _cli("joint", stage_overrides(data, tmp_path / "x") + [f"data.codes={tmp_path / 'nowhere'}"], capsys)
    assert code == 2 and "nowhere" in err


def test_image_without_codes_is_named(data, tmp_path, capsys):
    records = json.loads(Path(data["train_llava"]).read_text())
    records[0]["image"] = "images/train/does_not_exist.png"
    broken = Path(data["train_llava"]).parent / "broken_llava.json"
    broken.write_text(json.dumps(records))
    code, err = _cli("joint", stage_overrides(data, tmp_path / "x") + [f"data.conversations=[{broken}]"], capsys)
    assert code == 2 and "have no codes" in err and "does_not_exist.png" in err


def test_two_folders_with_the_same_image_paths_are_refused(data, tmp_path, capsys):
    from training.data.conversations import read_conversations

    # A second data file in another folder whose relative image paths are the same strings: the
    # code store is keyed by the path as written, so its images would silently read the first
    # file's codes.
    other = tmp_path / "other_world"
    other.mkdir()
    copy = other / "llava.json"
    copy.write_text(Path(data["train_llava"]).read_text())
    files = f"data.conversations=[{data['train_llava']},{copy}]"
    code, err = _cli("joint", stage_overrides(data, tmp_path / "x") + [files], capsys)
    first = json.loads(copy.read_text())[0]["image"]
    assert code == 2 and f"image path {first!r} names two files" in err and str(other / first) in err
    # The same files reached through a link are one image each: accepted.
    linked = tmp_path / "linked_world"
    linked.mkdir()
    source = Path(data["train_llava"]).parent
    for entry in source.iterdir():
        if entry.is_dir():
            (linked / entry.name).symlink_to(entry, target_is_directory=True)
    (linked / "llava.json").write_text(Path(data["train_llava"]).read_text())
    records = [r for path in (data["train_llava"], linked / "llava.json") for r in read_conversations(path)]
    check_images_tokenised(CodeStore(data["train_codes"]), records, "codes")


def test_conversation_without_answer_is_named(data, tmp_path, capsys):
    records = json.loads(Path(data["train_llava"]).read_text())
    records[3]["conversations"] = records[3]["conversations"][:1]
    broken = Path(data["train_llava"]).parent / "unanswered_llava.json"
    broken.write_text(json.dumps(records))
    code, err = _cli("joint", stage_overrides(data, tmp_path / "x") + [f"data.conversations=[{broken}]"], capsys)
    assert code == 2 and "unanswered_llava.json" in err and "record 3" in err


def test_codebook_init_refuses_another_tokenizer(data, tmp_path, capsys):
    """The code rows start from the codebooks of the tokenizer that wrote the shards, or not at all."""
    import shutil

    from mllm_fixtures import tiny_visual_tokenizer

    codes = tmp_path / "codes"
    shutil.copytree(data["train_codes"], codes)
    other = tiny_visual_tokenizer(seed=1).save_pretrained(tmp_path / "other_tokenizer")
    meta = json.loads((codes / "meta.json").read_text())
    meta["tokenizer_path"] = str(other)
    (codes / "meta.json").write_text(json.dumps(meta))
    overrides = stage_overrides(data, tmp_path / "x") + [f"data.codes={codes}", "model.code_embedding_init=codebook"]
    code, err = _cli("align", overrides, capsys)
    assert code == 2 and "other_tokenizer is not the tokenizer that wrote" in err


def test_trainable_glob_matching_nothing_is_named(data, tmp_path, capsys):
    code, err = _cli("joint", stage_overrides(data, tmp_path / "x") + ["stage.trainable=[decoder.*]"], capsys)
    assert code == 2 and "matches no parameter" in err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stage.loss_weights.contrast=-0.2", "stage.loss_weights.contrast=-0.2; expected a finite number >= 0"),
        ("stage.loss_weights.pixel=high", "stage.loss_weights.pixel='high'; expected a finite number >= 0"),
        ("stage.loss_weights.depth=1.0", "stage.loss_weights has unknown terms ['depth']"),
        ("stage.contrast_beta=0", "stage.contrast_beta=0.0; expected > 0"),
        ("stage.pixel_depth_weights=[1.0,-1.0]", "stage.pixel_depth_weights=[1.0, -1.0]; expected a list of finite"),
        ("stage.pixel_depth_weights=[0,0]", "stage.pixel_depth_weights=[0.0, 0.0]; expected a list of finite"),
        ("stage.pixel_depth_weights=[1.0,0.5,0.5]", "stage.pixel_depth_weights has 3 entries; the model writes 2"),
        ("model.image_position_embedding=grid", "model.image_position_embedding='grid'; expected one of"),
        ("model.image_position_scale=0", "model.image_position_scale=0.0; expected a finite number > 0"),
        ("model.image_position_scale=.inf", "model.image_position_scale=inf; expected a finite number > 0"),
        ("model.image_rope=3d", "model.image_rope='3d'; expected one of"),
        ("model.generated_position_embedding=learned", "model.generated_position_embedding='learned'; expected one of"),
        ("model.input_fusion=concat", "model.input_fusion='concat'; expected one of"),
        ("optim.name=sgd", "optim.name='sgd'; expected one of adamw|muon"),
        ("stage.image_input_noise=1.0", "stage.image_input_noise=1.0; expected a fraction in [0, 1)"),
        ("stage.image_input_noise=some", "stage.image_input_noise: expected a number, got 'some'"),
        (
            "model.image_position_embedding=projector model.input_fusion=sum",
            "model.image_position_embedding='projector' feeds the positions through the visual projector",
        ),
    ],
)
def test_bad_loss_weights_are_named(data, tmp_path, capsys, override, message):
    code, err = _cli("joint", stage_overrides(data, tmp_path / "x") + override.split(), capsys)
    assert code == 2 and message in err


def test_vqa_turns_train_either_way_and_a_bad_value_is_named(data, tmp_path, capsys, monkeypatch):
    # The stage tests above train whole conversations (the tiny config); independent turns too,
    # and their segments reach the model's attention mask.
    from mllm.modeling import DualTokenMLLMForCausalLM

    built, masked = [], []
    build, mask = SequenceBuilder.independent_turns, DualTokenMLLMForCausalLM.prefill_attention_mask

    def spy_build(self, *args, **kwargs):
        built.append(1)
        return build(self, *args, **kwargs)

    def spy_mask(self, input_ids, attention_mask, dtype, segment_ids=None):
        masked.append(segment_ids is not None)
        return mask(self, input_ids, attention_mask, dtype, segment_ids)

    monkeypatch.setattr(SequenceBuilder, "independent_turns", spy_build)
    monkeypatch.setattr(DualTokenMLLMForCausalLM, "prefill_attention_mask", spy_mask)
    metrics = _run("understand", stage_overrides(data, tmp_path / "turns") + ["data.vqa_turns=independent"])
    assert metrics["steps"] == 2 and built and any(masked)
    record = _train_records(tmp_path / "turns")[2]
    assert 0 < record["train/text"] < 20
    code, err = _cli("understand", stage_overrides(data, tmp_path / "x") + ["data.vqa_turns=sideways"], capsys)
    assert code == 2 and "data.vqa_turns='sideways'; expected one of conversation|independent" in err


def test_grounding_and_object_weights_train_a_stage_and_need_boxes(data, tmp_path, capsys):
    settings = ["stage.loss_weights.grounding=1.0", "stage.grounding_layer=1", "stage.object_pixel_weight=3.0"]
    metrics = _run("joint", stage_overrides(data, tmp_path / "grounded", steps=4) + settings)
    assert metrics["steps"] == 4 and 0 < metrics["val_vqa_grounding_mass"] < 1
    records = _train_records(tmp_path / "grounded")
    vqa = [r for r in records.values() if "train/text" in r and "train/pixel" not in r]
    assert vqa and all(0 < r["train/grounding"] < 20 and 0 < r["train/grounding_mass"] < 1 for r in vqa)
    # data written before boxes existed: the weights name what is missing
    for name, settings, needs in (
        (
            "llava",
            ["stage.loss_weights.grounding=1.0", "data.mix.t2i=0.0"],
            "no answer in data.conversations has 'boxes'",
        ),
        ("t2i", ["stage.object_pixel_weight=2.0", "data.mix.vqa=0.0"], "no pair in data.text_image has 'boxes'"),
    ):
        source = data[f"train_{name}"]
        text = source.read_text()
        stripped = tmp_path / source.name
        if name == "llava":
            records_in = json.loads(text)
            for record in records_in:
                for turn in record["conversations"]:
                    turn.pop("boxes", None)
            stripped.write_text(json.dumps(records_in))
        else:
            lines = [json.loads(line) for line in text.splitlines()]
            stripped.write_text("\n".join(json.dumps({k: v for k, v in r.items() if k != "boxes"}) for r in lines))
        key = "data.conversations" if name == "llava" else "data.text_image"
        overrides = (
            stage_overrides(data, tmp_path / f"x{name}")
            + settings
            + [f"{key}=[{stripped}]", f"data.image_root={source.parent}"]
        )
        code, err = _cli("joint", overrides, capsys)
        assert code == 2 and needs in err, err
    code, err = _cli("joint", stage_overrides(data, tmp_path / "y") + ["stage.object_pixel_weight=0"], capsys)
    assert code == 2 and "stage.object_pixel_weight=0.0; expected a finite number > 0" in err
    code, err = _cli(
        "joint",
        stage_overrides(data, tmp_path / "y") + ["stage.grounding_layer=9", "stage.loss_weights.grounding=1.0"],
        capsys,
    )
    assert code == 2 and "stage.grounding_layer=9; the LM has decoder layers 0..1" in err


def test_prompt_longer_than_the_context_is_named(data, tmp_path, capsys):
    code, err = _cli("joint", stage_overrides(data, tmp_path / "x") + ["model.max_length=40"], capsys)
    assert code == 2 and "longer than the model's context of 40" in err


# ---------------------------------------------------------------------------- pipeline API
def test_pipeline_answers_and_draws_reproducibly(chain):
    from mllm.inference import Pipeline
    from mllm.request_checks import PipelineError
    from training.data.shapes import ShapesWorld, ShapesWorldConfig

    pipe = Pipeline.from_pretrained(chain["joint"])
    sample = ShapesWorld(ShapesWorldConfig(seed=1, image_size=32)).sample("test", 0)
    answer = pipe.answer(sample.image, "what colour is the circle?")
    assert isinstance(answer, str)
    again = pipe.answer(sample.image, "how many objects are there?", history=[("what colour is the circle?", answer)])
    assert isinstance(again, str)
    first = pipe.generate("a large red circle", n=2, cfg=3.0, top_k=8, seed=3)
    second = pipe.generate("a large red circle", n=2, cfg=3.0, top_k=8, seed=3)
    other = pipe.generate("a large red circle", n=2, cfg=3.0, top_k=8, seed=4)
    assert len(first) == 2 and first[0].shape == (32, 32, 3) and first[0].dtype.name == "uint8"
    assert all((a == b).all() for a, b in zip(first, second, strict=True))
    assert any((a != b).any() for a, b in zip(first, other, strict=True))
    # an image depends on its own seed only, not on the rest of the batch
    third = pipe.generate("a large red circle", cfg=3.0, top_k=8, seed=4)[0]
    assert (third == second[1]).all()
    mixed = pipe.generate(["two blue squares", "a large red circle"], seeds=[9, 4], cfg=3.0, top_k=8)
    assert (mixed[1] == third).all()
    answers = pipe.answer_batch([sample.image] * 3, ["what colour is the circle?", "how many objects?", "is it red?"])
    assert answers[1] == pipe.answer(sample.image, "how many objects?")
    coarse = pipe.generate("a large red circle", cfg=3.0, top_k=8, seed=4, decode_depths=1)[0]
    assert (coarse == pipe.decode(pipe.generate_codes("a large red circle", cfg=3.0, top_k=8, seed=4), 1)[0]).all()
    assert (coarse != third).any()  # the same codes, drawn from their first depth only
    with pytest.raises(PipelineError, match=r"depths=9; expected None \(all\) or an integer in \[1, "):
        pipe.generate("a large red circle", decode_depths=9)
    with pytest.raises(PipelineError, match="empty prompt"):
        pipe.generate("   ")
    with pytest.raises(PipelineError, match="100,000 characters"):
        pipe.generate("x" * 100_000)
    with pytest.raises(PipelineError, match="empty question"):
        pipe.answer(sample.image, "")


def test_llm_pipeline_scores_and_pictures(chain, tmp_path):
    import shutil

    from mllm.generation import SamplingConfig
    from mllm.inference import Pipeline
    from training import tiny_mllm

    model = tmp_path / "model"  # a copy: scoring records its sampling settings in the folder
    shutil.copytree(chain["joint"], model)
    metrics = tiny_mllm.evaluate(model, tmp_path, vqa_scenes=3, t2i_prompts=2, cfg=2.0, seed=0, temperature=0.7)
    assert json.loads((model / "sampling.json").read_text()) == {"cfg": 2.0, "temperature": 0.7}
    assert Pipeline.from_pretrained(model).sampling == SamplingConfig(cfg=2.0, temperature=0.7)
    assert 0.0 <= metrics["vqa_mean"] <= 1.0 and 0.0 <= metrics["t2i_all"] <= 1.0
    assert metrics["t2i_prompts"] == 4 and metrics["vqa_questions"] >= 3 * 5
    assert (tmp_path / "t2i_samples.png").is_file() and (tmp_path / "vqa_samples.png").is_file()
    for kind in ("colour", "shape", "count", "exists"):
        assert 0.0 <= metrics[f"vqa_{kind}_baseline"] <= 1.0
    by_form = json.loads((tmp_path / tiny_mllm.BY_FORM_FILE).read_text())
    assert sum(row["questions"] for row in by_form) == metrics["vqa_questions"]
    assert {row["form"] for row in by_form} >= {"how many objects are there?", "is there a X?"}


def test_sampling_defaults_come_from_the_model_folder(chain, tmp_path, capsys):
    import shutil

    import numpy as np
    from PIL import Image

    from mllm.generation import SamplingConfig
    from mllm.inference import Pipeline, write_sampling
    from mllm.request_checks import PipelineError

    model = tmp_path / "model"
    shutil.copytree(chain["joint"], model)
    assert Pipeline.from_pretrained(model).sampling == SamplingConfig()  # no sampling.json: cfg 3, temperature 1
    write_sampling(model, cfg=1.0, temperature=0.5)
    pipe = Pipeline.from_pretrained(model)
    stored = pipe.generate_codes("a red circle", seed=5)
    assert torch.equal(stored, pipe.generate_codes("a red circle", seed=5, cfg=1.0, temperature=0.5))
    assert not torch.equal(stored, pipe.generate_codes("a red circle", seed=5, cfg=3.0, temperature=1.0))
    # The command line follows the folder unless told otherwise.
    paths = {name: tmp_path / f"{name}.png" for name in ("folder", "explicit", "other")}
    flags = {
        "folder": [],
        "explicit": ["--cfg", "1", "--temperature", "0.5"],
        "other": ["--cfg", "3", "--temperature", "1"],
    }
    for name, path in paths.items():
        argv = ["generate", "a red circle", "-o", str(path), "--model", str(model), "--seed", "5"]
        assert cli_main(argv + flags[name]) == 0
    pixels = {name: np.asarray(Image.open(path)) for name, path in paths.items()}
    assert (pixels["folder"] == pixels["explicit"]).all() and not (pixels["folder"] == pixels["other"]).all()
    # A broken file is named, with the setting at fault.
    for text, message in (
        ('{"cfg": "high"}', "cfg='high'; expected a number"),
        ('{"guidance": 2}', "unknown setting 'guidance'"),
        ("[1, 2]", "expected an object"),
        ("{cfg: 1}", "not JSON"),
    ):
        (model / "sampling.json").write_text(text)
        with pytest.raises(PipelineError, match="sampling.json") as caught:
            Pipeline.from_pretrained(model)
        assert message in str(caught.value)
    assert cli_main(["generate", "a red circle", "-o", str(tmp_path / "x.png"), "--model", str(model)]) == 2
    assert "sampling.json: not JSON" in capsys.readouterr().err


def test_generate_and_chat_commands(chain, tmp_path, capsys):
    import argparse
    import io

    import numpy as np
    from PIL import Image

    from mllm.commands import chat_loop
    from mllm.inference import Pipeline
    from training.data.shapes import ShapesWorld, ShapesWorldConfig

    out = tmp_path / "red.png"
    assert cli_main(["generate", "a red circle", "-o", str(out), "--model", str(chain["joint"]), "--n", "2"]) == 0
    assert (tmp_path / "red_0.png").is_file() and (tmp_path / "red_1.png").is_file()
    coarse = tmp_path / "coarse.png"
    assert (
        cli_main(
            ["generate", "a red circle", "-o", str(coarse), "--model", str(chain["joint"]), "--decode-depths", "1"]
        )
        == 0
    )
    assert (
        coarse.is_file()
        and not (np.asarray(Image.open(coarse)) == np.asarray(Image.open(tmp_path / "red_0.png"))).all()
    )
    assert not list(tmp_path.glob(".*partial"))
    assert cli_main(["generate", "  ", "-o", str(out), "--model", str(chain["joint"])]) == 2
    assert "empty prompt" in capsys.readouterr().err
    assert cli_main(["generate", "a", "-o", str(out), "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err

    picture = tmp_path / "scene.png"
    Image.fromarray(ShapesWorld(ShapesWorldConfig(image_size=32)).sample("test", 1).image).save(picture)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    script = io.StringIO(
        f"/image {not_an_image}\n/image {picture}\nwhat colour is the circle?\nhow many objects are there?\n"
        "/imagine a blue square\n/quit\n"
    )
    transcript = io.StringIO()
    args = argparse.Namespace(
        cfg=2.0, top_k=0, top_p=1.0, temperature=1.0, seed=0, decode_depths=None, out_dir=str(tmp_path / "chat")
    )
    pipe = Pipeline.from_pretrained(chain["joint"])
    chat_loop(pipe, script, transcript, args)
    lines = transcript.getvalue().splitlines()
    assert lines[1].startswith("error:") and "notes.png" in lines[1]
    assert lines[2] == f"(attached {picture})"
    assert (tmp_path / "chat" / "imagine_001.png").is_file()


def test_llm_pipeline_end_to_end_and_reuse(data, tmp_path, caplog, capsys):
    import logging
    import re

    from mllm_fixtures import stage_overrides

    from training import tiny_mllm

    prefixes = ("model.", "loop.batch", "eval.", "stage.pixel_depth_weights")
    micro = [o for o in stage_overrides(data, tmp_path / "unused") if o.startswith(prefixes)]
    argv = ["--tokenizer", str(data["visual_tokenizer"]), "--run-dir", str(tmp_path / "run"), "--train-images", "16"]
    argv += ["--val-images", "8", "--vqa-scenes", "2", "--t2i-prompts", "2", "--temperature", "0.7"]
    argv += [item for value in [*micro, "loop.max_steps=2"] for item in ("--set", value)]
    metrics = tiny_mllm.main(argv)
    report = (tmp_path / "run" / "mllm_report.md").read_text()
    assert metrics["t2i_temperature"] == 0.7 and "CFG 1, temperature 0.7." in report
    assert "majority baseline" in report and f"{100 * metrics['vqa_mean']:.1f} %" in report
    assert (tmp_path / "run" / "mllm_eval" / "t2i_samples.png").is_file()
    # Every scene gets one "yes" and one "no" existence question: 2 scenes, 4 such questions, the
    # most asked form, so the table (forms asked as often as min(20, the most asked)) lists it.
    by_form = json.loads((tmp_path / "run" / "mllm_eval" / tiny_mllm.BY_FORM_FILE).read_text())
    exists = next(row for row in by_form if row["form"] == "is there a X?")
    assert exists["questions"] == 4 and exists["top_answer_share"] == 0.5
    assert f"| is there a X? | 4 | {100 * exists['accuracy']:.1f} % |" in report
    summary = json.loads((tmp_path / "run" / "mllm_metrics.json").read_text())
    assert set(summary["stages"]) == {"align", "understand", "generate", "joint"}
    # By default the drawing stages read the slots world's pairs, written beside each split.
    for split in ("train", "val"):
        assert len((tmp_path / "run" / "data" / split / "t2i_slots.jsonl").read_text().splitlines()) > 0
    joint_argv = json.loads((tmp_path / "run" / "mllm" / "joint" / "pipeline_settings.json").read_text())["argv"]
    assert "data.text_image=[{run_dir}/data/train/t2i_slots.jsonl]" in joint_argv
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = tiny_mllm.main(argv)
    timeless = {k: v for k, v in metrics.items() if not k.endswith("_seconds")}
    assert {k: v for k, v in again.items() if not k.endswith("_seconds")} == pytest.approx(timeless)
    for stage in ("align", "understand", "generate", "joint"):
        assert f"LLM stage {stage}: reusing" in caplog.text
    assert "codes: reusing" in caplog.text and "data: reusing" in caplog.text
    # A finished stage asked for with other settings is not reused: the error names the stage and the change.
    from tokenizer.config import ConfigError

    with pytest.raises(ConfigError, match=r"LLM stage joint in .* other settings .*only now: \['loop.max_steps=3'\]"):
        tiny_mllm.main([*argv, "--set-joint", "loop.max_steps=3"])
    # Drawing only depth 1 re-scores the finished stages; an impossible depth stops before any work.
    coarse = tiny_mllm.main([*argv, "--decode-depths", "1"])
    assert coarse["t2i_decode_depths"] == 1.0 and coarse["vqa_mean"] == pytest.approx(metrics["vqa_mean"])
    assert "first 1 RVQ depth(s) drawn" in (tmp_path / "run" / "mllm_report.md").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        tiny_mllm.main([*argv, "--decode-depths", "9"])
    assert re.search(r"--decode-depths=9; expected 1\.\.\d+ \(the tokenizer's pixel depth\)", capsys.readouterr().err)


def test_canonical_decoder_config_trains_on_the_canonical_world():
    """configs/tokenizer/tiny_decoder_canonical.yaml spells the canonical world out in YAML; it
    must stay the world that ``--t2i-world canonical`` writes its pairs from."""
    from training.config import load_config
    from training.tiny_mllm import canonical_world_config
    from training.tokenizer_config import Stage1Config

    path = Path(__file__).resolve().parents[2] / "configs" / "tokenizer" / "tiny_decoder_canonical.yaml"
    config = load_config(Stage1Config, str(path), [])
    assert config.data.shapes == canonical_world_config(0, 64, 8)


def test_building_the_tiny_model_leaves_no_temporary_folders(data, tmp_path, monkeypatch):
    import tempfile

    from training.config import load_config

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config = load_config(MLLMStageConfig, _config("align"), stage_overrides(data, tmp_path / "x"))
    model, text_tokenizer = build_model(config.model, CodeStore(data["train_codes"]))
    assert text_tokenizer("is there a red circle?")["input_ids"]
    assert list(tmp_path.glob("dualtoken-sp-*")) == []


def test_data_written_without_boxes_is_written_again(tmp_path):
    from training.data.conversations import write_shapes
    from training.data.shapes import ShapesWorld, ShapesWorldConfig
    from training.tiny_mllm import _data_ready

    written = write_shapes(ShapesWorld(ShapesWorldConfig(seed=1, image_size=32)), "val", tmp_path, 3)
    assert _data_ready(tmp_path, 3) and not _data_ready(tmp_path, 4)
    records = json.loads(written["llava"].read_text())
    for record in records:
        for turn in record["conversations"]:
            turn.pop("boxes", None)
    written["llava"].write_text(json.dumps(records))
    assert not _data_ready(tmp_path, 3)


def test_grid_text_to_image_pairs_share_the_code_store(data, tmp_path, caplog):
    import logging

    import numpy as np
    from PIL import Image

    from training.data.code_store import CodeStore
    from training.data.conversations import read_text_image_pairs
    from training.data.shapes import SLOT_CENTRES
    from training.tiny_mllm import CANONICAL_GREY, data_overrides, prepare_data

    counts = {"train": 5, "val": 3}
    plain = prepare_data(data["visual_tokenizer"], tmp_path, counts)
    assert len(CodeStore(plain["train"] / "codes")) == 5 and not (plain["train"] / "t2i_grid.jsonl").exists()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        grid = prepare_data(data["visual_tokenizer"], tmp_path, counts, t2i_world="grid")
    # The conversations are kept; the store lacked the new pairs' images, so it is written again.
    assert "data: reusing" in caplog.text and "codes: writing" in caplog.text and "have no codes" in caplog.text
    for split, count in counts.items():
        pairs = read_text_image_pairs(grid[split] / "t2i_grid.jsonl")
        store = CodeStore(grid[split] / "codes")
        assert len(pairs) == count and len(store) == 2 * count
        assert all(pair.image_key.startswith(f"images/{split}_grid/") and pair.image_key in store for pair in pairs)
    lines = (grid["train"] / "t2i_grid.jsonl").read_text().splitlines()
    assert all(1 <= len(json.loads(line)["objects"]) <= 2 for line in lines)  # the grid world's scenes
    assert f"data.text_image=[{grid['train'] / 't2i_grid.jsonl'}]" in data_overrides(grid, "grid")
    assert f"data.val_text_image=[{grid['val'] / 't2i.jsonl'}]" in data_overrides(grid)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        prepare_data(data["visual_tokenizer"], tmp_path, counts, t2i_world="grid")
    assert "codes: writing" not in caplog.text and caplog.text.count("codes: reusing") == 2
    # The canonical world's pairs join the same store; their backgrounds are exactly one grey.
    canonical = prepare_data(data["visual_tokenizer"], tmp_path, counts, t2i_world="canonical")
    pairs = read_text_image_pairs(canonical["train"] / "t2i_canonical.jsonl")
    assert len(pairs) == 5 and len(CodeStore(canonical["train"] / "codes")) == 10  # scenes + canonical pairs
    assert all(pair.image_key.startswith("images/train_canonical/") for pair in pairs)
    corners = [np.asarray(Image.open(canonical["train"] / pair.image_key))[[0, -1]][:, [0, -1]] for pair in pairs]
    assert all((corner == CANONICAL_GREY).all() for corner in corners)
    assert f"data.text_image=[{canonical['train'] / 't2i_canonical.jsonl'}]" in data_overrides(canonical, "canonical")
    # The slots world's pairs: every object at its slot, by count and caption order.
    slots = prepare_data(data["visual_tokenizer"], tmp_path, counts, t2i_world="slots")
    lines = (slots["train"] / "t2i_slots.jsonl").read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line)["image"].startswith("images/train_slots/") for line in lines)
    for line in lines:
        objects = json.loads(line)["objects"]
        assert [tuple(obj["center"]) for obj in objects] == list(SLOT_CENTRES[len(objects)])
    with pytest.raises(
        ValueError, match=r"t2i_world='tiles'; expected one of \['scenes', 'grid', 'canonical', 'slots'\]"
    ):
        prepare_data(data["visual_tokenizer"], tmp_path, counts, t2i_world="tiles")
