"""AsyncBFL against respx: the contract's status and error tables, retries, keys, ownership."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import logging
import math
import time
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import respx

import bfl_async._client
from bfl_async import (
    APIConnectionError,
    AsyncBFL,
    AuthenticationError,
    DownloadError,
    GenerationError,
    InsufficientCreditsError,
    InvalidRequestError,
    MissingAPIKeyError,
    ModerationError,
    NotFoundError,
    OutputExistsError,
    ParameterError,
    RateLimitError,
    ResultExpiredError,
    SubmissionUncertainError,
    Task,
    TaskNotFoundError,
    UnknownModelError,
    WaitTimeoutError,
    WebhookEvent,
)
from bfl_async.testing import FakeBFL

from .helpers import (
    API,
    DELIVERY,
    FAST,
    JPEG,
    KEY,
    PNG,
    WEBP,
    accepted,
    error_answer,
    image,
    moderated,
    poll_answer,
    polling_url,
    ready,
    signed_url,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def mock() -> AsyncIterator[respx.MockRouter]:
    with respx.mock(assert_all_mocked=True, assert_all_called=False) as router:
        yield router


@pytest.fixture
async def client(mock: respx.MockRouter) -> AsyncIterator[AsyncBFL]:
    async with AsyncBFL(**FAST) as c:
        yield c


def route_task(
    mock: respx.MockRouter,
    *polls: httpx.Response,
    task_id: str = "task-1",
    model: str = "flux-2-pro",
    content: httpx.Response | None = None,
) -> tuple[respx.Route, respx.Route, respx.Route]:
    submit = mock.post(f"{API}/v1/{model}").mock(return_value=accepted(task_id))
    poll = mock.get(polling_url(task_id)).mock(side_effect=list(polls))
    download = mock.get(DELIVERY).mock(return_value=content or image())
    return submit, poll, download


# --- the happy path and the key ----------------------------------------------------------


async def test_submit_wait_download_sends_key_only_to_api_hosts(
    client: AsyncBFL, mock: respx.MockRouter, tmp_path: Path
) -> None:
    submit, poll, download = route_task(mock, poll_answer("Pending"), ready())
    task = await client.submit("flux-2-pro", prompt="a red fox", width=1024, height=1024)
    assert task.id == "task-1" and task.cost == 3.0 and task.model == "flux-2-pro"
    assert json.loads(submit.calls.last.request.content) == {
        "prompt": "a red fox",
        "width": 1024,
        "height": 1024,
    }
    result = await client.wait(task)
    assert result.seed == 42 and result.polls == 2
    path = await client.download(result, tmp_path / "out")
    assert path == tmp_path / "out" / "task-1.png"
    assert path.read_bytes() == PNG
    assert not list((tmp_path / "out").glob("*.part"))
    assert submit.calls.last.request.headers["x-key"] == KEY
    assert all(c.request.headers["x-key"] == KEY for c in poll.calls)
    assert "x-key" not in download.calls.last.request.headers


async def test_generate_returns_everything_a_caller_needs(
    client: AsyncBFL, mock: respx.MockRouter, tmp_path: Path
) -> None:
    route_task(mock, ready(seed=2**40))
    image_ = await client.generate(
        "flux-2-pro", prompt="a red fox", output_dir=tmp_path, name="fox"
    )
    assert image_.path == tmp_path / "fox.png"
    assert (image_.task_id, image_.model, image_.seed, image_.cost) == (
        "task-1",
        "flux-2-pro",
        2**40,
        3.0,
    )
    t = image_.timings
    assert min(t.queued, t.submit, t.generation, t.download) >= 0
    assert t.total >= t.generation


async def test_credits(client: AsyncBFL, mock: respx.MockRouter) -> None:
    mock.get(f"{API}/v1/credits").mock(return_value=httpx.Response(200, json={"credits": 12.5}))
    assert await client.credits() == 12.5


async def test_credits_bad_answer_and_bad_key(client: AsyncBFL, mock: respx.MockRouter) -> None:
    route = mock.get(f"{API}/v1/credits")
    route.mock(return_value=httpx.Response(200, text="<html>oops</html>"))
    with pytest.raises(Exception, match="unexpected answer"):
        await client.credits()
    route.mock(return_value=httpx.Response(403, json={"detail": "Not authenticated"}))
    with pytest.raises(AuthenticationError):
        await client.credits()
    route.mock(side_effect=httpx.ConnectError("down"))
    with pytest.raises(APIConnectionError):
        await client.credits()


# --- poll statuses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "details", "error", "check"),
    [
        (
            "Request Moderated",
            {"Moderation Reasons": ["Derivative Works Filter"]},
            ModerationError,
            lambda e: e.kind == "request" and e.reasons == ["Derivative Works Filter"],
        ),
        (
            "Content Moderated",
            {"Moderation Reasons": ["NSFW"]},
            ModerationError,
            lambda e: e.kind == "content" and e.reasons == ["NSFW"],
        ),
        ("Error", {"message": "boom"}, GenerationError, lambda e: "boom" in str(e)),
        ("Task not found", None, TaskNotFoundError, lambda e: e.task.id == "task-1"),
    ],
)
async def test_terminal_statuses_raise_their_error_and_free_the_slot(
    client: AsyncBFL,
    mock: respx.MockRouter,
    status: str,
    details: Any,
    error: type[Exception],
    check: Any,
) -> None:
    route_task(mock, poll_answer("Pending"), poll_answer(status, details=details))
    task = await client.submit("flux-2-pro", prompt="x")
    with pytest.raises(error) as caught:
        await client.wait(task)
    assert check(caught.value)
    assert client.limiter.in_use() == 0


async def test_unknown_status_warns_and_keeps_polling(
    client: AsyncBFL, mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    route_task(mock, poll_answer("Generating"), poll_answer("Generating"), ready())
    task = await client.submit("flux-2-pro", prompt="x")
    with caplog.at_level(logging.WARNING, logger="bfl_async"):
        result = await client.wait(task)
    assert result.polls == 3
    warnings = [r for r in caplog.records if "unknown status 'Generating'" in r.getMessage()]
    assert len(warnings) == 1


async def test_transient_poll_failures_are_retried(
    client: AsyncBFL, mock: respx.MockRouter
) -> None:
    route_task(
        mock,
        httpx.Response(503, text="<html>busy</html>", headers={"Retry-After": "0"}),
        httpx.Response(429, json={"detail": "slow down"}, headers={"Retry-After": "0"}),
        httpx.Response(500),
        httpx.Response(200, text="not json"),
        httpx.Response(200, json={"weird": True}),
    )
    mock.get(polling_url("task-1")).mock(
        side_effect=[
            httpx.Response(502),
            httpx.ConnectError("reset"),
            httpx.ReadTimeout("slow"),
            httpx.RemoteProtocolError("dropped"),
            httpx.Response(200, text="{truncated"),
            ready(),
        ]
    )
    task = await client.submit("flux-2-pro", prompt="x")
    result = await client.wait(task)
    assert result.polls == 6


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (error_answer(403), AuthenticationError),
        (error_answer(401), AuthenticationError),
        (error_answer(404), TaskNotFoundError),
        (error_answer(400, "bad id"), InvalidRequestError),
    ],
)
async def test_poll_errors_that_polling_cannot_fix_end_the_watch(
    client: AsyncBFL, mock: respx.MockRouter, answer: httpx.Response, error: type[Exception]
) -> None:
    route_task(mock, answer)
    task = await client.submit("flux-2-pro", prompt="x")
    with pytest.raises(error):
        await client.wait(task)
    assert client.limiter.in_use() == 0


async def test_a_task_whose_polling_failed_is_polled_again_by_the_next_wait(
    client: AsyncBFL, mock: respx.MockRouter, tmp_path: Path
) -> None:
    # A gateway's odd answer to a poll: the task is paid and may be ready; its handle is
    # not lost with the error, and waiting for it again polls again.
    route_task(mock, error_answer(400, "gateway says no"), ready())
    with pytest.raises(InvalidRequestError, match=r"wait\(e.task\) polls it again") as caught:
        await client.generate("flux-2-pro", prompt="x", output_dir=tmp_path)
    task = caught.value.task
    assert task is not None and task.id == "task-1"
    assert (await client.wait(task)).seed == 42 and client.limiter.in_use() == 0
    # The task's own end is kept: waiting again does not poll again.
    _, poll, _ = route_task(mock, moderated("Content Moderated"), ready(), task_id="task-2")
    task = await client.submit("flux-2-pro", prompt="x")
    for _ in range(2):
        with pytest.raises(ModerationError):
            await client.wait(task)
    assert poll.call_count == 1


async def test_ready_without_sample_is_asked_again_then_a_typed_error(
    client: AsyncBFL, mock: respx.MockRouter
) -> None:
    empty = poll_answer("Ready", result={"seed": 1})
    _, poll, _ = route_task(mock, empty, ready())  # a glitch: the next answer has the URL
    assert (await client.wait(await client.submit("flux-2-pro", prompt="x"))).seed == 42
    assert poll.call_count == 2
    _, poll, _ = route_task(mock, *[empty] * 4, task_id="task-2")
    task = await client.submit("flux-2-pro", prompt="x")
    with pytest.raises(GenerationError, match="no result URL") as caught:
        await client.wait(task)
    assert poll.call_count == 4 and "wait(" not in str(caught.value)  # no advice that fails


async def test_flux1_progress_and_result_fields(client: AsyncBFL, mock: respx.MockRouter) -> None:
    submit, _, _ = route_task(
        mock,
        poll_answer("Pending", progress=0.5),
        poll_answer(
            "Ready",
            result={
                "sample": signed_url(),
                "seed": "7",
                "prompt": "p",
                "start_time": 10.0,
                "end_time": 14.5,
                "duration": 4.5,
            },
        ),
        model="flux-pro-1.1",
    )
    submit.mock(return_value=accepted(cost=None))
    task = await client.submit("flux-pro-1.1", prompt="p", width=1024, height=768)
    assert task.cost is None
    result = await client.wait(task)
    assert (result.seed, result.duration, result.end_time) == (7, 4.5, 14.5)


# --- deadlines ---------------------------------------------------------------------------


async def test_wait_deadline_carries_the_handle_and_the_task_is_still_watched(
    client: AsyncBFL, mock: respx.MockRouter
) -> None:
    gate = anyio.Event()

    def poll(request: httpx.Request) -> httpx.Response:
        return ready() if gate.is_set() else poll_answer("Pending")

    mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
    mock.get(polling_url("task-1")).mock(side_effect=poll)
    mock.get(DELIVERY).mock(return_value=image())
    task = await client.submit("flux-2-pro", prompt="x")
    with pytest.raises(WaitTimeoutError) as caught:
        await client.wait(task, timeout=0.05)
    assert caught.value.task == task
    assert client.limiter.in_use() == 1
    assert client.in_flight == [task]
    gate.set()
    result = await client.wait(caught.value.task, timeout=None)
    assert result.task.id == "task-1"
    assert client.limiter.in_use() == 0


async def test_default_wait_timeout_comes_from_the_client(mock: respx.MockRouter) -> None:
    mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
    mock.get(polling_url("task-1")).mock(return_value=poll_answer("Pending"))
    async with AsyncBFL(**{**FAST, "wait_timeout": 0.05, "close_grace": 0.01}) as client:
        task = await client.submit("flux-2-pro", prompt="x")
        with pytest.raises(WaitTimeoutError, match="call wait"):
            await client.wait(task)


# --- submit errors and the retry rule ------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (error_answer(400, "bad prompt"), InvalidRequestError),
        (error_answer(402), InsufficientCreditsError),
        (error_answer(403), AuthenticationError),
        (error_answer(401), AuthenticationError),
        (error_answer(404), NotFoundError),
        (
            error_answer(422, [{"loc": ["body", "width"], "msg": "too big", "type": "value"}]),
            InvalidRequestError,
        ),
    ],
)
async def test_submit_refusals_are_typed_and_never_retried(
    client: AsyncBFL, mock: respx.MockRouter, answer: httpx.Response, error: type[Exception]
) -> None:
    submit = mock.post(f"{API}/v1/flux-2-pro").mock(return_value=answer)
    with pytest.raises(error) as caught:
        await client.submit("flux-2-pro", prompt="x")
    assert submit.call_count == 1
    assert caught.value.status_code == answer.status_code  # type: ignore[attr-defined]
    assert client.limiter.in_use() == 0
    assert KEY not in str(caught.value) and KEY not in repr(caught.value)


async def test_422_carries_the_server_detail_list(client: AsyncBFL, mock: respx.MockRouter) -> None:
    detail = [
        {"loc": ["body", "width"], "msg": "too big", "type": "value", "input": 99999},
        {"loc": ["body", "webhook_secret"], "msg": "too long", "input": "hush-SECRET"},
    ]
    mock.post(f"{API}/v1/flux-2-pro").mock(return_value=error_answer(422, detail))
    with pytest.raises(InvalidRequestError) as caught:
        await client.submit("flux-2-pro", prompt="x")
    assert caught.value.errors == detail
    # The message names the fields, without the inputs the server echoes.
    assert "width: too big; webhook_secret: too long" in str(caught.value)
    assert "SECRET" not in str(caught.value) and "99999" not in str(caught.value)


@pytest.mark.parametrize(
    "refusal",
    [
        httpx.Response(429, json={"detail": "too many"}, headers={"Retry-After": "0"}),
        httpx.Response(503, text="<html>Service Unavailable</html>"),
        httpx.ConnectError("refused"),
        httpx.ConnectTimeout("slow connect"),
        httpx.PoolTimeout("pool"),
        httpx.ProxyError("407 Proxy Authentication Required"),  # CONNECT refused: no tunnel
    ],
)
async def test_submit_is_retried_when_no_task_was_created(
    client: AsyncBFL, mock: respx.MockRouter, refusal: Any
) -> None:
    submit = mock.post(f"{API}/v1/flux-2-pro").mock(side_effect=[refusal, refusal, accepted()])
    task = await client.submit("flux-2-pro", prompt="x")
    assert task.id == "task-1"
    assert submit.call_count == 3


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (httpx.ReadTimeout("no answer"), "ReadTimeout"),
        (httpx.RemoteProtocolError("Server disconnected"), "RemoteProtocolError"),
        (httpx.ReadError("reset"), "ReadError"),
        (httpx.WriteTimeout("stuck"), "WriteTimeout"),
        (httpx.Response(500, json={"detail": "Internal"}), "HTTP 500"),
        (httpx.Response(502, text="<html>Bad Gateway</html>"), "HTTP 502"),
        (httpx.Response(504, text="Gateway Timeout"), "HTTP 504"),
        (httpx.Response(503, json={"id": "maybe-created"}), "HTTP 503"),
        (httpx.Response(200, json={"status": "ok"}), "no task id"),
        (httpx.Response(200, text="<html>"), "no task id"),
        (httpx.Response(202, json={"id": "x"}), "HTTP 202"),
    ],
)
async def test_submit_that_may_have_created_a_task_is_never_retried(
    client: AsyncBFL, mock: respx.MockRouter, failure: Any, reason: str
) -> None:
    submit = mock.post(f"{API}/v1/flux-2-pro").mock(side_effect=[failure, accepted()])
    prompt = "a fox in the snow, " * 30  # long: resent as it was, not shortened
    with pytest.raises(SubmissionUncertainError) as caught:
        await client.submit(
            "flux-2-pro", prompt=prompt, webhook_url="https://x.test/hook", webhook_secret="hush"
        )
    assert submit.call_count == 1
    error = caught.value
    assert reason in str(error)
    assert error.model == "flux-2-pro"
    # What to resubmit with, once the dashboard shows no task: secrets left out.
    assert error.params == {"prompt": prompt, "webhook_url": "https://x.test/hook"}
    for text in (str(error), repr(error), repr(error.params)):
        assert "hush" not in text and KEY not in text
    assert client.limiter.in_use() == 0
    again = await client.submit(error.model, **error.params, webhook_secret="hush")
    assert again.id == "task-1" and json.loads(submit.calls[-1].request.content) == {
        "prompt": prompt, "webhook_url": "https://x.test/hook", "webhook_secret": "hush"
    }  # fmt: skip


async def test_rate_limit_retries_are_bounded(mock: respx.MockRouter) -> None:
    mock.post(f"{API}/v1/flux-2-pro").mock(
        return_value=httpx.Response(429, json={"detail": "busy"}, headers={"Retry-After": "0"})
    )
    async with AsyncBFL(**{**FAST, "rate_limit_retries": 2}) as client:
        with pytest.raises(RateLimitError) as caught:
            await client.submit("flux-2-pro", prompt="x")
    assert caught.value.retry_after == 0
    assert mock.calls.call_count == 3


@pytest.mark.parametrize("code", [429, 503])
async def test_a_long_retry_after_is_obeyed_in_full(
    client: AsyncBFL, mock: respx.MockRouter, planned_waits: list[float], code: int
) -> None:
    later = httpx.Response(code, json={"detail": "busy"}, headers={"Retry-After": "120"})
    mock.post(f"{API}/v1/flux-2-pro").mock(side_effect=[later, accepted()])
    mock.get(polling_url("task-1")).mock(side_effect=[later, ready()])
    await client.wait(await client.submit("flux-2-pro", prompt="x"))
    assert len([w for w in planned_waits if 120 <= w <= 150]) == 2  # the submit's, the poll's
    # A 429 says the account is at its limit, and lowers ours; a 503 only that BFL is busy.
    assert (client.limiter.limit() < 24) is (code == 429)


async def test_unreachable_api_raises_after_bounded_retries(mock: respx.MockRouter) -> None:
    mock.post(f"{API}/v1/flux-2-pro").mock(side_effect=httpx.ConnectError("down"))
    async with AsyncBFL(**{**FAST, "submit_retries": 1}) as client:
        with pytest.raises(APIConnectionError, match="nothing was paid"):
            await client.submit("flux-2-pro", prompt="x")
        assert client.limiter.in_use() == 0
    assert mock.calls.call_count == 2


async def test_a_proxy_that_refuses_every_submit_says_nothing_was_paid(
    mock: respx.MockRouter,
) -> None:
    mock.post(f"{API}/v1/flux-2-pro").mock(side_effect=httpx.ProxyError("403 Forbidden"))
    async with AsyncBFL(**{**FAST, "submit_retries": 1}) as client:
        with pytest.raises(APIConnectionError, match=r"ProxyError.*nothing was paid"):
            await client.submit("flux-2-pro", prompt="x")
    assert mock.calls.call_count == 2


@pytest.mark.parametrize(
    "base_url", ["api.eu.bfl.ai", "ftp://api.bfl.ai", "https://", "/v1", "http://[::1"]
)
def test_a_base_url_that_is_no_http_url_is_refused_at_once(
    monkeypatch: pytest.MonkeyPatch, base_url: str
) -> None:
    # Sent as is, its submits failed in httpx before leaving, each reported as maybe paid.
    with pytest.raises(ValueError, match=r"base_url must be an absolute http\(s\) URL"):
        AsyncBFL(api_key=KEY, base_url=base_url)
    monkeypatch.setenv("BFL_BASE_URL", base_url)
    with pytest.raises(ValueError, match="BFL_BASE_URL"):
        AsyncBFL(api_key=KEY)


async def test_local_validation_sends_nothing(client: AsyncBFL, mock: respx.MockRouter) -> None:
    with pytest.raises(ParameterError) as caught:
        await client.submit("flux-2-pro", prompt="x", width=1000, output_format="gif")
    assert set(caught.value.fields) == {"width", "output_format"}
    with pytest.raises(UnknownModelError, match="flux-2-pro"):
        await client.generate("flux-3-ultra", prompt="x")
    assert mock.calls.call_count == 0


async def test_submit_raw_reaches_models_newer_than_the_catalog(
    client: AsyncBFL, mock: respx.MockRouter
) -> None:
    submit = mock.post(f"{API}/v1/flux-9-turbo").mock(return_value=accepted())
    task = await client.submit_raw("flux-9-turbo", {"prompt": "x", "novel": [1, 2]})
    assert task.model == "flux-9-turbo"
    assert json.loads(submit.calls.last.request.content) == {"prompt": "x", "novel": [1, 2]}
    with pytest.raises(ParameterError, match="model"):
        await client.submit_raw("../credits", {})


# --- key routing ---------------------------------------------------------------------------


async def test_api_redirects_are_not_followed(client: AsyncBFL, mock: respx.MockRouter) -> None:
    mock.post(f"{API}/v1/flux-2-pro").mock(
        return_value=httpx.Response(307, headers={"location": "https://evil.example/v1/x"})
    )
    evil = mock.route(host="evil.example").mock(return_value=httpx.Response(200))
    with pytest.raises(Exception, match="307"):
        await client.submit("flux-2-pro", prompt="x")
    assert evil.call_count == 0


async def test_delivery_redirects_are_followed_without_the_key(
    client: AsyncBFL, mock: respx.MockRouter, tmp_path: Path
) -> None:
    _, _, download = route_task(mock, ready())
    download.mock(
        return_value=httpx.Response(302, headers={"location": "https://blob.example/x.png"})
    )
    blob = mock.get("https://blob.example/x.png").mock(return_value=image())
    result = await client.wait(await client.submit("flux-2-pro", prompt="x"))
    await client.download(result, tmp_path)
    assert "x-key" not in blob.calls.last.request.headers


@pytest.mark.parametrize(
    "polling_url",
    [
        "https://delivery-eu1.bfl.ai/v1/get_result?id=t",
        "http://api.bfl.ai/v1/get_result?id=t",  # the key in clear text
        "http://api.bfl.ai:8080/v1/get_result?id=t",
    ],
)
async def test_key_is_never_sent_to_a_polling_url_off_the_api_hosts(
    client: AsyncBFL, mock: respx.MockRouter, polling_url: str
) -> None:
    mock.post(f"{API}/v1/flux-2-pro").mock(
        return_value=httpx.Response(200, json={"id": "t", "polling_url": polling_url})
    )
    task = await client.submit("flux-2-pro", prompt="x")
    with pytest.raises(APIConnectionError, match="refusing to send the API key"):
        await client.wait(task)


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://api.bfl.ai/v1/x", True),
        ("https://api.eu.bfl.ai/v1/x", True),
        ("https://api.eu2.bfl.ai/v1/get_result?id=1", True),
        ("https://api.us1.cluster.bfl.ai/v1/x", True),
        ("https://api.bfl.ai:8443/v1/x", True),
        ("http://api.bfl.ai/v1/x", False),
        ("http://api.bfl.ai:8080/v1/x", False),
        ("http://api.eu2.bfl.ai/v1/x", False),
        ("https://delivery-eu1.bfl.ai/x", False),
        ("https://bfldeliveryprodeu4.blob.core.windows.net/x", False),
        ("https://api.bfl.ai.evil.com/x", False),
        ("https://evilapi.bfl.ai/x", False),
        ("https://bfl.ai/x", False),
    ],
)
def test_is_api_host(url: str, allowed: bool) -> None:
    from bfl_async._http import is_api_host

    assert is_api_host(httpx.URL(url), httpx.URL("https://api.bfl.ai")) is allowed


def test_configured_host_gets_the_key_on_any_port() -> None:
    from bfl_async._http import is_api_host

    base = httpx.URL("http://127.0.0.1:8000")
    assert is_api_host(httpx.URL("http://127.0.0.1:9001/v1/get_result"), base)
    assert is_api_host(httpx.URL("https://127.0.0.1:9001/v1/get_result"), base)
    assert not is_api_host(httpx.URL("http://127.0.0.2:9001/results/x"), base)
    proxy = httpx.URL("https://bfl-proxy.example")
    assert is_api_host(httpx.URL("https://bfl-proxy.example:8443/v1/get_result"), proxy)
    assert not is_api_host(httpx.URL("http://bfl-proxy.example/v1/get_result"), proxy)


# --- the async with block ------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_an_error_leaves_async_with_as_it_was_raised() -> None:
    fake = FakeBFL()
    options = {**FAST, "api_key": fake.api_key, "http_client": fake.client()}
    with pytest.raises(ParameterError):  # not an ExceptionGroup: `except BFLError` works
        async with AsyncBFL(**options) as client:
            await client.generate("flux-2-pro", prompt="x", width=1000)
    with pytest.raises(KeyError):
        async with AsyncBFL(**options):
            raise KeyError("the caller's own")


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_closing_the_client_stops_its_watches_not_the_callers_block() -> None:
    fake = FakeBFL(generation_time=3600.0)
    options = {**FAST, "api_key": fake.api_key, "http_client": fake.client()}
    reached: list[str] = []
    async with AsyncBFL(**{**options, "close_grace": 0.0}) as client:
        await client.submit("flux-2-pro", prompt="x")
        await client.aclose()  # from the block itself, or a shutdown handler elsewhere
        reached.append("closed")
        await anyio.sleep(0.01)
        reached.append("went on")
        assert client.in_flight == []  # the watch stopped (its task is logged to resume)
    assert reached == ["closed", "went on"]


# --- configuration -------------------------------------------------------------------------


def test_missing_key_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BFL_API_KEY", raising=False)
    with pytest.raises(MissingAPIKeyError, match="BFL_API_KEY"):
        AsyncBFL()
    with pytest.raises(MissingAPIKeyError):
        AsyncBFL(api_key=" \n")


async def test_a_key_read_from_a_file_loses_its_newline(
    client: AsyncBFL, mock: respx.MockRouter
) -> None:
    route = mock.get(f"{API}/v1/credits").mock(
        return_value=httpx.Response(200, json={"credits": 1.0})
    )
    async with AsyncBFL(**{**FAST, "api_key": f"{KEY}\r\n"}) as own:
        await own.credits()
    assert route.calls.last.request.headers["x-key"] == KEY


@pytest.mark.parametrize("key", [f"{KEY}\u00a0x", f"{KEY[:4]}\n{KEY[4:]}", f"{KEY} x"])
def test_a_key_no_header_can_carry_is_refused_without_showing_it(key: str) -> None:
    with pytest.raises(ValueError, match="API key has a character") as info:
        AsyncBFL(api_key=key)
    assert "SECRET" not in str(info.value) and "SECRET" not in repr(info.value)


def test_key_from_environment_and_regions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BFL_API_KEY", KEY)
    monkeypatch.delenv("BFL_BASE_URL", raising=False)
    assert str(AsyncBFL().base_url) == "https://api.bfl.ai"
    assert str(AsyncBFL(region="eu").base_url) == "https://api.eu.bfl.ai"
    assert str(AsyncBFL(region="us").base_url) == "https://api.us.bfl.ai"
    monkeypatch.setenv("BFL_BASE_URL", "http://127.0.0.1:9/")
    assert str(AsyncBFL().base_url) == "http://127.0.0.1:9"
    assert str(AsyncBFL(base_url="https://proxy.example").base_url) == "https://proxy.example"
    with pytest.raises(ValueError, match="global, eu, us"):
        AsyncBFL(region="mars")  # type: ignore[arg-type]


async def test_key_appears_in_no_repr_and_no_log(
    mock: respx.MockRouter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    route_task(mock, poll_answer("Pending"), ready())
    mock.post(f"{API}/v1/flux-2-max").mock(return_value=httpx.Response(403, json={"detail": "x"}))
    caplog.set_level(logging.DEBUG)
    async with AsyncBFL(**FAST) as client:
        image_ = await client.generate("flux-2-pro", prompt="x", output_dir=tmp_path)
        with pytest.raises(AuthenticationError) as caught:
            await client.generate("flux-2-max", prompt="x", output_dir=tmp_path)
        texts = [repr(client), repr(client.limiter), repr(image_), image_.task.model_dump_json()]
        texts += [str(caught.value), repr(caught.value), repr(vars(client))]
    texts += [r.getMessage() for r in caplog.records]
    assert any("HTTP Request" in t for t in texts)  # httpx's own logs were captured
    for text in texts:
        assert KEY not in text


async def test_client_must_be_entered(mock: respx.MockRouter) -> None:
    client = AsyncBFL(**FAST)
    with pytest.raises(RuntimeError, match="async with"):
        await client.submit("flux-2-pro", prompt="x")
    await client.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await client.submit("flux-2-pro", prompt="x")


# --- callbacks and handles -----------------------------------------------------------------


async def test_on_submitted_runs_before_any_poll(mock: respx.MockRouter, tmp_path: Path) -> None:
    _, poll, _ = route_task(mock, ready())
    seen: list[tuple[str, str, int]] = []

    def at_client(task: Task) -> None:
        seen.append(("client", task.id, poll.call_count))

    async def per_call(task: Task) -> None:
        seen.append(("call", task.id, poll.call_count))

    async with AsyncBFL(**{**FAST, "on_submitted": at_client}) as client:
        await client.generate("flux-2-pro", prompt="x", output_dir=tmp_path, on_submitted=per_call)
    assert seen == [("client", "task-1", 0), ("call", "task-1", 0)]


async def test_failing_on_submitted_is_raised_and_the_task_still_watched(
    client: AsyncBFL, mock: respx.MockRouter
) -> None:
    route_task(mock, ready())

    def broken(task: Task) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        await client.submit("flux-2-pro", prompt="x", on_submitted=broken)
    result = await client.wait(Task(id="task-1", polling_url=polling_url("task-1"), model="x"))
    assert result.task.id == "task-1"


async def test_an_old_handle_is_polled_at_once(
    mock: respx.MockRouter, planned_waits: list[float]
) -> None:
    # Submitted a minute ago elsewhere: likely ended; the plan from its acceptance would
    # wait seconds for its next poll.
    poll = mock.get(polling_url("task-1")).mock(return_value=ready())
    task = Task(
        id="task-1",
        polling_url=polling_url("task-1"),
        model="flux-2-pro",
        submitted_at=time.time() - 60,
    )
    async with AsyncBFL(api_key=KEY) as client:
        assert (await client.wait(task)).seed == 42
    assert poll.call_count == 1 and max(planned_waits, default=0.0) < 0.1


async def test_handle_rebuilt_from_json_is_waited_in_another_client(
    mock: respx.MockRouter,
) -> None:
    gate = anyio.Event()

    def poll(request: httpx.Request) -> httpx.Response:
        return ready() if gate.is_set() else poll_answer("Pending")

    mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
    mock.get(polling_url("task-1")).mock(side_effect=poll)
    async with AsyncBFL(**{**FAST, "close_grace": 0.01}) as first:
        task = await first.submit("flux-2-pro", prompt="x")
        saved = task.model_dump_json()
    async with AsyncBFL(**{**FAST, "limits": {"standard": 1}}) as second:
        held = await second.limiter.acquire("standard")
        rebuilt = Task.model_validate_json(saved)
        assert rebuilt == task
        results: list[Any] = []
        async with anyio.create_task_group() as tg:

            async def waiter() -> None:
                results.append(await second.wait(rebuilt))

            tg.start_soon(waiter)
            await anyio.sleep(0.01)
            # It took its slot at once, over the limit, without queueing.
            assert second.limiter.in_use() == 2
            assert second.limiter.waiting() == 0
            gate.set()
        assert results[0].task == task
        assert second.limiter.in_use() == 1
        held.release()
        assert second.limiter.in_use() == 0


async def test_close_waits_for_tasks_then_logs_each_unfinished_handle(
    mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
    mock.get(polling_url("task-1")).mock(return_value=poll_answer("Pending"))
    caplog.set_level(logging.WARNING, logger="bfl_async")
    async with AsyncBFL(**{**FAST, "close_grace": 0.05}) as client:
        task = await client.submit("flux-2-pro", prompt="x")
    messages = [r.getMessage() for r in caplog.records]
    assert any(task.id in m and "still in flight" in m and "polling_url" in m for m in messages)
    assert KEY not in "".join(messages)


async def test_close_waits_for_a_task_that_finishes_within_the_grace(
    mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    route_task(mock, poll_answer("Pending"), poll_answer("Pending"), ready())
    caplog.set_level(logging.WARNING, logger="bfl_async")
    async with AsyncBFL(**FAST) as client:
        await client.submit("flux-2-pro", prompt="x")
    assert mock.calls.call_count == 4
    assert not [r for r in caplog.records if "still in flight" in r.getMessage()]


def held_submit(mock: respx.MockRouter) -> tuple[anyio.Event, anyio.Event]:
    """Route the submit so that BFL holds its answer: (received, release)."""
    received, release = anyio.Event(), anyio.Event()

    async def held(request: httpx.Request) -> httpx.Response:
        received.set()
        await release.wait()
        return accepted()

    mock.post(f"{API}/v1/flux-2-pro").mock(side_effect=held)
    return received, release


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.parametrize("finishes", [True, False], ids=["task-ends", "task-runs-on"])
async def test_close_waits_for_a_submit_on_its_way_whatever_its_grace(
    finishes: bool, mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    received, release = held_submit(mock)
    answers = [poll_answer("Pending"), ready()] if finishes else [poll_answer("Pending")] * 99
    polls = mock.get(polling_url("task-1")).mock(side_effect=answers)
    caplog.set_level(logging.WARNING, logger="bfl_async")
    tasks: list[Task] = []
    grace = FAST["close_grace"] if finishes else 0.0
    async with (
        AsyncBFL(**{**FAST, "close_grace": grace}) as client,
        anyio.create_task_group() as tg,
    ):

        async def submit() -> None:
            tasks.append(await client.submit("flux-2-pro", prompt="x"))

        tg.start_soon(submit)
        await received.wait()
        tg.start_soon(client.aclose)  # closing while BFL has not answered yet
        await anyio.wait_all_tasks_blocked()
        release.set()
    assert [task.id for task in tasks] == ["task-1"]  # the caller got its paid task
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if finishes:  # ... and the close waited for it to finish
        assert polls.call_count == 2 and not warnings
    else:  # no grace for the task, but its submit's answer was waited for: its handle
        [warning] = warnings
        assert "task-1" in warning and "still in flight" in warning


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_natively_cancelled_submit_keeps_its_paid_task_watched_and_logged(
    mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    received, release = held_submit(mock)
    mock.get(polling_url("task-1")).mock(return_value=poll_answer("Pending"))
    caplog.set_level(logging.WARNING, logger="bfl_async")
    async with AsyncBFL(**{**FAST, "close_grace": 0.0}) as client:
        # asyncio.wait_for, a server's shutdown...: a cancellation anyio's shield can't stop.
        submit = asyncio.ensure_future(client.submit("flux-2-pro", prompt="x"))
        await received.wait()
        submit.cancel()
        with pytest.raises(asyncio.CancelledError):
            await submit
        release.set()
        await anyio.wait_all_tasks_blocked()
        assert [task.id for task in client.in_flight] == ["task-1"]  # still watched
    [warning, *_] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "task-1" in warning and "caller was cancelled" in warning and "polling_url" in warning


async def test_a_cancelled_generate_logs_its_paid_task(
    mock: respx.MockRouter, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
    mock.get(polling_url("task-1")).mock(return_value=poll_answer("Pending"))
    caplog.set_level(logging.WARNING, logger="bfl_async")
    async with AsyncBFL(**{**FAST, "close_grace": 0.0}) as client:
        with anyio.move_on_after(0.05):  # a request timeout, a server shutting down...
            await client.generate("flux-2-pro", prompt="x", output_dir=tmp_path)
    [warning, *_] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "task-1" in warning and "generate was cancelled" in warning
    assert "polling_url" in warning and KEY not in warning


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_push_brings_the_result_after_polling_gave_up(mock: respx.MockRouter) -> None:
    mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
    mock.get(polling_url("task-1")).mock(return_value=httpx.Response(404, json={"detail": "x"}))
    hook = {"webhook_url": "https://app.test/hook", "webhook_secret": "hush"}
    async with AsyncBFL(**FAST, **hook) as client:
        task = await client.submit("flux-2-pro", prompt="x")
        with pytest.raises(TaskNotFoundError):
            await client.wait(task)
        event = WebhookEvent(task_id="task-1", status="Ready", result={"sample": signed_url()})
        assert client.deliver(event)  # signed by BFL: the image is there
        result = await client.wait(task)
        assert result.sample == event.result["sample"]  # type: ignore[index]
        assert not client.deliver(event)  # at-least-once: a duplicate changes nothing


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_close_from_on_submitted_waits_for_the_task_not_its_own_submit(
    mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
    mock.get(polling_url("task-1")).mock(side_effect=[poll_answer("Pending"), *[ready()] * 9])
    caplog.set_level(logging.WARNING, logger="bfl_async")
    async with AsyncBFL(**{**FAST, "close_grace": math.inf}) as client:

        async def close(task: Task) -> None:
            await client.aclose()

        with anyio.fail_after(5):  # not for ever: the close waited for the submit calling it
            await client.submit("flux-2-pro", prompt="x", on_submitted=close)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_uncertain_submit_whose_caller_was_cancelled_is_logged(
    mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bfl_async")
    callers: list[asyncio.Future[Task]] = []

    def lost(request: httpx.Request) -> httpx.Response:
        # Its answer lost, and its caller cancelled before it hears so (asyncio.wait_for).
        asyncio.get_running_loop().call_soon(callers[0].cancel)
        raise httpx.ReadTimeout("lost", request=request)

    mock.post(f"{API}/v1/flux-2-pro").mock(side_effect=lost)
    async with AsyncBFL(**FAST) as client:
        callers.append(asyncio.ensure_future(client.submit("flux-2-pro", prompt="x")))
        with pytest.raises(asyncio.CancelledError):
            await callers[0]
        assert client.limiter.in_use() == 0
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "may or may not have created a paid task" in warning and "cancelled" in warning


# --- downloads -----------------------------------------------------------------------------


async def _result(client: AsyncBFL, mock: respx.MockRouter, **kw: Any) -> Any:
    route_task(mock, ready(**kw))
    return await client.wait(await client.submit("flux-2-pro", prompt="x"))


@pytest.mark.parametrize(
    ("content", "content_type", "suffix"),
    [
        (PNG, "image/png", ".png"),
        (JPEG, "image/png", ".jpg"),
        (WEBP, "application/octet-stream", ".webp"),
    ],
)
async def test_suffix_follows_magic_bytes(
    client: AsyncBFL,
    mock: respx.MockRouter,
    tmp_path: Path,
    content: bytes,
    content_type: str,
    suffix: str,
) -> None:
    result = await _result(client, mock)
    mock.get(DELIVERY).mock(return_value=image(content, content_type))
    path = await client.download(result, tmp_path, name="pic")
    assert path.name == f"pic{suffix}" and path.read_bytes() == content


async def test_not_an_image_is_refused(
    client: AsyncBFL, mock: respx.MockRouter, tmp_path: Path
) -> None:
    result = await _result(client, mock)
    mock.get(DELIVERY).mock(return_value=image(b"<html>login</html>", "image/png"))
    with pytest.raises(DownloadError, match="not a PNG"):
        await client.download(result, tmp_path)
    assert list(tmp_path.iterdir()) == []


async def test_truncated_download_is_retried(
    client: AsyncBFL, mock: respx.MockRouter, tmp_path: Path
) -> None:
    result = await _result(client, mock)
    short = httpx.Response(200, content=PNG[:100], headers={"content-length": str(len(PNG))})
    route = mock.get(DELIVERY).mock(side_effect=[short, httpx.ReadError("reset"), image()])
    path = await client.download(result, tmp_path)
    assert path.read_bytes() == PNG
    assert route.call_count == 3


async def test_download_gives_up_but_keeps_the_result(
    client: AsyncBFL, mock: respx.MockRouter, tmp_path: Path
) -> None:
    route_task(mock, ready())
    short = httpx.Response(200, content=PNG[:100], headers={"content-length": str(len(PNG))})
    mock.get(DELIVERY).mock(return_value=short)
    # generate returns no Result to download again: the error carries it.
    with pytest.raises(DownloadError, match=r"download e\.result again") as caught:
        await client.generate("flux-2-pro", prompt="x", output_dir=tmp_path, name="fox")
    result = caught.value.result
    assert caught.value.task == result.task and result.sample.startswith(DELIVERY)
    assert list(tmp_path.iterdir()) == []
    mock.get(DELIVERY).mock(return_value=image())
    path = await client.download(result, tmp_path, name="fox")
    assert path.name == "fox.png" and path.read_bytes() == PNG


async def test_a_url_past_its_expiry_by_our_clock_is_still_asked_for(
    client: AsyncBFL, mock: respx.MockRouter, tmp_path: Path
) -> None:
    # Only the delivery host knows whether it expired: a clock ten minutes fast would
    # otherwise lose every paid image.
    result = await _result(client, mock, url=signed_url(expires_in=-5))
    route = mock.get(DELIVERY).mock(return_value=image())
    path = await client.download(result, tmp_path)
    assert path.read_bytes() == PNG and route.call_count == 1
    route.mock(return_value=httpx.Response(403))
    with pytest.raises(ResultExpiredError, match=r"expired at .* \(refused with 403\)"):
        await client.download(result, tmp_path, name="again")
    assert route.call_count == 2  # refused past its expiry: gone, not tried again


async def test_iso_expiry_and_delivery_refusal(
    client: AsyncBFL, mock: respx.MockRouter, tmp_path: Path
) -> None:
    refused = httpx.Response(403, text="<Error><Code>AuthenticationFailed</Code></Error>")
    past = await _result(client, mock, url=f"{DELIVERY}?se=2001-01-01T00:00:00Z&sig=1")
    route = mock.get(DELIVERY).mock(return_value=refused)
    with pytest.raises(ResultExpiredError, match="expired at"):
        await client.download(past, tmp_path)
    assert route.call_count == 1
    # Refused before its expiry: not taken as expired, and the paid result is kept.
    ahead = await _result(client, mock, url=f"{DELIVERY}?se=2099-01-01T00:00:00Z&sig=1")
    mock.get(DELIVERY).mock(return_value=refused)
    with pytest.raises(DownloadError, match="before the URL's expiry") as caught:
        await client.download(ahead, tmp_path)
    assert not isinstance(caught.value, ResultExpiredError) and caught.value.result == ahead


async def test_existing_file_is_found_before_paying(
    client: AsyncBFL, mock: respx.MockRouter, tmp_path: Path
) -> None:
    submit, _, _ = route_task(mock, ready())
    (tmp_path / "fox.jpg").write_bytes(b"mine")
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        await client.generate("flux-2-pro", prompt="x", output_dir=tmp_path, name="fox")
    assert submit.call_count == 0
    with pytest.raises(ParameterError, match="name"):
        await client.generate("flux-2-pro", prompt="x", output_dir=tmp_path, name="../fox")
    assert submit.call_count == 0


async def test_an_output_dir_that_cannot_take_files_is_refused_before_paying(
    client: AsyncBFL, mock: respx.MockRouter, tmp_path: Path
) -> None:
    submit, _, _ = route_task(mock, ready())
    (tmp_path / "taken").write_bytes(b"a file, not a directory")
    for directory in (tmp_path / "taken", tmp_path / "taken" / "out"):
        with pytest.raises(ParameterError, match="output_dir") as caught:
            await client.generate("flux-2-pro", prompt="x", output_dir=directory)
        assert caught.value.fields == ["output_dir"]
    assert submit.call_count == 0 and list(tmp_path.iterdir()) == [tmp_path / "taken"]


async def test_a_burst_of_generates_checks_its_output_dir_once(
    client: AsyncBFL, mock: respx.MockRouter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[Path] = []
    check = bfl_async._client.check_output_dir

    def counted(model: str, directory: Path) -> None:
        checked.append(directory)
        check(model, directory)

    monkeypatch.setattr(bfl_async._client, "check_output_dir", counted)
    for n in range(4):
        route_task(mock, ready(), task_id=f"task-{n}")
    mock.post(f"{API}/v1/flux-2-pro").mock(side_effect=[accepted(f"task-{n}") for n in range(4)])
    async with anyio.create_task_group() as tg:
        for n in range(3):
            generate = functools.partial(client.generate, prompt=f"{n}", output_dir=tmp_path)
            tg.start_soon(generate, "flux-2-pro")
    await client.generate("flux-2-pro", prompt="3", output_dir=tmp_path)
    assert checked == [tmp_path]  # the check makes a file: not once per image


async def test_a_read_only_output_dir_is_refused_before_paying(
    client: AsyncBFL, mock: respx.MockRouter, unwritable_dir: Path
) -> None:
    submit, _, _ = route_task(mock, ready())
    with pytest.raises(ParameterError, match=r"output_dir.*cannot take files"):
        await client.generate("flux-2-pro", prompt="x", output_dir=unwritable_dir)
    assert submit.call_count == 0


async def test_an_image_that_cannot_be_saved_leaves_its_result_with_the_error(
    client: AsyncBFL, mock: respx.MockRouter, tmp_path: Path
) -> None:
    route_task(mock, ready())
    out = tmp_path / "out"

    def lose_the_directory(task: Task) -> None:  # a disk unmounted while the task ran
        out.rmdir()
        out.write_bytes(b"")

    with pytest.raises(DownloadError, match="could not be saved in") as caught:
        await client.generate(
            "flux-2-pro", prompt="x", output_dir=out, on_submitted=lose_the_directory
        )
    assert isinstance(caught.value.__cause__, OSError)
    path = await client.download(caught.value.result, tmp_path)
    assert path.read_bytes() == PNG


async def test_overwrite_and_a_file_that_appeared_meanwhile(
    client: AsyncBFL, mock: respx.MockRouter, tmp_path: Path
) -> None:
    result = await _result(client, mock)
    (tmp_path / "fox.png").write_bytes(b"mine")
    with pytest.raises(OutputExistsError) as caught:
        await client.download(result, tmp_path, name="fox")
    kept = Path(caught.value.kept or "")
    assert kept.read_bytes() == PNG  # the paid image is not lost
    assert (tmp_path / "fox.png").read_bytes() == b"mine"
    path = await client.download(result, tmp_path, name="fox", overwrite=True)
    assert path.read_bytes() == PNG


async def test_download_to_a_file_object_and_stream(
    client: AsyncBFL, mock: respx.MockRouter
) -> None:
    result = await _result(client, mock)
    short = httpx.Response(200, content=PNG[:10], headers={"content-length": str(len(PNG))})
    mock.get(DELIVERY).mock(side_effect=[short, image(), image()])
    buffer = io.BytesIO()
    assert await client.download(result, buffer) == len(PNG)
    assert buffer.getvalue() == PNG
    chunks = [chunk async for chunk in client.stream(result)]
    assert b"".join(chunks) == PNG
    mock.get(DELIVERY).mock(return_value=short)
    with pytest.raises(DownloadError):
        async for _ in client.stream(result):
            pass


# --- generate_many -------------------------------------------------------------------------


async def test_generate_many_yields_one_outcome_per_job(
    client: AsyncBFL, mock: respx.MockRouter, tmp_path: Path
) -> None:
    for n in (1, 2):
        mock.get(polling_url(f"t{n}")).mock(return_value=ready(f"t{n}"))
    mock.get(polling_url("t3")).mock(
        return_value=poll_answer("Content Moderated", "t3", details={"Moderation Reasons": ["x"]})
    )
    mock.post(f"{API}/v1/flux-2-pro").mock(
        side_effect=[accepted("t1"), accepted("t2"), accepted("t3")]
    )
    mock.get(DELIVERY).mock(return_value=image())
    jobs = [
        {"model": "flux-2-pro", "prompt": "a", "name": "a"},
        {"model": "flux-2-pro", "prompt": "b"},
        {"model": "flux-2-pro", "prompt": "c"},
        {"model": "flux-2-pro", "prompt": "d", "width": 1001},
        {"model": "flux-2-pro", "prompt": "e", "name": "a"},
        {"prompt": "no model"},
        {"model": "flux-2-pro", "prompt": "f", "name": 7},
        {"model": "flux-2-pro", "prompt": "g", "webhook_secret": "hush", "webhook_url": 3},
    ]
    outcomes = [o async for o in client.generate_many(jobs, output_dir=tmp_path)]
    assert "hush" not in repr(outcomes)  # the request is left out of an Outcome's repr
    outcomes = [o for o in outcomes if o.index < 7]
    assert sorted(o.index for o in outcomes) == list(range(7))
    by_index = {o.index: o for o in outcomes}
    assert by_index[0].ok and by_index[0].image is not None
    assert by_index[0].image.path == tmp_path / "a.png"
    assert sum(o.ok for o in outcomes) == 2
    assert isinstance(by_index[3].error, ParameterError)
    assert isinstance(by_index[4].error, ParameterError)
    assert isinstance(by_index[5].error, ParameterError)
    assert isinstance(by_index[6].error, ParameterError)
    moderated = [o for o in outcomes if isinstance(o.error, ModerationError)]
    assert len(moderated) == 1
    assert mock.routes  # every submit went out once
    assert sum(1 for c in mock.calls if c.request.method == "POST") == 3


async def test_generate_many_refuses_names_that_are_one_file_on_windows_and_macos(
    client: AsyncBFL, mock: respx.MockRouter, tmp_path: Path
) -> None:
    mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted("t1"))
    mock.get(polling_url("t1")).mock(return_value=ready("t1"))
    mock.get(DELIVERY).mock(return_value=image())
    jobs = [
        {"model": "flux-2-pro", "prompt": "a", "name": "Fox"},
        {"model": "flux-2-pro", "prompt": "b", "name": "fox"},
    ]
    outcomes = sorted(
        [o async for o in client.generate_many(jobs, output_dir=tmp_path)], key=lambda o: o.index
    )
    assert outcomes[0].ok
    assert isinstance(outcomes[1].error, ParameterError)
    assert "same file on Windows and macOS" in str(outcomes[1].error)
    assert sum(1 for c in mock.calls if c.request.method == "POST") == 1  # paid once


async def test_breaking_out_of_generate_many_cancels_queued_jobs(
    mock: respx.MockRouter, tmp_path: Path
) -> None:
    submit = mock.post(f"{API}/v1/flux-2-pro").mock(
        side_effect=[accepted(f"t{i}") for i in range(5)]
    )
    mock.get(polling_url("t0")).mock(return_value=ready("t0"))
    for i in range(1, 5):
        mock.get(polling_url(f"t{i}")).mock(return_value=poll_answer("Pending", f"t{i}"))
    mock.get(DELIVERY).mock(return_value=image())
    async with AsyncBFL(**{**FAST, "limits": {"standard": 1}, "close_grace": 0.01}) as client:
        jobs = [{"model": "flux-2-pro", "prompt": str(i)} for i in range(5)]
        async with contextlib.aclosing(client.generate_many(jobs, output_dir=tmp_path)) as results:
            async for outcome in results:
                assert outcome.ok
                break
        assert client.limiter.waiting() == 0
        assert [t.id for t in client.in_flight] == ["t1"]  # paid for, so still watched
    assert submit.call_count == 2


# --- ownership of accepted tasks -------------------------------------------------------------


async def test_cancelled_caller_neither_leaks_nor_frees_the_slot_early(
    client: AsyncBFL, mock: respx.MockRouter, tmp_path: Path
) -> None:
    done = anyio.Event()

    def poll(request: httpx.Request) -> httpx.Response:
        return ready() if done.is_set() else poll_answer("Pending")

    mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
    poll_route = mock.get(polling_url("task-1")).mock(side_effect=poll)
    mock.get(DELIVERY).mock(return_value=image())
    handles: list[Task] = []
    with anyio.move_on_after(0.05):
        await client.generate(
            "flux-2-pro", prompt="x", output_dir=tmp_path, on_submitted=handles.append
        )
    assert len(handles) == 1
    assert client.limiter.in_use() == 1  # BFL still counts the task: so do we
    polls_before = poll_route.call_count
    await anyio.sleep(0.02)
    assert poll_route.call_count > polls_before  # still watched with nobody waiting
    done.set()
    with anyio.fail_after(2):
        while client.limiter.in_use():
            await anyio.sleep(0.001)
    assert list(tmp_path.iterdir()) == []  # nobody asked for the download


async def test_cancelled_while_queued_frees_the_slot_at_once(mock: respx.MockRouter) -> None:
    async with AsyncBFL(**{**FAST, "limits": {"standard": 1}}) as client:
        held = await client.limiter.acquire("standard")
        with anyio.move_on_after(0.02):
            await client.submit("flux-2-pro", prompt="x")
        assert client.limiter.waiting() == 0
        held.release()
        assert client.limiter.in_use() == 0
    assert mock.calls.call_count == 0


async def test_cancel_during_the_post_keeps_the_answer(
    client: AsyncBFL, mock: respx.MockRouter
) -> None:
    arrived = anyio.Event()
    release = anyio.Event()

    async def slow_accept(request: httpx.Request) -> httpx.Response:
        arrived.set()
        await release.wait()
        return accepted()

    mock.post(f"{API}/v1/flux-2-pro").mock(side_effect=slow_accept)
    mock.get(polling_url("task-1")).mock(return_value=poll_answer("Pending"))
    handles: list[Task] = []
    async with anyio.create_task_group() as tg:

        async def caller() -> None:
            await client.submit("flux-2-pro", prompt="x", on_submitted=handles.append)

        tg.start_soon(caller)
        await arrived.wait()
        tg.cancel_scope.cancel()
        release.set()
    assert [t.id for t in handles] == ["task-1"]
    assert client.in_flight == handles
    assert client.limiter.in_use() == 1


# --- bad waits; clients closed or cancelled mid-operation ------------------------------------


@pytest.mark.parametrize("timeout", [math.nan, 0, -1.0, "60", True])
async def test_a_generate_timeout_that_is_no_wait_is_refused_before_paying(
    client: AsyncBFL, mock: respx.MockRouter, tmp_path: Path, timeout: Any
) -> None:
    # A timeout read from the environment as a string, a deadline computed past: the task
    # was paid, then lost to a TypeError without its handle, or given up at once.
    route_task(mock, ready())
    with pytest.raises(ParameterError) as caught:
        await client.generate("flux-2-pro", prompt="x", output_dir=tmp_path, timeout=timeout)
    assert caught.value.fields == ["timeout"]
    with pytest.raises((TypeError, ValueError), match="timeout must be seconds > 0"):
        async for _ in client.generate_many(
            [{"model": "flux-2-pro", "prompt": "x"}], timeout=timeout
        ):
            pass
    assert mock.calls.call_count == 0


async def test_wait_names_a_timeout_that_is_no_number_of_seconds(
    client: AsyncBFL, mock: respx.MockRouter
) -> None:
    mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
    mock.get(polling_url("task-1")).mock(return_value=poll_answer("Pending"))
    task = await client.submit("flux-2-pro", prompt="x")
    with pytest.raises(ValueError, match="timeout must be seconds, or None, not nan"):
        await client.wait(task, timeout=math.nan)
    with pytest.raises(TypeError, match="timeout must be"):
        await client.wait(task, timeout="5")  # type: ignore[arg-type]
    for passed in (0, -1.0):  # a deadline already passed: the task is not finished yet
        with pytest.raises(WaitTimeoutError):
            await client.wait(task, timeout=passed)


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("close_grace", math.nan, ValueError),
        ("close_grace", -1.0, ValueError),
        ("close_grace", "30", TypeError),
        ("wait_timeout", 0, ValueError),
        ("wait_timeout", math.nan, ValueError),
        ("wait_timeout", "600", TypeError),
    ],
)
def test_client_waits_that_are_no_number_of_seconds_are_refused_at_once(
    option: str, value: Any, error: type[Exception]
) -> None:
    # A NaN grace stopped the close half-way: the `async with` exit then waited for ever.
    with pytest.raises(error, match=f"{option} must be"):
        AsyncBFL(**{**FAST, option: value})


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_client_cancelled_from_outside_logs_its_paid_tasks(
    mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
    mock.get(polling_url("task-1")).mock(return_value=poll_answer("Pending"))
    caplog.set_level(logging.WARNING, logger="bfl_async")
    with anyio.CancelScope() as scope:  # a deadline around the app, a forced shutdown...
        async with AsyncBFL(**FAST) as client:
            await client.submit("flux-2-pro", prompt="x")
            scope.cancel()  # the watches are cancelled with the block, before the close
            await anyio.sleep_forever()
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "task-1" in warning and "polling_url" in warning
    assert client.limiter.in_use() == 0


async def test_a_failed_task_waited_again_and_again_keeps_a_short_traceback(
    client: AsyncBFL, mock: respx.MockRouter
) -> None:
    # A status route waiting on a moderated task every second: each raise of the one cached
    # error appended the caller's frames (and kept their locals alive) for 15 minutes.
    mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
    mock.get(polling_url("task-1")).mock(return_value=moderated())
    task = await client.submit("flux-2-pro", prompt="x")
    depths = []
    for _ in range(5):
        with pytest.raises(ModerationError) as caught:
            await client.wait(task)
        depths.append(len(traceback.extract_tb(caught.value.__traceback__)))
    assert depths == depths[:1] * 5


async def test_output_dirs_known_to_take_files_are_bounded(
    client: AsyncBFL, mock: respx.MockRouter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A directory per request (out/<job id>/) grew the set as long as the app ran.
    monkeypatch.setattr(bfl_async._client, "_OUTPUT_DIRS_KEPT", 3, raising=False)
    mock.post(f"{API}/v1/flux-2-pro").mock(side_effect=[accepted(f"t{i}") for i in range(8)])
    for i in range(8):
        mock.get(polling_url(f"t{i}")).mock(return_value=ready(f"t{i}"))
    mock.get(DELIVERY).mock(return_value=image())
    for i in range(8):
        image_ = await client.generate("flux-2-pro", prompt="x", output_dir=tmp_path / str(i))
        assert image_.path.parent == tmp_path / str(i)
    assert len(client._output_dirs) <= 3


async def test_a_failing_client_on_submitted_still_lets_the_calls_own_run(
    mock: respx.MockRouter,
) -> None:
    route_task(mock, ready())
    stored: list[Task] = []

    def metrics(task: Task) -> None:
        raise OSError("statsd down")

    async with AsyncBFL(**{**FAST, "on_submitted": metrics}) as client:
        with pytest.raises(OSError, match="statsd down"):
            await client.submit("flux-2-pro", prompt="x", on_submitted=stored.append)
        assert [t.id for t in stored] == ["task-1"]  # the call's own callback stored it


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_generate_many_cut_short_by_the_close_gives_each_job_its_outcome(
    mock: respx.MockRouter, tmp_path: Path
) -> None:
    # A shutdown closing the client under a route streaming generate_many: the stream just
    # ended, as if every job had been reported.
    mock.post(f"{API}/v1/flux-2-pro").mock(side_effect=[accepted(f"t{i}") for i in range(3)])
    mock.get(polling_url("t0")).mock(return_value=ready("t0"))
    for i in (1, 2):
        mock.get(polling_url(f"t{i}")).mock(return_value=poll_answer("Pending", f"t{i}"))
    mock.get(DELIVERY).mock(return_value=image())
    jobs = [{"model": "flux-2-pro", "prompt": str(i)} for i in range(3)]
    outcomes = []
    async with (
        AsyncBFL(**{**FAST, "close_grace": 0.0}) as client,
        anyio.create_task_group() as tg,
    ):
        async for outcome in client.generate_many(jobs, output_dir=tmp_path):
            outcomes.append(outcome)
            if outcome.ok:
                tg.start_soon(client.aclose)
    assert sorted(o.index for o in outcomes) == [0, 1, 2]
    cut = [o.error for o in outcomes if not o.ok]
    assert all(isinstance(e, WaitTimeoutError) for e in cut)
    assert sorted(e.task.id for e in cut if isinstance(e, WaitTimeoutError)) == ["t1", "t2"]


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_close_grace_lets_a_generate_save_its_image(
    mock: respx.MockRouter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The close waited for the task, then closed the connections under its download: a
    # RuntimeError without the result, and no line logged, for a paid image.
    mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
    mock.get(polling_url("task-1")).mock(side_effect=[poll_answer("Pending")] * 3 + [ready()])
    mock.get(DELIVERY).mock(return_value=image())
    caplog.set_level(logging.WARNING, logger="bfl_async")
    images = []
    async with AsyncBFL(**FAST) as client, anyio.create_task_group() as tg:
        submitted = anyio.Event()

        async def generate() -> None:
            images.append(
                await client.generate(
                    "flux-2-pro",
                    prompt="x",
                    output_dir=tmp_path,
                    on_submitted=lambda t: submitted.set(),
                )
            )

        tg.start_soon(generate)
        await submitted.wait()
        await client.aclose()  # a shutdown while the task runs, within its grace
    assert [i.path for i in images] == [tmp_path / "task-1.png"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_an_unexpected_download_failure_leaves_the_result_with_the_error(
    client: AsyncBFL, mock: respx.MockRouter, tmp_path: Path
) -> None:
    route_task(mock, ready())
    mock.get(DELIVERY).mock(side_effect=RuntimeError("the connections were closed"))
    with pytest.raises(DownloadError, match="connections were closed") as caught:
        await client.generate("flux-2-pro", prompt="x", output_dir=tmp_path)
    assert caught.value.result is not None and caught.value.task.id == "task-1"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_close_cancelled_natively_still_stops_and_logs(
    mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    # A forced shutdown cancels the task closing the client (asyncio, past anyio's shield):
    # the close stopped half-way, its watches running, and `async with` never exited.
    mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
    mock.get(polling_url("task-1")).mock(return_value=poll_answer("Pending"))
    caplog.set_level(logging.WARNING, logger="bfl_async")
    client = AsyncBFL(**{**FAST, "close_grace": math.inf})

    async def app() -> None:
        async with client:
            await client.submit("flux-2-pro", prompt="x")

    running = asyncio.ensure_future(app())
    while not client._closed:  # then the close is waiting for the task, for ever
        await asyncio.sleep(0)
    running.cancel()
    done, _ = await asyncio.wait([running], timeout=5)  # at once (5 s: for a failure only)
    if not done:
        running.cancel()
        await asyncio.wait([running])
    assert done and running.cancelled()
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "task-1" in warning and "polling_url" in warning
    assert client.in_flight == [] and client.limiter.in_use() == 0
