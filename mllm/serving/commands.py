"""``dualtoken serve`` and ``dualtoken web``: the model behind an HTTP port.

    dualtoken serve runs/tiny/mllm/joint/model --port 8000
    dualtoken web runs/tiny/mllm/joint/model --port 7860

``serve`` answers the OpenAI API (:mod:`mllm.serving.app`); ``web`` adds the Gradio page at
``/`` to the same app, on the same model and batcher. Both bind 127.0.0.1 unless ``--host``
says otherwise. The API key comes from ``--api-key`` or the ``DUALTOKEN_API_KEY`` environment
variable. Ctrl-C (SIGINT) or SIGTERM stops taking requests and finishes the ones in flight.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from mllm.commands import quiet_library_notices

API_KEY_VARIABLE = "DUALTOKEN_API_KEY"


def _require_serving_packages() -> None:
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn", "gradio") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"error: this command needs {', '.join(missing)}: pip install -e '.[serve]'", file=sys.stderr)
        raise SystemExit(2)


def _parser(prog: str, description: str, port: int) -> argparse.ArgumentParser:
    from mllm.commands import add_compile_argument
    from tokenizer.devices import add_device_argument

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("model", help="a model folder from train-mllm (e.g. runs/tiny/mllm/joint/model)")
    parser.add_argument("--tokenizer", default=None, help="DualToken tokenizer folder (default: the model's)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--model-name", default="dualtoken", help="the id clients send as 'model'")
    parser.add_argument(
        "--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_VARIABLE}, if set)"
    )
    parser.add_argument("--max-batch", type=int, default=8, help="rows per model call; 1 = no batching")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for batch mates")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a request may wait for its answer")
    parser.add_argument("--max-body-mb", type=float, default=16.0, help="larger request bodies get 413")
    parser.add_argument("--max-images", type=int, default=8, help="the largest n of /v1/images/generations")
    parser.add_argument(
        "--allow-remote-images", action="store_true", help="also fetch http(s):// and read file:// image URLs"
    )
    add_device_argument(parser)
    add_compile_argument(parser)
    return parser


def _server_config(args: argparse.Namespace) -> Any:
    from mllm.commands import check_compile_flag
    from mllm.serving.app import ServerConfig
    from mllm.serving.batching import BatchingConfig
    from mllm.serving.protocol import Limits
    from tokenizer.devices import resolve_device

    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port={args.port}; expected an integer in [1, 65535]")
    if args.max_body_mb <= 0:
        raise ValueError(f"--max-body-mb={args.max_body_mb}; expected a number > 0")
    if args.max_images < 1:
        raise ValueError(f"--max-images={args.max_images}; expected an integer >= 1")
    resolve_device(args.device)  # a device the machine lacks fails before anything loads
    check_compile_flag(args.compile)
    batching = BatchingConfig(args.max_batch, args.max_wait_ms, args.max_queue, args.timeout)
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_VARIABLE) or None
    limits = Limits(max_images_per_request=args.max_images, allow_remote_images=args.allow_remote_images)
    return ServerConfig(args.model_name, key, int(args.max_body_mb * 1024 * 1024), limits, batching)


def load_pipeline(args: argparse.Namespace) -> Any:
    """The model folder's pipeline on ``--device``; the weight-loading bar only on a terminal."""
    from transformers.utils import logging as hf_logging

    from mllm.inference import Pipeline
    from tokenizer.devices import resolve_device

    device = resolve_device(args.device)
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    return Pipeline.from_pretrained(args.model, args.tokenizer, device=str(device), compile=args.compile)


def _run(app: Any, args: argparse.Namespace, what: str) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"dualtoken {what}: http://{args.host}:{args.port} (Ctrl-C stops after the requests in flight)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30)


def serve_main(argv: list[str] | None = None) -> None:
    parser = _parser("dualtoken serve", "Serve a model folder over the OpenAI API (chat, images).", 8000)
    args = parser.parse_args(argv)
    _require_serving_packages()
    config = _server_config(args)
    from mllm.serving.app import create_app

    with quiet_library_notices():
        _run(create_app(load_pipeline(args), config), args, "serve")


def web_main(argv: list[str] | None = None) -> None:
    parser = _parser("dualtoken web", "A web page (chat with images, drawing) plus the OpenAI API.", 7860)
    args = parser.parse_args(argv)
    _require_serving_packages()
    config = _server_config(args)
    with quiet_library_notices():
        from mllm.serving.web import create_web_app

        _run(create_web_app(load_pipeline(args), config), args, "web")
