"""YAML experiment files -> typed dataclasses, with dotted command-line overrides.

    dualtoken train-tokenizer --config configs/tokenizer/tiny.yaml --set tokenizer.pixel_quantizer.depth=2

A YAML file may name a ``base:`` file (relative to itself) whose values it overrides, so
variants (ablations, scales) state only what differs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tokenizer.config import ConfigError, config_from_dict


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, say); the previous one, if any, is intact."""


T = TypeVar("T")


def _merge(base: dict, update: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, following ``base:`` links; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        data = _merge(read_yaml(path.parent / base), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {key} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a YAML file plus overrides; every error names the file and key."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    try:
        return config_from_dict(cls, data)
    except ConfigError as error:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{error}") from None


# --------------------------------------------------------------------------------------
# Sections shared by every training stage
# --------------------------------------------------------------------------------------


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


OPTIMIZERS = ("adamw", "muon")


@dataclass
class OptimConfig:
    """AdamW (or Muon for the hidden matrices, ``name: muon``) with linear warm-up then cosine
    decay to ``min_lr_ratio`` x lr."""

    name: str = "adamw"
    lr: float = 1e-3
    betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    muon_momentum: float = 0.95  # name: muon only
    muon_ns_steps: int = 5  # name: muon only: Newton-Schulz iterations per step

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        _require(self.name in OPTIMIZERS, f"optim.name={self.name!r}; expected one of {'|'.join(OPTIMIZERS)}")
        _require(0 <= self.muon_momentum < 1, f"optim.muon_momentum={self.muon_momentum}; expected in [0, 1)")
        _require(self.muon_ns_steps >= 1, f"optim.muon_ns_steps={self.muon_ns_steps}; expected >= 1")
        _require(self.lr > 0, f"optim.lr={self.lr}; expected > 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"optim.betas={self.betas}")
        _require(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]")


@dataclass
class DeepSpeedConfig:
    """DeepSpeed settings; the JSON is filled from the typed config (training/deepspeed_json.py).

    ``config_path`` names a DeepSpeed JSON (``configs/deepspeed/zero3.json`` ...) whose ``"auto"``
    entries are filled from the typed config; ``zero_stage`` and ``offload_optimizer`` left unset
    take the file's values (ZeRO-2 and no offload without a file).
    """

    enabled: bool = False
    zero_stage: int | None = None
    offload_optimizer: bool | None = None  # optimizer state and step on the CPU (DeepSpeed's CPU Adam)
    config_path: str | None = None

    def __post_init__(self) -> None:
        _require(self.zero_stage in (None, 0, 1, 2, 3), f"deepspeed.zero_stage={self.zero_stage}; expected 0-3")


@dataclass
class LoopConfig:
    """The training loop: steps, batch, evaluation and checkpoint cadence."""

    output_dir: str = "runs/tokenizer"
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 32  # per process and micro-batch
    # Micro-batches per optimizer step: a step trains on batch_size x grad_accumulation x processes
    # items, and max_steps, the schedule, logging and checkpoints count optimizer steps.
    grad_accumulation: int = 1
    eval_every: int = 250
    eval_images: int = 256
    save_every: int = 250
    log_every: int = 10
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | fp32 | bf16 (autocast)
    num_workers: int = 0
    num_threads: int = 0  # torch CPU threads; 0 = leave torch's default
    resume: bool = True  # continue from output_dir/checkpoints/latest when present

    def __post_init__(self) -> None:
        _require(self.max_steps >= 1, f"loop.max_steps={self.max_steps}; expected >= 1")
        _require(self.batch_size >= 1, f"loop.batch_size={self.batch_size}; expected >= 1")
        _require(self.grad_accumulation >= 1, f"loop.grad_accumulation={self.grad_accumulation}; expected >= 1")
        _require(self.eval_every >= 1 and self.save_every >= 1, "loop.eval_every and loop.save_every must be >= 1")
        _require(
            self.precision in ("auto", "fp32", "bf16"),
            f"loop.precision={self.precision!r}; expected 'auto', 'fp32' or 'bf16'",
        )
