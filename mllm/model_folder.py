"""The unified model's folder: what an LLM stage writes and what the inference API loads.

A model folder holds the model (``config.json`` + ``model.safetensors``), the extended text
tokenizer (``tokenizer_config.json`` and its files), :data:`SIDECAR` (the DualToken tokenizer's
path for decoding, and the stage that wrote the folder with its config) and
:data:`METRICS_FILE` (the stage's final metrics). Writing one merges LoRA adapters, which is
training's business (``training.mllm_model.save_model_folder``); this module reads them.

The folder is written through :func:`tokenizer.files.atomic_directory`, so it also holds
``manifest.json`` (every file with its size and sha256, written last): a folder is complete when
that manifest verifies, and loading refuses a folder whose files no longer match it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mllm.modeling import DualTokenMLLMForCausalLM, pick_attn_implementation
from mllm.vocab import extend_tokenizer
from tokenizer.files import folder_is_complete, verify_folder

SIDECAR = "dualtoken.json"
METRICS_FILE = "metrics.json"
# What loading needs, in the order a missing one is reported.
LOADABLE_FILES = ("config.json", "model.safetensors", SIDECAR, "tokenizer_config.json")


def _check_loadable(directory: Path) -> None:
    """Recover and verify ``directory`` (sizes against its manifest), then check it holds what loading needs.

    Raises FileNotFoundError or :class:`tokenizer.files.ManifestError`, one line naming the folder
    and the file. A folder without a manifest loads with a warning (:func:`tokenizer.files.verify_folder`).
    """
    try:
        verify_folder(directory, required=LOADABLE_FILES)
    except FileNotFoundError:
        raise FileNotFoundError(f"model folder {directory} does not exist") from None
    for name in LOADABLE_FILES:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"model folder {directory} is missing {name}; was the stage finished?")


def model_folder_is_complete(directory: Path) -> bool:
    """Whether a stage finished writing ``directory``: its manifest verifies (hashes included) and
    lists what loading needs and the metrics. A folder without a manifest is never complete."""
    return folder_is_complete(directory, required=(*LOADABLE_FILES, METRICS_FILE))


def load_model_folder(
    directory: str | Path, attn_implementation: str = "auto"
) -> tuple[DualTokenMLLMForCausalLM, Any, dict[str, Any]]:
    """The model, its extended text tokenizer and the sidecar (DualToken tokenizer path, stage) of a folder."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    _check_loadable(directory)
    model = DualTokenMLLMForCausalLM.from_pretrained(
        str(directory), attn_implementation=pick_attn_implementation(attn_implementation)
    )
    text_tokenizer = AutoTokenizer.from_pretrained(str(directory))
    extend_tokenizer(text_tokenizer, model.config.semantic_size, model.config.pixel_size)  # checks the layout
    sidecar = json.loads((directory / SIDECAR).read_text())
    return model, text_tokenizer, sidecar
