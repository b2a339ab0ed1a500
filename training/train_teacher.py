"""Stage 0: train a small SigLIP (image + text tower) from scratch with the sigmoid loss.

It stands in for the pretrained SigLIP the paper starts from, when none is given (the
tiny default). The result is a transformers ``SiglipModel`` directory plus its text
tokenizer, so stage 1 loads it exactly as it would load ``google/siglip-so400m-*``.

    dualtoken train-teacher --config configs/tokenizer/tiny_teacher.yaml
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm import tqdm
from transformers import SiglipConfig, SiglipModel, SiglipTextConfig, SiglipVisionConfig

from tokenizer.config import BackboneConfig, ConfigError
from tokenizer.files import atomic_directory, folder_is_complete
from tokenizer.text_tower import build_word_tokenizer, tokenize_texts
from training import checkpointing, distributed
from training.common import (
    MetricsWriter,
    autocast,
    build_optimizer,
    count_parameters,
    resolve_precision,
    restore_schedule_lr,
    seed_everything,
    setup_logging,
    step_loader,
    steps_of,
    warmup_cosine,
)
from training.config import DeepSpeedConfig, LoopConfig, OptimConfig, load_config
from training.data import DataConfig, ShapesWorld, collate_image_text
from training.data.shapes import class_index

logger = logging.getLogger(__name__)

TEACHER_DIRNAME = "teacher"


@dataclass
class TextTowerConfig:
    """Size of the teacher's text tower (its width equals the vision width)."""

    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    max_length: int = 32

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.max_length < 4:
            raise ConfigError("teacher.text.num_layers must be >= 1 and teacher.text.max_length >= 4")


@dataclass
class TeacherConfig:
    vision: BackboneConfig = field(default_factory=BackboneConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    # Share of single-object images in each batch: zero-shot prompts name one object, so
    # the teacher must also see captions that do.
    single_object_fraction: float = 0.5
    # Add the class prompts to every batch's texts (see sigmoid_loss).
    class_prompt_negatives: bool = True
    # Weight of an auxiliary cross-entropy over the zero-shot classes on the pooled image
    # output of single-object scenes (their class is known), through a linear head that is
    # dropped after training. It gives shape a direct gradient: with the sigmoid loss alone
    # shape stays near chance for ~300 steps (configs/tokenizer/tiny_teacher.yaml). 0 turns it off.
    class_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.vision.kind != "siglip":
            raise ConfigError(f"teacher.vision.kind={self.vision.kind!r}; stage 0 trains a SigLIP ('siglip')")
        if not 0 <= self.single_object_fraction <= 1:
            raise ConfigError("teacher.single_object_fraction must lie in [0, 1]")
        if self.class_loss_weight < 0:
            raise ConfigError("teacher.class_loss_weight must be >= 0")


@dataclass
class Stage0Config:
    """Everything stage 0 reads from its YAML; any other key is an error that names it."""

    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


class MixedShapesDataset(Dataset):
    """Shapes-world training images where a fixed share of indices are single-object scenes."""

    def __init__(self, world: ShapesWorld, split: str, single_object_fraction: float) -> None:
        self.world = world
        self.split = split
        self.size = world.split_size(split)
        self.every = 0 if single_object_fraction <= 0 else max(1, round(1 / single_object_fraction))
        self.prompts = world.zero_shot_prompts()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        single = self.every and index % self.every == 0
        sample = self.world.sample_single(self.split, index) if single else self.world.sample(self.split, index)
        image = torch.from_numpy(sample.image).permute(2, 0, 1).float() / 127.5 - 1
        # Single-object scenes are captioned with their class prompt, as web alt-text often
        # names just the object: identical captions are positives for each other in the
        # sigmoid loss, which teaches colour x shape far faster than free captions alone.
        caption = self.prompts[sample.label] if single else sample.caption
        # Which class prompts are true of this image (+1) or false (-1): every object is known.
        class_targets = torch.full((len(self.prompts),), -1.0)
        for obj in sample.objects:
            class_targets[class_index(obj.colour, obj.shape)] = 1.0
        return {
            "image": image,
            "caption": caption,
            "label": sample.label,
            "index": index,
            "class_targets": class_targets,
        }


def collate_with_class_targets(batch: list[dict]) -> dict:
    collated = collate_image_text(batch)
    collated["class_targets"] = torch.stack([item["class_targets"] for item in batch])
    return collated


def build_teacher(config: TeacherConfig, vocab_size: int) -> SiglipModel:
    vision = config.vision
    vision_config = SiglipVisionConfig(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.num_heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
    )
    text_config = SiglipTextConfig(
        vocab_size=vocab_size,
        hidden_size=vision.hidden_size,
        intermediate_size=config.text.intermediate_size,
        num_hidden_layers=config.text.num_layers,
        num_attention_heads=config.text.num_heads,
        max_position_embeddings=config.text.max_length,
        projection_size=vision.hidden_size,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=2,
    )
    model = SiglipModel(SiglipConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict()))
    with torch.no_grad():
        # SigLIP paper §3: t' = log 10 and b = -10 at initialisation.
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    return model


class TeacherWithClassHead(torch.nn.Module):
    """The SigLIP being trained plus the auxiliary class head (only ``siglip`` is saved)."""

    def __init__(self, siglip: SiglipModel, num_classes: int) -> None:
        super().__init__()
        self.siglip = siglip
        self.class_head = torch.nn.Linear(siglip.config.vision_config.hidden_size, num_classes)


def sigmoid_loss(
    model: SiglipModel,
    images: torch.Tensor,
    input_ids: torch.Tensor,
    prompt_ids: torch.Tensor | None = None,
    class_targets: torch.Tensor | None = None,
    image_features: torch.Tensor | None = None,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss over (images x captions), optionally extended with
    (images x class prompts).

    images: (B, 3, H, W); input_ids: (B, L) captions; pairs with identical captions count as
    positives (a closed world repeats captions, and calling them negatives is wrong).
    prompt_ids: (K, L) class prompts and class_targets: (B, K) in {+1, -1}: the prompts are
    extra texts in every batch, so each image meets the hard negatives that differ from it
    in shape alone (same colour) — the signal a random batch of captions rarely contains.
    image_features: the pooled image output when the caller already computed it.
    """
    if image_features is None:
        image_features = model.get_image_features(pixel_values=images).pooler_output
    image_embeds = torch.nn.functional.normalize(image_features, dim=-1)
    texts = input_ids if prompt_ids is None else torch.cat([input_ids, prompt_ids])
    text_embeds = torch.nn.functional.normalize(model.get_text_features(input_ids=texts).pooler_output, dim=-1)
    logits = image_embeds @ text_embeds.t() * model.logit_scale.exp() + model.logit_bias
    same_text = (input_ids[:, None, :] == input_ids[None, :, :]).all(dim=-1).float()
    labels = 2 * same_text - 1
    if prompt_ids is not None:
        labels = torch.cat([labels, class_targets.to(labels)], dim=1)
    return -torch.nn.functional.logsigmoid(labels * logits).sum(dim=-1).mean()


def world_texts(world: ShapesWorld, count: int = 2000) -> list[str]:
    texts = list(world.zero_shot_prompts())
    # A small world (e.g. shapes.num_train=64 in tests) has fewer training samples than `count`.
    for index in range(min(count, world.split_size("train"))):
        texts.append(world.sample("train", index).caption)
        texts.append(world.sample_single("train", index).caption)
    return texts


@torch.no_grad()
def teacher_zero_shot(model: SiglipModel, text_tokenizer, world: ShapesWorld, split: str, limit: int) -> float:
    from training.data import ShapesImageDataset
    from training.evaluation import zero_shot_accuracy

    model.eval()
    ids = tokenize_texts(text_tokenizer, world.zero_shot_prompts(), model.config.text_config.max_position_embeddings)
    ids = ids.to(model.device)
    text_embeds = torch.nn.functional.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
    dataset = ShapesImageDataset(world, split, single_object=True)
    accuracy = zero_shot_accuracy(
        lambda images: model.get_image_features(pixel_values=images).pooler_output,
        text_embeds,
        dataset,
        limit=limit,
        desc="teacher zero-shot",
        device=model.device,
    )
    model.train()
    return accuracy


def teacher_is_complete(directory: Path) -> bool:
    """A finished stage 0 leaves the model, its tokenizer and a metrics file, all in a manifest that verifies."""
    return folder_is_complete(
        directory, required=("config.json", "model.safetensors", "tokenizer.json", "metrics.json")
    )


def fit(config: Stage0Config, dist_state: distributed.DistState) -> dict[str, float]:
    loop = config.loop
    output_dir = Path(loop.output_dir)
    world = ShapesWorld(config.data.shapes)
    text_tokenizer = build_word_tokenizer(world_texts(world), config.teacher.text.max_length)
    seed_everything(loop.seed)
    siglip = build_teacher(config.teacher, vocab_size=len(text_tokenizer))
    model = TeacherWithClassHead(siglip, len(world.zero_shot_prompts())).to(dist_state.device)
    precision = resolve_precision(loop.precision, dist_state.device)
    logger.info("stage 0: SigLIP teacher with %.2fM trainable parameters", count_parameters(model) / 1e6)
    optimizer = build_optimizer(model.parameters(), config.optim)
    scheduler = warmup_cosine(optimizer, config.optim, loop.max_steps)
    engine = distributed.TrainEngine(
        model,
        optimizer,
        scheduler,
        config.optim.grad_clip,
        config.deepspeed,
        loop.batch_size,
        loop.precision,  # DeepSpeed's bf16 mode (bf16 weights) for `bf16` only; `auto` is autocast
        dist_state.world_size,
        loop.grad_accumulation,
    )
    checkpoints = output_dir / "checkpoints"
    start_step = 0
    latest = checkpointing.latest_checkpoint(checkpoints) if loop.resume else None
    if latest is not None:
        start_step = checkpointing.load_checkpoint(latest, {"teacher": engine})["step"]
        restore_schedule_lr(engine.scheduler)
        logger.info("resumed stage 0 from %s (step %d)", latest, start_step)
    dataset = MixedShapesDataset(world, "train", config.teacher.single_object_fraction)
    prompt_ids = tokenize_texts(text_tokenizer, world.zero_shot_prompts(), config.teacher.text.max_length)
    prompt_ids = prompt_ids.to(dist_state.device)
    loader = step_loader(
        dataset,
        collate_with_class_targets,
        loop.batch_size,
        loop.seed,
        start_step,
        loop.max_steps,
        dist_state.rank,
        dist_state.world_size,
        loop.num_workers,
        loop.grad_accumulation,
    )
    writer = MetricsWriter(output_dir, enabled=dist_state.is_main)
    max_length = config.teacher.text.max_length
    step, started = start_step, time.time()
    losses: list[float] = []
    engine.train()
    progress = tqdm(
        steps_of(loader, loop.grad_accumulation),
        desc="stage 0 (teacher)",
        initial=start_step,
        total=loop.max_steps,
        disable=not dist_state.is_main,
    )
    for micro_batches in progress:  # a step is one optimizer update: loop.grad_accumulation micro-batches
        for batch in micro_batches:
            input_ids = tokenize_texts(text_tokenizer, batch["caption"], max_length)
            images = batch["image"].to(dist_state.device)
            with autocast(precision, dist_state.device):
                pooled = engine.module.siglip.get_image_features(pixel_values=images).pooler_output
                loss = sigmoid_loss(
                    engine.module.siglip,
                    images,
                    input_ids.to(dist_state.device),
                    prompt_ids if config.teacher.class_prompt_negatives else None,
                    batch["class_targets"].to(dist_state.device),
                    image_features=pooled,
                )
                single = batch["class_targets"].gt(0).sum(dim=-1).eq(1).to(dist_state.device)
                if config.teacher.class_loss_weight > 0 and bool(single.any()):
                    class_logits = engine.module.class_head(pooled[single])
                    labels = batch["label"].to(dist_state.device)[single]
                    loss = loss + config.teacher.class_loss_weight * torch.nn.functional.cross_entropy(
                        class_logits.float(), labels
                    )
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        step += 1
        if step % loop.log_every == 0:
            logged = distributed.all_reduce_scalars({"loss": sum(losses) / len(losses)})  # mean over ranks
            writer.scalars(step, {**logged, "lr": engine.lr}, prefix="stage0/")
            losses.clear()
        # The final step is checkpointed too, so a finished run can be extended (a larger
        # loop.max_steps, same output_dir) and continues exactly where it stopped.
        if step % loop.save_every == 0:
            checkpointing.save_checkpoint(checkpoints, step, {"teacher": engine}, {})
            checkpointing.prune_checkpoints(checkpoints)
    metrics = {
        "teacher_zero_shot_val": teacher_zero_shot(engine.module.siglip, text_tokenizer, world, "val", loop.eval_images)
    }
    metrics["train_seconds"] = time.time() - started
    if dist_state.is_main:
        save_teacher(engine.module.siglip, text_tokenizer, output_dir / TEACHER_DIRNAME, metrics)
        writer.scalars(step, metrics, prefix="stage0/")
    writer.close()
    logger.info("stage 0 done: %s", json.dumps(metrics))
    return metrics


def save_teacher(model: SiglipModel, text_tokenizer, directory: Path, metrics: dict) -> None:
    """Write the teacher through a staging folder so a crash never leaves a half teacher (manifest written last)."""
    with atomic_directory(directory) as staging:
        model.save_pretrained(staging)
        text_tokenizer.save_pretrained(staging)
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))


def main(argv: list[str] | None = None) -> dict[str, float]:
    import argparse

    from tokenizer.files import check_output_dir

    parser = argparse.ArgumentParser(prog="dualtoken train-teacher", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiment YAML (configs/tokenizer/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    distributed.add_launcher_arguments(parser)
    args = parser.parse_args(argv)
    config = load_config(Stage0Config, args.config, args.overrides)
    check_output_dir(config.loop.output_dir, "loop.output_dir")  # before any model is built
    dist_state = distributed.init_distributed(config.deepspeed.enabled, args.device)
    setup_logging(dist_state.rank)
    if config.loop.num_threads:
        torch.set_num_threads(config.loop.num_threads)
    try:
        return fit(config, dist_state)
    finally:
        distributed.cleanup_distributed()


if __name__ == "__main__":
    main()
