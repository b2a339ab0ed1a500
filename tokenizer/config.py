"""Typed configuration of the DualToken tokenizer, one dataclass per component.

Each component receives only its own sub-config. Every dataclass validates itself in
``__post_init__`` and raises :class:`ConfigError` with the dotted field name, the value
and what was expected, so a bad YAML file fails before any tensor is built.

``config_from_dict`` turns nested plain dicts (parsed YAML) into these dataclasses and
rejects unknown keys by name; ``config_to_dict`` is its inverse (used for
``save_pretrained``'s JSON).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class BackboneConfig:
    """The vision transformer that DualToken taps.

    ``kind="siglip"`` wraps transformers' ``SiglipVisionModel``; ``kind="timm"`` wraps a
    timm ``VisionTransformer``. With ``pretrained_path`` set, weights (and the
    architecture) come from that local directory / hub id / timm weights file and the
    size fields below are ignored (they are read back from the checkpoint).
    """

    kind: str = "siglip"
    pretrained_path: str | None = None
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 128
    num_layers: int = 6
    num_heads: int = 4
    intermediate_size: int = 512
    timm_model_name: str = "vit_small_patch16_224"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        _require(self.kind in ("siglip", "timm"), f"backbone.kind={self.kind!r}; expected 'siglip' or 'timm'")
        _require(self.image_size > 0 and self.patch_size > 0, "backbone.image_size and patch_size must be > 0")
        # Like SigLIP's stride-`patch_size` convolution, a remainder is dropped (384 / 14 -> 27).
        _require(
            self.image_size >= self.patch_size,
            f"backbone.image_size={self.image_size} is smaller than backbone.patch_size={self.patch_size}",
        )
        _require(self.num_layers >= 2, f"backbone.num_layers={self.num_layers}; DualToken needs at least 2 layers")
        _require(
            self.hidden_size % self.num_heads == 0,
            f"backbone.hidden_size={self.hidden_size} is not divisible by backbone.num_heads={self.num_heads}",
        )

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class TapsConfig:
    """Where the two branches leave the ViT (1-based: the output of block k).

    Paper: pixel from layer 6 and semantic from layer 26 of SigLIP-so400m's 27; the
    official code also adds ``pixel_aux_weight`` x a projection of layer 4 to the pixel
    features (``pixel_aux_layer``; ``None`` switches it off).
    """

    # 0: the patch embedding itself, before the position embedding and any block (not the
    # paper's design): each patch's pixel codes then depend on its own pixels only, so equal
    # content gets equal codes wherever it sits. On the tiny default this measured 26.34 dB
    # test PSNR against 25.21 dB from layer 1, at the same cost (README).
    pixel_layer: int = 2
    semantic_layer: int = 5
    pixel_aux_layer: int | None = None
    pixel_aux_weight: float = 0.6

    def __post_init__(self) -> None:
        _require(
            self.pixel_layer >= 0,
            f"taps.pixel_layer={self.pixel_layer}; expected a block 1..L, or 0 for the patch embedding itself",
        )
        _require(
            self.semantic_layer >= self.pixel_layer,
            f"taps.semantic_layer={self.semantic_layer} must be >= taps.pixel_layer={self.pixel_layer}",
        )
        if self.pixel_aux_layer is not None:
            _require(
                self.pixel_layer >= 1,
                f"taps.pixel_aux_layer={self.pixel_aux_layer} needs a pixel tap after a block; with "
                "taps.pixel_layer=0 (the patch embedding) set taps.pixel_aux_layer to null",
            )
            _require(
                1 <= self.pixel_aux_layer <= self.pixel_layer,
                f"taps.pixel_aux_layer={self.pixel_aux_layer} must lie in [1, taps.pixel_layer={self.pixel_layer}]",
            )

    def check_against(self, num_layers: int, source: str = "the backbone") -> None:
        """Raise if a tap lies beyond ``num_layers`` (known only once the backbone is)."""
        for name in ("pixel_layer", "semantic_layer", "pixel_aux_layer"):
            value = getattr(self, name)
            if value is not None and value > num_layers:
                raise ConfigError(f"tokenizer.taps.{name}={value} but {source} has {num_layers} layers")


@dataclass
class QuantizerConfig:
    """Residual VQ: ``depth`` levels sharing one ``codebook_size`` x ``code_dim`` codebook."""

    codebook_size: int = 1024
    code_dim: int = 16
    depth: int = 4
    ema: bool = True
    decay: float = 0.99
    eps: float = 1e-5
    dead_code_threshold: float = 1.0
    kmeans_init: bool = True

    def __post_init__(self) -> None:
        _require(self.codebook_size > 0, f"quantizer.codebook_size={self.codebook_size}; expected > 0")
        _require(self.code_dim > 0, f"quantizer.code_dim={self.code_dim}; expected > 0")
        _require(self.depth >= 1, f"quantizer.depth={self.depth}; expected >= 1")
        _require(0.0 < self.decay < 1.0, f"quantizer.decay={self.decay}; expected in (0, 1)")
        _require(self.eps > 0, f"quantizer.eps={self.eps}; expected > 0")
        _require(self.dead_code_threshold >= 0, "quantizer.dead_code_threshold must be >= 0")


@dataclass
class ProjectionConfig:
    """Down projection (width -> code_dim) before quantising and up projection after.

    ``kind="linear"``: LayerNorm + Linear; ``kind="mlp"``: LayerNorm + Linear-GELU-Linear
    (a light stand-in for the official attention + GeGLU block).
    """

    kind: str = "mlp"
    hidden_dim: int = 256

    def __post_init__(self) -> None:
        _require(self.kind in ("linear", "mlp"), f"projection.kind={self.kind!r}; expected 'linear' or 'mlp'")
        _require(self.hidden_dim > 0, "projection.hidden_dim must be > 0")


@dataclass
class DecoderConfig:
    """VQGAN-style convolutional pixel decoder.

    The token grid is first resized to ``latent_size`` (paper: 27 -> 24) when set, then
    upsampled by 2 ``len(channel_mult) - 1`` times. Output images are in [-1, 1].
    """

    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 1
    mid_attention: bool = True
    latent_size: int | None = None
    out_channels: int = 3

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)
        _require(self.base_channels > 0, "decoder.base_channels must be > 0")
        _require(len(self.channel_mult) >= 1, "decoder.channel_mult must list at least one level")
        _require(self.num_res_blocks >= 1, "decoder.num_res_blocks must be >= 1")

    @property
    def upsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass
class DiscriminatorConfig:
    """PatchGAN discriminator (pix2pix / taming-transformers NLayerDiscriminator)."""

    base_channels: int = 32
    num_layers: int = 3

    def __post_init__(self) -> None:
        _require(self.base_channels > 0 and self.num_layers >= 1, "discriminator sizes must be positive")


@dataclass
class DualTokenizerConfig:
    """The whole tokenizer: backbone, taps, projections, two quantizers, decoder.

    ``shared_codebook=True`` is the paper's ablation: one quantizer at the semantic tap
    carries both objectives, and the decoder reads the semantic codes.
    """

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    taps: TapsConfig = field(default_factory=TapsConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    pixel_quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    semantic_quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    shared_codebook: bool = False

    @property
    def pixel_depth(self) -> int:
        """RVQ depth of the codes the decoder reads (the semantic quantizer's with a shared codebook)."""
        return (self.semantic_quantizer if self.shared_codebook else self.pixel_quantizer).depth

    def __post_init__(self) -> None:
        if self.backbone.pretrained_path is None and self.backbone.kind == "siglip":
            self.taps.check_against(self.backbone.num_layers)
        if self.shared_codebook:
            _require(
                self.taps.pixel_aux_layer is None,
                "tokenizer.shared_codebook=true uses one codebook at the semantic tap; unset taps.pixel_aux_layer",
            )


# --------------------------------------------------------------------------------------
# dict <-> dataclass
# --------------------------------------------------------------------------------------


def _resolve_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, hint: Any, path: str) -> Any:
    """Convert a parsed YAML value to ``hint``, raising ConfigError naming ``path``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {hint.__name__}, got {type(value).__name__}")
        return config_from_dict(hint, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{path}: cannot convert {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item_hint = args[0] if args else Any
        items = [_convert(item, item_hint, f"{path}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{path}: expected an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    return value


def config_from_dict(cls: type[T], data: dict[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from nested dicts; unknown keys raise ConfigError by name."""
    data = dict(data or {})
    hints = _resolve_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = path or cls.__name__
        raise ConfigError(
            f"unknown config key {where + '.' if path else ''}{unknown[0]!s} "
            f"(valid keys of {where}: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except ConfigError as error:
        message = str(error)
        section = path.rsplit(".", 1)[-1]
        if path and message.startswith(section + ".") and not message.startswith(path):
            message = path[: len(path) - len(section)] + message  # "backbone.x" -> "tokenizer.backbone.x"
        elif path and not message.startswith(path):
            message = f"{path}: {message}"
        raise ConfigError(message) from None


def config_to_dict(config: Any) -> Any:
    """Inverse of :func:`config_from_dict` (tuples become lists, for JSON/YAML)."""
    if dataclasses.is_dataclass(config):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [config_to_dict(item) for item in config]
    if isinstance(config, dict):
        return {key: config_to_dict(value) for key, value in config.items()}
    return config
