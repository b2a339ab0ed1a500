"""The unified model's folder: what an LLM stage writes and what the inference API loads.

A model folder holds the model (``config.json`` + ``model.safetensors``), the extended text
tokenizer (``tokenizer_config.json`` and its files), :data:`SIDECAR` (the DualToken tokenizer's
path for decoding, and the stage that wrote the folder with its config) and
:data:`METRICS_FILE` (the stage's final metrics). The sidecar's ``image_resize`` records how the
training images the model answered about were made square (``pad`` or ``crop``,
:func:`tokenizer.images.fit_square`); :func:`recorded_image_resize` reads it. Writing one merges LoRA adapters, which is
training's business (``training.mllm_model.save_model_folder``); this module reads them.

The folder is written through :func:`tokenizer.files.atomic_directory`, so it also holds
``manifest.json`` (every file with its size and sha256, written last): a folder is complete when
that manifest verifies, and loading refuses a folder whose files no longer match it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mllm.modeling import DualTokenMLLMForCausalLM
from mllm.vocab import extend_tokenizer
from tokenizer.devices import pick_attn_implementation, resolve_device
from tokenizer.files import folder_is_complete, verify_folder

SIDECAR = "dualtoken.json"
METRICS_FILE = "metrics.json"
# What loading needs, in the order a missing one is reported.
LOADABLE_FILES = ("config.json", "model.safetensors", SIDECAR, "tokenizer_config.json")
# The sidecar field naming how understanding images were made square in training; a folder
# without it is answered with pad-to-square (LLaVA's choice, mllm.inference.Pipeline).
IMAGE_RESIZE_FIELD = "image_resize"


def check_image_resize(value: Any, where: str) -> str:
    """``value`` if it is a mode of :func:`tokenizer.images.fit_square`; else a ValueError naming ``where``."""
    from tokenizer.images import SQUARE_MODES

    if value not in SQUARE_MODES:
        raise ValueError(f"{where}={value!r}; expected one of {'|'.join(SQUARE_MODES)}")
    return value


def recorded_image_resize(directory: str | Path) -> str | None:
    """The ``image_resize`` a model folder's sidecar records (None when it records none)."""
    path = Path(directory) / SIDECAR
    if not path.is_file():
        return None
    try:
        sidecar = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from None
    value = sidecar.get(IMAGE_RESIZE_FIELD) if isinstance(sidecar, dict) else None
    return None if value is None else check_image_resize(value, f"{path}: {IMAGE_RESIZE_FIELD}")


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
    directory: str | Path,
    attn_implementation: str = "auto",
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[DualTokenMLLMForCausalLM, Any, dict[str, Any]]:
    """The model (on ``device``, in ``dtype`` or as saved), its extended text tokenizer and the
    sidecar (DualToken tokenizer path, stage) of a folder.

    The attention kernel ``auto`` picks is the one for that device and dtype
    (:func:`tokenizer.devices.pick_attn_implementation`): FlashAttention-2 only on CUDA with
    fp16/bf16 weights. ``device=None`` is ``auto`` (CUDA when available).
    """
    from transformers import AutoTokenizer

    directory = Path(directory)
    _check_loadable(directory)
    device = resolve_device(device)
    saved_dtype = json.loads((directory / "config.json").read_text()).get("dtype")
    weights_dtype = dtype or (getattr(torch, saved_dtype, None) if isinstance(saved_dtype, str) else None)
    model = DualTokenMLLMForCausalLM.from_pretrained(
        str(directory),
        attn_implementation=pick_attn_implementation(attn_implementation, device, weights_dtype or torch.float32),
        # No Hub kernels (transformers' default when the `kernels` package is installed): they are
        # fetched from the Hugging Face Hub for the device at hand, and a loaded model should run
        # the code a freshly built one runs (from_config leaves them off).
        use_kernels=False,
        **({"dtype": dtype} if dtype is not None else {}),
    ).to(device)
    text_tokenizer = AutoTokenizer.from_pretrained(str(directory))
    extend_tokenizer(text_tokenizer, model.config.semantic_size, model.config.pixel_size)  # checks the layout
    sidecar = json.loads((directory / SIDECAR).read_text())
    return model, text_tokenizer, sidecar
