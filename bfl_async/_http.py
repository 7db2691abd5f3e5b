"""Talking to the API: key routing, the submit and poll retry rules, errors from answers.

A submit costs money and BFL has no idempotency key, so `post_submit` tells apart the
failures that certainly created no task (retry them) from those that may have (never retry).
The API key is attached per request, and only to API hosts.
"""

from __future__ import annotations

import datetime
import email.utils
import logging
import math
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from ._catalog import SECRET_PARAMS
from ._errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    InsufficientCreditsError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    ServerError,
    SubmissionUncertainError,
)

if TYPE_CHECKING:
    from ._models import Task

logger = logging.getLogger("bfl_async")

REGIONS: Mapping[str, str] = {
    "global": "https://api.bfl.ai",
    "eu": "https://api.eu.bfl.ai",
    "us": "https://api.us.bfl.ai",
}

_API_HOST = re.compile(r"^api\.(?:[a-z0-9-]+\.)*bfl\.ai$")
_MAX_RETRY_DELAY = 30.0
# Failures before the request left for the API: no connection, no pooled connection, a
# proxy that refused the tunnel, a URL httpx cannot send.
_NOT_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.ProxyError,
    httpx.UnsupportedProtocol,
)


def is_http_url(url: str) -> bool:
    """Whether `url` is an absolute http(s) URL, one a request can be sent to."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return False
    return parsed.scheme in ("http", "https") and bool(parsed.host)


def is_api_host(url: httpx.URL, base_url: httpx.URL) -> bool:
    """May the key be sent to `url`? Only to the configured host (any port: a fake's regional
    host is another port on loopback; never over plain http when the base uses https) or to
    BFL's `api.` hosts over https.

    Delivery hosts (`delivery-eu1.bfl.ai`, blob storage) are under `bfl.ai` too, hence the
    explicit `api.` match.
    """
    if url.host == base_url.host:
        return url.scheme in (base_url.scheme, "https")
    return url.scheme == "https" and bool(_API_HOST.match(url.host))


def resendable(params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of a submit, to send again: in full (a shortened prompt would be paid
    for as it reads), secrets left out (never held in an error)."""
    return {key: value for key, value in params.items() if key not in SECRET_PARAMS}


def retry_delay(base: float, failures: int, retry_after: float | None = None) -> float:
    """Seconds before retry number `failures`: our own backoff from `base`, doubling, at
    most 30 s; a server's `Retry-After` (429, 503) is obeyed in full. Plus up to 25 %."""
    delay = min(_MAX_RETRY_DELAY, base * 2.0 ** min(failures - 1, 16))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay * random.uniform(1.0, 1.25)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or an HTTP date); None
    when it says nothing usable (an infinite wait is no answer)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # asctime and `-0000` dates name no zone: HTTP dates are GMT
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - time.time())


def float_or_none(value: Any) -> float | None:
    """A finite number from an answer's field, or None when it is missing, not a number,
    NaN or infinite."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def cost_or_none(value: Any) -> float | None:
    """Credits from an answer's field: a finite number >= 0, else None (the caller then
    counts the catalog's estimate: a garbled cost must never switch a budget off)."""
    number = float_or_none(value)
    return number if number is not None and number >= 0 else None


def int_or_none(value: Any) -> int | None:
    """An integer from an answer's field (seeds may exceed 2**32), or None."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def body_of(response: httpx.Response) -> Any:
    """The answer's JSON body, or its text when it is not JSON (an HTML error page...)."""
    try:
        return response.json()
    except ValueError:
        return response.text[:2000]


def _summary(detail: Any) -> str:
    """A detail for a message: FastAPI's validation list as `field: msg` items, without the
    `input` each echoes (a secret, or megabytes of base64 image); the full list stays on
    the error."""
    if not isinstance(detail, list):
        return str(detail)
    items = []
    for item in detail:
        if isinstance(item, dict):
            loc = item.get("loc")
            field = ".".join(str(p) for p in loc[1:]) if isinstance(loc, list) else ""
            items.append(f"{field}: {item.get('msg')}" if field else str(item.get("msg")))
        else:
            items.append(str(item))
    return "; ".join(items)


def error_from_response(response: httpx.Response, what: str, task: Task | None = None) -> APIError:
    """The typed error for an HTTP error answer to `what` ("submit to 'flux-2-pro'"...);
    for a poll, the error carries the `task` polled, which may still finish."""
    status = response.status_code
    body = body_of(response)
    detail = body.get("detail") if isinstance(body, dict) else None
    said = f": {_summary(detail)}" if detail else ""
    tail = (
        ""
        if task is None
        else f". Task {task.id} was accepted (and paid) and may still finish: wait(e.task) "
        "polls it again"
    )
    if status in (401, 403):
        return AuthenticationError(
            f"{what} was refused ({status}){said}. Check BFL_API_KEY or the api_key "
            f"you passed; the key was not retried{tail}",
            status_code=status,
            body=body,
            task=task,
        )
    if status == 402:
        return InsufficientCreditsError(
            f"{what} was refused: insufficient credits. Add credits at "
            f"https://dashboard.bfl.ai, then retry{tail}",
            status_code=status,
            body=body,
            task=task,
        )
    if status == 404:
        return NotFoundError(
            f"{what}: not found (404){said}. For a submit, check the model name{tail}",
            status_code=status,
            body=body,
            task=task,
        )
    if status in (400, 422):
        return InvalidRequestError(
            f"{what} was refused as invalid ({status}){said}. Fix the request; "
            f"retrying it unchanged will fail again{tail}",
            status_code=status,
            body=body,
            task=task,
        )
    if status == 429:
        return RateLimitError(
            f"{what}: too many requests or tasks in flight (429){said}. Lower the "
            f"concurrency or wait for tasks sharing this key to finish{tail}",
            body=body,
            retry_after=parse_retry_after(response.headers.get("retry-after")),
            task=task,
        )
    if status >= 500:
        return ServerError(
            f"{what}: server error {status} on BFL's side; try again later{tail}",
            status_code=status,
            body=body,
            task=task,
        )
    return APIError(
        f"{what}: unexpected answer {status}{said}{tail}", status_code=status, body=body, task=task
    )


class NotSent(Exception):
    """The submit certainly did not reach the server: retrying it is free."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class Refused(Exception):
    """The server refused the submit without creating a task (429, or 503 with no task id)."""

    def __init__(self, error: APIError, retry_after: float | None) -> None:
        self.error = error
        self.retry_after = retry_after
        super().__init__(str(error))


@dataclass(frozen=True)
class Accepted:
    """The submit's answer: BFL created (and charged for) a task."""

    body: dict[str, Any]


class API:
    """Sends requests to the API with the key attached only where it belongs."""

    def __init__(self, client: httpx.AsyncClient, api_key: str, base_url: str) -> None:
        self._client = client
        self._key = api_key
        self.base_url = httpx.URL(base_url.rstrip("/"))
        # API paths go under the base URL's own path: a gateway at https://gw.example/bfl
        # serves /bfl/v1/... A trailing /v1, as BFL's docs write endpoints, is the root's.
        root = self.base_url.path.rstrip("/").removesuffix("/v1")
        self._root = self.base_url.copy_with(path=root + "/")

    def __repr__(self) -> str:
        return f"API(base_url={str(self.base_url)!r})"

    def prepare(self, method: str, url: str | httpx.URL, *, json: Any = None) -> httpx.Request:
        """One API request with the key attached, built but not sent (a task's poll is built
        once and sent at every poll). Only API hosts get the key."""
        target = httpx.URL(url) if isinstance(url, str) else url
        if not target.is_absolute_url:
            target = self._root.join(str(target).lstrip("/"))
        if not is_api_host(target, self.base_url):
            raise APIConnectionError(
                f"refusing to send the API key to {target.host!r}: it is not an API host. "
                "Pass base_url= if you use a proxy in front of the API"
            )
        return self._client.build_request(method, target, json=json, headers={"x-key": self._key})

    async def send(self, request: httpx.Request) -> httpx.Response:
        """Send a prepared request; redirects are not followed so the key cannot be forwarded."""
        return await self._client.send(request, follow_redirects=False)

    async def request(
        self, method: str, url: str | httpx.URL, *, json: Any = None
    ) -> httpx.Response:
        """One API request (`prepare`, then `send`)."""
        return await self.send(self.prepare(method, url, json=json))

    async def call(self, method: str, path: str, what: str) -> Any:
        """A plain API call (credits...): transient failures raise, errors are typed."""
        try:
            response = await self.request(method, path)
        except httpx.HTTPError as exc:  # lost, or an undecodable answer
            raise APIConnectionError(f"{what}: {type(exc).__name__}; try again") from None
        if response.status_code != 200:
            raise error_from_response(response, what)
        return body_of(response)

    async def post_submit(
        self, model: str, body: Mapping[str, Any], params: Mapping[str, Any]
    ) -> Accepted:
        """POST a submit once and classify the outcome by what it may have cost.

        Raises `NotSent` or `Refused` when no task was created (the caller may retry), a
        typed `APIError` for a final refusal, and `SubmissionUncertainError` whenever a
        task may exist: never retry those.
        """
        what = f"submit to {model!r}"

        def uncertain(reason: str) -> SubmissionUncertainError:
            return SubmissionUncertainError(reason, model=model, params=resendable(params))

        try:
            response = await self.request("POST", f"/v1/{model}", json=dict(body))
        except _NOT_SENT as exc:
            raise NotSent(type(exc).__name__) from None
        except httpx.HTTPError as exc:
            # Written (or partly written) and then lost, or answered with a body that could
            # not be read (DecodingError...): the server may have acted on it.
            raise uncertain(f"{type(exc).__name__} after the request was sent") from None
        status = response.status_code
        if status == 200:
            answer = body_of(response)
            if (
                isinstance(answer, dict)
                and isinstance(answer.get("id"), str)
                and isinstance(answer.get("polling_url"), str)
            ):
                return Accepted(answer)
            raise uncertain("the API accepted it but its answer had no task id or polling_url")
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if status == 429:
            raise Refused(error_from_response(response, what), retry_after)
        if status == 503:
            answer = body_of(response)
            if not (isinstance(answer, dict) and answer.get("id")):
                raise Refused(error_from_response(response, what), retry_after)
        if status >= 500 or 200 <= status < 300:
            raise uncertain(f"HTTP {status}")
        raise error_from_response(response, what)
