"""The research scripts under scripts/: their samples are what they say, and they run end to end."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("question", ["side", "half", "colour"])
@pytest.mark.parametrize("textures", [1, 4])
def test_learnability_samples_put_one_square_where_the_answer_says(question, textures):
    learnability = _load("synthetic_position_accuracy")
    config = SimpleNamespace(grid_size=(6, 6), semantic_depth=2, pixel_depth=3)
    rng = np.random.default_rng(0)
    answers = set()
    for _ in range(40):
        semantic, pixel, answer = learnability.make_sample(rng, config, question, block=2, textures=textures)
        assert semantic.shape == (6, 6, 2) and pixel.shape == (6, 6, 3)
        square = torch.isin(pixel[..., 0], torch.tensor(learnability.CODES))
        rows, cols = square.nonzero(as_tuple=True)
        assert int(square.sum()) == 4 and int(rows.max() - rows.min()) == 1 and int(cols.max() - cols.min()) == 1
        assert len(torch.unique(pixel[~square][:, 0])) <= textures
        centre_row, centre_col = rows.float().mean(), cols.float().mean()
        expected = {
            "side": int(centre_col >= 2.5),
            "half": int(centre_row >= 2.5),
            "colour": learnability.CODES.index(int(pixel[rows[0], cols[0], 0])),
        }[question]
        assert answer == expected
        answers.add(answer)
    assert answers == {0, 1}


def test_learnability_script_trains_and_scores(chain, capsys):
    learnability = _load("synthetic_position_accuracy")
    result = learnability.main([str(chain["align"]), "--position", "gated", "--steps", "2", "--block", "1"])
    assert 0.0 <= result["accuracy"] <= 1.0
    out = capsys.readouterr().out
    assert "step    2  loss" in out and "held-out accuracy on 256 fresh samples" in out
    with pytest.raises(SystemExit):
        learnability.main([str(chain["align"]), "--block", "99", "--steps", "1"])


def test_position_diagnosis_runs_on_a_trained_model(chain):
    diagnosis = _load("vqa_position_diagnosis")
    found = diagnosis.main([str(chain["understand"]), "--scenes", "9", "--probe-scenes", "24"])
    assert all(0.0 <= value <= 1.0 for value in found["accuracy"].values())
    layers = 2  # the fixture's LM
    assert found["attention"].shape[0] == layers and np.isfinite(found["attention"]).all()
    for name in ("answer position", "object-centre slot"):  # after the input and after each layer
        assert len(found["probes"][name]) == layers + 1 and all(0 <= v <= 1 for v in found["probes"][name])
    assert set(found["mirror"]) == {"code grid mirrored", "another scene"}


def test_grounding_report_measures_every_layer(chain, data):
    report = _load("grounding_report").main(
        [str(chain["understand"]), "--conversations", str(data["val_llava"]), "--codes", str(data["val_codes"])]
        + ["--questions", "8"]
    )
    layers = 2  # the fixture's LM
    masses = [report[f"mass_layer{layer}_{name}"] for layer in range(layers) for name in ("head0", "mean_of_heads")]
    assert all(0 < mass < 1 for mass in masses) and report["val_answer_loss"] > 0
    assert 0 <= report["vqa_all"] <= 1


class _Copying:
    """A stand-in tokenizer whose decoder returns the image it was given (or a blank one)."""

    def __init__(self, blank: bool = False) -> None:
        self.blank = blank

    def encode(self, images: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(pixel_codes=images)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(codes) if self.blank else codes


def test_checker_ceiling_passes_true_drawings_and_fails_blank_ones(data, capsys):
    from training.data.shapes import ShapesWorld, ShapesWorldConfig
    from training.tiny_mllm import t2i_world_config

    ceiling = _load("checker_ceiling")
    worlds = [t2i_world_config(name, 0, 32, 8) for name in ("grid", "canonical")]  # 4-pixel cells: room for two
    worlds.append(t2i_world_config("slots", 0, 64, 8))  # two objects side by side need the full 64 pixels
    for config in (ShapesWorldConfig(image_size=32), *worlds):
        exact = ceiling.ceiling(_Copying(), ShapesWorld(config), 24)
        # Even draws are single-object scenes; odd ones hold 1-3 objects (three are skipped).
        assert exact["1_objects_scenes"] >= 12 and exact["2_objects_scenes"] >= 1
        assert exact["1_objects_scenes"] + exact["2_objects_scenes"] <= 24
        assert exact["1_objects"] >= 0.9 and exact["all"] >= 0.85  # the checker knows the world's own images
        assert ceiling.ceiling(_Copying(blank=True), ShapesWorld(config), 24)["all"] == 0.0
    found = ceiling.main([str(data["visual_tokenizer"]), "--scenes", "4"])
    assert set(found) == {"default", "grid", "canonical", "slots"} and all(0.0 <= found[w]["all"] <= 1.0 for w in found)
    assert "grid     one object" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        ceiling.main([str(data["visual_tokenizer"]), "--scenes", "1"])
