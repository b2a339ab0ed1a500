"""Reading the OpenAI request bodies into checked jobs, before anything is queued.

Every field is checked here and refused with an :class:`~mllm.serving.errors.APIError` that
names it (``messages[1].content[0].image_url``, ``max_tokens`` ...); the sampling and prompt
rules are the Pipeline's own (:mod:`mllm.request_checks`), and images go through the project's
one image loader (:func:`tokenizer.images.load_image`), so the server refuses what the
Python API refuses, with the same reasons.

Images arrive as ``image_url`` content parts. ``data:`` URLs are always read; ``http(s)://`` and
``file://`` URLs only when the server was started with ``--allow-remote-images`` (otherwise a
request could make the server fetch internal addresses or read its own files).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import numbers
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mllm.generation import SamplingConfig
from mllm.request_checks import MAX_PROMPT_CHARS, SEED_LIMIT, PipelineError, check_prompt, check_sampling
from mllm.serving.errors import bad_request, unknown_model

DEFAULT_MAX_TOKENS = 64  # an answer's length when the request names none (and the context leaves room)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 16_000_000  # width x height read from the header, before decoding
    max_images_per_request: int = 8  # ``n`` of /v1/images/generations
    allow_remote_images: bool = False
    remote_timeout_s: float = 10.0


@dataclass
class ChatJob:
    """One checked chat request: the image (or None), the question, earlier exchanges, sampling."""

    image: torch.Tensor | None
    question: str
    history: list[tuple[str, str]]
    max_tokens: int
    sampling: SamplingConfig
    seed: int
    seeded: bool  # the request named a seed: its answer must not depend on its batch mates
    prompt_tokens: int
    stream: bool
    include_usage: bool


@dataclass
class ImageJob:
    """One checked image-generation request: ``n`` images of ``prompt``, image k from ``seed + k``."""

    prompt: str
    n: int
    seed: int
    sampling: SamplingConfig


def check_model(body: dict[str, Any], served: str) -> None:
    name = body.get("model")
    if name is None:
        raise bad_request("model is required; GET /v1/models lists it", param="model")
    if name != served:
        raise unknown_model(name, served)


def _integer(body: dict[str, Any], name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise bad_request(f"{name}={value!r}; expected an integer in [{low}, {high}]", param=name)
    return int(value)


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise bad_request(f"{name}={value!r}; expected a number in [{low:g}, {high:g}]", param=name)
    if not low <= value <= high:
        raise bad_request(f"{name}={value!r}; expected a number in [{low:g}, {high:g}]", param=name)
    return float(value)


def _sampling(body: dict[str, Any], cfg: float, temperature: float) -> SamplingConfig:
    try:
        return check_sampling(
            cfg=cfg,
            top_k=0,
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
            temperature=_number(body, "temperature", temperature, 0.0, 2.0),
        )
    except PipelineError as error:
        raise bad_request(str(error), param=str(error).split("=")[0]) from None


# ------------------------------------------------------------------------------ images in
def _image_bytes(url: Any, where: str, limits: Limits) -> bytes:
    if not isinstance(url, str) or not url:
        raise bad_request(f"{where} is {url!r:.60}; expected a data: URL string", param=where)
    scheme = url.split(":", 1)[0].lower()
    if scheme == "data":
        header, separator, payload = url.partition(",")
        if not separator or not header.endswith(";base64"):
            raise bad_request(f"{where}: expected a data URL 'data:image/png;base64,...'", param=where)
        if len(payload) > limits.max_image_bytes * 4 // 3 + 4:
            raise bad_request(f"{where}: the image is over the limit of {limits.max_image_bytes:,} bytes", param=where)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"{where}: the data URL's payload is not valid base64", param=where) from None
    if scheme not in ("http", "https", "file"):
        raise bad_request(f"{where}: unsupported URL scheme {scheme!r}; expected a data: URL", param=where)
    if not limits.allow_remote_images:
        raise bad_request(
            f"{where}: {scheme}:// image URLs are refused; send the image as a data: URL "
            "(or start the server with --allow-remote-images)",
            param=where,
            code="remote_image_refused",
        )
    try:
        if scheme == "file":
            path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
            with open(path, "rb") as handle:
                data = handle.read(limits.max_image_bytes + 1)
        else:
            with urllib.request.urlopen(url, timeout=limits.remote_timeout_s) as response:  # noqa: S310 (scheme checked)
                data = response.read(limits.max_image_bytes + 1)
    except OSError as error:
        raise bad_request(f"{where}: cannot read {url!r:.200} ({error})", param=where) from None
    if len(data) > limits.max_image_bytes:
        raise bad_request(f"{where}: the image is over the limit of {limits.max_image_bytes:,} bytes", param=where)
    return data


def load_request_image(url: Any, where: str, image_size: int, limits: Limits) -> torch.Tensor:
    """A ``(3, S, S)`` image tensor in [-1, 1] from an ``image_url``; refused with a 400 naming ``where``."""
    from PIL import Image, UnidentifiedImageError

    from tokenizer.images import ImageLoadError, load_image

    data = _image_bytes(url, where, limits)
    try:
        with Image.open(io.BytesIO(data)) as header:  # reads the size only, decodes nothing yet
            width, height = header.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise bad_request(f"{where}: not an image ({type(error).__name__}: {error})", param=where) from None
    if width * height > limits.max_image_pixels:
        raise bad_request(
            f"{where}: the image is {width}x{height} pixels, over the limit of {limits.max_image_pixels:,} "
            "(a decompression bomb or an oversized photo)",
            param=where,
            code="image_too_large",
        )
    try:
        return load_image(data, name=where, image_size=image_size)
    except ImageLoadError as error:
        raise bad_request(str(error), param=where) from None


# ------------------------------------------------------------------------------ chat
def _message_parts(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise bad_request(f"{where} is {content!r:.60}; expected a string or a list of content parts", param=where)
    for index, part in enumerate(content):
        if not isinstance(part, dict):
            raise bad_request(f"{where}[{index}] is {part!r:.60}; expected an object", param=f"{where}[{index}]")
    return content


def read_messages(
    messages: Any, image_size: int, limits: Limits
) -> tuple[torch.Tensor | None, list[tuple[str, str]], str]:
    """``(image, history, question)`` from an OpenAI ``messages`` list.

    System messages are accepted and left out (the model's chat template carries its own);
    the rest must alternate user / assistant and end with a user message. At most one image,
    in a user message; the model reads it before the first question whichever message sent it.
    """
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {role, content} objects", param="messages")
    image = None
    dialogue: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} is {message!r:.60}; expected an object", param=where)
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad_request(f"{where}.role={role!r}; expected 'system', 'user' or 'assistant'", param=f"{where}.role")
        texts = []
        for number, part in enumerate(_message_parts(message.get("content"), f"{where}.content")):
            part_where = f"{where}.content[{number}]"
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise bad_request(f"{part_where}.text must be a string", param=f"{part_where}.text")
                texts.append(part["text"])
            elif kind == "image_url" and role == "user":
                if image is not None:
                    raise bad_request(f"{part_where}: this model reads one image per conversation", param=part_where)
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                image = load_request_image(url, f"{part_where}.image_url", image_size, limits)
            else:
                raise bad_request(
                    f"{part_where}.type={kind!r}; expected 'text'" + (" or 'image_url'" if role == "user" else ""),
                    param=f"{part_where}.type",
                )
        if role in ("user", "assistant"):
            dialogue.append((role, "\n".join(texts)))
    if not dialogue or dialogue[-1][0] != "user":
        raise bad_request("the last message must come from the user", param="messages")
    for index, (role, _) in enumerate(dialogue):
        if role != ("user" if index % 2 == 0 else "assistant"):
            raise bad_request("user and assistant messages must alternate, starting with the user", param="messages")
    try:
        question = check_prompt(dialogue[-1][1], "last user message")
        history = [
            (check_prompt(dialogue[i][1], f"user message {i // 2}"), dialogue[i + 1][1])
            for i in range(0, len(dialogue) - 1, 2)
        ]
    except PipelineError as error:
        raise bad_request(str(error), param="messages") from None
    return image, history, question


def read_chat_request(
    body: dict[str, Any],
    served: str,
    image_size: int,
    limits: Limits,
    prompt_length: Callable[[bool, list[tuple[str, str]], str], int],
    context: int | None,
    seed: int,
) -> ChatJob:
    """A checked /v1/chat/completions body; ``prompt_length(has_image, history, question)`` counts
    the prompt's positions, ``seed`` is used when the body names none."""
    check_model(body, served)
    image, history, question = read_messages(body.get("messages"), image_size, limits)
    _integer(body, "n", 1, 1, 1)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request(f"stream={stream!r}; expected true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("stream_options must be an object", param="stream_options")
    chosen = _integer(body, "seed", None, 0, SEED_LIMIT - 1)
    sampling = _sampling(body, cfg=1.0, temperature=0.0)  # left out: greedy, as the Pipeline answers
    try:
        length = prompt_length(image is not None, history, question)
    except ValueError as error:  # PipelineError, ConversationError: too long for the context
        raise bad_request(str(error), param="messages") from None
    room = DEFAULT_MAX_TOKENS if context is None else context - length
    if room < 1:
        raise bad_request(
            f"the conversation takes {length} of the model's {context} positions; shorten it", param="messages"
        )
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    limit = room if context is not None else 2**31 - 1
    max_tokens = _integer(body, name, min(DEFAULT_MAX_TOKENS, room), 1, limit)
    return ChatJob(
        image=image,
        question=question,
        history=history,
        max_tokens=max_tokens,
        sampling=sampling,
        seed=seed if chosen is None else chosen,
        seeded=chosen is not None,
        prompt_tokens=length,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
    )


# ------------------------------------------------------------------------------ images out
def read_image_request(
    body: dict[str, Any], served: str, image_size: int, defaults: SamplingConfig, limits: Limits, seed: int
) -> ImageJob:
    """The checked fields of a /v1/images/generations body; ``seed`` is used when the body has none."""
    if "model" in body:  # optional here, as in the OpenAI API
        check_model(body, served)
    try:
        prompt = check_prompt(body.get("prompt"), "prompt")
    except PipelineError as error:
        raise bad_request(f"{error} (at most {MAX_PROMPT_CHARS:,} characters)", param="prompt") from None
    count = _integer(body, "n", 1, 1, limits.max_images_per_request)
    size = body.get("size")
    expected = f"{image_size}x{image_size}"
    if size not in (None, "auto", expected):
        raise bad_request(f"size={size!r}; this model draws {expected!r} images only", param="size")
    response_format = body.get("response_format")
    if response_format not in (None, "b64_json"):
        raise bad_request(
            f"response_format={response_format!r}; this server returns 'b64_json' only", param="response_format"
        )
    chosen = _integer(body, "seed", None, 0, SEED_LIMIT - limits.max_images_per_request)
    guidance = _number(body, "guidance_scale", defaults.cfg, 0.0, 1000.0)
    sampling = check_sampling(
        cfg=guidance, top_k=defaults.top_k, top_p=defaults.top_p, temperature=defaults.temperature
    )
    return ImageJob(prompt, count, seed if chosen is None else chosen, sampling)
