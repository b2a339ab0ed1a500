"""scripts/gpu_check.py: the paper-scale check's code path, run at tiny shapes on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_check_writes_every_number(tmp_path):
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dualtoken" / "torch_extensions")
        ),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage 1: warm-up step" in result.stderr and "wrote" in result.stderr  # progress is printed
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    deepspeed = importlib.util.find_spec("deepspeed") is not None
    assert report["zero"] == ("ZeRO-2" if deepspeed else "unavailable — deepspeed not installed: plain PyTorch")
    assert report["shapes"] == "tiny" and report["device"] and report["precision"] == "fp32"
    assert report["peak_flops_per_card"] is None and "H100" in report["peak_flops_assumed"]
    stage1, stage = report["tokenizer_stage1"], report["mllm_stage"]
    for numbers in (stage1, stage):
        assert numbers["steps"] == 2 and len(numbers["losses"]) == 2
        assert all(loss > 0 and loss == loss for loss in numbers["losses"])  # finite, positive
        for key in ("steps_per_s", "tokens_per_s", "peak_memory_gb", "model_flops", "achieved_flops_per_s"):
            assert numbers[key] > 0, key
        assert numbers["mfu"] is None  # no peak is assumed for a CPU
    assert stage1["tokens_per_image"] == 16 and stage1["images_per_s"] > 0
    assert stage1["reconstruct"]["images_per_s"] > 0
    assert stage["loss_chunk_size"] == 32 and stage["gradient_checkpointing"] is True
    assert stage["vocabulary_rows"] >= 256 + 2 * 1024  # the text vocabulary extended by both codebooks
    inference = report["inference"]
    assert inference["answer_latency_s"] > 0 and inference["answer_max_new_tokens"] == 16
    assert list(inference["seconds_per_generated_image"]) == ["eager"]  # compiled only on CUDA by default
    eager = inference["seconds_per_generated_image"]["eager"]
    assert set(eager) == {"batch_1", "batch_8", "batch_1_warm_up_s", "batch_8_warm_up_s"}
    assert all(seconds > 0 for seconds in eager.values())
    assert inference["image_slots"] == 16 and inference["slot_loop_host_syncs"].startswith("not checked")
    bound = inference["bandwidth_bound"]
    assert bound["weight_bytes_per_slot"] > 0 and bound["measured_copy_bandwidth_bytes_per_s"] > 0
    assert bound["seconds_per_image"] == pytest.approx(
        16 * bound["weight_bytes_per_slot"] / bound["measured_copy_bandwidth_bytes_per_s"]
    )
    assert inference["batch_1_over_bound"]["eager"] == pytest.approx(eager["batch_1"] / bound["seconds_per_image"])
    assert report["wall_s"] > 0


def test_without_deepspeed_the_check_says_so(monkeypatch):
    gpu_check = _load()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "deepspeed" else real(name))
    config, zero = gpu_check.deepspeed_config(gpu_check.parse_args(["--tiny", "--out", "x"]))
    assert not config.enabled and zero == "unavailable — deepspeed not installed: plain PyTorch"


def test_weights_must_be_local_folders(tmp_path, capsys):
    gpu_check = _load()
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(["--out", str(tmp_path), "--llm", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--llm=" in err and "no config.json" in err


def test_peak_flops_are_named_per_card(monkeypatch):
    gpu_check = _load()
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    flops, note = gpu_check.peak_flops(torch.device("cuda"))
    assert flops == 989e12 and "989 TFLOP/s" in note and "NVIDIA H200" in note
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert gpu_check.peak_flops(torch.device("cuda"))[0] is None
