"""The tasks that score the visual tokenizer alone (no language model).

- ``tokenizer``: PSNR, SSIM, rFID, the checker on reconstructions (the text-to-image ceiling)
  and codebook usage / perplexity of both vocabularies.
- ``zero_shot``: 18-way Shapes classification through the quantised semantic path.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eval.task import Task, register
from eval.tasks.image_features import FIDFeatures, fid_from_features, image_tensor


@register("tokenizer")
class TokenizerMetrics(FIDFeatures, Task):
    """PSNR / SSIM per image; codebook usage and perplexity of both branches over the set."""

    needs_model = False

    def items(self) -> list[dict[str, Any]]:
        self._world = self.context.world()
        split = self.options.get("split", "test")
        count = min(int(self.options.get("images", 256)), self._world.split_size(split))
        return [{"key": f"{split}/{index}"} for index in range(count)]

    @torch.no_grad()
    def predict(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from tokenizer.losses import psnr, ssim
        from training.evaluation import checker_verdicts

        visual_tokenizer = self.context.visual_tokenizer
        scenes = [self._world.sample(*_split_index(item["key"])) for item in batch]
        images = torch.stack([image_tensor(scene.image) for scene in scenes])
        # One image at a time: convolution kernels pick different algorithms for different
        # batch sizes (last-bit differences), and the scores must not depend on the batch.
        encoded = [visual_tokenizer.encode(images[row : row + 1]) for row in range(len(batch))]
        recon = torch.cat([visual_tokenizer.decode(codes.pixel_codes) for codes in encoded]).clamp(-1, 1)
        codes = type(encoded[0])(
            pixel_codes=torch.cat([c.pixel_codes for c in encoded]),
            semantic_codes=torch.cat([c.semantic_codes for c in encoded]),
        )
        extractor = self._extractor()
        lpips = self._lpips()
        checked = checker_verdicts(recon, [[(o.colour, o.shape) for o in scene.objects] for scene in scenes])
        real = [extractor(images[row : row + 1])[0].double().tolist() for row in range(len(batch))]
        fake = [extractor(recon[row : row + 1])[0].double().tolist() for row in range(len(batch))]
        out = []
        for row in range(len(batch)):
            out.append(
                {
                    "features": real[row],
                    "recon_features": fake[row],
                    "psnr": float(psnr(recon[row : row + 1], images[row : row + 1])),
                    "ssim": float(ssim(recon[row : row + 1], images[row : row + 1])),
                    **(
                        {"lpips": float(lpips(recon[row : row + 1], images[row : row + 1], reduction="none")[0])}
                        if lpips is not None
                        else {}
                    ),
                    "checker": checked[row],
                    "pixel_codes": codes.pixel_codes[row].reshape(-1, codes.pixel_codes.shape[-1]).tolist(),
                    "semantic_codes": codes.semantic_codes[row].reshape(-1, codes.semantic_codes.shape[-1]).tolist(),
                }
            )
        return out

    def _lpips(self) -> Any:
        """LPIPS(VGG16) when ``lpips_weights`` (a local torchvision vgg16 state dict) is set, else None.

        ``lpips_linear`` optionally names the LPIPS v0.1 linear-layer weights; nothing is downloaded.
        """
        if not hasattr(self, "_lpips_net"):
            self._lpips_net = None
            if self.options.get("lpips_weights"):
                from tokenizer.losses import PerceptualLoss

                self._lpips_net = PerceptualLoss.from_vgg16(
                    self.options["lpips_weights"], self.options.get("lpips_linear")
                ).eval()
        return self._lpips_net

    def score(self, items: list[dict[str, Any]], predictions: list[dict[str, Any]]) -> dict[str, float]:

        visual_tokenizer = self.context.visual_tokenizer
        metrics = {
            "psnr": float(np.mean([p["psnr"] for p in predictions])),
            "ssim": float(np.mean([p["ssim"] for p in predictions])),
            # The text-to-image ceiling on these codes (see training.evaluation.tokenizer_metrics).
            "checker_on_reconstructions": float(np.mean([p["checker"] for p in predictions])),
        }
        if all("lpips" in p for p in predictions):
            metrics["lpips"] = float(np.mean([p["lpips"] for p in predictions]))
        rfid = fid_from_features([p["features"] for p in predictions], [p["recon_features"] for p in predictions])
        if rfid is not None:
            metrics["rfid"] = rfid
        metrics["rfid_features"] = self._extractor().name
        for branch, quantizer in (
            ("pixel", visual_tokenizer.pixel_quantizer),
            ("semantic", visual_tokenizer.semantic_quantizer),
        ):
            if quantizer is None:
                continue
            size = quantizer.config.codebook_size
            codes = np.concatenate([np.asarray(p[f"{branch}_codes"]) for p in predictions])  # (N*h*w, D)
            counts = np.stack([np.bincount(codes[:, d], minlength=size) for d in range(codes.shape[1])])
            metrics[f"{branch}_usage"] = float((counts.sum(0) > 0).mean())
            metrics[f"{branch}_min_depth_usage"] = float((counts > 0).mean(1).min())
            probs = counts.sum(0) / counts.sum()
            metrics[f"{branch}_perplexity"] = float(math.exp(-(probs[probs > 0] * np.log(probs[probs > 0])).sum()))
        return metrics


@register("zero_shot")
class ZeroShot(Task):
    """18-way zero-shot classification of single-object scenes through the quantised semantic path."""

    needs_model = False

    def items(self) -> list[dict[str, Any]]:
        self._world = self.context.world()
        split = self.options.get("split", "test")
        count = min(int(self.options.get("images", 512)), self._world.split_size(split))
        return [
            {"key": f"{split}/{index}", "label": self._world.sample_single(split, index).label}
            for index in range(count)
        ]

    def _text_embeds(self) -> torch.Tensor:
        if not hasattr(self, "_embeds"):
            from transformers import AutoTokenizer

            from training.evaluation import class_text_embeddings

            visual_tokenizer = self.context.visual_tokenizer
            path = self._visual_tokenizer_dir() / "text_tokenizer"
            if not path.is_dir():
                raise FileNotFoundError(
                    f"zero_shot needs the text tokenizer saved with the DualToken tokenizer ({path})"
                )
            self._embeds = class_text_embeddings(
                visual_tokenizer.text_tower, AutoTokenizer.from_pretrained(path), self._world.zero_shot_prompts()
            )
        return self._embeds

    def _visual_tokenizer_dir(self) -> Path:
        if self.context.visual_tokenizer_path:
            return Path(self.context.visual_tokenizer_path)
        import json

        from mllm.inference import resolve_visual_tokenizer_path
        from mllm.model_folder import SIDECAR

        sidecar = json.loads((self.context.model_dir / SIDECAR).read_text())
        return resolve_visual_tokenizer_path(self.context.model_dir, sidecar.get("tokenizer_path"))

    @torch.no_grad()
    def predict(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        visual_tokenizer = self.context.visual_tokenizer
        out = []
        for item in batch:  # one at a time, so the result does not depend on the batch size
            image = image_tensor(self._world.sample_single(*_split_index(item["key"])).image)[None]
            logits = visual_tokenizer.zero_shot_logits(
                visual_tokenizer.encode(image).semantic_codes, self._text_embeds()
            )
            out.append({"predicted": int(logits.argmax(-1)[0])})
        return out

    def score(self, items: list[dict[str, Any]], predictions: list[dict[str, Any]]) -> dict[str, float]:
        correct = [int(p["predicted"] == it["label"]) for it, p in zip(items, predictions, strict=True)]
        return {"accuracy": float(np.mean(correct)), "images": len(items)}


def _split_index(key: str) -> tuple[str, int]:
    split, index = key.split("/")[:2]
    return split, int(index)


__all__ = ["TokenizerMetrics", "ZeroShot"]
