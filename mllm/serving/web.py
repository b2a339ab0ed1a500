"""The web page: a Gradio chat that takes an image upload, and a tab that draws images.

The page is mounted at ``/`` of the API app (:func:`create_web_app`), so the page and the
OpenAI API share one model and one :class:`~mllm.serving.batching.Batcher`: a question typed on
the page is batched with API requests like any other. With an API key, the page asks for it
as the password (any user name).
"""

from __future__ import annotations

import secrets
from typing import Any

from mllm.inference import Pipeline
from mllm.request_checks import SEED_LIMIT, PipelineError
from mllm.serving.app import Server, ServerConfig, create_app
from mllm.serving.batching import BatcherClosed, QueueFull
from mllm.serving.errors import APIError
from mllm.serving.protocol import DEFAULT_MAX_TOKENS, ChatJob, ImageJob

Messages = list[dict[str, str]]  # the Chatbot's history: {"role", "content"} per message


def _chat_job(server: Server, image_path: str | None, question: str, history: list[tuple[str, str]]) -> ChatJob:
    from mllm.generation import SamplingConfig
    from mllm.request_checks import check_prompt
    from tokenizer.images import load_image

    question = check_prompt(question, "question")
    image = (
        None if image_path is None else load_image(image_path, name="the uploaded image", image_size=server.image_size)
    )
    length = server.prompt_length(image is not None, history, question)
    room = DEFAULT_MAX_TOKENS if server.context is None else server.context - length
    if room < 1:
        raise PipelineError("the conversation is longer than the model's context; press Reset")
    return ChatJob(
        image=image,
        question=question,
        history=history,
        max_tokens=min(DEFAULT_MAX_TOKENS, room),
        sampling=SamplingConfig(temperature=0.0),
        seed=0,
        seeded=False,
        prompt_tokens=length,
        stream=False,
        include_usage=False,
    )


def build_page(server: Server) -> Any:
    """The Gradio Blocks of the page, calling ``server``'s batcher."""
    import gradio as gr

    def ask(
        image_path: str | None, question: str, messages: Messages | None, dialogue: list[tuple[str, str]] | None
    ) -> tuple[Messages, list[tuple[str, str]], str]:
        messages, dialogue = list(messages or []), list(dialogue or [])
        try:
            answer = server.batcher.run(_chat_job(server, image_path, question, dialogue))
        except (ValueError, OSError, APIError) as error:  # PipelineError, ImageLoadError, a timeout ...
            raise gr.Error(str(error)) from None
        except (QueueFull, BatcherClosed):
            raise gr.Error("the server is busy; try again in a moment") from None
        dialogue.append((question, answer))
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return messages, dialogue, ""

    def draw(prompt: str, seed: float | None, guidance: float) -> Any:
        from mllm.request_checks import check_prompt, check_sampling

        try:
            defaults = server.pipe.sampling
            chosen = secrets.randbelow(SEED_LIMIT // 2) if seed is None or seed < 0 else int(seed)
            sampling = check_sampling(guidance, defaults.top_k, defaults.top_p, defaults.temperature)
            job = ImageJob(check_prompt(prompt, "prompt"), 1, chosen, sampling)
            return server.batcher.run(job)[0]
        except (ValueError, OSError, APIError) as error:
            raise gr.Error(str(error)) from None
        except (QueueFull, BatcherClosed):
            raise gr.Error("the server is busy; try again in a moment") from None

    with gr.Blocks(title="DualToken") as page:
        gr.Markdown("## DualToken\nAsk about an image, or draw one from a sentence.")
        with gr.Tab("Chat"):
            with gr.Row():
                image = gr.Image(type="filepath", label="image (optional)", elem_id="chat-image", height=256)
                with gr.Column():
                    chatbot = gr.Chatbot(label="conversation", elem_id="chat-history", height=300)
                    question = gr.Textbox(
                        label="question", placeholder="what colour is the circle?", elem_id="chat-question"
                    )
                    with gr.Row():
                        ask_button = gr.Button("Ask", variant="primary", elem_id="chat-ask")
                        reset_button = gr.Button("Reset", elem_id="chat-reset")
            dialogue = gr.State([])
            ask_button.click(ask, [image, question, chatbot, dialogue], [chatbot, dialogue, question])
            question.submit(ask, [image, question, chatbot, dialogue], [chatbot, dialogue, question])
            reset_button.click(lambda: ([], [], None), None, [chatbot, dialogue, image])
            image.change(lambda: ([], []), None, [chatbot, dialogue])  # a new image starts a new conversation
        with gr.Tab("Draw", elem_id="draw-tab"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="prompt", placeholder="a large red circle", elem_id="draw-prompt")
                    seed = gr.Number(value=0, precision=0, label="seed (-1: random)", elem_id="draw-seed")
                    guidance = gr.Slider(0.0, 10.0, value=server.pipe.sampling.cfg, step=0.5, label="guidance scale")
                    draw_button = gr.Button("Draw", variant="primary", elem_id="draw-button")
                drawn = gr.Image(label="image", elem_id="draw-output", height=256, format="png")
            draw_button.click(draw, [prompt, seed, guidance], drawn)
    return page


def create_web_app(pipe: Pipeline, config: ServerConfig | None = None) -> Any:
    """The API app (:func:`~mllm.serving.app.create_app`) with the page mounted at ``/``."""
    import gradio as gr

    config = config or ServerConfig()
    # The key guards /v1; the page asks for it through Gradio's own login.
    app = create_app(pipe, config, key_scope="/v1/")
    page = build_page(app.state.server)
    auth = (lambda _user, password: secrets.compare_digest(password, config.api_key)) if config.api_key else None
    return gr.mount_gradio_app(app, page, path="/", auth=auth, footer_links=[])
