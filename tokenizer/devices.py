"""Where a model runs: the device, the autocast dtype and the attention kernel that go with it.

Every command that runs a model takes ``--device`` (:func:`add_device_argument`); ``auto`` means
the first CUDA GPU when there is one, else the CPU. The same functions serve the Python API::

    device = resolve_device("auto")
    with autocast(device):
        ...

On CUDA the forward passes run under bf16 autocast; elsewhere in the model's own dtype.
FlashAttention-2 is chosen only on CUDA with fp16/bf16 weights and the ``flash-attn`` package
installed; everything else uses PyTorch's SDPA (which brings its own flash kernels on GPUs).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch

DEVICE_CHOICES_HELP = "auto (CUDA when available, else CPU), cpu, cuda, cuda:N, mps"
ATTENTION_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")


class DeviceError(ValueError):
    """A device the machine does not have, or a name torch does not know."""


def resolve_device(requested: str | torch.device | None = "auto") -> torch.device:
    """The device ``requested`` names; ``auto``/``None`` = ``cuda`` when available, else ``cpu``."""
    if isinstance(requested, torch.device):
        device = requested
    elif requested is None or requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(requested)
        except (RuntimeError, TypeError):
            raise DeviceError(f"--device {requested!r}: not a device; expected {DEVICE_CHOICES_HELP}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {requested}: this machine has no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
            )
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError(f"--device {requested}: MPS is not available on this machine; use --device cpu")
    return device


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--device`` flag every model-running command shares."""
    parser.add_argument("--device", default="auto", help=f"where the model runs: {DEVICE_CHOICES_HELP} (default: auto)")


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """bf16 on CUDA, nothing (the model's own dtype) elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else None


@contextlib.contextmanager
def autocast(device: torch.device | str, enabled: bool = True) -> Iterator[None]:
    """bf16 autocast on CUDA; a no-op on other devices (CPU autocast would change CPU numerics)."""
    dtype = autocast_dtype(device)
    if not enabled or dtype is None:
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        yield


def autocast_disabled(device: torch.device | str) -> contextlib.AbstractContextManager:
    """A float32 region inside autocast: autocast off on ``device``'s type, where it has one
    (``meta`` has none, and ``torch.autocast`` refuses it even to switch it off)."""
    device_type = torch.device(device).type
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def flash_attention_available() -> bool:
    try:
        from transformers.utils import is_flash_attn_2_available
    except ImportError:  # pragma: no cover - very old transformers
        return False
    return bool(is_flash_attn_2_available())


def pick_attn_implementation(
    requested: str | None = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """The attention kernel for a model on ``device`` in ``dtype``.

    An explicit choice wins, except FlashAttention-2 where it cannot run (not CUDA, or fp32
    weights), which raises. ``auto`` picks FlashAttention-2 on CUDA with fp16/bf16 weights when
    the package is installed, else SDPA. ``device=None`` means the device ``auto`` resolves to.
    """
    if requested not in (None, *ATTENTION_IMPLEMENTATIONS):
        raise ValueError(f"attn_implementation={requested!r}; expected one of {list(ATTENTION_IMPLEMENTATIONS)}")
    device = resolve_device(device)
    half = dtype in (torch.float16, torch.bfloat16)
    flash_fits = device.type == "cuda" and half
    if requested == "flash_attention_2":
        if not flash_fits:
            raise ValueError(
                f"attn_implementation=flash_attention_2 needs a CUDA device and fp16/bf16 weights; "
                f"this model is on {device} in {dtype}. Use sdpa (or auto)"
            )
        return requested
    if requested in ("sdpa", "eager"):
        return requested
    return "flash_attention_2" if flash_fits and flash_attention_available() else "sdpa"
