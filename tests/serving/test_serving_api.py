"""The OpenAI API of ``dualtoken serve``, driven by the official ``openai`` client against a live
server: what a client gets is what :class:`~mllm.inference.Pipeline` answers and draws."""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from live_server import serving
from PIL import Image

openai = pytest.importorskip("openai")


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_and_health(client, live) -> None:
    assert [model.id for model in client.models.list()] == ["dualtoken"]
    health = httpx.get(live.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "dualtoken"


def test_a_text_question_gets_the_pipelines_answer_and_real_usage(client, pipe) -> None:
    reply = client.chat.completions.create(
        model="dualtoken", messages=[{"role": "user", "content": "how many objects are there?"}]
    )
    answer = reply.choices[0].message.content
    assert answer == pipe.answer(None, "how many objects are there?", max_new_tokens=64)
    usage = reply.usage
    assert usage.completion_tokens == len(pipe.text_tokenizer(answer, add_special_tokens=False)["input_ids"])
    assert usage.prompt_tokens > len(pipe.text_tokenizer("how many objects are there?")["input_ids"])
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    short = client.chat.completions.create(
        model="dualtoken", messages=[{"role": "user", "content": "describe the image"}], max_tokens=1
    )
    assert short.usage.completion_tokens <= 1
    assert short.choices[0].finish_reason == ("length" if short.usage.completion_tokens == 1 else "stop")


def test_an_image_question_with_history_matches_the_pipeline(client, pipe, picture) -> None:
    first = [{"type": "image_url", "image_url": {"url": data_url(picture)}}, {"type": "text", "text": "what is it?"}]
    messages = [
        {"role": "system", "content": "You answer questions about shapes."},  # accepted, left out
        {"role": "user", "content": first},
        {"role": "assistant", "content": "a circle"},
        {"role": "user", "content": "what colour is the circle?"},
    ]
    reply = client.chat.completions.create(model="dualtoken", messages=messages, max_tokens=8)
    expected = pipe.answer(
        str(picture), "what colour is the circle?", history=[("what is it?", "a circle")], max_new_tokens=8
    )
    assert reply.choices[0].message.content == expected


def test_streaming_sends_the_same_answer_in_openai_chunks(client) -> None:
    messages = [{"role": "user", "content": "what shapes are in the picture?"}]
    whole = client.chat.completions.create(model="dualtoken", messages=messages).choices[0].message.content
    stream = client.chat.completions.create(
        model="dualtoken", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_image_generation_matches_the_pipeline_seed_for_seed(client, pipe) -> None:
    result = client.images.generate(
        model="dualtoken",
        prompt="a large red circle",
        n=2,
        size="32x32",
        response_format="b64_json",
        extra_body={"seed": 7, "guidance_scale": 2.0},
    )
    served = [np.asarray(Image.open(io.BytesIO(base64.b64decode(item.b64_json)))) for item in result.data]
    expected = pipe.generate("a large red circle", n=2, seed=7, cfg=2.0)
    assert [image.shape for image in served] == [(32, 32, 3)] * 2
    assert all((a == b).all() for a, b in zip(served, expected, strict=True))


def test_concurrent_requests_share_model_calls_and_get_their_own_answers(client, live, pipe) -> None:
    questions = ["what colour is the circle?", "how many objects are there?", "is there a square?", "what is it?"] * 2
    answers: dict[int, str] = {}

    def ask(index: int) -> None:
        reply = client.chat.completions.create(
            model="dualtoken", messages=[{"role": "user", "content": questions[index]}]
        )
        answers[index] = reply.choices[0].message.content

    before = httpx.get(live.url + "/health").json()["batches"]
    threads = [threading.Thread(target=ask, args=(index,)) for index in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    after = httpx.get(live.url + "/health").json()["batches"]
    assert after["jobs"] - before["jobs"] == len(questions)
    assert after["calls"] - before["calls"] < len(questions) and after["largest"] > 1  # batched
    for index, question in enumerate(questions):
        assert answers[index] == pipe.answer(None, question, max_new_tokens=64)


def test_the_api_key_guards_everything_but_health(pipe) -> None:
    from mllm.serving.app import ServerConfig, create_app

    with serving(create_app(pipe, ServerConfig(api_key="sesame"))) as server:
        assert httpx.get(server.url + "/health").status_code == 200
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            refused = httpx.get(server.url + "/v1/models", headers=headers)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
        keyed = openai.OpenAI(base_url=server.url + "/v1", api_key="sesame", max_retries=0)
        reply = keyed.chat.completions.create(model="dualtoken", messages=[{"role": "user", "content": "hello"}])
        assert isinstance(reply.choices[0].message.content, str)


def test_file_urls_are_read_only_when_allowed(pipe, picture, live) -> None:
    from mllm.serving.app import ServerConfig, create_app
    from mllm.serving.protocol import Limits

    body = {
        "model": "dualtoken",
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": picture.as_uri()}}, "what is it?"]}
        ],
    }
    body["messages"][0]["content"][1] = {"type": "text", "text": "what is it?"}
    refused = httpx.post(live.url + "/v1/chat/completions", json=body)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "remote_image_refused"
    with serving(create_app(pipe, ServerConfig(limits=Limits(allow_remote_images=True)))) as server:
        reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200
        assert reply.json()["choices"][0]["message"]["content"] == pipe.answer(
            str(picture), "what is it?", max_new_tokens=64
        )


def test_a_bad_job_in_a_batch_fails_alone(pipe) -> None:
    """A prompt that only sampling finds too long for the context fails its own job, not its batch mates'."""
    from mllm.generation import SamplingConfig
    from mllm.request_checks import PipelineError
    from mllm.serving.batching import Batcher, BatchingConfig
    from mllm.serving.protocol import ImageJob

    batcher = Batcher(pipe, BatchingConfig(max_batch=4, max_wait_ms=2000))
    try:
        sampling = SamplingConfig(cfg=1.0)
        long_prompt = " ".join(["a large red circle above a small blue square"] * 40)[:1990]
        futures = [
            batcher.submit(ImageJob("a red circle", 1, 3, sampling)),
            batcher.submit(ImageJob(long_prompt, 1, 0, sampling)),
            batcher.submit(ImageJob("a blue square", 2, 5, sampling)),
        ]
        good = futures[0].result(60)
        with pytest.raises(PipelineError, match="context"):
            futures[1].result(60)
        assert (good[0] == pipe.generate("a red circle", seed=3, cfg=1.0)[0]).all()
        assert len(futures[2].result(60)) == 2
        assert batcher.stats.largest == 3  # they were tried together first
    finally:
        batcher.close()
