"""The OpenAI-compatible HTTP API over one :class:`~mllm.inference.Pipeline`.

    POST /v1/chat/completions    text and one image (a data: URL), with history, stream: true (SSE)
    POST /v1/images/generations  prompt, n, size, response_format b64_json, seed, guidance_scale
    GET  /v1/models              the one served model
    GET  /health                 liveness, the queue's length and the batching counters

Every refusal is a JSON body in the OpenAI error shape (:mod:`mllm.serving.errors`); an
unexpected failure is logged with its traceback on the server and answered with a 500 that
carries none. Requests reach the model through one :class:`~mllm.serving.batching.Batcher`.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hmac
import io
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mllm.chat import SequenceBuilder
from mllm.inference import Pipeline
from mllm.request_checks import SEED_LIMIT
from mllm.serving import errors
from mllm.serving.batching import Batcher, BatcherClosed, BatchingConfig, QueueFull
from mllm.serving.errors import APIError
from mllm.serving.protocol import ChatJob, Limits, read_chat_request, read_image_request

logger = logging.getLogger(__name__)
OPEN_PATHS = ("/health",)  # answered without the API key


@dataclass(frozen=True)
class ServerConfig:
    """``model_name``: the id clients send as ``model``. ``api_key``: when set, every request but
    ``/health`` needs ``Authorization: Bearer <key>``. ``max_body_bytes``: larger bodies get 413."""

    model_name: str = "dualtoken"
    api_key: str | None = None
    max_body_bytes: int = 16 * 1024 * 1024
    limits: Limits = field(default_factory=Limits)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    retry_after_s: int = 1


def prompt_length(
    builder: SequenceBuilder, config: Any, has_image: bool, history: list[tuple[str, str]], question: str
) -> int:
    """Positions the prompt of :meth:`Pipeline.answer` takes (codes of the right shape stand in for the image)."""
    dialogue: list[tuple[str, str]] = []
    for old_question, old_answer in history:
        dialogue += [("user", old_question), ("assistant", old_answer)]
    dialogue.append(("user", question))
    semantic = pixel = None
    if has_image:
        semantic = torch.zeros(*config.grid_size, config.semantic_depth, dtype=torch.long)
        pixel = torch.zeros(*config.grid_size, config.pixel_depth, dtype=torch.long)
        dialogue[0] = (dialogue[0][0], f"<image>\n{dialogue[0][1].replace('<image>', '').strip()}")
    sequence = builder.conversation(dialogue, semantic=semantic, pixel=pixel, train=False, add_generation_prompt=True)
    return len(sequence)


def output_size(pipe: Pipeline) -> int:
    """The side of the square images the model draws (and reads)."""
    return int(pipe.visual_tokenizer.backbone.image_size)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object, read with a bound on its size whether or not it states one."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise errors.too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise errors.too_large(limit)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise errors.bad_request(f"the request body is not valid JSON ({error})") from None
    if not isinstance(body, dict):
        raise errors.bad_request(f"the request body is a JSON {type(body).__name__}; expected an object")
    return body


def _png_base64(image: Any) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class Server:
    """The routes' shared state: the pipeline, its batcher and the configuration."""

    def __init__(self, pipe: Pipeline, config: ServerConfig, batcher: Batcher | None = None) -> None:
        self.pipe = pipe
        self.config = config
        self.batcher = batcher or Batcher(pipe, config.batching)
        self.image_size = output_size(pipe)
        self.context = pipe.builder.max_length
        # Request threads count tokens with their own copy of the text tokenizer, one at a time: a
        # Rust tokenizer shared between threads can fail with "Already borrowed", and the worker
        # thread uses the pipeline's own copy.
        self._tokenizer = copy.deepcopy(pipe.text_tokenizer)
        self._builder = SequenceBuilder.for_model(self._tokenizer, pipe.model.config, self.context)
        self._tokenizer_lock = threading.Lock()

    def prompt_length(self, has_image: bool, history: list[tuple[str, str]], question: str) -> int:
        with self._tokenizer_lock:
            return prompt_length(self._builder, self.pipe.model.config, has_image, history, question)

    def count_tokens(self, text: str) -> int:
        with self._tokenizer_lock:
            return len(self._tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    def submit(self, job: Any, on_text: Any = None) -> Future:
        """Queue ``job`` (``on_text``: a streamed answer's pieces, on the worker thread)."""
        try:
            return self.batcher.submit(job, on_text) if on_text is not None else self.batcher.submit(job)
        except QueueFull:
            raise errors.server_busy(self.config.retry_after_s) from None
        except BatcherClosed:
            raise errors.shutting_down() from None

    async def result(self, job: Any) -> Any:
        """Queue ``job`` and wait for what the model made of it (errors become :class:`APIError`)."""
        return await self.wait(asyncio.wrap_future(self.submit(job)), self.config.batching.timeout_s)

    async def wait(self, waitable: Any, timeout: float) -> Any:
        """``waitable``'s result within ``timeout`` seconds (errors become :class:`APIError`)."""
        try:
            return await asyncio.wait_for(waitable, max(timeout, 0.0))
        except asyncio.TimeoutError:
            raise errors.request_timeout(self.config.batching.timeout_s) from None
        except ValueError as error:  # PipelineError and friends: the request, not the server
            raise errors.bad_request(str(error)) from None
        except Exception:
            raise errors.internal_error() from None

    async def stream(self, job: ChatJob) -> AsyncIterator[str]:
        """Queue ``job`` and return its answer's pieces, each as soon as the model has drawn it.

        The first piece (or the end of the job) is awaited before this returns, so a request that
        fails before its answer starts still gets its own error status; a failure after that ends
        the pieces with an :class:`APIError` (a piece that is sent cannot be taken back)."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()
        # The worker calls put_nowait (through the loop) before it sets the future's result.
        future = asyncio.wrap_future(
            self.submit(job, lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece))
        )
        deadline = loop.time() + self.config.batching.timeout_s
        getter = asyncio.ensure_future(pieces.get())
        try:
            await self.wait(asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED), deadline - loop.time())
            if not getter.done():
                await self.wait(future, 0)  # raises the request's error, if it failed before its first piece
        except APIError:
            getter.cancel()
            raise

        async def following() -> AsyncIterator[str]:
            nonlocal getter
            try:
                while True:
                    if not getter.done():
                        await asyncio.wait(
                            {getter, future},
                            timeout=max(deadline - loop.time(), 0.0),
                            return_when=asyncio.FIRST_COMPLETED,
                        )
                    if getter.done():
                        yield getter.result()
                        getter = asyncio.ensure_future(pieces.get())
                    elif future.done():
                        while not pieces.empty():
                            yield pieces.get_nowait()
                        await self.wait(future, 0)
                        return
                    else:
                        raise errors.request_timeout(self.config.batching.timeout_s)
            finally:
                getter.cancel()

        return following()

    def read_chat(self, body: dict[str, Any]) -> ChatJob:
        return read_chat_request(
            body,
            self.config.model_name,
            self.image_size,
            self.config.limits,
            self.prompt_length,
            self.context,
            seed=secrets.randbelow(SEED_LIMIT),
        )

    def usage(self, job: ChatJob, answer: str) -> tuple[dict[str, int], str]:
        completion = self.count_tokens(answer)
        usage = {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": job.prompt_tokens + completion,
        }
        return usage, "length" if completion >= job.max_tokens else "stop"


def _stream(
    server: Server, job: ChatJob, pieces: AsyncIterator[str], identity: str, created: int
) -> AsyncIterator[str]:
    """Server-sent events: the role, each piece of the answer as it is drawn, the finish reason,
    the usage (when asked for), ``[DONE]``; a failure mid-answer ends it with an error event."""
    base = {"id": identity, "object": "chat.completion.chunk", "created": created, "model": server.config.model_name}

    def event(delta: dict[str, Any], finish_reason: str | None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"

    async def events() -> AsyncIterator[str]:
        yield event({"role": "assistant", "content": ""}, None)
        sent = []
        try:
            async for piece in pieces:
                sent.append(piece)
                yield event({"content": piece}, None)
        except APIError as error:
            yield f"data: {json.dumps(error.body())}\n\n"
            return
        except Exception:
            logger.exception("model call failed while streaming")
            yield f"data: {json.dumps(errors.internal_error().body())}\n\n"
            return
        usage, finish = server.usage(job, "".join(sent))
        yield event({}, finish)
        if job.include_usage:
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return events()


def add_routes(app: FastAPI, server: Server) -> None:
    name = server.config.model_name

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = server.batcher.stats
        return {
            "status": "ok",
            "model": name,
            "queued": server.batcher.queued,
            "batches": {"calls": stats.calls, "jobs": stats.jobs, "largest": stats.largest},
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "dualtoken"}]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != name:
            raise errors.unknown_model(model_id, name)
        return {"id": name, "object": "model", "created": 0, "owned_by": "dualtoken"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_json(request, server.config.max_body_bytes)
        job = await run_in_threadpool(server.read_chat, body)  # images are decoded off the event loop
        identity, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if job.stream:
            pieces = await server.stream(job)
            return StreamingResponse(_stream(server, job, pieces, identity, created), media_type="text/event-stream")
        answer = await server.result(job)
        usage, finish = server.usage(job, answer)
        message = {"role": "assistant", "content": answer}
        return JSONResponse(
            {
                "id": identity,
                "object": "chat.completion",
                "created": created,
                "model": name,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": usage,
            }
        )

    @app.post("/v1/images/generations")
    async def images_generations(request: Request) -> Response:
        body = await read_json(request, server.config.max_body_bytes)
        job = read_image_request(
            body, name, server.image_size, server.pipe.sampling, server.config.limits, secrets.randbelow(2**62)
        )
        images = await server.result(job)
        encoded = await run_in_threadpool(lambda: [_png_base64(image) for image in images])
        data = [{"b64_json": text, "revised_prompt": None} for text in encoded]
        return JSONResponse({"created": int(time.time()), "data": data})


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {error.detail}"
        return JSONResponse(errors.error_body(message, kind), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        failure = errors.internal_error()
        return JSONResponse(failure.body(), status_code=failure.status)


def add_api_key(app: FastAPI, key: str, scope: str = "/") -> None:
    """Every request under ``scope`` but :data:`OPEN_PATHS` needs the key."""
    expected = f"Bearer {key}".encode()

    @app.middleware("http")
    async def check_key(request: Request, call_next: Any) -> Response:
        path = request.url.path
        if path in OPEN_PATHS or not path.startswith(scope):
            return await call_next(request)
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            failure = errors.invalid_api_key()
            return JSONResponse(failure.body(), status_code=failure.status, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)


def create_app(
    pipe: Pipeline, config: ServerConfig | None = None, batcher: Batcher | None = None, key_scope: str = "/"
) -> FastAPI:
    """The API app (the key, if any, guards the paths under ``key_scope``); on shutdown it finishes the queued and running requests before the worker stops."""
    config = config or ServerConfig()
    server = Server(pipe, config, batcher)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(server.batcher.close)

    app = FastAPI(title="DualToken", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    add_routes(app, server)
    add_error_handlers(app)
    if config.api_key:
        add_api_key(app, config.api_key, key_scope)
    return app
