"""Verifying BFL's webhook deliveries: `verify_webhook`, and `sign_webhook` for tests.

BFL pushes a task's end to the `webhook_url` of its submit. Two ways of proving a delivery
comes from BFL are in the wild, and both are accepted: an HMAC-SHA256 of the raw body in
`X-BFL-Signature: sha256=<hex>`, and the secret itself echoed in `X-Webhook-Secret`.
Checks run on the raw bytes (never on re-serialised JSON) and in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ._errors import WebhookPayloadError, WebhookVerificationError

__all__ = [
    "WebhookEvent",
    "WebhookScheme",
    "sign_webhook",
    "verify_webhook",
]

SIGNATURE_HEADER = "X-BFL-Signature"
SECRET_HEADER = "X-Webhook-Secret"
WebhookScheme = Literal["signature", "secret"]
"""`"signature"`: HMAC-SHA256 of the body in `X-BFL-Signature`; `"secret"`: the secret
echoed in `X-Webhook-Secret`."""

TERMINAL_STATUSES = frozenset(
    {"Ready", "Request Moderated", "Content Moderated", "Error", "Task not found"}
)
_STATUSES = {
    "ready": "Ready",
    "success": "Ready",
    "pending": "Pending",
    "request moderated": "Request Moderated",
    "content moderated": "Content Moderated",
    "error": "Error",
    "failed": "Error",
    "task not found": "Task not found",
}


class WebhookEvent(BaseModel):
    """One verified webhook delivery: a task's status, in the poll answers' vocabulary.

    `status` is normalised: `SUCCESS` becomes `Ready`, `FAILED` becomes `Error`, and
    spellings such as `CONTENT_MODERATED` become the poll status (`Content Moderated`);
    a status unknown here is kept as sent.
    """

    model_config = ConfigDict(frozen=True)

    task_id: str
    status: str
    result: dict[str, Any] | None = None
    """The `result` object (`sample`, `seed`...), as in a poll answer."""
    details: Any = None
    """Why the task failed: the body's `details`, else its `error` and `message`."""
    raw: dict[str, Any] = {}
    """The whole delivery body, as BFL sent it."""

    @property
    def terminal(self) -> bool:
        """Whether the event reports the task's end (ready, moderated, failed, unknown)."""
        return self.status in TERMINAL_STATUSES


def sign_webhook(
    body: bytes, secret: str, *, scheme: WebhookScheme = "signature"
) -> dict[str, str]:
    """The header that proves `body` comes from BFL, under `scheme`: for tests and fakes.

    ```python
    headers = sign_webhook(body, SECRET)  # {"X-BFL-Signature": "sha256=..."}
    assert verify_webhook(body, headers, SECRET).task_id
    ```
    """
    _check_secret(secret)
    if scheme == "signature":
        return {SIGNATURE_HEADER: f"sha256={_digest(body, secret)}"}
    if scheme == "secret":
        return {SECRET_HEADER: secret}
    raise ValueError(f"unknown webhook scheme {scheme!r}; allowed: signature, secret")


def verify_webhook(body: bytes, headers: Mapping[str, str], secret: str) -> WebhookEvent:
    """Check a delivery's raw `body` and `headers` against `secret`; return its event.

    Header names are case-insensitive. Raises `WebhookVerificationError` when neither a
    valid `X-BFL-Signature` nor a valid `X-Webhook-Secret` is present (answer 401), and
    `WebhookPayloadError` when a verified body is not a task event (answer 400).

    ```python
    event = verify_webhook(await request.body(), request.headers, SECRET)
    if event.terminal:
        print(event.task_id, event.status, (event.result or {}).get("sample"))
    ```
    """
    _check_secret(secret)
    # A header sent twice is two items (Starlette) or one value joined with commas (httpx):
    # every signature counts, whatever the order, and one valid is enough.
    signatures: list[str] = []
    echoed: list[str] = []
    for name, value in headers.items():
        if name.lower() == SIGNATURE_HEADER.lower():
            signatures += value.split(",")
        elif name.lower() == SECRET_HEADER.lower():
            echoed.append(value)  # not split: a secret may hold a comma
    if not signatures and not echoed:
        raise WebhookVerificationError(
            f"the delivery has neither an {SIGNATURE_HEADER} nor an {SECRET_HEADER} header; "
            "it does not come from BFL"
        )
    valid = False
    expected = _digest(body, secret).encode()
    for signature in signatures:
        given = signature.strip()
        if given[:7].lower() == "sha256=":
            given = given[7:]
        valid = hmac.compare_digest(given.lower().encode(), expected) or valid
    for value in echoed:
        valid = hmac.compare_digest(value.encode(), secret.encode()) or valid
    if not valid:
        raise WebhookVerificationError(
            "the delivery's signature does not match the webhook secret: it is forged, "
            "altered, or signed with another secret"
        )
    return _parse(body)


def _check_secret(secret: str) -> None:
    if not isinstance(secret, str) or not secret:
        raise ValueError("the webhook secret must be a non-empty string")


def _digest(body: bytes, secret: str) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _parse(body: bytes) -> WebhookEvent:
    try:
        data = json.loads(body)
    except ValueError:
        raise WebhookPayloadError("the webhook body is not JSON") from None
    except RecursionError:
        raise WebhookPayloadError("the webhook body is JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise WebhookPayloadError("the webhook body is not a JSON object")
    task_id = data.get("task_id", data.get("id"))
    if not isinstance(task_id, str) or not task_id:
        raise WebhookPayloadError("the webhook body has no task_id")
    status = data.get("status")
    if not isinstance(status, str) or not status:
        raise WebhookPayloadError(f"the webhook for task {task_id} has no status")
    result = data.get("result")
    if result is not None and not isinstance(result, dict):
        raise WebhookPayloadError(f"the webhook for task {task_id} has a malformed result")
    key = " ".join(status.replace("_", " ").replace("-", " ").lower().split())
    details = data.get("details")
    if details is None:  # BFL's guide shows failures saying why in `error` and `message`
        details = ": ".join(str(data[k]) for k in ("error", "message") if data.get(k)) or None
    return WebhookEvent(
        task_id=task_id,
        status=_STATUSES.get(key, status),
        result=result,
        details=details,
        raw=data,
    )
