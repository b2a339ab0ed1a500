"""The DeepSpeed JSON of a run: generated from the typed config, or a named file with its ``"auto"`` entries filled.

The batch size, accumulation, clipping, precision and ZeRO stage a run trains with come from the
typed config (``loop.*``, ``optim.*``, ``deepspeed.*``) and the world size; a file named by
``deepspeed.config_path`` (``configs/deepspeed/zero2.json``, ``zero3.json`` ...) adds what the
typed config does not say (bucket sizes, ZeRO-3 thresholds). Where the file writes ``"auto"``
(as in the Hugging Face DeepSpeed integration) or leaves a key out, the typed value goes in; where
it writes a value of its own that differs, the run is refused with both values named, so that a
JSON never silently trains another batch size than the config says.

The optimizer and the LR schedule are built from ``optim.*`` (DeepSpeed's CPU Adam when the
optimizer is offloaded; :class:`training.distributed.TrainEngine`), so a file's ``optimizer`` and
``scheduler`` sections are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizer.config import ConfigError
from training.config import DeepSpeedConfig

AUTO = "auto"
DEFAULT_ZERO_STAGE = 2
OFFLOAD_DEVICES = ("cpu", "nvme")
_ABSENT = object()


@dataclass(frozen=True)
class TrainShape:
    """What one optimizer step is made of, from the typed config and the launch."""

    micro_batch: int  # loop.batch_size: sequences per process per forward
    accumulation: int  # loop.grad_accumulation: micro-batches per optimizer step
    world_size: int
    grad_clip: float  # optim.grad_clip; 0 = no clipping
    bf16: bool  # loop.precision=bf16 on a GPU (on the CPU, bf16 is autocast without DeepSpeed's bf16)
    on_gpu: bool = False  # pinned host memory for the offloaded optimizer state


def read_deepspeed_file(path: str | Path) -> dict[str, Any]:
    """A DeepSpeed JSON file as a mapping; a missing, unreadable or misplaced file is named."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"deepspeed.config_path={path} does not exist")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"deepspeed.config_path={path} is not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise ConfigError(f"deepspeed.config_path={path} must hold a JSON object, got {type(payload).__name__}")
    for section in ("optimizer", "scheduler"):
        if section in payload:
            raise ConfigError(
                f"{path}: remove the {section!r} section; the optimizer and its schedule come from optim.* "
                "(deepspeed.offload_optimizer=true runs DeepSpeed's CPU Adam)"
            )
    return payload


def _get(payload: dict[str, Any], key: str) -> Any:
    node: Any = payload
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _put(payload: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = payload
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _same(found: Any, typed: Any) -> bool:
    if isinstance(typed, bool) or isinstance(found, bool):
        return found is typed
    if isinstance(typed, int | float) and isinstance(found, int | float):
        return float(found) == float(typed)
    return found == typed


def _fill(payload: dict[str, Any], key: str, typed: Any, field: str, source: str) -> None:
    found = _get(payload, key)
    if found is _ABSENT or found == AUTO:
        _put(payload, key, typed)
    elif not _same(found, typed):
        raise ConfigError(
            f"{source}: {key}={json.dumps(found)} contradicts {field} ({json.dumps(typed)} for this run); "
            f'write "auto" there or change {field}'
        )


def _leftover_auto(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [key for name, value in node.items() for key in _leftover_auto(value, f"{prefix}{name}.")]
    return [prefix.rstrip(".")] if node == AUTO else []


def deepspeed_json(config: DeepSpeedConfig, shape: TrainShape) -> dict[str, Any]:
    """The JSON handed to ``deepspeed.initialize``: ``config.config_path`` (or nothing) with every
    value the typed config owns filled in or checked."""
    source = f"deepspeed.config_path={config.config_path}" if config.config_path else "the generated DeepSpeed JSON"
    payload = read_deepspeed_file(config.config_path) if config.config_path else {}
    stated_stage = _get(payload, "zero_optimization.stage")
    stage = config.zero_stage
    if stage is None:
        stage = stated_stage if isinstance(stated_stage, int) and stated_stage in (0, 1, 2, 3) else DEFAULT_ZERO_STAGE
    stated_offload = _get(payload, "zero_optimization.offload_optimizer.device")
    offload = config.offload_optimizer
    if offload is None:
        offload = stated_offload in OFFLOAD_DEVICES
    typed: list[tuple[str, Any, str]] = [
        ("train_micro_batch_size_per_gpu", shape.micro_batch, "loop.batch_size"),
        ("gradient_accumulation_steps", shape.accumulation, "loop.grad_accumulation"),
        (
            "train_batch_size",
            shape.micro_batch * shape.accumulation * shape.world_size,
            "loop.batch_size x loop.grad_accumulation x the number of processes",
        ),
        ("gradient_clipping", shape.grad_clip, "optim.grad_clip"),
        ("bf16.enabled", shape.bf16, "loop.precision (DeepSpeed's bf16 runs on GPUs only)"),
        ("fp16.enabled", False, "loop.precision (fp32 or bf16)"),
        ("zero_optimization.stage", stage, "deepspeed.zero_stage"),
    ]
    for key, value, field in typed:
        _fill(payload, key, value, field, source)
    if offload:
        if stated_offload not in (_ABSENT, AUTO, *OFFLOAD_DEVICES):
            raise ConfigError(
                f"{source}: zero_optimization.offload_optimizer.device={json.dumps(stated_offload)} contradicts "
                'deepspeed.offload_optimizer=true; write "cpu" or "auto" there'
            )
        if stated_offload in (_ABSENT, AUTO):
            _put(payload, "zero_optimization.offload_optimizer.device", "cpu")
        if _get(payload, "zero_optimization.offload_optimizer.pin_memory") in (_ABSENT, AUTO):
            _put(payload, "zero_optimization.offload_optimizer.pin_memory", shape.on_gpu)
    elif stated_offload in OFFLOAD_DEVICES:
        raise ConfigError(
            f"{source}: zero_optimization.offload_optimizer.device={json.dumps(stated_offload)} contradicts "
            'deepspeed.offload_optimizer=false; write "none" there or set deepspeed.offload_optimizer=true'
        )
    elif stated_offload == AUTO:
        _put(payload, "zero_optimization.offload_optimizer.device", "none")
    if stage == 3 and _get(payload, "zero_optimization.stage3_gather_16bit_weights_on_model_save") in (_ABSENT, AUTO):
        _put(payload, "zero_optimization.stage3_gather_16bit_weights_on_model_save", True)
    payload.setdefault("steps_per_print", 10**9)
    payload.setdefault("wall_clock_breakdown", False)
    leftover = _leftover_auto(payload)
    if leftover:
        raise ConfigError(
            f'{source}: "auto" is filled only for values the typed config owns; give {", ".join(leftover)} a value'
        )
    return payload


def offloads_optimizer(payload: dict[str, Any]) -> bool:
    """Whether a filled DeepSpeed JSON keeps the optimizer state (and its step) on the CPU or NVMe."""
    return _get(payload, "zero_optimization.offload_optimizer.device") in OFFLOAD_DEVICES
