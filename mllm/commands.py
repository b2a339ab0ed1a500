"""``dualtoken chat`` and ``dualtoken generate``: the Pipeline from a terminal.

    dualtoken generate "a large red circle above a small blue square" -o out.png --n 4 --seed 0
    dualtoken chat --model runs/tiny/mllm/joint/model

``generate`` draws ``--batch-size`` images at a time and writes each batch's PNGs as it comes,
so ``--n`` is bounded by the disk, not by memory; a run of several batches shows its progress.
In chat, ``/image PATH`` attaches an image (the conversation restarts around it), a plain
line asks about it (earlier turns are kept as history), ``/imagine PROMPT`` draws and saves
a PNG, ``/reset`` forgets the history, ``/help`` lists the commands, ``/quit`` leaves. A line
that starts with ``/`` is always a command, never a question for the model. A bad line (an
unreadable image, text that is not UTF-8, an unknown command) prints one ``error:`` line and
the chat goes on. On a terminal the chat shows a ``you>`` prompt; library notices (deprecation
warnings, progress bars) are kept out of it.

Both commands check their options and output paths before the model is loaded, so a bad flag
or a file in the way of the output fails at once, with one line, instead of after sampling.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

import numpy as np

from mllm.generation import COMPILE_MODES
from mllm.inference import Pipeline
from mllm.request_checks import PipelineError, check_prompt, check_sampling, decode_text
from tokenizer.devices import add_device_argument, resolve_device
from tokenizer.files import atomic_output, check_output_dir, check_output_file

DEFAULT_BATCH_SIZE = 8  # images sampled together; with guidance on, each adds an unconditional row
_LISTED_PATHS = 16  # up to this many images each written path is printed; beyond it, one summary line
INPUT_PROMPT = "you> "
CHAT_HELP = """commands:
  /image PATH       attach an image (starts a new conversation about it)
  /imagine PROMPT   draw an image from PROMPT and save it as a PNG
  /reset            forget the image and the conversation
  /help             show this list
  /quit             leave (also /exit, or Ctrl-D)
anything else is a question about the attached image (or a text-only question)"""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _save_images(images: list[np.ndarray], paths: list[Path]) -> None:
    from PIL import Image

    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(images, paths, strict=True):
        with atomic_output(path) as temporary:  # never a half-written PNG under the real name
            Image.fromarray(image).save(temporary, format="PNG")


def output_paths(output: Path, count: int) -> list[Path]:
    """Where ``count`` images go: ``output`` itself for one, ``stem_0.png``, ``stem_1.png`` ... for more."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{index}{output.suffix or '.png'}") for index in range(count)]


def _sampling_arguments(parser: argparse.ArgumentParser) -> None:
    # Left out, each comes from the model folder's sampling.json (written by tiny-mllm with the
    # settings it scored the model with), else cfg 3, temperature 1, no top-k / top-p.
    parser.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--top-k", type=int, default=None, help="0 = off")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--decode-depths", type=int, default=None, help="draw only the first RVQ depths of the codes (default: all)"
    )


def _check_sampling_flags(args: argparse.Namespace) -> None:
    """Refuse a bad sampling flag before the model is loaded (the ones left out are checked with it)."""
    given = {name: getattr(args, name) for name in ("cfg", "top_k", "top_p", "temperature")}
    defaults = {"cfg": 1.0, "top_k": 0, "top_p": 1.0, "temperature": 1.0}  # stand-ins for the flags left out
    check_sampling(**{name: defaults[name] if value is None else value for name, value in given.items()}, label=_flag)
    if args.seed < 0:
        raise PipelineError(f"--seed={args.seed}; expected an integer >= 0")
    if args.decode_depths is not None and args.decode_depths < 1:
        raise PipelineError(f"--decode-depths={args.decode_depths}; expected an integer >= 1 (or leave it out: all)")


def _sampling_options(args: argparse.Namespace) -> dict[str, float | int | None]:
    return {"cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p, "temperature": args.temperature}


def add_compile_argument(parser: argparse.ArgumentParser) -> None:
    """``--compile [MODE]``: decode through ``torch.compile`` (:func:`mllm.generation.compile_mode_for`)."""
    parser.add_argument(
        "--compile",
        nargs="?",
        const=True,
        default=False,
        metavar="MODE",
        help="compile the decoding steps with torch.compile (CUDA graphs on CUDA; MODE: "
        f"{', '.join(COMPILE_MODES)}); the first answer or image pays the compilation",
    )


def check_compile_flag(value: bool | str) -> None:
    """Refuse an unknown ``--compile`` mode before any model loads."""
    if isinstance(value, str) and value not in COMPILE_MODES:
        raise ValueError(f"--compile {value!r}; expected one of {', '.join(COMPILE_MODES)}")


def _load_pipeline(args: argparse.Namespace) -> Pipeline:
    """The model folder's pipeline on ``--device``; the weight-loading bar shows on a terminal only,
    so a log or a pipe gets the command's own lines and not carriage-return bars."""
    from transformers.utils import logging as hf_logging

    quiet = hf_logging.is_progress_bar_enabled() and not sys.stderr.isatty()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        device = resolve_device(args.device)
        return Pipeline.from_pretrained(args.model, args.tokenizer, device=device, compile=args.compile)
    finally:
        if quiet:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_library_notices() -> Iterator[None]:
    """Keep the libraries' notices (transformers deprecation messages, Python warnings) out of the
    command's output while it runs: the user did nothing to cause them and cannot act on them."""
    import warnings

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def generate_main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="dualtoken generate", description="Draw images from a text prompt.")
    parser.add_argument("prompt")
    parser.add_argument("-o", "--output", required=True, help="PNG path (with --n > 1: name_0.png, name_1.png, ...)")
    parser.add_argument("--model", default="runs/tiny/mllm/joint/model", help="a model folder from train-mllm")
    parser.add_argument("--tokenizer", default=None, help="DualToken tokenizer folder (default: the model's)")
    parser.add_argument("--n", type=int, default=1, help="images to draw")
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images sampled together; each batch is saved"
    )
    _sampling_arguments(parser)
    add_device_argument(parser)
    add_compile_argument(parser)
    args = parser.parse_args(argv)
    check_compile_flag(args.compile)
    if args.n < 1:
        raise PipelineError(f"--n={args.n}; expected an integer >= 1")
    if args.batch_size < 1:
        raise PipelineError(f"--batch-size={args.batch_size}; expected an integer >= 1")
    _check_sampling_flags(args)
    prompt = check_prompt(args.prompt, "prompt")
    paths = output_paths(Path(args.output), args.n)
    for path in paths:
        check_output_file(path, "-o/--output")
    resolve_device(args.device)  # a device the machine lacks fails before the model loads
    with quiet_library_notices():
        return _draw(args, prompt, paths)


def _draw(args: argparse.Namespace, prompt: str, paths: list[Path]) -> list[Path]:
    from tqdm import tqdm

    pipe = _load_pipeline(args)
    pipe.check_decode_depths(args.decode_depths, "--decode-depths")
    batches = pipe.generate_batches(
        prompt,
        n=args.n,
        batch_size=args.batch_size,
        seed=args.seed,
        decode_depths=args.decode_depths,
        **_sampling_options(args),
    )
    written = 0
    with tqdm(total=args.n, desc="drawing", unit="image", disable=args.n <= args.batch_size) as progress:
        for images in batches:
            _save_images(images, paths[written : written + len(images)])
            written += len(images)
            progress.update(len(images))
    if len(paths) <= _LISTED_PATHS:
        for path in paths:
            print(f"wrote {path}")
    else:
        print(f"wrote {len(paths)} images: {paths[0]} ... {paths[-1]}")
    return paths


def _read_lines(lines: Iterable[str | bytes], out: TextIO, prompt: str) -> Iterator[str | bytes]:
    """``lines`` one at a time, with ``prompt`` written (and flushed) before each is read."""
    iterator = iter(lines)
    while True:
        if prompt:
            out.write(prompt)
            out.flush()
        try:
            yield next(iterator)
        except StopIteration:
            if prompt:
                out.write("\n")  # Ctrl-D leaves the cursor after the prompt
            return


def chat_loop(
    pipe: Pipeline, lines: Iterable[str | bytes], out: TextIO, args: argparse.Namespace, prompt: str = ""
) -> None:
    """Run the chat over ``lines`` (text, or raw bytes that are decoded one line at a time),
    writing ``prompt`` before each line is read."""
    image = None
    history: list[tuple[str, str]] = []
    drawn = 0
    print("type a question, or /help for the commands", file=out)
    for number, raw in enumerate(_read_lines(lines, out, prompt), start=1):
        try:
            line = decode_text(raw, f"input line {number}").strip()
            if not line:
                continue
            command, _, argument = line.partition(" ") if line.startswith("/") else ("", "", line)
            argument = argument.strip()
            if command in ("/quit", "/exit"):
                break
            if command == "/help":
                print(CHAT_HELP, file=out)
            elif command == "/reset":
                image, history = None, []
                print("(history cleared)", file=out)
            elif command == "/image":
                if not argument:
                    raise PipelineError("/image needs a path: /image PATH")
                image = pipe._image_tensor(argument)  # loads and checks it now, with a clear error
                history = []
                print(f"(attached {argument})", file=out)
            elif command == "/imagine":
                if not argument:
                    raise PipelineError("/imagine needs a prompt: /imagine PROMPT")
                images = pipe.generate(
                    argument, seed=args.seed + drawn, decode_depths=args.decode_depths, **_sampling_options(args)
                )
                drawn += 1
                path = Path(args.out_dir) / f"imagine_{drawn:03d}.png"
                _save_images(images, [path])
                print(f"(saved {path})", file=out)
            elif command:
                raise PipelineError(f"unknown command {command}; /help lists the commands")
            else:
                answer = pipe.answer(image, line, history=history)
                history.append((line, answer))
                print(answer, file=out)
        except (ValueError, OSError) as error:  # PipelineError, ImageLoadError, a file that vanished ...
            print(f"error: {error}", file=out)


def chat_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dualtoken chat", description="Multi-turn chat about images; /imagine draws.")
    parser.add_argument("--model", default="runs/tiny/mllm/joint/model", help="a model folder from train-mllm")
    parser.add_argument("--tokenizer", default=None, help="DualToken tokenizer folder (default: the model's)")
    parser.add_argument("--out-dir", default="chat_images", help="where /imagine saves PNGs")
    _sampling_arguments(parser)
    add_device_argument(parser)
    add_compile_argument(parser)
    args = parser.parse_args(argv)
    check_compile_flag(args.compile)
    _check_sampling_flags(args)
    check_output_dir(args.out_dir, "--out-dir")
    resolve_device(args.device)  # a device the machine lacks fails before the model loads
    with quiet_library_notices():
        pipe = _load_pipeline(args)
        pipe.check_decode_depths(args.decode_depths, "--decode-depths")
        prompt = INPUT_PROMPT if sys.stdin.isatty() and sys.stdout.isatty() else ""
        # Bytes, decoded line by line: one line that is not UTF-8 is reported, not the end of the chat.
        chat_loop(pipe, getattr(sys.stdin, "buffer", sys.stdin), sys.stdout, args, prompt=prompt)
