"""respx answers shaped like the real API (see shared/bfl-api-contract.md)."""

from __future__ import annotations

import time
from typing import Any

import httpx

from bfl_async import Backoff

API = "https://api.bfl.ai"
POLL_HOST = "https://api.eu2.bfl.ai"
DELIVERY = "https://delivery-eu1.bfl.ai/results/sample.png"
KEY = "bfl-test-key-0123456789-SECRET"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
JPEG = b"\xff\xd8\xff\xe0" + bytes(range(200))
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 " + bytes(100)

FAST: dict[str, Any] = {
    "api_key": KEY,
    "poll_schedule": Backoff(initial=0.001, factor=1.0, maximum=0.001, jitter=0.0),
    "retry_base_delay": 0.001,
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
        headers={"Retry-After": "1", "X-Ratelimit-Limit": "1200"},
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
