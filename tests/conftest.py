import pathlib
import sys

# Tests run from a clean checkout too (before `pip install -e .`), so the repo root is importable.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402


@pytest.fixture(scope="package")
def data(tmp_path_factory):
    """Tiny DualToken tokenizer + Shapes train/val data + code shards (tests/mllm_fixtures.py)."""
    import torch
    from mllm_fixtures import make_mllm_data

    torch.set_num_threads(1)
    return make_mllm_data(tmp_path_factory.mktemp("mllm_data"))


@pytest.fixture(scope="package")
def chain(data, tmp_path_factory):
    """The four tiny LLM stages, 2 steps each, each from the previous stage's model folder."""
    from mllm_fixtures import REPO, stage_overrides

    from training import train_mllm

    root = tmp_path_factory.mktemp("chain")
    folders = {}
    previous = None
    for stage in ("align", "understand", "generate", "joint"):
        argv = ["--config", str(REPO / "configs" / "stages" / "tiny" / f"{stage}.yaml")]
        for override in stage_overrides(data, root / stage, previous):
            argv += ["--set", override]
        metrics = train_mllm.main(argv)
        assert metrics["steps"] == 2 and metrics["trainable_parameters"] > 0
        previous = folders[stage] = root / stage / "model"
    return folders
