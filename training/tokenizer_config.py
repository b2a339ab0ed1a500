"""The typed config of stage 1 / 1b (``configs/tokenizer/*.yaml``): the loss weights and the
experiment YAML (teacher, optional init tokenizer, data, tokenizer, discriminator, optimizers,
loop), with their validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenizer.config import ConfigError, DiscriminatorConfig, DualTokenizerConfig
from training.config import DeepSpeedConfig, LoopConfig, OptimConfig
from training.data import DataConfig


@dataclass
class LossConfig:
    """Loss weights (paper defaults; the tiny config states its own)."""

    mse: float = 5.0
    l1: float = 0.0
    perceptual: float = 1.0
    # "vgg16": LPIPS-style VGG16 features from perceptual_weights_path (no download);
    # "teacher": the teacher ViT's hidden states; "off".
    perceptual_network: str = "vgg16"
    perceptual_weights_path: str | None = None
    perceptual_lpips_path: str | None = None
    gan: float = 0.75
    gan_start_step: int = 20000
    adaptive_gan_weight: bool = True
    adaptive_min: float = 0.3
    adaptive_max: float = 10.0
    semantic_tap: float = 5.0
    semantic_pooled: float = 1.0
    commitment: float = 5.0

    def __post_init__(self) -> None:
        if self.perceptual_network not in ("vgg16", "teacher", "off"):
            raise ConfigError(f"loss.perceptual_network={self.perceptual_network!r}; expected vgg16, teacher or off")
        if self.perceptual > 0 and self.perceptual_network == "vgg16" and not self.perceptual_weights_path:
            raise ConfigError(
                "loss.perceptual > 0 with loss.perceptual_network=vgg16 needs loss.perceptual_weights_path "
                "(a local torchvision VGG16 state dict; nothing is downloaded) — or set loss.perceptual=0"
            )
        for name in ("mse", "l1", "perceptual", "gan", "semantic_tap", "semantic_pooled", "commitment"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name}={getattr(self, name)}; weights must be >= 0")


@dataclass
class Stage1Config:
    """The experiment YAML of stage 1 (configs/tokenizer/*.yaml)."""

    teacher_path: str = "runs/tiny/stage0/teacher"
    # Start from a trained DualToken folder instead of the teacher (its own saved config is
    # used; the `tokenizer:` section must describe the same architecture).
    init_tokenizer: str | None = None
    # Train only the pixel decoder (pixel_up + decoder) of `init_tokenizer`; the encoder,
    # projections and codebooks stay frozen (in eval mode: no EMA or dead-code updates), so
    # every image keeps its codes and code shards made with `init_tokenizer` stay valid.
    decoder_only: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: DualTokenizerConfig = field(default_factory=DualTokenizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=7.2e-5, betas=(0.5, 0.9), weight_decay=1e-4))
    discriminator_optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=7.2e-5, betas=(0.5, 0.9), weight_decay=1e-4)
    )
    loop: LoopConfig = field(default_factory=LoopConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def __post_init__(self) -> None:
        if self.decoder_only and not self.init_tokenizer:
            raise ConfigError("decoder_only=true fine-tunes a trained tokenizer: set init_tokenizer to its folder")
