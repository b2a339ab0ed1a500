"""Fixtures of the serving tests: the ``chain`` fixture's joint model (tests/conftest.py) as a
Pipeline, a Shapes picture, and the API served live on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serving tests need the serve extra: pip install -e '.[serve]'")

from live_server import LiveServer, serving  # noqa: E402


@pytest.fixture(scope="package")
def pipe(chain: dict[str, Path]):
    from mllm.inference import Pipeline

    return Pipeline.from_pretrained(chain["joint"], device="cpu")


@pytest.fixture(scope="package")
def picture(tmp_path_factory) -> Path:
    """A 32-px Shapes scene as a PNG."""
    from PIL import Image

    from training.data.shapes import ShapesWorld, ShapesWorldConfig

    path = tmp_path_factory.mktemp("serving_images") / "scene.png"
    Image.fromarray(ShapesWorld(ShapesWorldConfig(image_size=32)).sample("test", 1).image).save(path)
    return path


@pytest.fixture(scope="package")
def live(pipe) -> Iterator[LiveServer]:
    """The API with a small body limit (1 MiB) and a batching window wide enough to see batches."""
    from mllm.serving.app import ServerConfig, create_app
    from mllm.serving.batching import BatchingConfig

    config = ServerConfig(max_body_bytes=1024 * 1024, batching=BatchingConfig(max_batch=8, max_wait_ms=20))
    with serving(create_app(pipe, config)) as server:
        yield server
