"""SigLIP2 (NaFlex) as the DualToken backbone: the tap path equals transformers' own forward.

A NaFlex ``Siglip2VisionModel`` reads pre-cut patches with their grid and a padding mask; the
backbone feeds every image as one full square grid. These tests build the inputs with
transformers' ``Siglip2ImageProcessor`` (the reference cut and normalisation) and compare.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from real_format_models import IMAGE_SIZE, PATCH_SIZE, VISION_LAYERS, save_siglip2

from tokenizer.backbone_factory import backbone_num_layers, build_backbone
from tokenizer.config import (
    BackboneConfig,
    DecoderConfig,
    DualTokenizerConfig,
    ProjectionConfig,
    QuantizerConfig,
    TapsConfig,
)
from tokenizer.model import DualTokenizer
from tokenizer.siglip_backbone import SiglipBackbone

GRID = IMAGE_SIZE // PATCH_SIZE


@pytest.fixture(scope="module")
def siglip2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A position table of 8 x 8 resized to the 4 x 4 grid of a 32-px image: the resize is exercised.
    return save_siglip2(tmp_path_factory.mktemp("siglip2") / "model", position_grid=8)


def _processor_inputs(images_uint8: np.ndarray) -> dict[str, torch.Tensor]:
    from transformers import Siglip2ImageProcessor

    processor = Siglip2ImageProcessor(patch_size=PATCH_SIZE, max_num_patches=GRID * GRID)
    return processor(images=list(images_uint8), return_tensors="pt")


def test_siglip2_features_match_the_direct_call(siglip2_dir: Path) -> None:
    from transformers import Siglip2VisionModel

    torch.manual_seed(0)
    images_uint8 = np.random.default_rng(0).integers(0, 256, size=(2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    inputs = _processor_inputs(images_uint8)
    assert inputs["spatial_shapes"].tolist() == [[GRID, GRID]] * 2  # one full square grid per image
    reference = Siglip2VisionModel.from_pretrained(siglip2_dir).eval()
    with torch.no_grad():
        expected = reference(**inputs, output_hidden_states=True)

    backbone = SiglipBackbone.from_pretrained(str(siglip2_dir), image_size=IMAGE_SIZE).eval()
    assert backbone.naflex and backbone.num_layers == VISION_LAYERS and backbone.grid_size == GRID
    images = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [-1, 1]
    with torch.no_grad():
        taps = backbone.forward_taps(images, [0, 2, VISION_LAYERS])
        output = backbone(images)
    for layer in (0, 2, VISION_LAYERS):
        torch.testing.assert_close(taps[layer], expected.hidden_states[layer], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(output.pooled, expected.pooler_output, atol=1e-5, rtol=1e-4)
    # The patch projection alone (the pixel tap's layer 0) is the embedding minus the positions.
    patches = backbone.patch_features(images)
    positions = expected.hidden_states[0] - patches
    torch.testing.assert_close(positions[0], positions[1])


def test_a_tokenizer_on_siglip2_saves_and_reloads(siglip2_dir: Path, tmp_path: Path) -> None:
    backbone_config = BackboneConfig(pretrained_path=str(siglip2_dir), image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    assert backbone_num_layers(backbone_config) == VISION_LAYERS
    config = DualTokenizerConfig(
        backbone=backbone_config,
        taps=TapsConfig(pixel_layer=1, semantic_layer=3),
        projection=ProjectionConfig(kind="mlp", hidden_dim=32),
        pixel_quantizer=QuantizerConfig(codebook_size=16, code_dim=4, depth=2),
        semantic_quantizer=QuantizerConfig(codebook_size=16, code_dim=4, depth=2),
        decoder=DecoderConfig(base_channels=8, channel_mult=(1, 2, 2, 2), num_res_blocks=1),
    )
    torch.manual_seed(0)
    visual_tokenizer = DualTokenizer(config, backbone=build_backbone(config.backbone)).eval()
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1
    with torch.no_grad():
        before = visual_tokenizer.encode(images)
    reloaded = DualTokenizer.from_pretrained(visual_tokenizer.save_pretrained(tmp_path / "tokenizer"))
    assert isinstance(reloaded.backbone, SiglipBackbone) and reloaded.backbone.naflex
    with torch.no_grad():
        after = reloaded.encode(images)
    assert torch.equal(before.semantic_codes, after.semantic_codes)
    assert torch.equal(before.pixel_codes, after.pixel_codes)
