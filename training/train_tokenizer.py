"""Stage 1: train DualToken (docs/architecture.md, "The method") from a SigLIP teacher.

The whole vision tower is fine-tuned; a frozen copy of the teacher's vision tower is the
distillation target of the semantic branch; the text tower stays frozen. With the GAN on,
the discriminator has an optimizer (and engine) of its own.

    dualtoken train-tokenizer --config configs/tokenizer/tiny.yaml
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from tokenizer.backbone import VisionBackbone
from tokenizer.config import ConfigError, config_to_dict
from tokenizer.discriminator import PatchDiscriminator
from tokenizer.files import folder_is_complete, verify_folder
from tokenizer.losses import (
    PerceptualLoss,
    adaptive_generator_weight,
    feature_distillation_loss,
    generator_adversarial_loss,
    hinge_discriminator_loss,
)
from tokenizer.model import DualTokenizer, DualTokenizerOutput
from tokenizer.pretrained import HUB_ID, resolve_pretrained
from tokenizer.siglip_backbone import SiglipBackbone
from tokenizer.text_tower import TextTower
from training import checkpointing, distributed
from training.common import (
    MetricsWriter,
    autocast,
    build_optimizer,
    count_parameters,
    format_metrics,
    resolve_precision,
    restore_schedule_lr,
    seed_everything,
    setup_logging,
    step_loader,
    steps_of,
    warmup_cosine,
)
from training.config import OptimConfig, load_config
from training.data import ShapesImageDataset, ShapesWorld, build_image_dataset, collate_image_text
from training.data.bad_images import BadImageLog
from training.evaluation import class_text_embeddings, save_image_grid, tokenizer_metrics, zero_shot_accuracy
from training.tokenizer_config import LossConfig, Stage1Config

logger = logging.getLogger(__name__)

TOKENIZER_DIRNAME = "tokenizer"
# A SigLIP teacher's text tokenizer: stage 0 writes tokenizer.json, a hub SigLIP ships spiece.model.
TEXT_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


# ---------------------------------------------------------------------------------- setup
DECODER_MODULES = ("pixel_up", "decoder")


def load_init_tokenizer(config: Stage1Config) -> DualTokenizer:
    """The trained tokenizer named by ``config.init_tokenizer``, checked against ``config.tokenizer``."""
    visual_tokenizer = DualTokenizer.from_pretrained(config.init_tokenizer)
    saved, wanted = config_to_dict(visual_tokenizer.config), config_to_dict(config.tokenizer)
    for section in ("taps", "pixel_quantizer", "semantic_quantizer", "decoder", "projection"):
        if saved.get(section) != wanted.get(section):
            raise ConfigError(
                f"init_tokenizer={config.init_tokenizer} was saved with tokenizer.{section}={saved.get(section)}, "
                f"but the config asks for {wanted.get(section)}; make them equal"
            )
    return visual_tokenizer


def frozen_parts(visual_tokenizer: DualTokenizer) -> list[nn.Module]:
    """Freeze all but DECODER_MODULES; returns the frozen parts (to keep in eval mode)."""
    frozen = []
    for name, child in visual_tokenizer.named_children():
        child.requires_grad_(name in DECODER_MODULES)
        if name not in DECODER_MODULES:
            frozen.append(child)
    return frozen


# ---------------------------------------------------------------------------------- setup
@dataclass
class Teacher:
    """The frozen pieces stage 1 takes from the teacher checkpoint."""

    vision: VisionBackbone  # frozen copy: the distillation target
    text_tower: TextTower | None
    text_tokenizer: object | None


def load_teacher(path: str, image_size: int | None = None) -> tuple[VisionBackbone, Teacher]:
    """-> (trainable backbone initialised from the teacher, frozen teacher parts).

    ``path`` is a SiglipModel directory (stage 0's output, or a pretrained SigLIP such as
    siglip-so400m-patch14-384 on local disk), a Siglip2Model directory, or a vision-only
    directory (then no zero-shot: there is no text tower); or the hub id of one of these, found in
    the Hugging Face cache (:func:`tokenizer.pretrained.resolve_pretrained`).
    """
    from transformers import AutoTokenizer, Siglip2Model, SiglipModel

    source = Path(path)
    if not source.exists() and HUB_ID.match(path):  # a hub id: its snapshot in the Hugging Face cache
        source = resolve_pretrained(path, "teacher_path")
    with contextlib.suppress(FileNotFoundError):  # a missing folder is named just below
        verify_folder(source)  # recovers an interrupted replacement; refuses a file that does not match the manifest
    if not (source / "config.json").is_file():
        raise FileNotFoundError(
            f"teacher_path={path} has no config.json; run stage 0 first (dualtoken train-teacher) "
            "or point teacher_path at a local SigLIP checkpoint"
        )
    model_type = json.loads((source / "config.json").read_text()).get("model_type")
    if model_type in ("siglip", "siglip2"):
        if not any((source / name).is_file() for name in TEXT_TOKENIZER_FILES):
            # Named here: without it AutoTokenizer fails deep inside sentencepiece or tokenizers.
            raise FileNotFoundError(
                f"teacher_path={path} has no text tokenizer ({' or '.join(TEXT_TOKENIZER_FILES)}); "
                "run stage 0 again or copy the checkpoint's tokenizer files next to its config.json"
            )
        siglip = (Siglip2Model if model_type == "siglip2" else SiglipModel).from_pretrained(source)
        vision_model, text_tower = (
            siglip.vision_model,
            TextTower(siglip.text_model, float(siglip.logit_scale.detach()), float(siglip.logit_bias.detach())),
        )
        text_tokenizer = AutoTokenizer.from_pretrained(source)
    else:
        vision_model, text_tower, text_tokenizer = SiglipBackbone.from_pretrained(str(source)).vision_model, None, None
    # image_size: the grid a NaFlex SigLIP2 tower reads (fixed-resolution towers keep their own).
    trainable = SiglipBackbone.from_siglip_model(copy.deepcopy(vision_model), image_size)
    frozen = SiglipBackbone.from_siglip_model(vision_model, image_size).requires_grad_(False).eval()
    return trainable, Teacher(vision=frozen, text_tower=text_tower, text_tokenizer=text_tokenizer)


def build_perceptual(config: LossConfig, teacher: Teacher, device: torch.device) -> PerceptualLoss | None:
    """The perceptual term's network, frozen, on ``device`` (the teacher variant uses ``teacher.vision``)."""
    if config.perceptual <= 0 or config.perceptual_network == "off":
        return None
    if config.perceptual_network == "vgg16":
        return PerceptualLoss.from_vgg16(config.perceptual_weights_path, config.perceptual_lpips_path).to(device)
    vision = teacher.vision

    def teacher_features(images: torch.Tensor) -> list[torch.Tensor]:
        layers = list(range(1, vision.num_layers + 1))
        taps = vision.forward_taps(images, layers)
        return [vision.tokens_to_grid(taps[layer]) for layer in layers]

    return PerceptualLoss(teacher_features).to(device)


# ---------------------------------------------------------------------------------- losses
def generator_losses(
    output: DualTokenizerOutput,
    images: torch.Tensor,
    teacher: Teacher,
    semantic_layer: int,
    config: LossConfig,
    perceptual: PerceptualLoss | None,
) -> dict[str, torch.Tensor]:
    """Every generator-side term, unweighted except where noted; ``total`` is weighted."""
    recon = output.reconstruction
    losses: dict[str, torch.Tensor] = {"mse": nn.functional.mse_loss(recon, images)}
    losses["l1"] = (recon - images).abs().mean()
    reconstruction = config.mse * losses["mse"] + config.l1 * losses["l1"]
    if perceptual is not None:
        losses["perceptual"] = perceptual(recon, images).mean()
        reconstruction = reconstruction + config.perceptual * losses["perceptual"]
    losses["reconstruction"] = reconstruction
    with torch.no_grad():
        hidden = teacher.vision.embed(images)
        tap = teacher.vision.run_blocks(hidden, 0, semantic_layer)
        pooled = teacher.vision.head(teacher.vision.run_blocks(tap, semantic_layer, teacher.vision.num_layers))
        tap = tap[:, teacher.vision.num_prefix_tokens :]
    losses["semantic_tap"] = feature_distillation_loss(output.semantic_tap_features, tap)
    losses["semantic_pooled"] = feature_distillation_loss(output.semantic_pooled, pooled)
    losses["commitment"] = output.pixel_commitment_loss + output.semantic_commitment_loss
    losses["total"] = (
        reconstruction
        + config.semantic_tap * losses["semantic_tap"]
        + config.semantic_pooled * losses["semantic_pooled"]
        + config.commitment * losses["commitment"]
    )
    return losses


# ---------------------------------------------------------------------------------- loop
class Stage1Trainer:
    """Holds the engines and evaluators of stage 1; ``fit`` is the explicit loop."""

    def __init__(self, config: Stage1Config, dist_state: distributed.DistState) -> None:
        self.config = config
        self.dist = dist_state
        self.output_dir = Path(config.loop.output_dir)
        seed_everything(config.loop.seed)
        backbone, self.teacher = load_teacher(config.teacher_path, config.tokenizer.backbone.image_size)
        if config.init_tokenizer:
            self.visual_tokenizer = load_init_tokenizer(config)
        else:
            self.visual_tokenizer = DualTokenizer(
                config.tokenizer, backbone=backbone, text_tower=self.teacher.text_tower
            )
        self._frozen = frozen_parts(self.visual_tokenizer) if config.decoder_only else []
        self.visual_tokenizer.backbone.set_gradient_checkpointing(config.tokenizer.backbone.gradient_checkpointing)
        # Every module on the run's device before an optimizer sees its parameters: the
        # trainable tokenizer, the frozen distillation target and the frozen text tower.
        self.visual_tokenizer.to(dist_state.device)
        self.teacher.vision.to(dist_state.device)
        if self.teacher.text_tower is not None:
            self.teacher.text_tower.to(dist_state.device)
        self.precision = resolve_precision(config.loop.precision, dist_state.device)
        logger.info(
            "stage 1: DualToken with %.2fM trainable parameters (taps %d/%d of %d layers)",
            count_parameters(self.visual_tokenizer) / 1e6,
            config.tokenizer.taps.pixel_layer,
            config.tokenizer.taps.semantic_layer,
            self.visual_tokenizer.backbone.num_layers,
        )
        self.perceptual = build_perceptual(config.loss, self.teacher, dist_state.device)
        self.engine = self._engine(self.visual_tokenizer, config.optim)
        self.engines = {"tokenizer": self.engine}
        self.discriminator_engine = None
        if config.loss.gan > 0:
            self.discriminator_engine = self._engine(
                PatchDiscriminator(config.discriminator).to(dist_state.device), config.discriminator_optim
            )
            self.engines["discriminator"] = self.discriminator_engine
        self.writer = MetricsWriter(self.output_dir, enabled=dist_state.is_main)
        self._text_embeds: torch.Tensor | None = None
        self._world = ShapesWorld(config.data.shapes) if config.data.kind == "shapes" else None

    @property
    def _stage_name(self) -> str:
        return "stage 1b" if self.config.decoder_only else "stage 1"

    def _train_mode(self) -> None:
        """Training mode, except the frozen parts of a decoder-only run: in eval mode their
        quantisers make no EMA or dead-code updates, so the codes cannot move."""
        self.engine.train()
        for part in self._frozen:
            part.eval()

    def _engine(self, module: nn.Module, optim: OptimConfig) -> distributed.TrainEngine:
        """AdamW (or Muon + AdamW) + warm-up/cosine over the trainable parameters of ``module``, in an engine."""
        loop = self.config.loop
        optimizer = build_optimizer([p for p in module.parameters() if p.requires_grad], optim, module)
        return distributed.TrainEngine(
            module,
            optimizer,
            warmup_cosine(optimizer, optim, loop.max_steps),
            optim.grad_clip,
            self.config.deepspeed,
            loop.batch_size,
            loop.precision,  # DeepSpeed's bf16 mode (bf16 weights) for `bf16` only; `auto` is autocast
            self.dist.world_size,
            loop.grad_accumulation,
        )

    # ------------------------------------------------------------ one step
    def train_step(self, images: torch.Tensor, step: int) -> dict[str, float]:
        config = self.config
        with autocast(self.precision, self.dist.device):
            output = self.engine(images)
            losses = generator_losses(
                output, images, self.teacher, config.tokenizer.taps.semantic_layer, config.loss, self.perceptual
            )
            total = losses["total"]
            gan_on = self.discriminator_engine is not None and step >= config.loss.gan_start_step
            if gan_on:
                fake_logits = self.discriminator_engine.frozen_forward(output.reconstruction)
                losses["generator_adversarial"] = generator_adversarial_loss(fake_logits)
                weight = torch.ones((), device=images.device)
                if config.loss.adaptive_gan_weight:
                    weight = adaptive_generator_weight(
                        losses["reconstruction"],
                        losses["generator_adversarial"],
                        self.visual_tokenizer.decoder.last_layer_weight,
                        config.loss.adaptive_min,
                        config.loss.adaptive_max,
                    )
                losses["adaptive_weight"] = weight
                total = total + config.loss.gan * weight * losses["generator_adversarial"]
        self.engine.backward(total)
        grad_norm = self.engine.step()
        record = {name: float(value.detach()) for name, value in losses.items()}
        record["total"] = float(total.detach())
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if gan_on:
            with autocast(self.precision, self.dist.device):
                real = self.discriminator_engine(images)
                fake = self.discriminator_engine(output.reconstruction.detach())
                disc_loss = hinge_discriminator_loss(real, fake)
            self.discriminator_engine.backward(disc_loss)
            self.discriminator_engine.step()
            record["discriminator"] = float(disc_loss.detach())
        return record

    # ------------------------------------------------------------ evaluation
    def _class_text_embeds(self) -> torch.Tensor | None:
        if self._world is None or self.teacher.text_tower is None:
            return None
        if self._text_embeds is None:
            self._text_embeds = class_text_embeddings(
                self.teacher.text_tower, self.teacher.text_tokenizer, self._world.zero_shot_prompts()
            )
        return self._text_embeds

    def evaluate(self, step: int, split: str = "val", limit: int | None = None) -> dict[str, float]:
        """Reconstruction, codebook usage and quantised zero-shot on ``split``; saves a grid PNG."""
        limit = limit or self.config.loop.eval_images
        if self._world is not None:
            recon_set = ShapesImageDataset(self._world, split)
            zero_shot_set = ShapesImageDataset(self._world, split, single_object=True)
        else:
            recon_set, zero_shot_set = build_image_dataset(self.config.data, split), None
        metrics, originals, recons = tokenizer_metrics(
            self.visual_tokenizer, recon_set, zero_shot_set, self._class_text_embeds(), limit=limit
        )
        if self.dist.is_main:
            grid = save_image_grid(
                [originals, recons],
                self.output_dir / "reconstructions" / f"{split}_step_{step:07d}.png",
                labels=["original", "decoded"],
            )
            logger.info("eval %s @ %d: %s (grid: %s)", split, step, format_metrics(metrics), grid)
            self.writer.scalars(step, metrics, prefix=f"eval_{split}/")
        return metrics

    def teacher_zero_shot(self, split: str, limit: int | None = None) -> float | None:
        text_embeds = self._class_text_embeds()
        if text_embeds is None:
            return None
        vision = self.teacher.vision
        return zero_shot_accuracy(
            lambda images: vision(images).pooled,
            text_embeds,
            ShapesImageDataset(self._world, split, single_object=True),
            limit=limit or self.config.loop.eval_images,
            desc="teacher zero-shot",
            device=self.dist.device,
        )

    # ------------------------------------------------------------ loop
    def _check_images(self, batch: dict, step: int, checkpoints: Path) -> None:
        """``data.on_bad_image`` for a batch that met a bad image: counted and listed (skip), or the
        steps trained so far are checkpointed and the run stops with one line naming the file (error)."""
        stop = self.bad_images.meet(batch)
        if self.dist.world_size > 1 and self.config.data.kind != "shapes" and self.bad_images.on_bad_image == "error":
            stop = distributed.all_reduce_scalars({"stop": float(stop)})["stop"] > 0  # saving is collective
        if stop:
            checkpoint = checkpointing.save_checkpoint(checkpoints, step, self.engines, {})
            checkpointing.prune_checkpoints(checkpoints)
            self.writer.close()
            raise self.bad_images.stop_error(step, checkpoint)

    def fit(self) -> dict[str, float]:
        loop = self.config.loop
        checkpoints = self.output_dir / "checkpoints"
        start_step = 0
        latest = checkpointing.latest_checkpoint(checkpoints) if loop.resume else None
        if latest is not None:
            start_step = checkpointing.load_checkpoint(latest, self.engines)["step"]
            for engine in self.engines.values():
                restore_schedule_lr(engine.scheduler)
            logger.info("resumed stage 1 from %s (step %d)", latest, start_step)
        dataset = (
            ShapesImageDataset(self._world, "train")
            if self._world is not None
            else build_image_dataset(self.config.data, "train", report_bad_images=True)
        )
        self.bad_images = BadImageLog(
            self.config.data.on_bad_image, self.output_dir, resumed=latest is not None, enabled=self.dist.is_main
        )
        loader = step_loader(
            dataset,
            collate_image_text,
            loop.batch_size,
            loop.seed,
            start_step,
            loop.max_steps,
            self.dist.rank,
            self.dist.world_size,
            loop.num_workers,
            loop.grad_accumulation,
        )
        step, started, window = start_step, time.time(), []
        self._train_mode()
        progress = tqdm(
            steps_of(loader, loop.grad_accumulation),
            desc=f"{self._stage_name} ({'decoder only' if self.config.decoder_only else 'DualToken'})",
            initial=start_step,
            total=loop.max_steps,
            disable=not self.dist.is_main,
        )
        for micro_batches in progress:  # a step is one optimizer update: loop.grad_accumulation micro-batches
            for batch in micro_batches:
                self._check_images(batch, step, checkpoints)
                window.append(self.train_step(batch["image"].to(self.dist.device), step))
            step += 1
            if step % loop.log_every == 0:
                averaged = {key: sum(r.get(key, 0.0) for r in window) / len(window) for key in window[-1]}
                norms = [r["grad_norm"] for r in window if "grad_norm" in r]  # one per step, not per micro-batch
                if norms:
                    averaged["grad_norm"] = sum(norms) / len(norms)
                averaged = distributed.all_reduce_scalars(averaged)  # the global batch, not rank 0's share
                averaged["lr"] = self.engine.lr
                self.writer.scalars(step, averaged, prefix="train/")
                progress.set_postfix(mse=f"{averaged['mse']:.4f}", sem=f"{averaged['semantic_tap']:.3f}")
                window.clear()
            if step % loop.eval_every == 0 and step < loop.max_steps:
                self.evaluate(step)
                self._train_mode()
            # The final step is checkpointed too, so a finished run can be extended (a larger
            # loop.max_steps, same output_dir) and continues exactly where it stopped.
            if step % loop.save_every == 0:
                checkpointing.save_checkpoint(checkpoints, step, self.engines, {})
                checkpointing.prune_checkpoints(checkpoints)
        train_seconds = time.time() - started
        return self.finish(step, train_seconds)

    def finish(self, step: int, train_seconds: float) -> dict[str, float]:
        """Final held-out evaluation (test split), the saved tokenizer and its metrics.json."""
        metrics = {f"val_{k}": v for k, v in self.evaluate(step, "val").items()}
        test = self.evaluate(step, "test")
        metrics.update({f"test_{k}": v for k, v in test.items()})
        teacher = self.teacher_zero_shot("test")
        if teacher is not None:
            metrics["test_teacher_zero_shot"] = teacher
        metrics["train_seconds"] = train_seconds
        metrics["steps"] = step
        metrics.update(self.bad_images.summary())  # data.on_bad_image=skip: how many were left out
        if self.dist.is_main:

            def write_extra(staging: Path) -> None:  # inside the folder's manifest, so reuse sees them
                if self.teacher.text_tokenizer is not None:
                    self.teacher.text_tokenizer.save_pretrained(staging / "text_tokenizer")
                (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))

            self.visual_tokenizer.save_pretrained(self.output_dir / TOKENIZER_DIRNAME, write_extra)
            (self.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
            self.writer.scalars(step, metrics, prefix="final/")
            logger.info("%s done: %s", self._stage_name, format_metrics(metrics))
        self.writer.close()
        return metrics


def tokenizer_is_complete(directory: Path) -> bool:
    """A finished stage 1 / 1b folder: its manifest verifies (hashes) and lists the model and its metrics."""
    return folder_is_complete(directory, required=("config.json", "model.safetensors", "metrics.json"))


def main(argv: list[str] | None = None) -> dict[str, float]:
    import argparse

    from tokenizer.files import check_output_dir

    parser = argparse.ArgumentParser(prog="dualtoken train-tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiment YAML (configs/tokenizer/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    distributed.add_launcher_arguments(parser)
    args = parser.parse_args(argv)
    config = load_config(Stage1Config, args.config, args.overrides)
    check_output_dir(config.loop.output_dir, "loop.output_dir")  # before any model is built
    dist_state = distributed.init_distributed(config.deepspeed.enabled, args.device)
    setup_logging(dist_state.rank)
    if config.loop.num_threads:
        torch.set_num_threads(config.loop.num_threads)
    try:
        return Stage1Trainer(config, dist_state).fit()
    finally:
        distributed.cleanup_distributed()


if __name__ == "__main__":
    main()
