"""Every bad input is one line that names it, before any work starts, and leaves no file behind.

The command cases run ``dualtoken`` in-process (``training.cli.main``) and check the exit status
(2), that stderr is exactly one line naming the flag, argument or path at fault, and that the
temporary folder holds the same files with the same modification times afterwards. Where the
input can be judged before the model is loaded, loading it fails the test; the Python API cases
fail the test if a model runs. The models are the tiny ones of ``tests/mllm_fixtures.py``.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizer.files import OutputPathError, check_output_dir, check_output_file
from tokenizer.images import ImageLoadError, load_image
from training import cli

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "train-teacher": REPO / "configs" / "tokenizer" / "tiny_teacher.yaml",
    "train-tokenizer": REPO / "configs" / "tokenizer" / "tiny.yaml",
    "train-mllm": REPO / "configs" / "stages" / "tiny" / "joint.yaml",
}


# ------------------------------------------------------------------------------ helpers
def _snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every file and folder under ``root``: kind, size and modification time."""
    found = {}
    for path in root.rglob("*"):
        stat = path.lstat()
        found[str(path.relative_to(root))] = ("dir" if path.is_dir() else "file", stat.st_size, stat.st_mtime_ns)
    return found


def _refused(argv: list[str], root: Path, capsys: pytest.CaptureFixture, *fragments: str) -> str:
    """Run ``dualtoken argv``; assert exit 2, one stderr line holding ``fragments``, ``root`` untouched."""
    capsys.readouterr()
    before = _snapshot(root)
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"dualtoken {argv[0]}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert _snapshot(root) == before
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a model folder or a visual tokenizer is loaded."""
    from mllm.inference import Pipeline
    from tokenizer.model import DualTokenizer

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded for an input that could be judged without it")

    monkeypatch.setattr(Pipeline, "from_pretrained", refuse)
    monkeypatch.setattr(DualTokenizer, "from_pretrained", refuse)


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a trainer gets past its start (process groups come before any model)."""
    from training import distributed

    def refuse(*args, **kwargs):
        raise AssertionError("the trainer started for an output folder it cannot write")

    monkeypatch.setattr(distributed, "init_distributed", refuse)


@pytest.fixture
def locked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A folder nobody may write to. Root writes anywhere, so there ``os.access`` answers for
    this folder as it would for an ordinary user (the checks ask ``os.access``)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real_access = os.access

        def access(path, mode, *args, **kwargs):
            if mode & os.W_OK and Path(path) == folder:
                return False
            return real_access(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
    yield folder
    folder.chmod(0o755)


@pytest.fixture
def blocker(tmp_path: Path) -> Path:
    """A plain file where a folder is expected."""
    path = tmp_path / "taken.txt"
    path.write_text("not a folder")
    return path


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    path = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def pipe(chain):
    from mllm.inference import Pipeline

    return Pipeline.from_pretrained(chain["joint"])


@pytest.fixture
def no_model_work(pipe, monkeypatch: pytest.MonkeyPatch):
    """The pipeline, with every model call turned into a test failure."""
    import mllm.inference

    def refuse(*args, **kwargs):
        raise AssertionError("the model ran for an input that should have been refused first")

    monkeypatch.setattr(mllm.inference, "generate_image_codes", refuse)
    monkeypatch.setattr(mllm.inference, "generate_text", refuse)
    monkeypatch.setattr(pipe.visual_tokenizer, "encode", refuse)
    return pipe


# ------------------------------------------------------------------------------ generate
@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--n", "0"], ["--n=0", "expected an integer >= 1"]),
        (["--batch-size", "0"], ["--batch-size=0"]),
        (["--cfg", "nan"], ["--cfg=nan", "finite"]),
        (["--cfg", "inf"], ["--cfg=inf", "finite"]),
        (["--cfg", "-1"], ["--cfg=-1.0", "[0, "]),
        (["--temperature", "nan"], ["--temperature=nan", "finite"]),
        (["--temperature", "-0.5"], ["--temperature=-0.5"]),
        (["--top-p", "1.5"], ["--top-p=1.5", "(0, 1]"]),
        (["--top-p", "0"], ["--top-p=0.0", "(0, 1]"]),
        (["--top-k", "-1"], ["--top-k=-1", ">= 0"]),
        (["--seed", "-3"], ["--seed=-3"]),
        (["--decode-depths", "0"], ["--decode-depths=0"]),
    ],
)
def test_generate_bad_option(flags, fragments, tmp_path, capsys, no_model_load):
    argv = ["generate", "a red circle", "-o", str(tmp_path / "out.png"), "--model", "unused", *flags]
    _refused(argv, tmp_path, capsys, *fragments)


def test_generate_bad_output_paths(tmp_path, capsys, no_model_load, blocker, locked):
    base = ["generate", "a red circle", "--model", "unused"]
    folder = tmp_path / "a_folder.png"
    folder.mkdir()
    _refused([*base, "-o", str(folder)], tmp_path, capsys, "-o/--output", str(folder), "is a folder")
    inside_file = blocker / "out.png"
    _refused([*base, "-o", str(inside_file)], tmp_path, capsys, "-o/--output", str(blocker), "is a file")
    _refused([*base, "-o", str(locked / "out.png")], tmp_path, capsys, str(locked), "not writable")
    # With --n 3 the images are out_0.png ... out_2.png: a folder named like the second is in the way.
    (tmp_path / "many_1.png").mkdir()
    _refused([*base, "-o", str(tmp_path / "many.png"), "--n", "3"], tmp_path, capsys, "many_1.png", "is a folder")


def test_generate_bad_prompt_is_refused_before_sampling(chain, tmp_path, capsys, monkeypatch):
    import mllm.inference

    def refuse(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(mllm.inference, "generate_image_codes", refuse)
    base = ["--model", str(chain["joint"]), "-o", str(tmp_path / "out.png")]
    # Undecodable bytes on the command line reach Python as lone surrogates.
    _refused(["generate", "a red \udcff circle", *base], tmp_path, capsys, "not valid UTF-8", "byte 0xff at position 6")
    _refused(["generate", "   ", *base], tmp_path, capsys, "empty prompt")
    _refused(["generate", "x" * 2001, *base], tmp_path, capsys, "2,001 characters", "the limit is 2,000")
    _refused(["generate", "a " * 700, *base], tmp_path, capsys, "the prompt", "longer than the model's context of 512")
    # 504 positions fit the context of 512, but not with the image's 16 slots after them.
    _refused(["generate", "red " * 500, *base], tmp_path, capsys, "takes 504 positions", "16 slots", "context of 512")
    _refused(["generate", "a red circle", *base, "--decode-depths", "9"], tmp_path, capsys, "--decode-depths=9")


def test_generate_writes_each_batch_as_it_comes(chain, tmp_path, capsys, monkeypatch):
    from mllm.inference import Pipeline

    written_before_batch = []
    sample_codes = Pipeline._sample_codes

    def counting(self, prompts, seeds, sampling, use_cache):
        written_before_batch.append(len(list((tmp_path / "batched").glob("*.png"))))
        return sample_codes(self, prompts, seeds, sampling, use_cache)

    monkeypatch.setattr(Pipeline, "_sample_codes", counting)
    common = ["generate", "a red circle", "--model", str(chain["joint"]), "--n", "5", "--seed", "7"]
    assert cli.main([*common, "-o", str(tmp_path / "batched" / "img.png"), "--batch-size", "2"]) == 0
    assert written_before_batch == [0, 2, 4]  # each batch's PNGs are on disk before the next is drawn
    assert "drawing" in capsys.readouterr().err  # the progress bar of a run of several batches
    assert cli.main([*common, "-o", str(tmp_path / "whole" / "img.png")]) == 0
    for index in range(5):  # the same seeds, so the same images whatever the batch size
        batched = np.asarray(Image.open(tmp_path / "batched" / f"img_{index}.png"))
        whole = np.asarray(Image.open(tmp_path / "whole" / f"img_{index}.png"))
        assert (batched == whole).all()


# ------------------------------------------------------------------------------ chat
def test_chat_bad_start(chain, tmp_path, capsys, no_model_load, blocker, locked):
    base = ["chat", "--model", str(chain["joint"])]
    _refused([*base, "--out-dir", str(blocker)], tmp_path, capsys, "--out-dir", str(blocker), "is a file")
    _refused([*base, "--out-dir", str(locked / "pictures")], tmp_path, capsys, "--out-dir", "not writable")
    _refused([*base, "--cfg", "inf"], tmp_path, capsys, "--cfg=inf")
    _refused([*base, "--top-p", "-1"], tmp_path, capsys, "--top-p=-1.0")


def test_chat_bad_lines_are_reported_and_the_chat_goes_on(chain, tmp_path, capsys, monkeypatch, picture):
    folder = tmp_path / "not_a_picture"
    folder.mkdir()
    script = b"".join(
        [
            b"what is \xff this?\n",  # not UTF-8
            f"/image {folder}\n".encode(),
            b"/image\n",
            f"/image {picture}\n".encode(),
            b"what colour is the circle?\n",
            b"/quit\n",
        ]
    )
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(script)))
    capsys.readouterr()
    assert cli.main(["chat", "--model", str(chain["joint"]), "--out-dir", str(tmp_path / "drawn")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "error: the input line 1 is not valid UTF-8: byte 0xff at position 8"
    assert lines[2].startswith("error: ") and lines[2].endswith(f"{folder} is a directory, not an image")
    assert lines[3] == "error: /image needs a path: /image PATH"
    assert lines[4] == f"(attached {picture})"
    assert len(lines) == 6 and not lines[5].startswith("error")  # the question after the errors is answered
    assert not (tmp_path / "drawn").exists()


# ------------------------------------------------------------------------------ tokenize / reconstruct
def test_tokenize_and_reconstruct_bad_inputs(data, tmp_path, capsys, picture, blocker):
    tokenizer = str(data["visual_tokenizer"])
    folder = tmp_path / "album"
    folder.mkdir()
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (32, 32), (255, 0, 0, 128)).save(rgba)
    tokenize = ["tokenize", "--tokenizer", tokenizer, "--images"]
    reconstruct = ["reconstruct", "--tokenizer", tokenizer, "--images"]
    _refused([*tokenize, str(picture), "-o", str(folder)], tmp_path, capsys, "-o/--output", "is a folder")
    _refused(
        [*tokenize, str(picture), "-o", str(blocker / "c.safetensors")], tmp_path, capsys, str(blocker), "is a file"
    )
    _refused(
        [*tokenize, str(folder), "-o", str(tmp_path / "c.safetensors")], tmp_path, capsys, f"{folder} is a directory"
    )
    _refused([*tokenize, str(picture), "-o", str(tmp_path / "c.pt")], tmp_path, capsys, "c.pt", ".safetensors")
    _refused(
        [*tokenize, str(rgba), "-o", str(tmp_path / "c.safetensors"), "--strict"],
        tmp_path,
        capsys,
        str(rgba),
        "mode 'RGBA'",
        "leave out --strict",
    )
    _refused([*reconstruct, str(picture), "-o", str(tmp_path / "grid.file")], tmp_path, capsys, "'.file'")
    _refused([*reconstruct, str(folder), "-o", str(tmp_path / "grid.png")], tmp_path, capsys, "is a directory")


# ------------------------------------------------------------------------------ tokenize-codes and the trainers
def test_tokenize_codes_bad_out(data, tmp_path, capsys, no_model_load, blocker, locked):
    base = ["tokenize-codes", "--tokenizer", str(data["visual_tokenizer"]), "--llava", str(data["val_llava"])]
    _refused([*base, "--out", str(blocker)], tmp_path, capsys, "--out", str(blocker), "is a file")
    _refused([*base, "--out", str(locked / "codes")], tmp_path, capsys, "--out", str(locked), "not writable")


@pytest.mark.parametrize("command", sorted(SETTINGS))
def test_trainer_bad_output_dir(command, tmp_path, capsys, no_training, blocker, locked):
    base = [command, "--config", str(SETTINGS[command]), "--set"]
    _refused([*base, f"loop.output_dir={blocker}"], tmp_path, capsys, "loop.output_dir", str(blocker), "is a file")
    _refused([*base, f"loop.output_dir={blocker}/run"], tmp_path, capsys, "loop.output_dir", "cannot be created")
    _refused([*base, f"loop.output_dir={locked}/run"], tmp_path, capsys, "loop.output_dir", "not writable")


# ------------------------------------------------------------------------------ Python API: Pipeline
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: p.generate([]), "prompts is empty"),
        (lambda p: p.generate(b"a red \xff circle"), "not valid UTF-8: byte 0xff at position 6"),
        (lambda p: p.generate(["a red circle", 7]), "prompt at prompts[1] is a int; expected a str"),
        (lambda p: p.generate("a red circle", cfg=float("inf")), "cfg=inf; expected a finite number"),
        (lambda p: p.generate("a red circle", temperature=float("nan")), "temperature=nan"),
        (lambda p: p.generate("a red circle", top_p=0.0), "top_p=0.0; expected a number in (0, 1]"),
        (lambda p: p.generate("a red circle", top_k=-2), "top_k=-2"),
        (lambda p: p.generate("a red circle", n=0), "n=0; expected an integer >= 1"),
        (lambda p: p.generate("a red circle", n=2.5), "n=2.5"),
        (lambda p: p.generate("a red circle", seed=-1), "seed=-1"),
        (lambda p: p.generate("a red circle", seeds=[1, 2]), "2 seeds for 1 images"),
        (lambda p: p.generate("a red circle", decode_depths=0), "decode_depths=0"),
        (lambda p: p.generate_batches("a red circle", n=4, batch_size=0), "batch_size=0"),
        (lambda p: p.answer(None, b"\xc3("), "question is not valid UTF-8: byte 0xc3 at position 0"),
        (lambda p: p.answer(None, "what?", history=[("a question",)]), "history[0] is ('a question',)"),
        (lambda p: p.answer(None, "what?", history="a question"), "history is a str; expected a list"),
        (lambda p: p.answer(None, "what?", history=[("", "red")]), "empty history[0] question"),
        (lambda p: p.answer(None, "what?", max_new_tokens=-1), "max_new_tokens=-1"),
        (lambda p: p.answer(None, "what?", max_new_tokens=10**9), "max_new_tokens=1000000000"),
        (lambda p: p.answer(None, "what?", max_new_tokens=510), "would run past the context"),
        (lambda p: p.answer_batch([], []), "questions is empty"),
        (lambda p: p.answer_batch([None], ["a", "b"]), "1 images, 2 questions"),
        (lambda p: p.answer(np.zeros((4, 4), np.uint8), "what?"), "images[0]: expected an (H, W, 3) uint8 image"),
    ],
)
def test_pipeline_refuses_before_any_model_work(no_model_work, call, message):
    from mllm.request_checks import PipelineError

    with pytest.raises(PipelineError) as caught:
        call(no_model_work)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_pipeline_counts_the_image_slots_against_the_context(no_model_work):
    """A prompt that fits the context alone but not with the image after it is refused."""
    from mllm.request_checks import PipelineError

    pipe = no_model_work
    context, slots = pipe.builder.max_length, pipe.model.config.image_slots
    words = 1
    while len(pipe.builder.generation("a " * words, train=False)) <= context - slots:
        words += 1
    assert len(pipe.builder.generation("a " * words, train=False)) <= context  # the prompt alone fits
    with pytest.raises(PipelineError, match=f"with the image's {slots} slots .* over the model's context of {context}"):
        pipe.generate("a " * words)


def test_pipeline_refuses_a_folder_as_an_image(no_model_work, tmp_path):
    with pytest.raises(ImageLoadError, match=f"{tmp_path} is a directory, not an image"):
        no_model_work.answer(str(tmp_path), "what is this?")


# ------------------------------------------------------------------------------ Python API: images and paths
def _encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


AWKWARD = {
    "L": lambda: _encoded(Image.new("L", (8, 8), 100)),
    "LA": lambda: _encoded(Image.new("LA", (8, 8), (100, 0))),
    "RGBA": lambda: _encoded(Image.new("RGBA", (8, 8), (255, 0, 0, 0))),
    "CMYK": lambda: _encoded(Image.new("CMYK", (8, 8), (0, 255, 0, 0)), "JPEG"),
    "P": lambda: _encoded(Image.new("RGB", (8, 8), (0, 0, 255)).convert("P")),
    "P-transparent": lambda: _encoded(Image.new("P", (8, 8), 0), transparency=0),
    "I;16": lambda: _encoded(Image.fromarray(np.full((8, 8), 40000, np.uint16))),
    "I": lambda: _encoded(Image.fromarray(np.full((8, 8), 70000, np.int32)), "TIFF"),
    "F": lambda: _encoded(Image.fromarray(np.full((8, 8), 0.5, np.float32)), "TIFF"),
}


@pytest.mark.parametrize("mode", sorted(AWKWARD))
def test_awkward_modes_convert_with_one_note_or_refuse_when_strict(mode, caplog):
    source = AWKWARD[mode]()
    name = f"awkward-{mode}.png"
    with caplog.at_level(logging.INFO, logger="tokenizer.images"):
        first = load_image(source, name=name, image_size=4)
        again = load_image(source, name=name, image_size=4)
    assert first.shape == (3, 4, 4) and torch.equal(first, again)
    notes = [record.getMessage() for record in caplog.records if name in record.getMessage()]
    assert len(notes) == 1 and "converted to RGB" in notes[0]  # once per file
    if mode in ("LA", "RGBA", "P-transparent"):  # fully transparent pixels come out white
        assert torch.equal(first, torch.ones(3, 4, 4))
    with pytest.raises(ImageLoadError, match="not 'RGB'; leave out --strict to convert it") as caught:
        load_image(source, name=name, image_size=4, strict=True, convert_hint="leave out --strict")
    assert name in str(caught.value)


def test_output_path_helpers_name_the_flag_and_create_nothing(tmp_path, blocker, locked):
    before = _snapshot(tmp_path)
    assert check_output_dir(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert check_output_file(tmp_path / "new" / "file.png", "-o") == tmp_path / "new" / "file.png"
    for check, path, message in (
        (check_output_dir, blocker, f"--flag {blocker}: {blocker} is a file, not a folder"),
        (check_output_dir, blocker / "a" / "b", f"{blocker} is a file, so {blocker / 'a' / 'b'} cannot be created"),
        (check_output_dir, locked, f"--flag {locked}: {locked} is not writable"),
        (check_output_file, tmp_path, f"--flag {tmp_path}: is a folder; expected a file name"),
        (check_output_file, locked / "x.png", f"{locked} is not writable"),
    ):
        with pytest.raises(OutputPathError) as caught:
            check(path, "--flag")
        assert message in str(caught.value)
    assert _snapshot(tmp_path) == before
