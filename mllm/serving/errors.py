"""What a refused request gets back: an HTTP status and a body in the OpenAI error shape.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages", "code": null}}

The shape and the status codes follow the OpenAI API reference ("Error codes": 400 bad request,
401 invalid key, 404 unknown model, 429 too many requests), so clients such as the ``openai``
package raise their own typed exceptions (``BadRequestError``, ``RateLimitError`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class APIError(Exception):
    """A request the server refuses, with the status and the fields of the error body."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def unknown_model(name: Any, served: str) -> APIError:
    return APIError(
        404, f"The model {name!r} does not exist; this server serves {served!r}", param="model", code="model_not_found"
    )


def invalid_api_key() -> APIError:
    return APIError(
        401,
        "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'",
        code="invalid_api_key",
    )


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over the server's limit of {limit:,} bytes", code="request_too_large")


def server_busy(retry_after: int) -> APIError:
    return APIError(
        429,
        f"the server's queue is full; retry in {retry_after} s",
        "rate_limit_error",
        code="queue_full",
        headers={"Retry-After": str(retry_after)},
    )


def request_timeout(seconds: float) -> APIError:
    return APIError(504, f"the request was not answered within {seconds:g} s", "timeout_error", code="timeout")


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", "server_error", code="shutting_down")


def internal_error() -> APIError:
    return APIError(500, "the model failed on this request; see the server's log", "server_error")
