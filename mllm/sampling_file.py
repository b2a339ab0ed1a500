"""A model folder's ``sampling.json``: the image-sampling settings the model draws best with
(:class:`~mllm.generation.SamplingConfig` fields; ``tiny-mllm`` writes the ones it scored the
model with, :meth:`mllm.inference.Pipeline.from_pretrained` reads them)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mllm.generation import SamplingConfig
from mllm.request_checks import PipelineError

SAMPLING_FILE = "sampling.json"


def _sampling_fields() -> dict[str, type]:
    return {field.name: type(field.default) for field in dataclasses.fields(SamplingConfig)}


def read_sampling(model_dir: Path) -> SamplingConfig:
    """:class:`SamplingConfig`'s defaults updated from the folder's ``sampling.json`` (if there is one)."""
    path = Path(model_dir) / SAMPLING_FILE
    if not path.is_file():
        return SamplingConfig()
    fields = _sampling_fields()
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PipelineError(f"{path}: not JSON ({error})") from None
    if not isinstance(stored, dict):
        raise PipelineError(f"{path}: expected an object with some of {sorted(fields)}")
    settings = {}
    for key, value in stored.items():
        if key not in fields:
            raise PipelineError(f"{path}: unknown setting {key!r}; expected some of {sorted(fields)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PipelineError(f"{path}: {key}={value!r}; expected a number")
        settings[key] = fields[key](value)
    try:
        return SamplingConfig(**settings)
    except ValueError as error:
        raise PipelineError(f"{path}: {error}") from None


def write_sampling(model_dir: Path, **settings: float) -> None:
    """Record the image-sampling settings a model draws best with in its folder."""
    from tokenizer.files import write_text_atomic

    unknown = set(settings) - set(_sampling_fields())
    if unknown:
        raise PipelineError(
            f"unknown sampling settings {sorted(unknown)}; expected some of {sorted(_sampling_fields())}"
        )
    write_text_atomic(Path(model_dir) / SAMPLING_FILE, json.dumps(settings, indent=2) + "\n")
