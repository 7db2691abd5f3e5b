"""The API contract's tables, asserted against every server the tests use.

Each row of ROWS is a line of shared/bfl-api-contract.md: a situation on the server, the
answer the respx builders of tests/helpers.py give for it, and what the contract says that
answer looks like. Every row runs against three backends: FakeBFL over loopback HTTP,
FakeBFL through its in-memory transport, and the builders mounted with respx, as the unit
tests mount them. So neither the fake nor the unit tests' answers can drift from the contract.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import httpx
import pytest
import respx

from bfl_async._download import url_expiry
from bfl_async._http import is_api_host
from bfl_async.testing import FakeBFL, HostURLs

from .helpers import (
    API,
    DELIVERY,
    DELIVERY_HOST,
    KEY,
    POLL_HOST,
    accepted,
    credits_answer,
    error_answer,
    expired_answer,
    failed,
    image,
    moderated,
    poll_answer,
    polling_url,
    ready,
    ready_flux1,
    signed_url,
)

pytestmark = pytest.mark.anyio

SUBMIT_KEYS = {"id", "polling_url", "cost", "input_mp", "output_mp"}
POLL_KEYS = {"id", "status", "result", "progress", "details", "preview"}
FLUX2_RESULT_KEYS = {"start_time", "prompt", "seed", "sample"}
FLUX1_RESULT_KEYS = FLUX2_RESULT_KEYS | {"end_time", "duration"}
RESULT_TTL = 600.0
"""A signed URL expires about 10 minutes after its task finished."""
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF")

# -- the table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Situation:
    """What a request meets on the server, said once for every backend."""

    action: Literal["submit", "poll", "poll_global_host", "credits", "download"]
    model: str = "flux-2-pro"
    body: Mapping[str, Any] = field(default_factory=lambda: {"prompt": "a red fox"})
    key: Literal["right", "wrong", "none"] = "right"
    """The `x-key` of the request under test (earlier steps always send the right one)."""
    status: str = "Ready"
    """Polls and downloads: the task's status when asked ("Task not found": never made)."""
    trouble: int | None = None
    """Submits: 402 out of credits, 429 the account is full, 500/502/503 server trouble."""
    expired: bool = False
    """Downloads: the signed URL's `se=` has passed."""


@dataclass(frozen=True)
class Exchange:
    """The answer to the request under test, and what the checks must know about it."""

    response: httpx.Response
    task_id: str
    """The task the request was about ("" for none)."""
    urls: HostURLs

    def json(self) -> Any:
        return self.response.json()


@dataclass(frozen=True)
class Row:
    """One line of the contract: the situation, the builders' answer to it, the check."""

    id: str
    situation: Situation
    builder: Callable[[str], httpx.Response]
    """The helpers' answer, for the task id, that the respx backend mounts."""
    check: Callable[[Exchange], None]


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def accepted_answer(family: Literal["flux1", "flux2"]) -> Callable[[Exchange], None]:
    """200 `{id: uuid4, polling_url, cost: float (FLUX.1: null), input_mp, output_mp}`."""

    def check(x: Exchange) -> None:
        assert x.response.status_code == 200
        body = x.json()
        assert set(body) == SUBMIT_KEYS
        assert uuid.UUID(body["id"]).version == 4
        assert body["polling_url"] == f"{x.urls.polling}/v1/get_result?id={body['id']}"
        assert is_api_host(httpx.URL(body["polling_url"]), httpx.URL(x.urls.api))
        if family == "flux1":
            assert body["cost"] is None
        else:
            assert is_number(body["cost"]) and body["cost"] > 0
        for mp in ("input_mp", "output_mp"):
            assert body[mp] is None or is_number(body[mp])

    return check


def poll_answer_of(
    status: str,
    *,
    progress: Literal["null", "fraction", "null or fraction"] = "null",
    result_keys: set[str] | None = None,
    moderation: bool = False,
) -> Callable[[Exchange], None]:
    """200 with the six keys, `Retry-After: 1`, `X-Ratelimit-Limit: 1200`, and `status`."""

    def check(x: Exchange) -> None:
        assert x.response.status_code == 200
        assert x.response.headers["retry-after"] == "1"
        assert x.response.headers["x-ratelimit-limit"] == "1200"
        body = x.json()
        assert set(body) == POLL_KEYS
        assert (body["id"], body["status"]) == (x.task_id, status)
        value = body["progress"]
        if value is None:
            assert progress != "fraction", "FLUX.1 gives progress as 0.0-1.0 while pending"
        else:
            assert progress != "null", "FLUX.2 gives progress null"
            assert is_number(value) and 0.0 <= value <= 1.0
        if result_keys is None:
            assert body["result"] is None
        else:
            check_result(x, body["result"], result_keys)
        details = body["details"]
        if moderation:
            assert set(details) == {"Moderation Reasons"}
            reasons = details["Moderation Reasons"]
            assert reasons and all(isinstance(reason, str) for reason in reasons)
        else:
            assert details is None or isinstance(details, dict)

    return check


def check_result(x: Exchange, result: Any, keys: set[str]) -> None:
    """`result` of a `Ready`: its keys, an integer seed, a signed URL on a delivery host."""
    assert set(result) == keys
    assert isinstance(result["seed"], int) and not isinstance(result["seed"], bool)
    assert isinstance(result["prompt"], str) and is_number(result["start_time"])
    if "duration" in keys:
        assert is_number(result["end_time"]) and is_number(result["duration"])
        assert result["end_time"] >= result["start_time"]
    sample = httpx.URL(result["sample"])
    assert str(sample).startswith(f"{x.urls.delivery}/")
    assert not is_api_host(sample, httpx.URL(x.urls.api))  # the key must not go there
    expiry = url_expiry(str(sample))
    assert expiry is not None, "a signed URL carries its expiry in se="
    assert abs(expiry - time.time() - RESULT_TTL) < 60


def detail_answer(status: int, detail: str | None = None) -> Callable[[Exchange], None]:
    """`status` with `{"detail": <string>}` (that string, when given)."""

    def check(x: Exchange) -> None:
        assert x.response.status_code == status
        body = x.json()
        assert set(body) == {"detail"} and isinstance(body["detail"], str)
        if detail is not None:
            assert body["detail"] == detail

    return check


def not_authenticated(x: Exchange) -> None:
    """403 (some paths: 401) `{"detail": "Not authenticated - …"}`."""
    assert x.response.status_code in (401, 403)
    assert x.json()["detail"].startswith("Not authenticated - ")


def validation_error(x: Exchange) -> None:
    """422 with FastAPI's list `{"detail": [{"loc": [...], "msg": "...", "type": "..."}]}`."""
    assert x.response.status_code == 422
    problems = x.json()["detail"]
    assert isinstance(problems, list) and problems
    for problem in problems:
        assert isinstance(problem["loc"], list) and problem["loc"]
        assert isinstance(problem["msg"], str) and isinstance(problem["type"], str)


def rate_limited(x: Exchange) -> None:
    """429, carrying a `Retry-After` in seconds."""
    assert x.response.status_code == 429
    assert float(x.response.headers["retry-after"]) >= 0


def server_error(status: int) -> Callable[[Exchange], None]:
    """`status` with any body (maybe HTML): only the status is promised."""

    def check(x: Exchange) -> None:
        assert x.response.status_code == status

    return check


def credits_balance(x: Exchange) -> None:
    """200 `{"credits": <float>}`."""
    assert x.response.status_code == 200
    body = x.json()
    assert set(body) == {"credits"} and isinstance(body["credits"], float)


def image_served(x: Exchange) -> None:
    """200 with an image, asked without a key; Content-Length is the body's length."""
    assert x.response.status_code == 200
    assert "x-key" not in x.response.request.headers
    assert x.response.headers["content-type"].startswith("image/")
    assert int(x.response.headers["content-length"]) == len(x.response.content)
    assert x.response.content.startswith(IMAGE_MAGIC)


def url_refused(x: Exchange) -> None:
    """An expired signed URL is refused (Azure: 403 AuthenticationFailed)."""
    assert x.response.status_code == 403
    assert "AuthenticationFailed" in x.response.text


def error(status: int) -> Callable[[str], httpx.Response]:
    """The helpers' answer for `status` from the error table, whatever the task."""
    return lambda _: error_answer(status)


S = Situation
ROWS: list[Row] = [
    # Submit: 200 answers.
    Row("submit FLUX.2: 200 with cost", S("submit"), accepted, accepted_answer("flux2")),
    Row(
        "submit FLUX.1: 200, cost null",
        S("submit", model="flux-pro-1.1"),
        lambda task_id: accepted(task_id, cost=None),
        accepted_answer("flux1"),
    ),
    # Submit: the error table.
    Row(
        "400 semantic error",
        S("submit", body={"prompt": "x", "width": 4096, "height": 4096}),
        error(400),
        detail_answer(400),
    ),
    Row(
        "402 insufficient credits",
        S("submit", trouble=402),
        error(402),
        detail_answer(402, "Insufficient credits"),
    ),
    Row("403 wrong key", S("submit", key="wrong"), error(403), not_authenticated),
    Row("403 no key", S("submit", key="none"), error(403), not_authenticated),
    Row(
        "404 unknown model path",
        S("submit", model="flux-kontext"),  # the seeds' name; the real path is -pro
        error(404),
        detail_answer(404, "Not Found"),
    ),
    Row(
        "422 validation",
        S("submit", body={"seed": 1}),
        error(422),
        validation_error,
    ),
    Row("429 account full", S("submit", trouble=429), error(429), rate_limited),
    *(
        Row(
            f"{status} server trouble",
            S("submit", trouble=status),
            error(status),
            server_error(status),
        )
        for status in (500, 502, 503)
    ),
    # Poll: each status.
    Row(
        "Pending FLUX.2: progress null",
        S("poll", status="Pending"),
        lambda task_id: poll_answer("Pending", task_id),
        poll_answer_of("Pending"),
    ),
    Row(
        "Pending FLUX.1: progress a fraction",
        S("poll", model="flux-pro-1.1", status="Pending"),
        lambda task_id: poll_answer("Pending", task_id, progress=0.25),
        poll_answer_of("Pending", progress="fraction"),
    ),
    Row(
        "Ready FLUX.2",
        S("poll"),
        ready,
        poll_answer_of("Ready", result_keys=FLUX2_RESULT_KEYS),
    ),
    Row(
        "Ready FLUX.1: end_time and duration",
        S("poll", model="flux-pro-1.1"),
        ready_flux1,
        # The contract says nothing of a finished FLUX.1 task's progress.
        poll_answer_of("Ready", progress="null or fraction", result_keys=FLUX1_RESULT_KEYS),
    ),
    *(
        Row(
            status,
            S("poll", status=status),
            partial(moderated, status),
            poll_answer_of(status, moderation=True),
        )
        for status in ("Request Moderated", "Content Moderated")
    ),
    Row("Error", S("poll", status="Error"), failed, poll_answer_of("Error")),
    Row(
        "Task not found",
        S("poll", status="Task not found"),
        lambda task_id: poll_answer("Task not found", task_id),
        poll_answer_of("Task not found"),
    ),
    Row(
        "poll with a wrong key: 403",
        S("poll", key="wrong"),
        error(403),
        not_authenticated,
    ),
    Row(
        "regional task polled on the global host: 404",
        S("poll_global_host"),
        error(404),
        detail_answer(404, "Not Found"),
    ),
    # Credits.
    Row("credits", S("credits"), lambda _: credits_answer(), credits_balance),
    Row(
        "credits with a wrong key: 403",
        S("credits", key="wrong"),
        error(403),
        not_authenticated,
    ),
    # Delivery: signed URLs that need no key and expire.
    Row("signed URL, no key", S("download", key="none"), lambda _: image(), image_served),
    Row(
        "signed URL past se=: refused",
        S("download", key="none", expired=True),
        lambda _: expired_answer(),
        url_refused,
    ),
]
TERMINAL_FAKE_STATUSES = ("Ready", "Request Moderated", "Content Moderated", "Error")


# -- the backends ------------------------------------------------------------------------


class FakeBackend:
    """A FakeBFL, reached over loopback HTTP or in memory, brought into each situation by
    using its API as a client would, and by its test knobs."""

    def __init__(self, fake: FakeBFL, client: httpx.AsyncClient, urls: HostURLs) -> None:
        self.fake = fake
        self.client = client
        self.urls = urls

    def headers(self, key: str) -> dict[str, str]:
        return {"right": {"x-key": self.fake.api_key}, "wrong": {"x-key": "wrong"}}.get(key, {})

    async def submit(self, situation: Situation, key: str = "right") -> httpx.Response:
        return await self.client.post(
            f"{self.urls.api}/v1/{situation.model}",
            json=dict(situation.body),
            headers=self.headers(key),
        )

    async def exchange(self, row: Row) -> Exchange:
        s, fake = row.situation, self.fake
        headers = self.headers(s.key)
        if s.action == "credits":
            response = await self.client.get(f"{self.urls.api}/v1/credits", headers=headers)
            return Exchange(response, "", self.urls)
        if s.action == "submit":
            if s.trouble == 402:
                fake.credits = 0.0
            elif s.trouble == 429:
                fake.limits["standard"] = 1
                assert (await self.submit(s)).status_code == 200
            elif s.trouble is not None:
                fake.fail_next("submit", str(s.trouble))  # type: ignore[arg-type]
            response = await self.submit(s, s.key)
            task_id = response.json()["id"] if response.status_code == 200 else ""
            return Exchange(response, task_id, self.urls)
        if s.status == "Task not found":
            task_id = str(uuid.uuid4())
        else:
            if s.status in TERMINAL_FAKE_STATUSES:
                fake.outcome = lambda model, body: s.status
            if s.expired:
                fake.result_ttl = -60.0
            task_id = (await self.submit(s)).json()["id"]
            if s.status != "Pending":
                fake.finish_now(task_id)
        host = self.urls.api if s.action == "poll_global_host" else self.urls.polling
        poll_headers = headers if s.action != "download" else self.headers("right")
        url = f"{host}/v1/get_result?id={task_id}"
        response = await self.client.get(url, headers=poll_headers)
        if s.action == "download":
            sample = response.json()["result"]["sample"]
            response = await self.client.get(sample, headers=headers)
        return Exchange(response, task_id, self.urls)


class RespxBackend:
    """The helpers' builders mounted with respx: each row's answer is what its builder
    returns, asked with the same request a client would send."""

    urls = HostURLs(api=API, polling=POLL_HOST, delivery=DELIVERY_HOST)

    def __init__(self, router: respx.MockRouter, client: httpx.AsyncClient) -> None:
        self.router = router
        self.client = client

    async def exchange(self, row: Row) -> Exchange:
        s = row.situation
        task_id = str(uuid.uuid4())
        answer = row.builder(task_id)
        headers = {"right": {"x-key": KEY}, "wrong": {"x-key": "wrong"}}.get(s.key, {})
        if s.action == "credits":
            self.router.get(f"{API}/v1/credits").mock(return_value=answer)
            response = await self.client.get(f"{API}/v1/credits", headers=headers)
        elif s.action == "submit":
            self.router.post(f"{API}/v1/{s.model}").mock(return_value=answer)
            response = await self.client.post(
                f"{API}/v1/{s.model}", json=dict(s.body), headers=headers
            )
        elif s.action == "download":
            sample = signed_url(expires_in=-60 if s.expired else RESULT_TTL)
            self.router.get(polling_url(task_id)).mock(return_value=ready(task_id, url=sample))
            self.router.get(DELIVERY).mock(return_value=answer)
            polled = await self.client.get(polling_url(task_id), headers={"x-key": KEY})
            response = await self.client.get(polled.json()["result"]["sample"], headers=headers)
        else:
            host = API if s.action == "poll_global_host" else POLL_HOST
            url = f"{host}/v1/get_result?id={task_id}"
            self.router.get(url).mock(return_value=answer)
            response = await self.client.get(url, headers=headers)
        return Exchange(response, task_id, self.urls)


Backend = FakeBackend | RespxBackend


@pytest.fixture(params=["loopback", "memory", "respx"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """Each server the tests use, behind one interface."""
    # Tasks run until finish_now(), so a Pending stays pending however slow the machine.
    fake = FakeBFL(generation_time=3600)
    if request.param == "loopback":
        async with fake, httpx.AsyncClient(timeout=10) as client:
            yield FakeBackend(fake, client, fake.loopback_urls)
    elif request.param == "memory":
        async with fake.client(timeout=10) as client:
            yield FakeBackend(fake, client, fake.memory_urls)
    else:
        with respx.mock(assert_all_mocked=True) as router:
            async with httpx.AsyncClient(timeout=10) as client:
                yield RespxBackend(router, client)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
async def test_contract(backend: Backend, row: Row) -> None:
    row.check(await backend.exchange(row))


def test_the_table_covers_every_status_and_error_of_the_contract() -> None:
    polled = {row.situation.status for row in ROWS if row.situation.action == "poll"}
    assert polled == {"Pending", *TERMINAL_FAKE_STATUSES, "Task not found"}
    refusals = {row.id.split()[0] for row in ROWS if row.situation.action == "submit"}
    assert {"400", "402", "403", "404", "422", "429", "500", "502", "503"} <= refusals
