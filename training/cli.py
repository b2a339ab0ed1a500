"""The ``dualtoken`` command: one entry point, one subcommand per job.

    dualtoken train-teacher   --config configs/tokenizer/tiny_teacher.yaml
    dualtoken train-tokenizer --config configs/tokenizer/tiny.yaml [--set key=value ...]
    dualtoken tokenize        --tokenizer DIR --images a.png b.png -o codes.safetensors
    dualtoken reconstruct     --tokenizer DIR --images a.png -o grid.png
    dualtoken tiny-pipeline   (stage 0 + stage 1 on the embedded default, then the report)
    dualtoken ablate          --teacher runs/tiny/stage0/teacher (the paper's codebook ablation)
    dualtoken make-data       --split train --limit 20000 --out runs/tiny/data/train
    dualtoken tokenize-codes  --tokenizer DIR --llava .../llava.json --t2i .../t2i.jsonl --out .../codes
    dualtoken train-mllm      --config configs/stages/tiny/understand.yaml
    dualtoken serve           runs/tiny/mllm/joint/model --port 8000 (the OpenAI API)

Errors a user can fix (bad config, missing file, bad image, bad option, an output path that
cannot be written) print one clear line and exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable

from tokenizer.config import ConfigError
from training.config import CheckpointWriteError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train-teacher": ("training.train_teacher", "stage 0: train a small SigLIP teacher from scratch"),
    "train-tokenizer": ("training.train_tokenizer", "stage 1: train the DualToken tokenizer"),
    "tokenize": ("training.tokenize_images", "encode images into pixel and semantic codes"),
    "reconstruct": ("training.tokenize_images", "encode + decode images and save a comparison grid"),
    "tiny-pipeline": ("training.tiny_pipeline", "the embedded default end to end: stage 0, stage 1, report"),
    "ablate": ("training.ablation", "dual vs shared codebook vs reconstruction only, side by side"),
    "make-data": ("training.data.conversations", "write the Shapes world as LLaVA conversations + text-image pairs"),
    "tokenize-codes": ("training.data.code_shards", "tokenise a dataset's images once into code shards"),
    "check-data": ("training.check_data", "list every bad image of a training config's data (exit 2 if any)"),
    "train-mllm": ("training.train_mllm", "one LLM stage (align / understand / generate / joint)"),
    "chat": ("mllm.commands", "chat about images (/image PATH, /imagine PROMPT)"),
    "generate": ("mllm.commands", "draw images from a text prompt"),
    "serve": ("mllm.serving.commands", "an OpenAI-compatible HTTP API on a model folder (chat, images)"),
    "web": ("mllm.serving.commands", "a web page (chat with images, drawing) plus the same API"),
    "eval": ("eval.harness", "score a model on registered tasks (results JSON + Markdown)"),
    "tiny-mllm": ("training.tiny_mllm", "LLM half of the embedded default: data, codes, 4 stages, scores"),
}

# Entry functions that are not a module's ``main``.
_ENTRY_NAMES = {
    "tokenize": "tokenize_main",
    "reconstruct": "reconstruct_main",
    "chat": "chat_main",
    "generate": "generate_main",
    "serve": "serve_main",
    "web": "web_main",
}


def _usage() -> str:
    lines = ["usage: dualtoken <command> [options]", "", "commands:"]
    lines += [f"  {name:<16} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    lines += ["", "Run `dualtoken <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"dualtoken: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[command][0])
    entry: Callable[[list[str]], object] = getattr(module, _ENTRY_NAMES.get(command, "main"))
    try:
        entry(rest)
    except SystemExit as exit_request:
        # argparse exits for `--help` (0) and bad flags (2); hand the status back so
        # `main` always returns it, as its signature says, instead of raising.
        code = exit_request.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    except (ConfigError, ValueError, CheckpointWriteError, OSError) as error:
        # ValueError covers the project's input errors (ImageLoadError, PipelineError, OutputPathError,
        # MetadataError ...); OSError a path the checks could not foresee (a disk that fills up, a
        # folder removed mid-run, FileNotFoundError for a missing input).
        logging.getLogger("dualtoken").debug("fatal", exc_info=True)
        message = " / ".join(str(error).splitlines())  # one line, whatever the error's text holds
        print(f"dualtoken {command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
