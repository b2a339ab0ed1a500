"""The chat's own commands (/help, /image, /imagine, /reset, /quit), its input prompt, its quiet
output, and ``--device`` on ``chat`` and ``generate``; on the ``chain`` fixture's joint model."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mllm.commands import CHAT_HELP, INPUT_PROMPT, chat_loop
from training import cli

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pipe(chain):
    from mllm.inference import Pipeline

    return Pipeline.from_pretrained(chain["joint"], device="cpu")


@pytest.fixture
def asked(pipe, monkeypatch) -> list[str]:
    """The questions that reach the model."""
    questions: list[str] = []
    answer = pipe.answer

    def recording(image, question, history=None, **options):
        questions.append(question)
        return answer(image, question, history=history, **options)

    monkeypatch.setattr(pipe, "answer", recording)
    return questions


def run_chat(pipe, text: str, tmp_path: Path, prompt: str = "") -> list[str]:
    out = io.StringIO()
    args = argparse.Namespace(
        cfg=None, top_k=None, top_p=None, temperature=None, seed=0, decode_depths=None, out_dir=str(tmp_path / "drawn")
    )
    chat_loop(pipe, io.StringIO(text), out, args, prompt=prompt)
    return out.getvalue().splitlines()


def test_slash_lines_are_commands_and_never_reach_the_model(pipe, asked, tmp_path) -> None:
    lines = run_chat(
        pipe, "/help\n/frobnicate now\n/imagine\n/image\nwhat shapes are there?\n/quit\nnever read\n", tmp_path
    )
    assert lines[1 : 1 + len(CHAT_HELP.splitlines())] == CHAT_HELP.splitlines()
    rest = lines[1 + len(CHAT_HELP.splitlines()) :]
    assert rest[0] == "error: unknown command /frobnicate; /help lists the commands"
    assert rest[1] == "error: /imagine needs a prompt: /imagine PROMPT"
    assert rest[2] == "error: /image needs a path: /image PATH"
    assert asked == ["what shapes are there?"]  # the one plain line; nothing after /quit
    assert len(rest) == 4


def test_imagine_reset_and_image_do_what_help_says(pipe, asked, tmp_path) -> None:
    from PIL import Image

    picture = tmp_path / "scene.png"
    Image.new("RGB", (32, 32), "red").save(picture)
    lines = run_chat(pipe, f"/image {picture}\nwhat is it?\n/imagine a red circle\n/reset\nwhat is it?\n", tmp_path)
    assert lines[1] == f"(attached {picture})"
    assert lines[3] == f"(saved {tmp_path / 'drawn' / 'imagine_001.png'})"
    assert Image.open(tmp_path / "drawn" / "imagine_001.png").size == (32, 32)
    assert lines[4] == "(history cleared)"
    assert asked == ["what is it?", "what is it?"]


def test_the_prompt_is_shown_before_every_line(pipe, tmp_path) -> None:
    out = run_chat(pipe, "/help\n/reset\n", tmp_path, prompt=INPUT_PROMPT)
    text = "\n".join(out)
    assert text.count(INPUT_PROMPT) == 3  # before each of the two lines, and before the end of input


def test_the_chat_command_prints_no_library_notices(chain) -> None:
    """A real process: warnings a library prints once per process would hide from an in-process test."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "default"}
    done = subprocess.run(
        [sys.executable, "-m", "training.cli", "chat", "--model", str(chain["joint"]), "--device", "cpu"],
        input="what shapes are there?\n/quit\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "type a question, or /help for the commands"
    assert len(done.stdout.splitlines()) == 2  # the header and the answer; no prompt when not a terminal
    for notice in ("Warning", "deprecated", "[transformers]"):
        assert notice not in done.stderr, done.stderr


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="needs a machine without a cuda:7")
def test_a_device_the_machine_lacks_is_refused_before_loading(chain, tmp_path, capsys) -> None:
    for argv in (
        ["chat", "--model", str(chain["joint"]), "--device", "cuda:7"],
        [
            "generate",
            "a red circle",
            "-o",
            str(tmp_path / "x.png"),
            "--model",
            str(chain["joint"]),
            "--device",
            "cuda:7",
        ],
    ):
        assert cli.main(argv) == 2
        error = capsys.readouterr().err
        assert "--device cuda:7" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_generate_runs_on_the_device_it_is_given(chain, tmp_path) -> None:
    out = tmp_path / "cpu.png"
    assert (
        cli.main(["generate", "a red circle", "-o", str(out), "--model", str(chain["joint"]), "--device", "cpu"]) == 0
    )
    assert out.is_file()
