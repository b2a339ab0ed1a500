"""Where a pretrained checkpoint lives: a local folder, or a hub id found in the Hugging Face cache.

Every ``from_pretrained`` of the project (the SigLIP teacher, the base LM, its text tokenizer)
goes through :func:`resolve_pretrained` first, so that a hub id such as
``google/siglip-so400m-patch14-384`` works on a machine that holds it in its Hugging Face cache
(``HF_HOME`` / ``HF_HUB_CACHE``, laid out as ``models--org--name/snapshots/<revision>/``), with or
without network, and a missing one is named in one line instead of a connection traceback.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# "org/name" or "name": what the Hugging Face hub accepts as a repository id.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# The files a model or tokenizer folder needs; a download takes these and nothing else (no
# duplicate PyTorch pickles, ONNX exports or pictures).
CHECKPOINT_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")
_TRUE = {"1", "ON", "YES", "TRUE"}


def hf_cache_dir() -> Path:
    """The hub cache the environment names at call time (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else the default).

    Read at call time rather than from ``huggingface_hub.constants`` (fixed at import), so a
    process may point it elsewhere after importing transformers.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache")), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    """Whether downloads are switched off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(name, "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_pretrained(path: str, field: str, required_file: str = "config.json") -> Path:
    """The local folder of a checkpoint named by a path or a hub id.

    ``field`` is the config field or flag that named it (``teacher_path``,
    ``model.llm_pretrained`` ...), quoted in every error. A local folder must hold
    ``required_file`` (None: no check). A hub id is looked up in the Hugging Face cache first;
    when it is not there it is downloaded (its config, weights and tokenizer files), unless
    ``HF_HUB_OFFLINE`` is set, in which case the error says how to get it.
    """
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise FileNotFoundError(f"{field}={path!r} is a file; expected a checkpoint folder (save_pretrained)")
        if required_file and not (local / required_file).is_file():
            raise FileNotFoundError(f"{field}={path!r} has no {required_file} (is it a save_pretrained folder?)")
        return local
    if not HUB_ID.match(path) or path.startswith((".", "~")) or path.count("/") > 1:
        raise FileNotFoundError(f"{field}={path!r}: no such folder (and not a hub id of the form org/name)")
    from huggingface_hub import snapshot_download

    cache = hf_cache_dir()
    absent = (
        f"{field}={path!r} is neither a folder nor in the local Hugging Face cache (HF_HOME="
        f"{os.environ.get('HF_HOME', '<unset>')}, hub cache {cache}); download it with "
        f"`hf download {path}` on a machine with network (then copy the cache), or give a local path"
    )
    try:
        return Path(snapshot_download(path, cache_dir=cache, local_files_only=True))
    except Exception as error:  # LocalEntryNotFoundError, or a cache entry without its snapshot
        if hub_offline():
            raise FileNotFoundError(absent) from error
    try:
        folder = snapshot_download(path, cache_dir=cache, allow_patterns=list(CHECKPOINT_PATTERNS))
    except Exception as error:  # no network, unknown repository, gated repository ...
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise FileNotFoundError(f"{absent}; downloading failed: {type(error).__name__}: {reason}") from error
    return Path(folder)


__all__ = ["CHECKPOINT_PATTERNS", "HUB_ID", "hf_cache_dir", "hub_offline", "resolve_pretrained"]
