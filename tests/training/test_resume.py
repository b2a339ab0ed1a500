"""Checkpoints hold tensors and plain values only, a planted pickle never runs, and the random
state survives a save exactly (docs/reliability.md, "What is never executed", "What resume
promises"). The kill-and-resume runs are in test_fault_injection.py."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mllm_fixtures import REPO, stage_overrides

from tokenizer.config import ConfigError
from training import checkpointing, distributed
from training.cli import main as cli_main
from training.common import resumable_loader, step_loader


class Payload:
    """Unpickling this creates ``marker``: what a planted checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def plant(path: Path, marker: Path) -> None:
    """Replace the torch file ``path`` with one that carries a :class:`Payload`; if the folder has
    a manifest, rewrite it too (whoever can write the checkpoint can write its manifest)."""
    original = torch.load(path, weights_only=True)
    original[next(iter(original))] = Payload(marker)
    torch.save(original, path)
    from tokenizer import files

    for folder in (path.parent, path.parent.parent):
        if (folder / "manifest.json").is_file():
            files.write_manifest(folder)


def _engine() -> distributed.TrainEngine:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return distributed.TrainEngine(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), 1.0)


@pytest.mark.parametrize("planted", ["model/state.pt", "rng_rank0.pt"])
def test_a_planted_pickle_is_refused_and_never_runs(tmp_path: Path, planted: str) -> None:
    engine = _engine()
    engine.backward(engine(torch.ones(4, 3)).sum())
    engine.step()
    checkpoint = checkpointing.save_checkpoint(tmp_path / "checkpoints", 1, {"model": engine}, {})
    marker = tmp_path / "payload-ran"
    plant(checkpoint / planted, marker)
    with pytest.raises(ConfigError) as refused:
        checkpointing.load_checkpoint(checkpoint, {"model": _engine()})
    assert str(refused.value) == (
        f"checkpoint {checkpoint / planted} holds objects that are not tensors (io.open); refusing to unpickle it"
    )
    assert not marker.exists()
    # The planted file is live: an unrestricted load runs it.
    torch.load(checkpoint / planted, weights_only=False)
    assert marker.exists()


def test_an_unreadable_checkpoint_file_is_named(tmp_path: Path) -> None:
    engine = _engine()
    checkpoint = checkpointing.save_checkpoint(tmp_path / "checkpoints", 1, {"model": engine}, {})
    state = checkpoint / "rng_rank0.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ConfigError, match=rf"^checkpoint {state} cannot be read \(.*\); delete its step folder"):
        distributed.load_tensors(state)


def test_latest_recovers_a_step_renamed_aside_and_names_a_truncated_file(tmp_path: Path) -> None:
    from tokenizer.files import ManifestError

    root = tmp_path / "checkpoints"
    checkpoint = checkpointing.save_checkpoint(root, 1, {"model": _engine()}, {})
    # A kill between the two renames of a re-save of the same step leaves it under its backup name.
    checkpoint.rename(checkpoint.with_name(f".{checkpoint.name}.old"))
    assert checkpointing.latest_checkpoint(root) == checkpoint and (checkpoint / "trainer_state.json").is_file()
    state = checkpoint / "model" / "state.pt"
    state.write_bytes(state.read_bytes()[:-10])
    with pytest.raises(ManifestError, match="state.pt"):
        checkpointing.latest_checkpoint(root)


def test_the_random_state_round_trips_through_a_weights_only_file(tmp_path: Path) -> None:
    random.gauss(0, 1)  # python and numpy cache a second Gaussian: part of the state
    np.random.standard_normal()
    torch.manual_seed(3)
    path = tmp_path / "rng.pt"
    torch.save(checkpointing._rng_state(), path)
    expected = (random.gauss(0, 1), random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    checkpointing._set_rng_state(distributed.load_tensors(path))
    drawn = (random.gauss(0, 1), random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    assert drawn[:4] == expected[:4]
    assert torch.equal(drawn[4], expected[4])


def test_loaders_draw_nothing_from_the_global_generator() -> None:
    """A resumed run builds and iterates its loader right after restoring the random state."""
    dataset = torch.utils.data.TensorDataset(torch.arange(16.0))
    state = torch.get_rng_state()
    batches = [batch for batch in step_loader(dataset, None, 4, seed=0, start_step=1, max_steps=3)]
    assert len(batches) == 2
    sampler = [[0, 1], [2, 3]]
    assert len(list(resumable_loader(dataset, sampler, None, seed=0, start_step=5))) == 2
    assert torch.equal(torch.get_rng_state(), state)


def test_the_command_refuses_a_planted_checkpoint_in_one_line(
    data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["train-mllm", "--config", str(REPO / "configs" / "stages" / "tiny" / "joint.yaml")]
    for override in stage_overrides(data, tmp_path / "run", steps=2):
        argv += ["--set", override]
    assert cli_main(argv) == 0
    checkpoint = checkpointing.latest_checkpoint(tmp_path / "run" / "checkpoints")
    pristine = tmp_path / "pristine"
    shutil.copytree(checkpoint, pristine)
    marker = tmp_path / "payload-ran"
    for planted in ("mllm/state.pt", "rng_rank0.pt"):
        shutil.rmtree(checkpoint)
        shutil.copytree(pristine, checkpoint)
        plant(checkpoint / planted, marker)
        capsys.readouterr()
        assert cli_main([*argv, "--set", "loop.max_steps=3"]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dualtoken")]
        assert errors == [
            f"dualtoken train-mllm: error: checkpoint {checkpoint / planted} holds objects that are not tensors "
            "(io.open); refusing to unpickle it"
        ]
        assert not marker.exists()
