"""Bad requests never hurt the server: each gets its 4xx with a JSON body in the OpenAI error
shape and no traceback, and the next good request is answered. Also a full queue (429 with
Retry-After), a request past its timeout (504), a client gone mid-stream, and a shutdown that
finishes the requests in flight."""

from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path

import httpx
import pytest
from live_server import serving
from PIL import Image

CHAT = "/v1/chat/completions"
IMAGES = "/v1/images/generations"


def png_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(content, **fields) -> dict:
    return {"model": "dualtoken", "messages": [{"role": "user", "content": content}], **fields}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def truncated_png() -> str:
    whole = base64.b64decode(png_url(Image.new("RGB", (32, 32), "red")).split(",")[1])
    return "data:image/png;base64," + base64.b64encode(whole[: len(whole) // 2]).decode()


def bomb_png() -> str:
    """A small file (a few kB) that decodes to 25 million pixels."""
    return png_url(Image.new("1", (5000, 5000)))


GOOD_CHAT = chat("what colour is the circle?")
# (name, path, body: a dict sent as JSON, or raw bytes, expected status, the error's param or code)
CORPUS = [
    ("malformed JSON", CHAT, b'{"model": "dualtoken", "messages": [', 400, None),
    ("a JSON array, not an object", CHAT, b"[1, 2]", 400, None),
    ("body not UTF-8", CHAT, b"\xff\xfe{}", 400, None),
    ("messages of the wrong type", CHAT, {"model": "dualtoken", "messages": "hi"}, 400, "messages"),
    ("empty messages", CHAT, {"model": "dualtoken", "messages": []}, 400, "messages"),
    ("an unknown model", CHAT, {**GOOD_CHAT, "model": "gpt-4o"}, 404, "model"),
    ("no model", CHAT, {"messages": GOOD_CHAT["messages"]}, 400, "model"),
    ("an unknown role", CHAT, {"model": "dualtoken", "messages": [{"role": "robot", "content": "hi"}]}, 400, None),
    (
        "the last message from the assistant",
        CHAT,
        {"model": "dualtoken", "messages": [{"role": "assistant", "content": "hi"}]},
        400,
        "messages",
    ),
    ("an empty question", CHAT, chat("   "), 400, "messages"),
    (
        "an unknown content-part type",
        CHAT,
        chat([{"type": "input_audio", "input_audio": {}}]),
        400,
        "messages[0].content[0].type",
    ),
    ("a content part that is not an object", CHAT, chat(["hello"]), 400, "messages[0].content[0]"),
    (
        "a non-image data URL",
        CHAT,
        chat([image_part("data:image/png;base64," + base64.b64encode(b"hello").decode())]),
        400,
        "messages[0].content[0].image_url",
    ),
    ("a truncated image", CHAT, chat([image_part(truncated_png())]), 400, "messages[0].content[0].image_url"),
    ("a decompression bomb", CHAT, chat([image_part(bomb_png())]), 400, "image_too_large"),
    ("invalid base64", CHAT, chat([image_part("data:image/png;base64,@@@@")]), 400, "messages[0].content[0].image_url"),
    ("a remote image URL", CHAT, chat([image_part("http://127.0.0.1:9/cat.png")]), 400, "remote_image_refused"),
    (
        "two images",
        CHAT,
        chat([image_part(png_url(Image.new("RGB", (8, 8)))), image_part(png_url(Image.new("RGB", (8, 8))))]),
        400,
        None,
    ),
    ("an oversized body", CHAT, chat("x" * (2 * 1024 * 1024)), 413, "request_too_large"),
    ("a huge max_tokens", CHAT, {**GOOD_CHAT, "max_tokens": 10**9}, 400, "max_tokens"),
    ("max_tokens of the wrong type", CHAT, {**GOOD_CHAT, "max_tokens": "ten"}, 400, "max_tokens"),
    ("a temperature out of range", CHAT, {**GOOD_CHAT, "temperature": 5}, 400, "temperature"),
    ("a negative seed", CHAT, {**GOOD_CHAT, "seed": -1}, 400, "seed"),
    ("stream of the wrong type", CHAT, {**GOOD_CHAT, "stream": "yes"}, 400, "stream"),
    ("n > 1 for chat", CHAT, {**GOOD_CHAT, "n": 3}, 400, "n"),
    ("a prompt over the length limit", IMAGES, {"prompt": "a red circle " * 300}, 400, "prompt"),
    ("an empty prompt", IMAGES, {"prompt": ""}, 400, "prompt"),
    ("a huge n", IMAGES, {"prompt": "a red circle", "n": 1000}, 400, "n"),
    ("an unsupported size", IMAGES, {"prompt": "a red circle", "size": "1024x1024"}, 400, "size"),
    ("response_format url", IMAGES, {"prompt": "a red circle", "response_format": "url"}, 400, "response_format"),
    ("guidance of the wrong type", IMAGES, {"prompt": "a red circle", "guidance_scale": "high"}, 400, "guidance_scale"),
    ("an unknown path", "/v1/embeddings", {"input": "x"}, 404, None),
]


@pytest.mark.parametrize(("name", "path", "body", "status", "where"), CORPUS, ids=[row[0] for row in CORPUS])
def test_a_bad_request_gets_its_status_and_an_openai_error_and_the_server_goes_on(
    live, name: str, path: str, body, status: int, where: str | None
) -> None:
    if isinstance(body, bytes):
        response = httpx.post(live.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    else:
        response = httpx.post(live.url + path, json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    if where is not None:
        assert where in (error["param"], error["code"]), error
    good = httpx.post(live.url + CHAT, json=GOOD_CHAT, timeout=30)
    assert good.status_code == 200 and isinstance(good.json()["choices"][0]["message"]["content"], str)


def test_a_wrong_method_is_a_json_405(live) -> None:
    response = httpx.get(live.url + CHAT)
    assert response.status_code == 405 and set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_client_that_leaves_mid_stream_does_not_hurt_the_server(live) -> None:
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", live.url + CHAT, json={**GOOD_CHAT, "stream": True}) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # the first event, then the connection is dropped
    assert httpx.post(live.url + CHAT, json=GOOD_CHAT, timeout=30).status_code == 200


class GatedPipeline:
    """The test pipeline, but every model call waits until ``gate`` is set."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.gate = threading.Event()
        self.calls = 0
        self.finished = 0

    def answer_batch(self, *args, **kwargs):
        self.calls += 1
        assert self.gate.wait(30)
        answers = self.pipe.answer_batch(*args, **kwargs)
        self.finished += 1
        return answers


def gated_app(pipe, **batching):
    from mllm.serving.app import ServerConfig, create_app
    from mllm.serving.batching import Batcher, BatchingConfig

    config = ServerConfig(batching=BatchingConfig(max_batch=1, max_wait_ms=0, **batching))
    gated = GatedPipeline(pipe)
    return create_app(pipe, config, Batcher(gated, config.batching)), gated


def post_later(url: str, results: list, body: dict = GOOD_CHAT) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.append(httpx.post(url + CHAT, json=body, timeout=60)))
    thread.start()
    return thread


def wait_for(condition, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_full_queue_answers_429_with_retry_after_and_then_serves(pipe) -> None:
    app, gated = gated_app(pipe, max_queue=1)
    with serving(app) as server:
        results: list[httpx.Response] = []
        running = post_later(server.url, results)
        wait_for(lambda: gated.calls == 1)  # the first request is in the model
        queued = post_later(server.url, results)
        wait_for(lambda: app.state.server.batcher.queued == 1)  # the second fills the queue
        refused = httpx.post(server.url + CHAT, json=GOOD_CHAT, timeout=30)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        gated.gate.set()
        running.join(30), queued.join(30)
        assert [response.status_code for response in results] == [200, 200]
        assert httpx.post(server.url + CHAT, json=GOOD_CHAT, timeout=30).status_code == 200  # the retry


def test_a_request_past_its_timeout_gets_504_and_the_server_goes_on(pipe) -> None:
    app, gated = gated_app(pipe, timeout_s=3)
    with serving(app) as server:
        late = httpx.post(server.url + CHAT, json=GOOD_CHAT, timeout=30)
        assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
        gated.gate.set()
        wait_for(lambda: gated.finished == 1)  # the late request's model call ends; its answer is dropped
        assert httpx.post(server.url + CHAT, json=GOOD_CHAT, timeout=30).status_code == 200


def test_shutdown_finishes_the_requests_in_flight(pipe) -> None:
    app, gated = gated_app(pipe)
    server = serving(app)
    live = server.__enter__()
    results: list[httpx.Response] = []
    running = post_later(live.url, results)
    wait_for(lambda: gated.calls == 1)
    live.server.should_exit = True  # what SIGINT / SIGTERM do
    time.sleep(0.2)
    gated.gate.set()
    running.join(30)
    server.__exit__(None, None, None)
    assert results[0].status_code == 200 and results[0].json()["choices"][0]["message"]["content"] is not None
    assert not app.state.server.batcher._worker.is_alive()  # the worker stopped after the last job
    with pytest.raises(httpx.ConnectError):
        httpx.post(live.url + CHAT, json=GOOD_CHAT, timeout=5)


def test_remote_images_can_be_allowed(pipe, picture: Path) -> None:
    """``--allow-remote-images``: an http:// URL (here this machine's own) is fetched and read."""
    from mllm.serving.app import ServerConfig, create_app
    from mllm.serving.protocol import Limits

    with serving(create_app(pipe, ServerConfig(limits=Limits(allow_remote_images=True)))) as server:
        # The server itself answers /health with JSON: fetched, it is refused as "not an image".
        body = chat([image_part(server.url + "/health"), {"type": "text", "text": "what is it?"}])
        response = httpx.post(server.url + CHAT, json=body, timeout=30)
        assert response.status_code == 400 and "not an image" in response.json()["error"]["message"]
