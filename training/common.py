"""Small pieces every training loop uses: logging, metrics, schedules, step-indexed data."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from tokenizer.config import ConfigError
from tokenizer.files import write_text_atomic
from training.config import OptimConfig
from training.optimizers import MuonAdamW, hidden_matrices

logger = logging.getLogger("dualtoken")


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    """Configure stdlib logging once; ranks other than 0 only report warnings."""
    root = logging.getLogger()
    if getattr(setup_logging, "_done", False):
        root.setLevel(level if rank == 0 else logging.WARNING)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else logging.WARNING)
    for noisy in ("deepspeed", "DeepSpeed", "torch.distributed", "httpx", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    setup_logging._done = True  # type: ignore[attr-defined]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class MetricsWriter:
    """Tensorboard scalars plus an append-only ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, output_dir: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self._tensorboard = None
        self._jsonl = None
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(output_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but logging must never stop training
                logger.warning("tensorboard is not importable; scalars go to metrics.jsonl only")

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {f"{prefix}{key}": float(value) for key, value in values.items()}
        if self._tensorboard is not None:
            for key, value in record.items():
                self._tensorboard.add_scalar(key, value, step)
        self._jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._jsonl is not None:
            self._jsonl.close()


def build_optimizer(params: Any, config: OptimConfig, module: nn.Module | None = None) -> torch.optim.Optimizer:
    """AdamW over ``params``; with ``optim.name: muon``, Muon for those of them that are
    hidden matrices of ``module`` (:func:`training.optimizers.hidden_matrices`) and AdamW for
    the rest."""
    params = list(params)
    if config.name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
    if module is None:
        raise ConfigError(f"optim.name={config.name!r} is not supported here; use adamw")
    matrices = {id(p) for p in hidden_matrices(module)}
    groups = [
        {"params": [p for p in params if id(p) in matrices], "use_muon": True},
        {"params": [p for p in params if id(p) not in matrices], "use_muon": False},
    ]
    return MuonAdamW(
        [g for g in groups if g["params"]],
        lr=config.lr,
        betas=tuple(config.betas),
        weight_decay=config.weight_decay,
        momentum=config.muon_momentum,
        ns_steps=config.muon_ns_steps,
    )


def warmup_cosine(
    optimizer: torch.optim.Optimizer, config: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at ``max_steps``."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / max(1, config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / max(1, max_steps - config.warmup_steps))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def restore_schedule_lr(scheduler: torch.optim.lr_scheduler.LambdaLR | None) -> None:
    """After loading a checkpoint, set each param group's lr from *this* run's schedule.

    The optimizer state restores the lr the saved run computed for the next step, with that
    run's ``max_steps``; when a finished run is extended (larger ``loop.max_steps``) the
    cosine differs, and the first resumed step would otherwise use the old run's lr.
    """
    if scheduler is None:
        return
    groups = scheduler.optimizer.param_groups
    for group, base_lr, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base_lr * factor(scheduler.last_epoch)


class StepIndexedSampler(Sampler):
    """Yields ``batch_for_step(step, micro)`` for ``step`` in ``[start_step, max_steps)`` and each of
    its ``accumulation`` micro-batches: a batch is a function of its step alone, so a resumed run
    sees exactly the batches of an uninterrupted one.

    A step's global batch holds ``batch_size x world x accumulation`` items; micro-batch m of rank
    r is its slice number ``m x world + r`` (:meth:`micro_offset`), so the micro-batches of all
    ranks together are the global batch, whatever the split into processes and micro-batches.
    """

    start_step: int
    max_steps: int
    batch_size: int
    rank: int
    world: int
    accumulation: int = 1

    def batch_for_step(self, step: int, micro: int = 0) -> list[Any]:
        raise NotImplementedError

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world * self.accumulation

    def micro_offset(self, micro: int) -> int:
        """Where this rank's ``micro``-th micro-batch starts in the step's global batch."""
        return (micro * self.world + self.rank) * self.batch_size

    def __iter__(self) -> Iterator[list[Any]]:
        for step in range(self.start_step, self.max_steps):
            for micro in range(self.accumulation):
                yield self.batch_for_step(step, micro)

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.accumulation


def steps_of(micro_batches: Iterable[Any], accumulation: int) -> Iterator[list[Any]]:
    """The micro-batches of a step-indexed loader, ``accumulation`` at a time: one list per optimizer step."""
    step: list[Any] = []
    for batch in micro_batches:
        step.append(batch)
        if len(step) == accumulation:
            yield step
            step = []


class StepSampler(StepIndexedSampler):
    """Batches of indices defined by the step number alone, so a resumed run sees exactly
    the batches an uninterrupted one would. Each epoch is a fresh permutation seeded by
    ``(seed, epoch)``; rank r of w takes the r-th contiguous slice of the global batch."""

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        seed: int,
        start_step: int,
        max_steps: int,
        rank: int = 0,
        world: int = 1,
        accumulation: int = 1,
    ) -> None:
        self.batch_size = batch_size
        self.rank = rank
        self.world = world
        self.accumulation = accumulation
        if dataset_size < self.global_batch:
            raise ValueError(f"the dataset has {dataset_size} items, fewer than one global batch ({self.global_batch})")
        self.dataset_size = dataset_size
        self.seed = seed
        self.start_step = start_step
        self.max_steps = max_steps
        self._cached_epoch: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cached_epoch = (epoch, torch.randperm(self.dataset_size, generator=generator))
        return self._cached_epoch[1]

    def batch_for_step(self, step: int, micro: int = 0) -> list[int]:
        per_epoch = self.dataset_size // self.global_batch
        epoch, position = divmod(step, per_epoch)
        start = position * self.global_batch + self.micro_offset(micro)
        return self._permutation(epoch)[start : start + self.batch_size].tolist()


def step_loader(
    dataset: Dataset,
    collate: Any,
    batch_size: int,
    seed: int,
    start_step: int,
    max_steps: int,
    rank: int = 0,
    world: int = 1,
    num_workers: int = 0,
    accumulation: int = 1,
) -> DataLoader:
    sampler = StepSampler(len(dataset), batch_size, seed, start_step, max_steps, rank, world, accumulation)
    return resumable_loader(dataset, sampler, collate, seed, start_step, num_workers)


def resumable_loader(
    dataset: Dataset, batch_sampler: Sampler[list[int]], collate: Any, seed: int, start_step: int, num_workers: int = 0
) -> DataLoader:
    """A DataLoader over step-indexed batches that draws nothing from the global random generators.

    A DataLoader draws its workers' base seed from the *global* torch generator each time it is
    iterated unless it is given one of its own. A resumed run iterates right after restoring the
    saved random state, so that one draw would shift every later one (dropout masks, k-means init,
    dead-code restarts) against an uninterrupted run. The private generator is a function of
    ``(seed, start_step)``, both saved with the run. Datasets draw their own randomness from
    ``(seed, step or item)`` streams, never from the worker's global generators, so what a worker
    seeds does not change what it returns.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + start_step)
    return DataLoader(
        dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=num_workers, generator=generator
    )


def format_metrics(metrics: dict[str, float]) -> str:
    """``name=value, ...`` with 4 significant digits, for log lines."""
    return ", ".join(f"{key}={value:.4g}" for key, value in metrics.items())


def count_parameters(module: torch.nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``loop.precision`` as run on ``device``: ``auto`` is bf16 on CUDA and fp32 elsewhere (CPU
    numerics stay those of fp32); ``fp32`` and ``bf16`` are taken as written."""
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``bf16`` (CPU or GPU) and for ``auto`` on CUDA; a no-op context otherwise."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------- pipeline stage settings
SETTINGS_FILENAME = "pipeline_settings.json"


def _portable(argv: list[str], run_dir: Path | None) -> list[str]:
    """``argv`` with the run folder written as ``{run_dir}``, so a moved folder, or one named by
    an absolute instead of a relative path, still matches what it recorded."""
    if run_dir is None:
        return list(argv)
    names = sorted({str(run_dir), str(Path(run_dir).resolve())}, key=len, reverse=True)
    # The folder as a whole path component: after "=", "[" or ",", before "/", "]", "," or the end.
    pattern = re.compile(r"(?<=[=\[,])(?:" + "|".join(map(re.escape, names)) + r")(?=/|\]|,|$)")
    return [pattern.sub("{run_dir}", item) for item in argv]


def check_stage_settings(output_dir: Path, argv: list[str], stage: str, run_dir: Path | None = None) -> None:
    """Raise ``ConfigError`` when ``output_dir`` was started by the pipeline with other settings than ``argv``.

    Paths inside ``run_dir`` are compared relative to it (see :func:`record_stage_settings`).
    """
    path = output_dir / SETTINGS_FILENAME
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text())["argv"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ConfigError(
            f"{path}: unreadable stage settings ({error}); delete {output_dir} to train {stage} again"
        ) from None
    argv = _portable(argv, run_dir)
    if recorded == argv:
        return
    before = [item for item in recorded if item not in argv]
    now = [item for item in argv if item not in recorded]
    if not before and not now:  # the same items in another order (later --set wins)
        before, now = recorded, argv
    raise ConfigError(
        f"{stage} in {output_dir} was started with other settings (only there: {before}; only now: {now}); "
        f"pass the same options, use another --run-dir, or delete {output_dir} to train it again"
    )


def record_stage_settings(output_dir: Path, argv: list[str], run_dir: Path | None = None) -> None:
    """Write the settings a stage is started with (atomically) for :func:`check_stage_settings`;
    paths inside ``run_dir`` are written relative to it, as ``{run_dir}``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output_dir / SETTINGS_FILENAME, json.dumps({"argv": _portable(argv, run_dir)}, indent=2))


def run_or_reuse(
    stage: str,
    output_dir: Path,
    argv: list[str],
    run_dir: Path | None,
    finished: Callable[[], bool],
    train: Callable[[list[str]], Any],
    result: str,
    launch: Sequence[str] = (),
) -> tuple[bool, Any]:
    """One pipeline stage: refuse a folder started with other settings, reuse a finished one, else train.

    ``finished()`` says whether ``result`` (a path, for the log) is complete. ``launch`` are
    arguments that say where the stage runs, not what it trains (``--device cuda``): passed to
    ``train`` after ``argv`` but neither recorded nor compared, so a stage started on one device
    is reused or resumed on another. Returns ``(reused, train's return value or None)``.
    """
    check_stage_settings(output_dir, argv, stage, run_dir)
    if finished():
        logger.info("%s: reusing %s", stage, result)
        return True, None
    record_stage_settings(output_dir, argv, run_dir)
    return False, train([*argv, *launch])
