"""A process's place in a launch: rank, world size, local rank and device, from whichever launcher started it.

``torchrun`` exports ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``;
the ``deepspeed`` launcher exports the same and also passes ``--local_rank N``; ``srun`` exports
``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``, which stand in for the first three when
the torchrun variables are absent (SLURM's sbatch documentation, "OUTPUT ENVIRONMENT VARIABLES").
A process started by none of them runs alone.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
from dataclasses import dataclass
from typing import Any

import torch

from tokenizer.devices import add_device_argument, resolve_device

DEFAULT_MASTER_PORT = "29500"  # torchrun's default


@dataclass
class DistState:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class _LocalRankAction(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any, option: Any = None):
        # The launchers also export LOCAL_RANK, which init_distributed reads; the flag fills it in
        # only where a launcher passed the flag alone.
        os.environ.setdefault("LOCAL_RANK", str(value))
        setattr(namespace, self.dest, value)


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--local_rank N`` (also ``--local-rank``), which the ``deepspeed`` launcher
    passes to every process it starts; ``torchrun`` and ``srun`` pass the same through the environment."""
    add_device_argument(parser)
    parser.add_argument(
        "--local_rank",
        "--local-rank",
        dest="local_rank",
        type=int,
        default=None,
        action=_LocalRankAction,
        help="set by the deepspeed launcher (LOCAL_RANK in the environment wins)",
    )


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[03-05,09],cpu1`` -> ``gpu03``."""
    match = re.match(r"([^,\[]+)(?:\[([^\],]+))?", nodelist.strip())
    if match is None:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} is not a node list")
    prefix, ranges = match.groups()
    return prefix + (ranges.split("-")[0] if ranges else "")


def adopt_slurm_environment() -> None:
    """Fill ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` from ``srun``'s
    variables where no torchrun-style launcher set them; ``torch.distributed`` reads them from there."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    try:
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ.get("SLURM_NTASKS", "1"))
        local_rank = int(os.environ.get("SLURM_LOCALID", "0"))
    except ValueError:
        names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
        found = {name: os.environ.get(name) for name in names}
        raise ValueError(f"SLURM variables {found} must be integers") from None
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    if "MASTER_ADDR" not in os.environ:
        nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
        if world > 1 and not nodelist:
            raise ValueError("SLURM_PROCID is set but neither MASTER_ADDR nor SLURM_JOB_NODELIST; export MASTER_ADDR")
        os.environ["MASTER_ADDR"] = _first_host(nodelist) if nodelist else "127.0.0.1"
    os.environ.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)


def launched() -> bool:
    """Whether a launcher (torchrun, deepspeed, srun) started this process."""
    return "RANK" in os.environ or "WORLD_SIZE" in os.environ


def launch_device(requested: str | torch.device | None, local_rank: int) -> torch.device:
    """Alone: the device ``requested`` names (``auto``: CUDA when present). Under a launcher,
    ``auto`` or ``cuda`` mean this process's GPU, ``cuda:LOCAL_RANK``."""
    if launched() and str(requested or "auto") in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA GPU(s); "
                "start at most one process per GPU"
            )
        return torch.device("cuda", local_rank)
    device = resolve_device(requested)
    if device.type == "cuda" and device.index is None:  # torch.cuda.set_device and NCCL need an index
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def default_single_process_env() -> None:
    """Fill the rendezvous variables a launcher would set, for a run started without one.

    DeepSpeed always needs a process group; when ``RANK`` etc. are missing it falls back to
    MPI discovery (``mpi4py``), which is neither installed nor wanted for a 1-process run.
    """
    if launched():
        return
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
