"""The checkpoint folders: one ``step_XXXXXXX`` folder per save, the ``latest`` pointer, pruning.

A step is written into a staging folder and made visible by an atomic rename, so a crash never
leaves a half-written "latest". Each engine saves and loads its own part through
:meth:`TrainEngine.save` / :meth:`TrainEngine.load`; the folder adds every rank's random state and
``trainer_state.json``. The random state is saved as tensors and plain numbers and read back with
:func:`training.distributed.load_tensors` (``weights_only=True``), so that a resumed run draws
exactly what an uninterrupted one would (docs/reliability.md, "What resume promises").
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tokenizer.files import has_manifest, recover_directory, replace_directory, verify_manifest, write_text_atomic
from training.config import CheckpointWriteError
from training.distributed import TrainEngine, barrier, load_tensors

LATEST_FILE = "latest"


# ---------------------------------------------------------------- random state
def _rng_state() -> dict[str, Any]:
    """Every global random stream, as tensors and plain numbers (what ``weights_only`` loads).

    Python's Mersenne Twister state is 625 ints and an optional cached Gaussian; numpy's legacy
    state is its 624-word key, a position and a cached Gaussian; torch's CPU and CUDA states are
    uint8 tensors already.
    """
    version, internal, gauss_next = random.getstate()
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, engines: dict[str, TrainEngine], trainer_state: dict[str, Any]) -> Path:
    """Write ``root/step_XXXXXXX`` through a staging folder, then point ``root/latest`` at it.

    Every rank must call this (DeepSpeed saves collectively). Only after all ranks finished
    writing does rank 0 rename the folder and replace ``latest`` (both atomic renames). Under
    ZeRO every rank writes its own optimizer shard into the same folder, so on several nodes
    ``root`` must be on a filesystem they share. A write that fails (a full disk) removes the
    staging folder and raises :class:`CheckpointWriteError`; ``latest`` still names the
    previous checkpoint.
    """
    from tokenizer.files import write_manifest

    rank = dist.get_rank() if dist.is_initialized() else 0
    name = f"step_{step:07d}"
    staging = root / f".{name}.staging"
    try:
        if rank == 0:
            recover_directory(root / name)  # an earlier save of this step killed between its two renames
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        barrier()
        for engine_name, engine in engines.items():
            engine.save(staging / engine_name)
        torch.save(_rng_state(), staging / f"rng_rank{rank}.pt")  # read back by load_tensors
    except (OSError, RuntimeError) as error:
        # A full disk shows up as ENOSPC from Python, or as torch's zip writer failing deep
        # inside ("unexpected pos ..."): either way, say which checkpoint, why, and what is safe.
        shutil.rmtree(staging, ignore_errors=True)  # the partial folder only takes space
        raise CheckpointWriteError(_write_failure(root, name, error)) from error
    barrier()
    final = root / name
    if rank == 0:
        (staging / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))
        write_manifest(staging)  # last, over every rank's files: a staging folder with a manifest is complete
        replace_directory(staging, final)
        write_text_atomic(root / LATEST_FILE, name)
    barrier()
    return final


def _write_failure(root: Path, name: str, error: BaseException) -> str:
    try:
        free = f"{shutil.disk_usage(root).free / 2**20:.0f} MiB free there now"
    except OSError:
        free = "free space unknown"
    try:
        previous = latest_checkpoint(root)
    except FileNotFoundError:
        previous = None
    keep = (
        f"the last complete checkpoint, {previous}, is untouched: free space and run the same command to resume from it"
        if previous is not None
        else "no earlier checkpoint exists, so a rerun starts from step 0"
    )
    return f"could not write checkpoint {root / name} ({type(error).__name__}: {error}; {free}); {keep}"


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    candidate = root / pointer.read_text().strip()
    # A kill while the same step was saved again can leave it renamed aside; bring it back. Staging
    # folders are left alone here: another rank may still be writing one.
    recover_directory(candidate, remove_leftovers=False)
    if not (candidate / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {candidate}, which has no trainer_state.json (corrupt checkpoint)")
    if has_manifest(candidate):
        verify_manifest(candidate)  # sizes: a truncated optimizer shard is named before anything loads
    return candidate


def load_checkpoint(directory: Path, engines: dict[str, TrainEngine]) -> dict[str, Any]:
    """Restore engines and this rank's RNG state; returns the trainer state (incl. ``step``).

    Every random draw after this comes from the restored state only if nothing draws from the
    global generators before the next training step: the loops' DataLoaders take a private
    generator (:func:`training.common.resumable_loader`) for that reason.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    for engine_name, engine in engines.items():
        engine.load(directory / engine_name)
    rng_path = directory / f"rng_rank{rank}.pt"
    if rng_path.is_file():
        _set_rng_state(load_tensors(rng_path))
    return json.loads((directory / "trainer_state.json").read_text())


def prune_checkpoints(root: Path, keep: int = 2) -> None:
    """Keep the newest ``keep`` step folders (rank 0 only)."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
