"""``dualtoken chat`` and ``dualtoken generate``: the Pipeline from a terminal.

    dualtoken generate "a large red circle above a small blue square" -o out.png --n 4 --seed 0
    dualtoken chat --model runs/tiny/mllm/joint/model

In chat, ``/image PATH`` attaches an image (the conversation restarts around it), a plain
line asks about it (earlier turns are kept as history), ``/imagine PROMPT`` draws and saves
a PNG, ``/reset`` forgets the history, ``/quit`` leaves.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

import numpy as np

from mllm.inference import Pipeline, PipelineError
from tokenizer.files import atomic_output


def _save_images(images: list[np.ndarray], output: Path) -> list[Path]:
    from PIL import Image

    output.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1:
        paths = [output]
    else:
        paths = [output.with_name(f"{output.stem}_{index}{output.suffix or '.png'}") for index in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        with atomic_output(path) as temporary:  # never a half-written PNG under the real name
            Image.fromarray(image).save(temporary, format="PNG")
    return paths


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


def generate_main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="dualtoken generate", description="Draw images from a text prompt.")
    parser.add_argument("prompt")
    parser.add_argument("-o", "--output", required=True, help="PNG path (with --n > 1: name_0.png, name_1.png, ...)")
    parser.add_argument("--model", default="runs/tiny/mllm/joint/model", help="a model folder from train-mllm")
    parser.add_argument("--tokenizer", default=None, help="DualToken tokenizer folder (default: the model's)")
    parser.add_argument("--n", type=int, default=1, help="images to draw")
    _sampling_arguments(parser)
    args = parser.parse_args(argv)
    pipe = Pipeline.from_pretrained(args.model, args.tokenizer)
    images = pipe.generate(
        args.prompt,
        n=args.n,
        cfg=args.cfg,
        top_k=args.top_k,
        top_p=args.top_p,
        temperature=args.temperature,
        seed=args.seed,
        decode_depths=args.decode_depths,
    )
    paths = _save_images(images, Path(args.output))
    for path in paths:
        print(f"wrote {path}")
    return paths


def chat_loop(pipe: Pipeline, lines: TextIO, out: TextIO, args: argparse.Namespace) -> None:
    image = None
    history: list[tuple[str, str]] = []
    drawn = 0
    print("commands: /image PATH, /imagine PROMPT, /reset, /quit; anything else is a question", file=out)
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        try:
            if line in ("/quit", "/exit"):
                break
            if line == "/reset":
                image, history = None, []
                print("(history cleared)", file=out)
            elif line.startswith("/image"):
                path = line[len("/image") :].strip()
                image = pipe._image_tensor(path)  # loads and checks it now, with a clear error
                history = []
                print(f"(attached {path})", file=out)
            elif line.startswith("/imagine"):
                prompt = line[len("/imagine") :].strip()
                images = pipe.generate(
                    prompt,
                    cfg=args.cfg,
                    top_k=args.top_k,
                    top_p=args.top_p,
                    temperature=args.temperature,
                    seed=args.seed + drawn,
                    decode_depths=args.decode_depths,
                )
                drawn += 1
                path = _save_images(images, Path(args.out_dir) / f"imagine_{drawn:03d}.png")[0]
                print(f"(saved {path})", file=out)
            else:
                answer = pipe.answer(image, line, history=history)
                history.append((line, answer))
                print(answer, file=out)
        except (PipelineError, ValueError, FileNotFoundError) as error:
            print(f"error: {error}", file=out)


def chat_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dualtoken chat", description="Multi-turn chat about images; /imagine draws.")
    parser.add_argument("--model", default="runs/tiny/mllm/joint/model", help="a model folder from train-mllm")
    parser.add_argument("--tokenizer", default=None, help="DualToken tokenizer folder (default: the model's)")
    parser.add_argument("--out-dir", default="chat_images", help="where /imagine saves PNGs")
    _sampling_arguments(parser)
    args = parser.parse_args(argv)
    pipe = Pipeline.from_pretrained(args.model, args.tokenizer)
    chat_loop(pipe, sys.stdin, sys.stdout, args)
