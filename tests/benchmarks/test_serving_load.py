"""Load on ``dualtoken serve``: 32 concurrent clients x 8 mixed requests, batching on vs off.

Each client sends, in order: a text question, a question about an image (a data: URL), a
streamed question, an image generation (n=1), a question with history, a question about an
image, a text question and an image generation. A 429 is retried after its ``Retry-After``
(bounded). The same model folder is served twice, one process each, on 127.0.0.1: with
``--max-batch 8`` (batching on) and ``--max-batch 1`` (off); both with ``--max-queue 16``, so
the 32 clients overrun the queue and the 429 path is exercised. Reported per setting: p50 /
p95 latency of a request (retries included), requests per second over the whole run, the 429s
seen, and the server's peak resident memory (``VmHWM`` of /proc/PID/status).

    python tests/benchmarks/test_serving_load.py --model runs/tiny/mllm/joint/model   # Markdown table
    pytest tests/benchmarks/test_serving_load.py -m benchmark -s   # the same; the make-demo model when present

The model is ``--model`` (and ``--tokenizer``), else ``$DUALTOKEN_SERVE_MODEL``, else
``runs/tiny/mllm/joint/model`` (what ``make demo`` trains); without one the pytest run skips.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLIENTS, REQUESTS_PER_CLIENT, MAX_RETRIES = 32, 8, 200


def _picture_url() -> str:
    from PIL import Image

    from training.data.shapes import ShapesWorld, ShapesWorldConfig

    buffer = io.BytesIO()
    Image.fromarray(ShapesWorld(ShapesWorldConfig(image_size=64)).sample("test", 3).image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _requests(picture: str) -> list[tuple[str, dict]]:
    def chat(content, **fields):
        return "/v1/chat/completions", {
            "model": "dualtoken",
            "messages": [{"role": "user", "content": content}],
            **fields,
        }

    with_image = [{"type": "image_url", "image_url": {"url": picture}}, {"type": "text", "text": "what colour is it?"}]
    dialogue = [
        {"role": "user", "content": with_image},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "how many objects are there?"},
    ]
    draw = ("/v1/images/generations", {"prompt": "a large red circle above a small blue square", "n": 1})
    return [
        chat("what shapes are there?"),
        chat(with_image),
        chat("is there a circle?", stream=True),
        draw,
        ("/v1/chat/completions", {"model": "dualtoken", "messages": dialogue}),
        chat([with_image[0], {"type": "text", "text": "how many objects are there?"}]),
        chat("what is the biggest shape?"),
        draw,
    ]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_server(model: str, tokenizer: str | None, max_batch: int, port: int, log: Path) -> subprocess.Popen:
    import httpx

    command = [sys.executable, "-m", "training.cli", "serve", model, "--port", str(port)]
    command += ["--max-batch", str(max_batch), "--max-queue", "16", "--device", "cpu"]
    command += ["--tokenizer", tokenizer] if tokenizer else []
    with open(log, "w") as handle:  # a file, not a pipe: a pipe nobody reads would block the server
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=handle)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start within 180 s")


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_load(url: str, picture: str) -> dict[str, float]:
    """Every client's requests against ``url``; latencies, throughput and the 429s seen."""
    import httpx

    requests = _requests(picture)
    latencies: list[float] = []
    failures: list[str] = []
    rejected = [0]
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            for number in range(REQUESTS_PER_CLIENT):
                path, body = requests[(index + number) % len(requests)]
                started = time.perf_counter()
                for _ in range(MAX_RETRIES):
                    response = http.post(path, json=body)
                    if response.status_code != 429:
                        break
                    with lock:
                        rejected[0] += 1
                    time.sleep(float(response.headers.get("Retry-After", "1")))
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    if response.status_code != 200:
                        failures.append(f"{path}: {response.status_code} {response.text[:200]}")

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(index,)) for index in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if failures:
        raise AssertionError(f"{len(failures)} requests failed, e.g. {failures[0]}")
    cuts = statistics.quantiles(latencies, n=20)
    return {
        "requests": len(latencies),
        "p50_s": statistics.median(latencies),
        "p95_s": cuts[18],
        "requests_per_s": len(latencies) / wall,
        "rejected_429": rejected[0],
        "wall_s": wall,
    }


def compare(model: str, tokenizer: str | None) -> dict[str, dict[str, float]]:
    import tempfile

    import httpx

    picture = _picture_url()
    results = {}
    logs = Path(tempfile.mkdtemp(prefix="serve_load_"))
    for name, max_batch in (("batching on (--max-batch 8)", 8), ("batching off (--max-batch 1)", 1)):
        port = _free_port()
        server = _start_server(model, tokenizer, max_batch, port, logs / f"server_batch{max_batch}.log")
        try:
            result = run_load(f"http://127.0.0.1:{port}", picture)
            result["peak_rss_mib"] = _peak_rss_mib(server.pid)
            result["model_calls"] = httpx.get(f"http://127.0.0.1:{port}/health").json()["batches"]["calls"]
            results[name] = result
        finally:
            server.terminate()
            server.wait(60)
    return results


def markdown(results: dict[str, dict[str, float]]) -> str:
    lines = [
        "| setting | requests | model calls | p50 latency | p95 latency | throughput | 429s (retried) | server peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['requests']} | {r['model_calls']} | {r['p50_s']:.2f} s | {r['p95_s']:.2f} s | "
            f"{r['requests_per_s']:.1f} req/s | {r['rejected_429']} | {r['peak_rss_mib']:.0f} MiB |"
        )
    on, off = results.values()
    lines.append("")
    lines.append(f"throughput ratio, on / off: {on['requests_per_s'] / off['requests_per_s']:.2f}x")
    return "\n".join(lines)


def _default_model() -> tuple[str | None, str | None]:
    model = os.environ.get("DUALTOKEN_SERVE_MODEL") or str(REPO / "runs/tiny/mllm/joint/model")
    return (model if Path(model).is_dir() else None), os.environ.get("DUALTOKEN_SERVE_TOKENIZER")


@pytest.mark.benchmark
def test_serving_load_batching_on_vs_off() -> None:
    model, tokenizer = _default_model()
    if model is None:
        pytest.skip("no model folder: run make demo, or set DUALTOKEN_SERVE_MODEL")
    results = compare(model, tokenizer)
    print("\n" + markdown(results))
    for result in results.values():
        assert result["requests"] == CLIENTS * REQUESTS_PER_CLIENT


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    default_model, default_tokenizer = _default_model()
    model, tokenizer = args.model or default_model, args.tokenizer or default_tokenizer
    if model is None:
        raise SystemExit("no model folder: pass --model (make demo trains runs/tiny/mllm/joint/model)")
    results = compare(model, tokenizer)
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
