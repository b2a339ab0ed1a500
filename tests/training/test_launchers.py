"""Launchers, gradient accumulation and the DeepSpeed JSON.

The fast tests check the pieces in this process: which process a launcher's variables (torchrun,
``deepspeed --local_rank``, SLURM's ``srun``) make this one, the device it picks, how the
step-indexed samplers split a step into micro-batches, the plain engine's accumulation, and how a
DeepSpeed JSON's ``"auto"`` entries are filled or its contradictions refused.

The slow tests launch the LLM ``joint`` stage (micro LM from ``tests/mllm_fixtures.py``,
text-to-image batches only, fp32) as a user would, and compare the ``train/`` scalars of
``metrics.jsonl`` with a 1-process run of micro-batch 4:

- ``scripts/train_slurm.sbatch`` with 2 tasks (``srun`` and ``scontrol`` stood in for by small
  scripts that set ``SLURM_PROCID`` / ``SLURM_LOCALID`` as srun does), plain PyTorch, micro-batch 1,
  accumulation 2;
- 2 processes started by the ``deepspeed`` launcher (``--local_rank``), ZeRO-2 with the optimizer
  offloaded to DeepSpeed's CPU Adam (``configs/deepspeed/zero2_offload.json``), micro-batch 1,
  accumulation 2;
- the same under ``torchrun``, killed by ``DUALTOKEN_FAULT_AT`` as it starts to save step 3, then
  started again: it resumes from step 2 and must log what the uninterrupted run logged (to the
  last bits of DeepSpeed's CPU Adam, see ``RESUME_RTOL``).

Why the runs can be compared: a step's global batch (micro-batch x processes x accumulation = 4
sequences) is drawn from ``(seed, step)`` alone and micro-batch m of rank r is its slice
``m x world + r`` (``training.common.StepIndexedSampler``), so all runs train on the same four
sequences at every step. Text-to-image sequences have the same number of targets each, so the
mean of per-micro-batch losses is the 4-sequence loss; each micro-batch's gradient counts 1/2 and
the processes average theirs, which is the 4-sequence gradient.

The first DeepSpeed use compiles its CPU ops (the shared-memory communication op and CPU Adam,
2-5 min each) into ``TORCH_EXTENSIONS_DIR``; later launches load them from there.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mllm_fixtures import REPO, stage_overrides

from tokenizer.config import ConfigError
from tokenizer.devices import DeviceError
from training import cli, distributed, launcher
from training.common import StepSampler, steps_of
from training.config import DeepSpeedConfig, OptimConfig, read_yaml
from training.deepspeed_json import TrainShape, deepspeed_json
from training.mllm_data import MixtureSampler
from training.optimizers import MuonAdamW

JOINT_CONFIG = REPO / "configs" / "stages" / "tiny" / "joint.yaml"
DEEPSPEED_DIR = REPO / "configs" / "deepspeed"
LAUNCH_TIMEOUT_S = 900  # a first launch may compile DeepSpeed's CPU ops
STEPS = 4
LOSS_KEYS = ("loss", "text", "pixel", "grad_norm", "lr")
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARIABLES = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


# ------------------------------------------------------------------------------ launch variables
@pytest.fixture
def clean_launch_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No launcher variables; whatever the code under test exports is undone afterwards."""
    saved = dict(os.environ)
    for name in LAUNCHER_VARIABLES + SLURM_VARIABLES:
        os.environ.pop(name, None)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_srun_variables_stand_in_for_torchruns(clean_launch_env: pytest.MonkeyPatch) -> None:
    clean_launch_env.setenv("SLURM_PROCID", "5")
    clean_launch_env.setenv("SLURM_NTASKS", "8")
    clean_launch_env.setenv("SLURM_LOCALID", "1")
    clean_launch_env.setenv("SLURM_JOB_NODELIST", "gpu[03-04,09]")
    launcher.adopt_slurm_environment()
    found = {name: os.environ.get(name) for name in LAUNCHER_VARIABLES}
    assert found == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": None,
        "MASTER_ADDR": "gpu03",
        "MASTER_PORT": launcher.DEFAULT_MASTER_PORT,
    }


def test_torchrun_variables_win_over_sruns(clean_launch_env: pytest.MonkeyPatch) -> None:
    # `srun torchrun ...`: every torchrun worker inherits srun's SLURM_PROCID of the node's one task.
    clean_launch_env.setenv("SLURM_PROCID", "0")
    clean_launch_env.setenv("SLURM_NTASKS", "2")
    clean_launch_env.setenv("RANK", "3")
    clean_launch_env.setenv("WORLD_SIZE", "4")
    launcher.adopt_slurm_environment()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("3", "4")


@pytest.mark.parametrize(
    ("nodelist", "first"), [("node17", "node17"), ("a[1-3]", "a1"), ("gpu-[007,012]", "gpu-007"), ("x1,y2", "x1")]
)
def test_the_master_is_the_first_host_of_the_node_list(nodelist: str, first: str) -> None:
    assert launcher._first_host(nodelist) == first


def test_bad_slurm_variables_are_named(clean_launch_env: pytest.MonkeyPatch) -> None:
    clean_launch_env.setenv("SLURM_PROCID", "zero")
    with pytest.raises(ValueError, match="SLURM variables .*SLURM_PROCID.*must be integers"):
        launcher.adopt_slurm_environment()


def test_init_distributed_reads_srun_variables(clean_launch_env: pytest.MonkeyPatch) -> None:
    clean_launch_env.setenv("SLURM_PROCID", "0")
    clean_launch_env.setenv("SLURM_NTASKS", "1")
    clean_launch_env.setenv("SLURM_LOCALID", "0")
    state = distributed.init_distributed(device="cpu")
    assert (state.rank, state.world_size, state.local_rank, state.device) == (0, 1, 0, torch.device("cpu"))
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"  # one task: no node list needed


def test_a_process_alone_runs_on_the_device_it_names(clean_launch_env: pytest.MonkeyPatch) -> None:
    assert distributed.init_distributed(device="cpu").device == torch.device("cpu")
    assert distributed.init_distributed(device="auto").device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="--device cuda: this machine has no CUDA GPU"):
            distributed.init_distributed(device="cuda")


def test_under_a_launcher_each_process_takes_its_own_gpu(clean_launch_env: pytest.MonkeyPatch) -> None:
    # Which device is picked, not a run on it: torch.cuda answers as on a 2-GPU node.
    clean_launch_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_launch_env.setattr(torch.cuda, "device_count", lambda: 2)
    clean_launch_env.setattr(torch.cuda, "current_device", lambda: 0)
    assert launcher.launch_device("auto", 0) == torch.device("cuda", 0)  # alone: an indexed device
    clean_launch_env.setenv("RANK", "1")
    clean_launch_env.setenv("WORLD_SIZE", "2")
    assert launcher.launch_device("auto", 1) == torch.device("cuda", 1)
    assert launcher.launch_device("cuda", 1) == torch.device("cuda", 1)
    assert launcher.launch_device("cpu", 1) == torch.device("cpu")
    with pytest.raises(ValueError, match="LOCAL_RANK=2 but this node has 2 CUDA GPU"):
        launcher.launch_device("auto", 2)


@pytest.mark.parametrize("command", ["train-teacher", "train-tokenizer", "train-mllm"])
def test_every_trainer_takes_local_rank_and_device(command: str, capsys: pytest.CaptureFixture) -> None:
    assert cli.main([command, "--local_rank", "0", "--help"]) == 0
    assert "--local_rank" in capsys.readouterr().out
    assert cli.main([command, "--local_rank", "0", "--device", "cpu", "--help"]) == 0
    assert "--device" in capsys.readouterr().out


def test_python_m_trainer_takes_local_rank_and_device() -> None:
    # What the deepspeed launcher runs: `python -u -m training.<trainer> --local_rank=N <args>`.
    result = subprocess.run(
        [sys.executable, "-m", "training.train_mllm", "--local_rank", "0", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--local_rank" in result.stdout and "--device" in result.stdout


# ------------------------------------------------------------------------------ samplers
def _mixture(batch_size: int, start: int, world: int, rank: int, accumulation: int) -> MixtureSampler:
    dataset = SimpleNamespace(names=["vqa", "t2i"], weights=[0.5, 0.5], sizes=[40, 30])
    return MixtureSampler(dataset, batch_size, 3, start, 6, rank, world, accumulation)


def _step_sampler(batch_size: int, start: int, world: int, rank: int, accumulation: int) -> StepSampler:
    return StepSampler(50, batch_size, 3, start, 6, rank, world, accumulation)


@pytest.mark.parametrize("make", [_mixture, _step_sampler])
def test_micro_batches_of_every_rank_make_the_global_batch(make) -> None:
    whole = list(make(4, 0, 1, 0, 1))  # 1 process x micro-batch 4
    split = [list(make(1, 0, 2, rank, 2)) for rank in range(2)]  # 2 processes x 1 x 2 micro-batches
    for step in range(6):
        micro_batches = [items for rank in range(2) for items in split[rank][2 * step : 2 * step + 2]]
        assert sorted(item for items in micro_batches for item in items) == sorted(whole[step])


@pytest.mark.parametrize("make", [_mixture, _step_sampler])
def test_a_resumed_sampler_yields_the_same_micro_batches(make) -> None:
    uninterrupted, resumed = list(make(2, 0, 2, 1, 3)), list(make(2, 4, 2, 1, 3))
    assert len(uninterrupted) == 18 and len(resumed) == 6
    assert resumed == uninterrupted[12:]


# ------------------------------------------------------------------------------ the plain engine
def _engine(accumulation: int) -> distributed.TrainEngine:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return distributed.TrainEngine(model, optimizer, None, grad_clip=0.05, accumulation=accumulation)


def test_the_plain_engine_accumulates_to_the_full_batch_step() -> None:
    inputs, targets = torch.randn(3, 8, 6), torch.randn(3, 8, 3)
    whole, split = _engine(1), _engine(2)
    for step in range(3):
        loss = torch.nn.functional.mse_loss(whole(inputs[step]), targets[step])
        whole.backward(loss)
        norm = whole.step()
        norms = []
        for half in (slice(0, 4), slice(4, 8)):
            split.backward(torch.nn.functional.mse_loss(split(inputs[step, half]), targets[step, half]))
            norms.append(split.step())
        assert norms[0] is None, "the optimizer stepped before the last micro-batch"
        assert norms[1] == pytest.approx(norm, rel=1e-5)
        for expected, actual in zip(whole.module.parameters(), split.module.parameters(), strict=True):
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_muon_is_refused_under_deepspeed_naming_the_fix() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    matrices = [model[0].weight, model[1].weight]
    biases = [model[0].bias, model[1].bias]
    optimizer = MuonAdamW([{"params": matrices, "use_muon": True}, {"params": biases, "use_muon": False}], lr=0.1)
    with pytest.raises(ConfigError, match="optim.name=adamw"):
        distributed.TrainEngine(model, optimizer, None, 1.0, DeepSpeedConfig(enabled=True))


def test_offload_refuses_an_optimizer_cpu_adam_cannot_replace() -> None:
    model = torch.nn.Linear(4, 2)
    config = DeepSpeedConfig(enabled=True, offload_optimizer=True)
    with pytest.raises(ConfigError, match="CPU Adam, which cannot stand in for SGD"):
        distributed.TrainEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), None, 1.0, config)


def test_configs_that_enable_deepspeed_do_not_use_muon() -> None:
    enabled = []
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        data = read_yaml(path)
        if not (data.get("deepspeed") or {}).get("enabled"):
            continue
        enabled.append(path.name)
        for section in ("optim", "discriminator_optim"):
            name = (data.get(section) or {}).get("name", OptimConfig.name)
            assert name != "muon", f"{path}: deepspeed.enabled=true with {section}.name=muon"
    assert enabled, "no config enables DeepSpeed"


# ------------------------------------------------------------------------------ the DeepSpeed JSON
SHAPE = TrainShape(micro_batch=2, accumulation=4, world_size=8, grad_clip=1.0, bf16=True, on_gpu=True)


def _write(tmp_path: Path, payload: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(payload))
    return str(path)


def test_auto_entries_are_filled_from_the_typed_config() -> None:
    config = DeepSpeedConfig(enabled=True, config_path=str(DEEPSPEED_DIR / "zero3_offload.json"))
    payload = deepspeed_json(config, SHAPE)
    assert payload["train_micro_batch_size_per_gpu"] == 2
    assert payload["gradient_accumulation_steps"] == 4
    assert payload["train_batch_size"] == 2 * 4 * 8
    assert payload["gradient_clipping"] == 1.0 and payload["bf16"] == {"enabled": True}
    assert payload["zero_optimization"]["stage"] == 3  # the file's stage: deepspeed.zero_stage is unset
    assert payload["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}


def test_without_a_file_the_json_is_generated() -> None:
    payload = deepspeed_json(DeepSpeedConfig(enabled=True, offload_optimizer=True), SHAPE)
    assert payload["zero_optimization"]["stage"] == 2
    assert payload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert payload["train_batch_size"] == 64


@pytest.mark.parametrize(
    ("payload", "typed", "message"),
    [
        ({"train_micro_batch_size_per_gpu": 16}, {}, r"train_micro_batch_size_per_gpu=16 contradicts loop.batch_size"),
        ({"gradient_accumulation_steps": 1}, {}, r"gradient_accumulation_steps=1 contradicts loop.grad_accumulation"),
        ({"train_batch_size": 32}, {}, r"train_batch_size=32 contradicts loop.batch_size x loop.grad_accumulation"),
        (
            {"zero_optimization": {"stage": 3}},
            {"zero_stage": 2},
            r"zero_optimization.stage=3 contradicts deepspeed.zero",
        ),
        (
            {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
            {"offload_optimizer": False},
            r"offload_optimizer.device=\"cpu\" contradicts deepspeed.offload_optimizer=false",
        ),
        ({"optimizer": {"type": "Adam"}}, {}, r"remove the 'optimizer' section; the optimizer .* come from optim"),
        (
            {"zero_optimization": {"reduce_bucket_size": "auto"}},
            {},
            r"give zero_optimization.reduce_bucket_size a value",
        ),
    ],
)
def test_a_contradicting_file_is_refused_by_name(tmp_path: Path, payload: dict, typed: dict, message: str) -> None:
    config = DeepSpeedConfig(enabled=True, config_path=_write(tmp_path, payload), **typed)
    with pytest.raises(ConfigError, match=message) as caught:
        deepspeed_json(config, SHAPE)
    assert str(tmp_path / "ds.json") in str(caught.value)


def test_a_missing_or_broken_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"deepspeed.config_path=.*nowhere.json does not exist"):
        deepspeed_json(DeepSpeedConfig(enabled=True, config_path=str(tmp_path / "nowhere.json")), SHAPE)
    (tmp_path / "ds.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"ds.json is not valid JSON"):
        deepspeed_json(DeepSpeedConfig(enabled=True, config_path=str(tmp_path / "ds.json")), SHAPE)


# ------------------------------------------------------------------------------ real launches
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES + SLURM_VARIABLES}
    env.pop("DUALTOKEN_FAULT_AT", None)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dualtoken" / "torch_extensions"))
    # CPU even on a GPU machine: two ranks must not share one GPU.
    env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@dataclass
class Run:
    output_dir: Path
    log: str

    def records(self) -> dict[int, dict[str, float]]:
        """``{step: {name: value}}`` of the ``train/`` scalars; a step logged again (after a resume) keeps its last record."""
        by_step: dict[int, dict[str, float]] = {}
        for line in (self.output_dir / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "train/loss" in record:
                by_step[record["step"]] = {k[len("train/") :]: v for k, v in record.items() if k.startswith("train/")}
        return by_step


def _arguments(
    data: dict[str, Path], output_dir: Path, batch_size: int, accumulation: int, extra: list[str]
) -> list[str]:
    overrides = [*stage_overrides(data, output_dir, None, STEPS), f"loop.batch_size={batch_size}"]
    overrides += [f"loop.grad_accumulation={accumulation}", "loop.precision=fp32", "optim.name=adamw", "data.mix.vqa=0"]
    arguments = ["--config", str(JOINT_CONFIG), "--device", "cpu"]
    for override in overrides + extra:
        arguments += ["--set", override]
    return arguments


def _launch(commands: list[list[str]], envs: list[dict[str, str]], output_dir: Path, expect_ok: bool = True) -> Run:
    """Start every command at once (one per process, or one launcher) and wait for all of them."""
    output_dir.mkdir(parents=True, exist_ok=True)
    processes = [
        subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for command, env in zip(commands, envs, strict=True)
    ]
    outputs, codes = [], []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=LAUNCH_TIMEOUT_S)[0])
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
        codes.append(process.returncode)
    log = "\n".join(outputs)
    with (output_dir / "launch.log").open("a") as handle:
        handle.write(log)
    if expect_ok:
        assert codes == [0] * len(codes), f"{commands[0][:6]} failed ({codes}):\n{log[-4000:]}"
    else:
        assert any(code != 0 for code in codes), f"{commands[0][:6]} was expected to be killed:\n{log[-3000:]}"
    return Run(output_dir, log)


def _torchrun(arguments: list[str], output_dir: Path, nproc: int, fault: str | None = None) -> Run:
    env = _environment() | {"NPROC": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    if fault:
        env["DUALTOKEN_FAULT_AT"] = fault
    command = ["bash", str(REPO / "scripts" / "train_mllm.sh"), *arguments]
    return _launch([command], [env], output_dir, expect_ok=fault is None)


# Stand-ins for SLURM's tools on a machine without SLURM: `scontrol show hostnames` prints the
# node list as it is, `srun` starts SLURM_NTASKS copies of its command on this host with the
# variables srun gives each task, and fails when one of them fails.
FAKE_SCONTROL = 'echo "$3"\n'
FAKE_SRUN = """\
shift  # --kill-on-bad-exit=1
pids=()
for ((task = 0; task < SLURM_NTASKS; task++)); do
    SLURM_PROCID=$task SLURM_LOCALID=$task "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""


def _sbatch(arguments: list[str], output_dir: Path, ntasks: int) -> Run:
    """``scripts/train_slurm.sbatch`` as sbatch runs it on one node with ``ntasks`` tasks."""
    tools = output_dir / "slurm_bin"
    tools.mkdir(parents=True)
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (tools / name).write_text("#!/usr/bin/env bash\n" + body)
        (tools / name).chmod(0o755)
    env = _environment() | {
        "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_SUBMIT_DIR": str(REPO),
        "MASTER_PORT": str(_free_port()),
    }
    command = ["bash", str(REPO / "scripts" / "train_slurm.sbatch"), "train_mllm", *arguments]
    return _launch([command], [env], output_dir)


def _deepspeed_launcher(arguments: list[str], output_dir: Path, nproc: int) -> Run:
    runner = Path(sys.executable).parent / "deepspeed"
    command = [str(runner), "--num_gpus", str(nproc), "--master_port", str(_free_port())]
    command += ["--module", "training.train_mllm", *arguments]
    return _launch([command], [_environment()], output_dir)


def _assert_steps_close(expected: Run, actual: Run, steps: list[int], rtol: float) -> None:
    reference, records = expected.records(), actual.records()
    for step in steps:
        for key in LOSS_KEYS:
            want, got = reference[step][key], records[step][key]
            assert math.isfinite(got) and abs(got - want) <= rtol * abs(want), (
                f"step {step} train/{key}: {got} vs {want} (|diff|={abs(got - want):.3g}, rtol={rtol})"
            )


# 1 process x micro-batch 4 vs 2 processes x 1 x accumulation 2, plain PyTorch: measured <= 1.5e-7
# relative (float32 sums in another order). Negative controls, 1 process x 2 x accumulation 2: a
# loss not scaled by 1 / accumulation doubles grad_norm (+100 %); micro-batches that repeat one
# slice instead of covering the global batch move the loss by 2e-4 at step 1 and 1.5e-2 at step 3.
ACCUMULATION_RTOL = 1e-5
# The same under ZeRO-2 with DeepSpeed's CPU Adam (its own vectorised Adam, not torch's AdamW):
# measured <= 4.4e-7 relative over 4 steps (the deepspeed launcher and torchrun give identical runs).
OFFLOAD_RTOL = 1e-5
# Killed at step 3's checkpoint and resumed vs uninterrupted: step 3 identical, step 4 within
# 2.2e-7 relative (grad_norm). DeepSpeed's CPU Adam keeps beta^t as a running float32 product in
# a process that steps on, and computes it with pow() in one that starts at step t
# (csrc/includes/cpu_adam.h), so its bias correction after a restart differs in the last bits.
# A resume that loses the Adam moments moves step 4 by > 1e-3 (test_mllm_deepspeed.py).
RESUME_RTOL = 1e-6

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, data: dict[str, Path]) -> Run:
    output_dir = tmp_path_factory.mktemp("reference")
    return _torchrun(_arguments(data, output_dir, 4, 1, []), output_dir, 1)


@pytest.mark.slow
def test_sbatch_with_accumulation_matches_one_process(tmp_path: Path, data: dict[str, Path], reference: Run) -> None:
    run = _sbatch(_arguments(data, tmp_path, 1, 2, []), tmp_path, 2)
    assert sorted(run.records()) == list(range(1, STEPS + 1)), "a step is one optimizer update, not a micro-batch"
    _assert_steps_close(reference, run, list(range(1, STEPS + 1)), ACCUMULATION_RTOL)


OFFLOAD = ["deepspeed.enabled=true", f"deepspeed.config_path={DEEPSPEED_DIR / 'zero2_offload.json'}"]


@pytest.fixture(scope="module")
def offload_run(tmp_path_factory: pytest.TempPathFactory, data: dict[str, Path]) -> Run:
    output_dir = tmp_path_factory.mktemp("offload")
    return _deepspeed_launcher(_arguments(data, output_dir, 1, 2, OFFLOAD), output_dir, 2)


@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_launcher_zero2_offload_with_accumulation_matches_one_process(
    reference: Run, offload_run: Run
) -> None:
    assert "ZeRO-2 with DeepSpeedCPUAdam, 2 micro-batches per step" in offload_run.log
    assert sorted(offload_run.records()) == list(range(1, STEPS + 1))
    _assert_steps_close(reference, offload_run, list(range(1, STEPS + 1)), OFFLOAD_RTOL)


@pytest.mark.slow
@needs_deepspeed
def test_a_killed_accumulating_run_resumes_exactly(tmp_path: Path, data: dict[str, Path], offload_run: Run) -> None:
    arguments = _arguments(data, tmp_path, 1, 2, OFFLOAD)
    killed = _torchrun(arguments, tmp_path, 2, fault="step_0000003.staging:1")
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert max(killed.records()) == 3, "the kill came before step 3 was trained"
    resumed = _torchrun(arguments, tmp_path, 2)
    assert "(step 2)" in resumed.log, "the second launch did not resume from step 2"
    _assert_steps_close(offload_run, resumed, [3, 4], RESUME_RTOL)


def test_steps_of_groups_micro_batches_by_optimizer_step() -> None:
    assert list(steps_of(iter(range(6)), 3)) == [[0, 1, 2], [3, 4, 5]]
    assert list(steps_of(iter(range(4)), 1)) == [[0], [1], [2], [3]]


# ------------------------------------------------------------------------------ the image trainers
ACCUMULATE = ["loop.batch_size=4", "loop.grad_accumulation=2", "loop.save_every=2"]


def test_the_teacher_and_tokenizer_loops_count_optimizer_steps_and_resume_exactly(tmp_path: Path) -> None:
    """Stage 0 and stage 1 with 2 micro-batches per step: 4 steps straight vs 2 then extended to 4.

    Every step is logged once (a step is an optimizer update, not a micro-batch), and the
    extended run continues the straight one exactly (same micro-batches, moments and schedule).
    """
    from test_training import GAN_SETS, SHORT_WARMUP_SETS, _assert_resume_is_exact, teacher_argv, tokenizer_argv

    from training import train_teacher, train_tokenizer

    teacher_sets = [*ACCUMULATE, SHORT_WARMUP_SETS[0]]
    for name, steps in (("straight", 4), ("resumed", 2), ("resumed", 4)):
        train_teacher.main(teacher_argv(tmp_path / "stage0" / name, *teacher_sets, f"loop.max_steps={steps}"))
    _assert_resume_is_exact(tmp_path / "stage0" / "straight", tmp_path / "stage0" / "resumed", "stage0/loss")

    teacher = tmp_path / "stage0" / "straight" / train_teacher.TEACHER_DIRNAME
    tokenizer_sets = [*ACCUMULATE, *GAN_SETS, *SHORT_WARMUP_SETS]
    for name, steps in (("straight", 4), ("resumed", 2), ("resumed", 4)):
        output_dir = tmp_path / "stage1" / name
        train_tokenizer.main(tokenizer_argv(output_dir, teacher, *tokenizer_sets, f"loop.max_steps={steps}"))
    _assert_resume_is_exact(tmp_path / "stage1" / "straight", tmp_path / "stage1" / "resumed", "train/total")
