"""``dualtoken serve`` / ``dualtoken web`` refuse a bad flag or model folder with one line and
status 2, before anything binds a port."""

from __future__ import annotations

import pytest

from training import cli


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--max-batch", "0"], "--max-batch=0"),
        (["--max-queue", "0"], "--max-queue=0"),
        (["--timeout", "0"], "--timeout=0"),
        (["--port", "70000"], "--port=70000"),
        (["--max-images", "0"], "--max-images=0"),
        (["--device", "nonsense"], "--device 'nonsense'"),
        (["--compile", "fast"], "--compile 'fast'; expected one of default, reduce-overhead"),
    ],
)
@pytest.mark.parametrize("command", ["serve", "web"])
def test_a_bad_flag_is_one_line_and_status_2(chain, command, argv, expected, capsys) -> None:
    assert cli.main([command, str(chain["joint"]), *argv]) == 2
    error = capsys.readouterr().err.strip()
    assert expected in error and len(error.splitlines()) == 1, error


def test_a_missing_model_folder_is_named(tmp_path, capsys) -> None:
    assert cli.main(["serve", str(tmp_path / "missing"), "--device", "cpu"]) == 2
    error = capsys.readouterr().err.strip()
    assert "missing" in error and "does not exist" in error and len(error.splitlines()) == 1, error


def test_serve_and_web_are_listed(capsys) -> None:
    assert cli.main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert "  serve " in listed and "  web " in listed
