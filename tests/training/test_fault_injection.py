"""Runs killed with SIGKILL at seeded random moments, resumed until they finish, end bit for bit
where an uninterrupted run ends (docs/reliability.md, "What resume promises").

A tiny stage-1 tokenizer run (GAN on: two engines; every pixel code restarted at every step, so
every step draws from the global torch generator) and a tiny LLM stage (LoRA with dropout 0.2:
every step draws dropout masks) are each killed three times and resumed with the same command.
A killed process is a fork of this one running the entry point's ``main(argv)`` with
``DUALTOKEN_FAULT_AT=TEXT:N`` set (:func:`training.fault_injection._install_fault_injection`): SIGKILL
at its N-th filesystem change on a path containing TEXT. Forks share this process's imports (7 s
per fresh interpreter on 2 busy cores); the run that finishes is a fresh
``python -m training.train_*`` process, so nothing in memory carries over to the end. The
moments: inside a periodic checkpoint save or its ``latest`` pointer (which save, and where in it,
drawn from the seed), inside the final checkpoint save, and inside the write of the final model
folder. Each next process resumes from what the kill left (no checkpoint at all, an earlier one, or
the final one). The saved weights must equal (``torch.equal``) those of an uninterrupted run in
this process, which never installs the hook.

The numbers of filesystem changes at each moment (``*_CHANGES``) are lower bounds counted on these
runs; a kill moment that is never reached fails the test by name.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mllm_fixtures import REPO, stage_overrides
from safetensors.torch import load_file
from test_training import GAN_SETS, SHORT_WARMUP_SETS, teacher_argv, tokenizer_argv

from training import fault_injection, train_mllm, train_teacher, train_tokenizer

# Draws the kill moments; every seed must pass (DUALTOKEN_FAULT_SEED=7 pytest ... tries another).
SEED = int(os.environ.get("DUALTOKEN_FAULT_SEED", "0"))
STEPS, SAVE_EVERY = 6, 2  # periodic checkpoints at steps 2 and 4, the final one at step 6
RUN_TIMEOUT_S = 300
# Lower bounds of the audited filesystem changes (folders made, files opened for writing, renames)
# of one save: a checkpoint's step folder (its staging folder, an engine folder, the trainer state,
# the manifest, the renames: 6 to 8 counted) and a model folder's staging folder (9 for the
# tokenizer, 18 for the LLM with its adapter).
CHECKPOINT_CHANGES = 5
MODEL_FOLDER_CHANGES = 7

LLM_SETS = [
    "lora.enabled=true",
    "lora.r=4",
    "lora.alpha=8",
    "lora.dropout=0.2",
    "eval.vqa_samples=0",
    f"loop.save_every={SAVE_EVERY}",
]
TOKENIZER_SETS = [
    *GAN_SETS,
    *SHORT_WARMUP_SETS,
    f"loop.save_every={SAVE_EVERY}",
    f"loop.max_steps={STEPS}",
    "tokenizer.pixel_quantizer.dead_code_threshold=1e6",
]


def kill_moments(seed: int, model_folder: str) -> list[str]:
    """``DUALTOKEN_FAULT_AT`` values, one per killed process, in order: inside a periodic checkpoint
    save (its step folder, or the ``latest`` pointer written after it), inside the final checkpoint
    save, inside the final model folder's write."""
    draw = random.Random(f"{seed}/{model_folder}")
    periodic = draw.choice(range(SAVE_EVERY, STEPS, SAVE_EVERY))
    if draw.random() < 0.5:
        first = f"step_{periodic:07d}:{draw.randint(1, CHECKPOINT_CHANGES)}"
    else:  # two changes per pointer (its partial file, the rename), counted from step 0
        first = f"latest:{2 * (periodic // SAVE_EVERY - 1) + draw.randint(1, 2)}"
    return [
        first,
        f"step_{STEPS:07d}:{draw.randint(1, CHECKPOINT_CHANGES)}",
        f".{model_folder}.partial:{draw.randint(1, MODEL_FOLDER_CHANGES)}",
    ]


def run_killed(main: Callable[[list[str]], object], argv: list[str], fault: str) -> None:
    """``main(argv)`` in a fork of this process that must die by SIGKILL at ``fault``."""

    def target() -> None:
        os.environ[fault_injection.FAULT_ENV] = fault
        main(argv)

    process = multiprocessing.get_context("fork").Process(target=target)
    process.start()
    process.join(RUN_TIMEOUT_S)
    if process.is_alive():
        process.kill()
        process.join()
    assert process.exitcode == -signal.SIGKILL, (
        f"{main.__module__} with {fault_injection.FAULT_ENV}={fault} exited with {process.exitcode}, expected "
        f"{-signal.SIGKILL} (the kill moment was never reached, or the resume failed; its log is above)"
    )


def run_to_the_end(module: str, argv: list[str]) -> None:
    """``python -m module argv`` in a fresh interpreter, without the hook; must finish."""
    env = {key: value for key, value in os.environ.items() if key != fault_injection.FAULT_ENV}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", module, *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"{module} did not finish after the kills:\n{result.stderr[-4000:]}"


def assert_same_weights(expected_file: Path, actual_file: Path) -> None:
    expected, actual = load_file(expected_file), load_file(actual_file)
    assert sorted(expected) == sorted(actual)
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, f"{len(different)} of {len(expected)} tensors differ after resuming, e.g. {different[:3]}"


def _argv(config: str, overrides: list[str]) -> list[str]:
    argv = ["--config", config]
    for override in overrides:
        argv += ["--set", override]
    return argv


def test_llm_stage_killed_anywhere_resumes_bit_for_bit(data: dict[str, Path], tmp_path: Path) -> None:
    config = str(REPO / "configs" / "stages" / "tiny" / "joint.yaml")

    def argv(output_dir: Path) -> list[str]:
        return _argv(config, stage_overrides(data, output_dir, steps=STEPS) + LLM_SETS)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train_mllm.main(argv(straight))
    for fault in kill_moments(SEED, train_mllm.MODEL_DIRNAME):
        run_killed(train_mllm.main, argv(killed), fault)
    run_to_the_end("training.train_mllm", argv(killed))
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        assert_same_weights(straight / train_mllm.MODEL_DIRNAME / name, killed / train_mllm.MODEL_DIRNAME / name)


def test_tokenizer_killed_anywhere_resumes_bit_for_bit(tmp_path: Path) -> None:
    teacher_dir = tmp_path / "stage0"
    train_teacher.main(teacher_argv(teacher_dir))
    teacher = teacher_dir / train_teacher.TEACHER_DIRNAME
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train_tokenizer.main(tokenizer_argv(straight, teacher, *TOKENIZER_SETS))
    for fault in kill_moments(SEED, train_tokenizer.TOKENIZER_DIRNAME):
        run_killed(train_tokenizer.main, tokenizer_argv(killed, teacher, *TOKENIZER_SETS), fault)
    run_to_the_end("training.train_tokenizer", tokenizer_argv(killed, teacher, *TOKENIZER_SETS))
    weights = Path(train_tokenizer.TOKENIZER_DIRNAME) / "model.safetensors"
    assert_same_weights(straight / weights, killed / weights)


@pytest.mark.parametrize("spec", ["no-count", "step_0000002:0", ":3"])
def test_a_bad_fault_spec_is_named(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fault_injection.FAULT_ENV, spec)
    with pytest.raises(ValueError, match=f"{fault_injection.FAULT_ENV}=.*expected TEXT:N"):
        fault_injection._install_fault_injection()
