"""DualToken tokenizer library: one ViT, two taps, pixel and semantic residual-VQ vocabularies."""

from tokenizer.backbone import BackboneOutput, VisionBackbone
from tokenizer.backbone_factory import backbone_num_layers, build_backbone
from tokenizer.config import (
    BackboneConfig,
    ConfigError,
    DecoderConfig,
    DiscriminatorConfig,
    DualTokenizerConfig,
    ProjectionConfig,
    QuantizerConfig,
    TapsConfig,
)
from tokenizer.decoder import PixelDecoder
from tokenizer.discriminator import PatchDiscriminator
from tokenizer.losses import (
    PerceptualLoss,
    adaptive_generator_weight,
    feature_distillation_loss,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    psnr,
    ssim,
)
from tokenizer.model import DualTokenizer, DualTokenizerCodes, DualTokenizerOutput, SemanticFeatures
from tokenizer.quantizer import QuantizerOutput, ResidualVectorQuantizer, code_usage_from_counts, code_usage_stats
from tokenizer.siglip_backbone import SiglipBackbone
from tokenizer.text_tower import TextTower, build_word_tokenizer
from tokenizer.timm_backbone import TimmBackbone

__all__ = [
    "BackboneConfig",
    "BackboneOutput",
    "ConfigError",
    "DecoderConfig",
    "DiscriminatorConfig",
    "DualTokenizer",
    "DualTokenizerCodes",
    "DualTokenizerConfig",
    "DualTokenizerOutput",
    "PatchDiscriminator",
    "PerceptualLoss",
    "PixelDecoder",
    "ProjectionConfig",
    "QuantizerConfig",
    "QuantizerOutput",
    "ResidualVectorQuantizer",
    "SemanticFeatures",
    "SiglipBackbone",
    "TapsConfig",
    "TextTower",
    "TimmBackbone",
    "VisionBackbone",
    "adaptive_generator_weight",
    "backbone_num_layers",
    "build_backbone",
    "build_word_tokenizer",
    "code_usage_from_counts",
    "code_usage_stats",
    "feature_distillation_loss",
    "generator_adversarial_loss",
    "hinge_discriminator_loss",
    "psnr",
    "ssim",
]
