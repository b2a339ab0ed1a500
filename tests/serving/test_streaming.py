"""``stream: true`` sends each piece of an answer as the model draws it, not after the whole answer."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from live_server import serving

openai = pytest.importorskip("openai")

QUESTION = "what shapes are in the picture and where are they?"


def streamed_pieces(lines) -> list[str]:
    """The content pieces of an SSE chat-completion stream (``lines``: its text lines)."""
    pieces = []
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[len("data: ") :])["choices"]:
                if choice["delta"].get("content"):
                    pieces.append(choice["delta"]["content"])
    return pieces


class HeldAfterFirstPiece:
    """The test pipeline, but after an answer's first piece the model waits until the client has
    read that piece: a server that sent the answer only when it was done would never let it go on."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.client_has_it = threading.Event()
        self.released: list[bool] = []

    def answer_batch(self, *args, on_text=None, **kwargs):
        def relay(row: int, piece: str) -> None:
            on_text(row, piece)
            if not self.released:
                self.released.append(self.client_has_it.wait(30))

        return self.pipe.answer_batch(*args, on_text=None if on_text is None else relay, **kwargs)


def test_pieces_reach_the_client_while_the_answer_is_drawn(pipe) -> None:
    from mllm.serving.app import ServerConfig, create_app
    from mllm.serving.batching import Batcher

    config = ServerConfig()
    held = HeldAfterFirstPiece(pipe)
    body = {"model": "dualtoken", "messages": [{"role": "user", "content": QUESTION}], "stream": True}
    with serving(create_app(pipe, config, Batcher(held, config.batching))) as server:
        lines = []
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                lines.append(line)
                if streamed_pieces(lines):
                    held.client_has_it.set()
        whole = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60)
    assert held.released == [True]  # the first piece arrived while the model was still held
    pieces = streamed_pieces(lines)
    answer = whole.json()["choices"][0]["message"]["content"]
    assert len(pieces) > 1 and "".join(pieces) == answer == pipe.answer(None, QUESTION, max_new_tokens=64)
    assert [line for line in lines if line][-1] == "data: [DONE]"


def test_streamed_requests_in_one_batch_each_get_their_own_pieces(client_url, live, pipe) -> None:
    questions = [QUESTION, "what colour is the circle?", "how many objects are there?", "is there a square?"]
    pieces: dict[int, list[str]] = {}
    client = openai.OpenAI(base_url=client_url, api_key="unused", max_retries=0, timeout=60)

    def ask(index: int) -> None:
        stream = client.chat.completions.create(
            model="dualtoken", messages=[{"role": "user", "content": questions[index]}], stream=True
        )
        pieces[index] = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]

    before = httpx.get(live.url + "/health").json()["batches"]
    threads = [threading.Thread(target=ask, args=(index,)) for index in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    after = httpx.get(live.url + "/health").json()["batches"]
    assert after["calls"] - before["calls"] < len(questions)  # they shared model calls
    for index, question in enumerate(questions):
        assert "".join(pieces[index]) == pipe.answer(None, question, max_new_tokens=64)


@pytest.fixture(scope="module")
def client_url(live) -> str:
    return live.url + "/v1"
