"""Evaluations run during and after tokenizer training: zero-shot, reconstruction, usage.

These are the training loops' evaluators; the benchmark harness in ``eval/`` reuses the
same functions so a number printed at the end of training and one from ``dualtoken eval``
are computed by one piece of code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from tokenizer.losses import psnr, ssim
from tokenizer.model import DualTokenizer
from tokenizer.quantizer import code_usage_from_counts
from tokenizer.text_tower import TextTower, tokenize_texts


def _loader(dataset: Dataset, batch_size: int, limit: int | None) -> DataLoader:
    from training.data import collate_image_text

    if limit is not None and limit < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(limit))
    # Its own generator: a DataLoader otherwise draws its base seed from the global RNG, so a
    # mid-run evaluation would shift the random draws of the training that follows it.
    generator = torch.Generator().manual_seed(0)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_image_text, generator=generator)


@torch.no_grad()
def class_text_embeddings(text_tower: TextTower, text_tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """prompts -> normalised text embeddings (T, D) from the frozen text tower, on its device."""
    input_ids = tokenize_texts(text_tokenizer, prompts, text_tower.max_length)
    return text_tower.encode(input_ids.to(_device_of(text_tower)))


@torch.no_grad()
def zero_shot_accuracy(
    image_embed_fn: Callable[[torch.Tensor], torch.Tensor],
    text_embeds: torch.Tensor,
    dataset: Dataset,
    batch_size: int = 64,
    limit: int | None = None,
    desc: str = "zero-shot",
    device: torch.device | None = None,
) -> float:
    """Top-1 accuracy of argmax over classes of cos(image_embed_fn(images), text_embeds).

    Images go to ``device`` (default: where ``text_embeds`` are, i.e. the model's device)."""
    device = text_embeds.device if device is None else device
    correct = total = 0
    for batch in tqdm(_loader(dataset, batch_size, limit), desc=desc, leave=False):
        embeds = torch.nn.functional.normalize(image_embed_fn(batch["image"].to(device)).float(), dim=-1)
        predictions = (embeds @ text_embeds.to(embeds.device).t()).argmax(dim=-1)
        correct += int((predictions.cpu() == batch["label"]).sum())
        total += len(predictions)
    return correct / max(1, total)


@torch.no_grad()
def tokenizer_metrics(
    visual_tokenizer: DualTokenizer,
    recon_dataset: Dataset,
    zero_shot_dataset: Dataset | None,
    text_embeds: torch.Tensor | None,
    batch_size: int = 64,
    limit: int | None = None,
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """PSNR / SSIM / codebook usage on ``recon_dataset`` and zero-shot accuracy through
    the *quantised* semantic path, on the tokenizer's device. Returns (metrics, first originals,
    their reconstructions), the images on the CPU."""
    device = _device_of(visual_tokenizer)
    was_training = visual_tokenizer.training
    visual_tokenizer.eval()
    psnrs, ssims, checked = [], [], []
    describe = getattr(recon_dataset, "objects", None)  # Shapes scenes: the checker can judge
    pixel_counts = semantic_counts = None
    first_images = first_recons = None
    for batch in tqdm(_loader(recon_dataset, batch_size, limit), desc="reconstruction", leave=False):
        images = batch["image"].to(device)
        codes = visual_tokenizer.encode(images)
        recons = visual_tokenizer.decode(codes.pixel_codes)
        psnrs.append(psnr(recons, images))
        ssims.append(ssim(recons, images))
        if describe is not None:
            checked += checker_verdicts(recons.cpu(), [describe(int(index)) for index in batch["index"]])
        pixel_counts = _accumulate_counts(pixel_counts, codes.pixel_codes, _codebook_size(visual_tokenizer, "pixel"))
        semantic_counts = _accumulate_counts(
            semantic_counts, codes.semantic_codes, visual_tokenizer.config.semantic_quantizer.codebook_size
        )
        if first_images is None:
            first_images, first_recons = images[:16].cpu(), recons[:16].cpu()
    metrics: dict[str, float] = {
        "psnr": float(torch.cat(psnrs).mean()),  # one read per metric, not one per batch
        "ssim": float(torch.cat(ssims).mean()),
    }
    if checked:
        # The ceiling of text-to-image on these codes: a generated image can pass the checker
        # only as often as the decoder draws real scenes recognisably.
        metrics["checker_on_reconstructions"] = float(np.mean(checked))
    for branch, counts in (("pixel", pixel_counts), ("semantic", semantic_counts)):
        usage = code_usage_from_counts(counts)
        metrics[f"{branch}_usage"] = float(usage["usage"])
        metrics[f"{branch}_perplexity"] = float(usage["perplexity"])
        metrics[f"{branch}_min_depth_usage"] = float(min(usage["usage_per_depth"]))
    if zero_shot_dataset is not None and text_embeds is not None:
        metrics["zero_shot"] = zero_shot_accuracy(
            lambda images: visual_tokenizer.semantic_features(visual_tokenizer.encode(images).semantic_codes).pooled,
            text_embeds,
            zero_shot_dataset,
            batch_size,
            limit,
            desc="zero-shot (quantised)",
            device=device,
        )
    visual_tokenizer.train(was_training)
    return metrics, first_images, first_recons


def checker_verdicts(recons: torch.Tensor, scenes: Sequence[list[tuple[str, str]]]) -> list[int]:
    """1 where the independent checker finds exactly the scene's objects in a reconstruction."""
    from training.data.shapes.detect import to_uint8_image
    from training.data.shapes.judge import ObjectSpec, judge

    return [
        int(judge(to_uint8_image(recon), [ObjectSpec(colour, shape) for colour, shape in objects]).correct)
        for recon, objects in zip(recons.clamp(-1, 1), scenes, strict=True)
    ]


def _device_of(module: torch.nn.Module) -> torch.device:
    """Where ``module`` runs: the device of its first parameter (or buffer); the CPU if it has none."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _codebook_size(visual_tokenizer: DualTokenizer, branch: str) -> int:
    quantizer = visual_tokenizer.pixel_quantizer if branch == "pixel" else visual_tokenizer.semantic_quantizer
    return (quantizer or visual_tokenizer.semantic_quantizer).config.codebook_size


def _accumulate_counts(counts: torch.Tensor | None, codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    depth = codes.shape[-1]
    flat = codes.reshape(-1, depth)
    batch_counts = torch.stack([torch.bincount(flat[:, d], minlength=codebook_size) for d in range(depth)])
    return batch_counts if counts is None else counts + batch_counts


def save_image_grid(rows: Sequence[torch.Tensor], path: Path, labels: Sequence[str] | None = None) -> Path:
    """rows: tensors (N, 3, H, W) in [-1, 1], one grid row each (e.g. originals, reconstructions)."""
    from PIL import Image, ImageDraw

    count = min(len(row) for row in rows)
    height, width = rows[0].shape[-2:]
    pad = 2
    label_width = 0 if labels is None else 80
    canvas = Image.new("RGB", (label_width + count * (width + pad) + pad, len(rows) * (height + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        pixels = ((row[:count].clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        top = pad + r * (height + pad)
        if labels is not None:
            draw.text((4, top + height // 2 - 5), labels[r], fill="black")
        for c in range(count):
            canvas.paste(Image.fromarray(pixels[c]), (label_width + pad + c * (width + pad), top))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
