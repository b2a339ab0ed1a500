"""The model over HTTP: an OpenAI-compatible API (:mod:`mllm.serving.app`) with dynamic batching
(:mod:`mllm.serving.batching`), and a Gradio web page on the same model (:mod:`mllm.serving.web`).

Nothing is imported here, so ``dualtoken serve --help`` works, and says what to install, on a
machine without the ``serve`` extra (FastAPI, uvicorn, Gradio)."""
