"""The device helpers: what ``--device`` resolves to, and the attention kernel chosen for it."""

import argparse

import pytest
import torch

from tokenizer.devices import (
    DeviceError,
    add_device_argument,
    autocast,
    pick_attn_implementation,
    resolve_device,
)


def test_auto_resolves_to_cuda_only_when_present():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("meta") == torch.device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_names_the_flag():
    with pytest.raises(DeviceError, match=r"--device cuda: this machine has no CUDA GPU"):
        resolve_device("cuda")


def test_unknown_device_is_a_clear_error():
    with pytest.raises(DeviceError, match=r"--device 'gpu0': not a device"):
        resolve_device("gpu0")


def test_device_flag_defaults_to_auto():
    parser = argparse.ArgumentParser()
    add_device_argument(parser)
    assert parser.parse_args([]).device == "auto"
    assert parser.parse_args(["--device", "cpu"]).device == "cpu"


def test_flash_attention_only_on_cuda_in_half_precision():
    assert pick_attn_implementation("auto", "cpu", torch.bfloat16) == "sdpa"
    assert pick_attn_implementation("auto", "cpu", torch.float32) == "sdpa"
    assert pick_attn_implementation("eager", "cpu", torch.float32) == "eager"
    with pytest.raises(ValueError, match="flash_attention_2 needs a CUDA device"):
        pick_attn_implementation("flash_attention_2", "cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="expected one of"):
        pick_attn_implementation("flash3", "cpu", torch.float32)


def test_flash_attention_is_picked_on_cuda_bf16_when_installed(monkeypatch):
    import tokenizer.devices as devices

    monkeypatch.setattr(devices, "flash_attention_available", lambda: True)
    monkeypatch.setattr(devices, "resolve_device", lambda requested: torch.device("cuda"))
    assert devices.pick_attn_implementation("auto", "cuda", torch.bfloat16) == "flash_attention_2"
    assert devices.pick_attn_implementation("auto", "cuda", torch.float32) == "sdpa"
    monkeypatch.setattr(devices, "flash_attention_available", lambda: False)
    assert devices.pick_attn_implementation("auto", "cuda", torch.bfloat16) == "sdpa"


def test_autocast_is_a_no_op_off_cuda():
    layer = torch.nn.Linear(4, 4)
    with autocast("cpu"):
        out = layer(torch.ones(1, 4))
    assert out.dtype == torch.float32
