"""Processes and DeepSpeed: the process group, collectives, and the engine that trains a model.

One :class:`TrainEngine` per (model, optimizer) pair hides whether DeepSpeed (ZeRO 0-3,
optionally offloaded) or plain PyTorch (one process, or several averaging their gradients)
does the work; the training loops call ``engine(...)``, ``engine.backward(loss)``,
``engine.step()`` and never check ``hasattr(model, "module")``. Each engine saves and loads its
own state; the step folders around it are :mod:`training.checkpointing`'s.

Loading never runs code from a file: every file is read with ``torch.load(...,
weights_only=True)`` (tensors, numbers, strings and plain containers only; docs/reliability.md,
"What is never executed"), DeepSpeed's own reads included.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tokenizer.config import ConfigError
from training.config import DeepSpeedConfig
from training.deepspeed_json import TrainShape, deepspeed_json, offloads_optimizer
from training.fault_injection import _install_fault_injection
from training.launcher import DistState, adopt_slurm_environment, default_single_process_env, launch_device
from training.launcher import add_launcher_arguments as add_launcher_arguments

logger = logging.getLogger(__name__)


def _deepspeed():
    # The CPU accelerator must be chosen before DeepSpeed is imported.
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def init_distributed(use_deepspeed: bool = False, device: str | torch.device | None = "auto") -> DistState:
    """Join the process group started by ``torchrun`` / ``deepspeed`` / ``srun`` (or run alone).

    Alone, the model runs on ``device`` (``auto``: CUDA when present); under a launcher, ``auto``
    and ``cuda`` mean ``cuda:LOCAL_RANK`` (:func:`training.launcher.launch_device`). Plain runs
    create a group only with several processes; DeepSpeed always needs one, so a DeepSpeed run
    started without a launcher becomes a 1-process group on 127.0.0.1. CPU runs use gloo (and
    DeepSpeed's CPU accelerator), GPU runs NCCL.
    """
    _install_fault_injection()
    adopt_slurm_environment()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = launch_device(device, local_rank)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is first imported
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    if use_deepspeed:
        default_single_process_env()
        _deepspeed().init_distributed(dist_backend=backend)
    elif world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistState(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (identity when running alone)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def all_reduce_scalars(values: dict[str, float]) -> dict[str, float]:
    """Mean of each named scalar over ranks, in one collective (identity when running alone).

    Every rank must call it with the same keys. The training loops log these means, so a
    logged loss is the loss of the global batch, not of rank 0's share of it.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return dict(values)
    keys = sorted(values)
    # NCCL only reduces GPU tensors; gloo takes CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    packed = all_reduce_mean(torch.tensor([float(values[key]) for key in keys], dtype=torch.float64, device=device))
    return dict(zip(keys, packed.tolist(), strict=True))


class TrainEngine:
    """A model with its optimizer and LR schedule; plain PyTorch or DeepSpeed underneath.

    With ``accumulation`` > 1 an optimizer step spans that many micro-batches: the loop calls
    :meth:`backward` and :meth:`step` once per micro-batch, and the optimizer, the schedule and
    the gradient averaging over processes run on the last one of each step (DeepSpeed's
    ``gradient_accumulation_steps`` under DeepSpeed). Each micro-batch's loss counts
    ``1 / accumulation``, so a step's gradient is the mean over its micro-batches.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        grad_clip: float,
        deepspeed_config: DeepSpeedConfig | None = None,
        batch_size: int = 1,
        precision: str = "fp32",
        world_size: int = 1,
        accumulation: int = 1,
    ) -> None:
        self.grad_clip = grad_clip
        self.accumulation = accumulation
        self._micro_steps = 0
        self.uses_deepspeed = bool(deepspeed_config and deepspeed_config.enabled)
        if self.uses_deepspeed and getattr(optimizer, "needs_whole_matrices", False):
            raise ConfigError(
                "optim.name='muon' orthogonalises whole weight matrices, which DeepSpeed ZeRO "
                "partitions; use optim.name=adamw with deepspeed.enabled=true"
            )
        if self.uses_deepspeed:
            on_gpu = any(param.is_cuda for param in model.parameters())
            shape = TrainShape(batch_size, accumulation, world_size, grad_clip, precision == "bf16" and on_gpu, on_gpu)
            ds_json = deepspeed_json(deepspeed_config, shape)
            if offloads_optimizer(ds_json):
                optimizer, scheduler = _cpu_adam(optimizer, scheduler)
            engine, optimizer, _, scheduler = _deepspeed().initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_json
            )
            logger.info(
                "DeepSpeed ZeRO-%d with %s, %d micro-batches per step",
                ds_json["zero_optimization"]["stage"],
                type(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer).__name__,
                accumulation,
            )
            self._wrapped: nn.Module = engine
            self.module: nn.Module = engine.module
        else:
            # Several plain processes average gradients in step() instead of wrapping the model
            # in DDP: DDP only syncs what went through its own forward, and the loops also call
            # the bare model (stage 0 uses SigLIP's get_image_features / get_text_features; the
            # adaptive GAN weight differentiates with autograd.grad). Bypassing DDP would leave
            # the ranks silently training different models. Averaging on the last micro-batch
            # of a step only is what DDP's no_sync() does on the others.
            self._wrapped = model
            self.module = model
            if world_size > 1:
                _broadcast_from_rank0(model)
        self.data_parallel = not self.uses_deepspeed and world_size > 1
        self.optimizer = optimizer
        self.scheduler = scheduler

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapped(*args, **kwargs)

    def frozen_forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the bare model as a fixed function inside *another* engine's loss.

        Gradients reach the inputs, never this model's parameters. The GAN generator step
        needs this for the discriminator: a forward through the DeepSpeed engine hooks the
        outputs, so the generator's backward would also open a backward of this engine and
        then reduce gradients that were never produced (DeepSpeed 0.19 fails inside ZeRO's
        bucket reduction). The parameters are
        frozen for the forward only: autograd decides whether a parameter gets a gradient
        when the op runs, so restoring the flags afterwards keeps the graph free of them
        (the model must not recompute activations in backward, i.e. no checkpointing).
        """
        params = list(self.module.parameters())
        flags = [param.requires_grad for param in params]
        for param in params:
            param.requires_grad_(False)
        try:
            return self.module(*args, **kwargs)
        finally:
            for param, flag in zip(params, flags, strict=True):
                param.requires_grad_(flag)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss, counted ``1 / accumulation`` (DeepSpeed scales it itself)."""
        if self.uses_deepspeed:
            self._wrapped.backward(loss)
        elif self.accumulation > 1:
            (loss / self.accumulation).backward()
        else:
            loss.backward()

    def step(self) -> float | None:
        """Once per micro-batch. On the last micro-batch of an optimizer step: clip, step the
        optimizer and schedule, zero the grads, and return the grad norm when known; before it,
        the gradients only accumulate and None is returned."""
        if self.uses_deepspeed:
            boundary = self._wrapped.is_gradient_accumulation_boundary()
            self._wrapped.step()
            norm = self._wrapped.get_global_grad_norm() if boundary else None
            return float(norm) if norm is not None else None
        self._micro_steps += 1
        if self._micro_steps % self.accumulation:
            return None
        if self.data_parallel:
            _average_gradients(self.module)
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip) if self.grad_clip > 0 and params else None
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm) if norm is not None else None

    def zero_grad(self) -> None:
        if self.uses_deepspeed:
            self._wrapped.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self, mode: bool = True) -> None:
        self._wrapped.train(mode)

    # ---------------------------------------------------------------- whole parameters
    def zero_stage(self) -> int:
        """The ZeRO stage DeepSpeed runs (after ``deepspeed.config_path`` is merged); 0 without DeepSpeed."""
        return int(self._wrapped.zero_optimization_stage()) if self.uses_deepspeed else 0

    def parameter_count(self, trainable_only: bool = False) -> int:
        """Elements of the model's parameters, whole under ZeRO-3 as well.

        Under ZeRO-3 a parameter's tensor is an empty partition unless a forward left it
        gathered (micro model: ``numel()`` counts 0 of 41888 after initialisation, 23168 after
        one evaluation); ZeRO-3 records the whole size as ``ds_numel``.
        """
        params = [p for p in self.module.parameters() if p.requires_grad or not trainable_only]
        return sum(getattr(p, "ds_numel", p.numel()) for p in params)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The model's whole state dict on rank 0 under ZeRO-3 (None on other ranks); None otherwise,
        where ``module.state_dict()`` already holds whole tensors.

        Collective under ZeRO-3: every rank calls it. Parameters are gathered one module at a time
        (``deepspeed.zero.GatheredParameters``) so that rank 0 never holds the whole model on the
        accelerator; tied parameters stay one tensor under both names. This is what DeepSpeed's
        ``save_16bit_model`` gathers before writing its own file.
        """
        if self.zero_stage() != 3:
            return None
        gathered_parameters = _deepspeed().zero.GatheredParameters
        is_main = dist.get_rank() == 0
        state_dict: dict[str, torch.Tensor] = {}
        names_by_id: dict[int, str] = {}
        persistent = set(self.module.state_dict())  # buffer names without the non-persistent ones
        # The ZeRO-3 optimizer partitions every parameter before a gather and re-gathers its
        # persistent ones after, as around its checkpoints.
        if hasattr(self.optimizer, "checkpoint_event_prologue"):
            self.optimizer.checkpoint_event_prologue()
        for prefix, module in self.module.named_modules(remove_duplicate=False):
            prefix = f"{prefix}." if prefix else ""
            # modifier_rank=0 releases the gathered memory on exit (GatheredParameters' documentation).
            with gathered_parameters(list(module.parameters(recurse=False)), modifier_rank=0):
                if not is_main:
                    continue
                for name, param in module.named_parameters(recurse=False):
                    if param.ds_id in names_by_id:
                        state_dict[prefix + name] = state_dict[names_by_id[param.ds_id]]
                    else:
                        state_dict[prefix + name] = param.detach().cpu()
                        names_by_id[param.ds_id] = prefix + name
                for name, buffer in module.named_buffers(recurse=False):
                    if prefix + name in persistent:
                        state_dict[prefix + name] = buffer.detach().cpu()
        if hasattr(self.optimizer, "checkpoint_event_epilogue"):
            self.optimizer.checkpoint_event_epilogue()
        return state_dict if is_main else None

    # ---------------------------------------------------------------- checkpoints
    def save(self, directory: Path) -> None:
        """Collective under DeepSpeed (every rank calls it); rank 0 writes in plain mode.

        Plain mode writes ``state.pt``: the model, optimizer and schedule state dicts, which hold
        tensors, numbers, strings and plain containers only, so :meth:`load` reads it back with
        ``weights_only=True``.
        """
        if self.uses_deepspeed:
            self._wrapped.save_checkpoint(str(directory), tag="state", save_latest=False)
        elif not dist.is_initialized() or dist.get_rank() == 0:
            directory.mkdir(parents=True, exist_ok=True)
            state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
            if self.scheduler is not None:
                state["scheduler"] = self.scheduler.state_dict()
            torch.save(state, directory / "state.pt")

    def load(self, directory: Path) -> None:
        if self.uses_deepspeed:
            with _deepspeed_weights_only(directory):
                path, _ = self._wrapped.load_checkpoint(str(directory), tag="state")
            if path is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}")
            return
        state_path = directory / "state.pt"
        if not state_path.is_file():
            raise FileNotFoundError(f"checkpoint file {state_path} is missing")
        state = load_tensors(state_path)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])


def _cpu_adam(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler | None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """DeepSpeed's CPU Adam with ``optimizer``'s parameter groups and settings, and the schedule moved onto it.

    ZeRO-Offload steps the optimizer on the CPU and accepts only this optimizer for it
    (DeepSpeed's ZeRO-Offload documentation); a torch AdamW is refused there.
    """
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        raise ConfigError(
            f"deepspeed.offload_optimizer=true runs DeepSpeed's CPU Adam, which cannot stand in for "
            f"{type(optimizer).__name__}; use optim.name=adamw or deepspeed.offload_optimizer=false"
        )
    if scheduler is not None and not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise ConfigError(f"deepspeed.offload_optimizer=true cannot move a {type(scheduler).__name__} schedule")
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    groups = []
    for group in optimizer.param_groups:
        # The schedule's base lr, not the lr it already set for step 0: the new schedule sets that again.
        lr = group.get("initial_lr", group["lr"])
        settings = {key: group[key] for key in ("betas", "eps", "weight_decay")}
        groups.append({"params": group["params"], "lr": lr, **settings})
    defaults = optimizer.defaults
    cpu_adam = DeepSpeedCPUAdam(
        groups,
        lr=defaults["lr"],
        betas=defaults["betas"],
        eps=defaults["eps"],
        weight_decay=defaults["weight_decay"],
        adamw_mode=isinstance(optimizer, torch.optim.AdamW),
    )
    if scheduler is None:
        return cpu_adam, None
    return cpu_adam, torch.optim.lr_scheduler.LambdaLR(cpu_adam, scheduler.lr_lambdas)


@torch.no_grad()
def _broadcast_from_rank0(model: nn.Module) -> None:
    """Start every rank from rank 0's parameters and buffers (what DDP and DeepSpeed do)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


@torch.no_grad()
def _average_gradients(model: nn.Module) -> None:
    """Average ``.grad`` over ranks in one flat all-reduce (plain multi-process runs).

    A parameter without a gradient on some rank counts as zeros there; one without a gradient
    on every rank keeps ``grad=None``, so the optimizer skips it exactly as a single process
    would (AdamW would otherwise decay it and age its moments).
    """
    params = [param for param in model.parameters() if param.requires_grad]
    if not params:
        return
    device = params[0].device
    has_grad = torch.tensor([param.grad is not None for param in params], dtype=torch.float32, device=device)
    grads = [
        (param.grad if param.grad is not None else torch.zeros_like(param)).reshape(-1).float() for param in params
    ]
    packed = torch.cat([has_grad, *grads])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    offset = len(params)
    for index, param in enumerate(params):
        size = param.numel()
        if packed[index] > 0:
            mean = (packed[offset : offset + size] / dist.get_world_size()).view_as(param).to(param.dtype)
            if param.grad is None:
                param.grad = mean
            else:
                param.grad.copy_(mean)
        offset += size


def unwrap(engine: TrainEngine) -> nn.Module:
    return engine.module


# ---------------------------------------------------------------- loading without unpickling code
def _unsafe_globals(path: Path, allowed: tuple[type, ...] = ()) -> list[str]:
    """The classes and functions a torch file would import beyond what ``weights_only`` accepts.

    Read from the pickle's opcodes, not by running them (``get_unsafe_globals_in_checkpoint``).
    """
    names = {f"{cls.__module__}.{cls.__qualname__}" for cls in allowed}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - only used to word the message; the refusal stands anyway
        return []
    return [name for name in found if name not in names]


def _refusal(path: Path, names: list[str]) -> ConfigError:
    listed = f" ({', '.join(names)})" if names else ""
    return ConfigError(f"checkpoint {path} holds objects that are not tensors{listed}; refusing to unpickle it")


def load_tensors(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a file that needs more, or cannot be read,
    is refused with one line naming it (:class:`ConfigError`).

    ``weights_only`` rebuilds tensors, numbers, strings and plain containers and imports nothing
    else, so a pickled payload (an object whose ``__reduce__`` runs a command) is refused before
    any of it runs (torch.load's documentation, "weights_only").
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _refusal(path, _unsafe_globals(path)) from None
    except (RuntimeError, EOFError, ValueError) as error:  # torch's zip reader on a truncated or foreign file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"checkpoint {path} cannot be read ({reason}); delete its step folder so that resuming starts "
            "from an earlier checkpoint"
        ) from None


def _deepspeed_safe_globals() -> tuple[type, ...]:
    """The DeepSpeed classes its ZeRO checkpoints pickle besides tensors and plain containers.

    Found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO-0/1/2/3 checkpoints
    (DeepSpeed 0.19.8): the optimizer shards hold the loss scaler, the ZeRO stage enum and the
    fragment addresses of the parameters. Rebuilding them runs no code beyond setting attributes.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


@contextlib.contextmanager
def _deepspeed_weights_only(directory: Path) -> Iterator[None]:
    """Make every checkpoint read in the block weights-only, for DeepSpeed's ``load_checkpoint``.

    DeepSpeed's checkpoint engine turns ``weights_only`` off in its own reads and has no option to
    change that. PyTorch's own switch, the ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` environment variable,
    overrides a caller's explicit choice at each read (torch.load's documentation), and
    ``torch.serialization.safe_globals`` admits DeepSpeed's few classes (:func:`_deepspeed_safe_globals`).
    A file with anything else is refused with one line naming it.
    """
    allowed = _deepspeed_safe_globals()
    variable = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    previous = os.environ.get(variable)
    os.environ[variable] = "1"
    try:
        with torch.serialization.safe_globals(list(allowed)):
            yield
    except pickle.UnpicklingError:
        for path in sorted(directory.rglob("*.pt")):
            names = _unsafe_globals(path, allowed)
            if names:
                raise _refusal(path, names) from None
        raise _refusal(directory, []) from None
    finally:
        if previous is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = previous
