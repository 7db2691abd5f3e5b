"""respx answers shaped like the real API (see shared/bfl-api-contract.md).

tests/test_conformance.py checks every builder here against the contract's tables, beside
FakeBFL, so the unit tests' answers cannot drift from the real API's shapes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import httpx

from bfl_async import Backoff

API = "https://api.bfl.ai"
POLL_HOST = "https://api.eu2.bfl.ai"
DELIVERY_HOST = "https://delivery-eu1.bfl.ai"
DELIVERY = f"{DELIVERY_HOST}/results/sample.png"
KEY = "bfl-test-key-0123456789-SECRET"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
JPEG = b"\xff\xd8\xff\xe0" + bytes(range(200))
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 " + bytes(100)
POLL_HEADERS = {"Retry-After": "1", "X-Ratelimit-Limit": "1200"}
NOT_AUTHENTICATED = "Not authenticated - Invalid Authentication"

FAST: dict[str, Any] = {
    "api_key": KEY,
    "poll_schedule": Backoff(initial=0.001, factor=1.0, maximum=0.001, jitter=0.0),
    "retry_base_delay": 0.001,
    "poll_rate": None,
    "close_grace": 2.0,
}


def polling_url(task_id: str) -> str:
    return f"{POLL_HOST}/v1/get_result?id={task_id}"


def signed_url(expires_in: float = 600.0, path: str = DELIVERY) -> str:
    return f"{path}?se={int(time.time() + expires_in)}&sig=abc"


def accepted(task_id: str = "task-1", cost: float | None = 3.0) -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "id": task_id,
            "polling_url": polling_url(task_id),
            "cost": cost,
            "input_mp": 0.0,
            "output_mp": 1.05,
        },
    )


def poll_answer(
    status: str,
    task_id: str = "task-1",
    result: dict[str, Any] | None = None,
    details: Any = None,
    progress: float | None = None,
) -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "id": task_id,
            "status": status,
            "result": result,
            "progress": progress,
            "details": details,
            "preview": None,
        },
        headers=POLL_HEADERS,
    )


def ready(task_id: str = "task-1", url: str | None = None, seed: int = 42) -> httpx.Response:
    return poll_answer(
        "Ready",
        task_id,
        result={
            "start_time": 1.0,
            "prompt": "a red fox",
            "seed": seed,
            "sample": url or signed_url(),
        },
    )


def image(content: bytes = PNG, content_type: str = "image/png") -> httpx.Response:
    return httpx.Response(
        200,
        content=content,
        headers={"content-type": content_type, "content-length": str(len(content))},
    )


def ready_flux1(
    task_id: str = "task-1", url: str | None = None, seed: int = 42, duration: float = 4.5
) -> httpx.Response:
    """A FLUX.1 `Ready`: the FLUX.2 result plus `end_time` and `duration`."""
    return poll_answer(
        "Ready",
        task_id,
        result={
            "start_time": 10.0,
            "prompt": "a red fox",
            "seed": seed,
            "sample": url or signed_url(),
            "end_time": 10.0 + duration,
            "duration": duration,
        },
    )


def moderated(
    status: str = "Request Moderated",
    task_id: str = "task-1",
    reasons: Sequence[str] = ("Derivative Works Filter",),
) -> httpx.Response:
    """`Request Moderated` (the input) or `Content Moderated` (the output), with reasons."""
    return poll_answer(status, task_id, details={"Moderation Reasons": list(reasons)})


def failed(task_id: str = "task-1", message: str = "Generation failed") -> httpx.Response:
    """The `Error` status: generation failed."""
    return poll_answer("Error", task_id, details={"message": message})


def credits_answer(credits: float = 12.5) -> httpx.Response:
    """`GET /v1/credits`."""
    return httpx.Response(200, json={"credits": float(credits)})


_BAD_GATEWAY = (
    "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway"
    "</h1></center><hr><center>nginx</center></body></html>"
)


def error_answer(
    status: int, detail: Any = None, *, retry_after: str | None = None
) -> httpx.Response:
    """An error answer from the contract's error table; `detail` replaces the default one.

    400 `{"detail": str}`; 401/403 `{"detail": "Not authenticated - ..."}`; 402
    `{"detail": "Insufficient credits"}`; 404 `{"detail": "Not Found"}`; 422 FastAPI's list;
    429 with `Retry-After` (default "1"); 500 text, 502 HTML, 503 JSON with `Retry-After`.
    """
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    if status == 500:
        return httpx.Response(500, text="Internal Server Error", headers=headers)
    if status == 502:
        return httpx.Response(502, html=_BAD_GATEWAY, headers=headers)
    defaults: dict[int, Any] = {
        400: "Output size 16.0 MP is too large: at most 4 MP",
        401: NOT_AUTHENTICATED,
        402: "Insufficient credits",
        403: NOT_AUTHENTICATED,
        404: "Not Found",
        422: [{"loc": ["body", "prompt"], "msg": "Field required", "type": "missing"}],
        429: "Too many active tasks. Wait for some to finish.",
        503: "Service Unavailable",
    }
    if status not in defaults:
        raise ValueError(f"the contract has no error answer {status}")
    if status in (429, 503):
        headers.setdefault("Retry-After", "1")
    return httpx.Response(
        status, json={"detail": defaults[status] if detail is None else detail}, headers=headers
    )


def expired_answer() -> httpx.Response:
    """The delivery host's refusal of a signed URL past its `se=` expiry (Azure's 403)."""
    return httpx.Response(
        403,
        text=(
            '<?xml version="1.0" encoding="utf-8"?><Error><Code>AuthenticationFailed</Code>'
            "<Message>Server failed to authenticate the request.</Message>"
            "<AuthenticationErrorDetail>Signature not valid in the specified time frame"
            "</AuthenticationErrorDetail></Error>"
        ),
        headers={"content-type": "application/xml"},
    )
