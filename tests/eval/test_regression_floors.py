"""Scores as regression tests: a short training must reach the floors recorded in configs/eval/floors.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mllm_fixtures import REPO, stage_overrides

from eval import harness
from training import train_mllm

FLOORS = yaml.safe_load((REPO / "configs" / "eval" / "floors.yaml").read_text())


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> tuple[dict[str, float], Path]:
    spec = FLOORS["llm_micro"]
    out = tmp_path_factory.mktemp("floors")
    argv = ["--config", str(REPO / "configs" / "stages" / "tiny" / "joint.yaml")]
    extra = ["loop.log_every=50", "loop.save_every=1000", "optim.lr=3e-3", "optim.warmup_steps=10", "loop.batch_size=8"]
    for override in stage_overrides(data, out / "joint", None, steps=spec["steps"]) + extra:
        argv += ["--set", override]
    return train_mllm.main(argv), out


def test_short_training_reaches_the_recorded_floors(trained):
    metrics, out = trained
    spec = FLOORS["llm_micro"]
    settings = yaml.safe_load((REPO / "configs" / "eval" / "shapes.yaml").read_text())
    settings["shapes_vqa"]["scenes"] = 10
    path = out / "settings.yaml"
    path.write_text(yaml.safe_dump(settings))
    results = harness.evaluate(["shapes_vqa"], out / "eval", out / "joint" / "model", path)
    observed = {**metrics, **results["shapes_vqa"]}  # the stage's held-out losses, then the harness's scores
    missing = sorted(name for name in (*spec["floors"], *spec["ceilings"]) if name not in observed)
    assert not missing, f"configs/eval/floors.yaml names metrics that no run reported: {missing}"
    for name, floor in spec["floors"].items():
        assert observed[name] >= floor, f"{name}={observed[name]:.3f} fell below its floor {floor}"
    for name, ceiling in spec["ceilings"].items():
        assert observed[name] <= ceiling, f"{name}={observed[name]:.3f} rose above its ceiling {ceiling}"
