"""The request layer: Retry-After, what errors keep, a caller's own httpx client, poll schedules."""

from __future__ import annotations

import email.utils
import json
import math
import pickle
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from bfl_async import (
    APIError,
    AsyncBFL,
    Backoff,
    BatchInUseError,
    DownloadError,
    LimiterUnavailableError,
    ModerationError,
    OutputExistsError,
    ParameterError,
    Problem,
    Result,
    SubmissionUncertainError,
    Task,
    UnknownModelError,
    WaitTimeoutError,
)
from bfl_async._http import cost_or_none, float_or_none, parse_retry_after, resendable

from .helpers import API, FAST, KEY, accepted, image, polling_url, ready

pytestmark = pytest.mark.anyio


@pytest.fixture
def mock() -> AsyncIterator[respx.MockRouter]:
    with respx.mock(assert_all_mocked=True) as router:
        yield router


def test_retry_after_in_seconds_or_as_an_http_date() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    in_ten = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8 <= (parse_retry_after(in_ten) or 0) <= 10
    long_ago = email.utils.formatdate(time.time() - 100, usegmt=True)
    assert parse_retry_after(long_ago) == 0.0


def test_what_an_uncertain_submit_offers_to_resend_is_whole_but_for_secrets() -> None:
    image = "A" * 5000
    clean = resendable({"prompt": "fox", "webhook_secret": "hush", "input_image": image})
    assert clean == {"prompt": "fox", "input_image": image}


def test_backoff_grows_to_its_cap_with_bounded_jitter() -> None:
    schedule = Backoff(initial=1.0, factor=2.0, maximum=5.0, jitter=0.1)
    delays = [schedule.next_delay("m", n, 0.0, None) for n in range(6)]
    for got, base in zip(delays, [1, 2, 4, 5, 5, 5], strict=True):
        assert base * 0.9 <= got <= base * 1.1
    assert "maximum=5.0" in repr(schedule)
    with pytest.raises(ValueError, match="initial > 0"):
        Backoff(initial=0)
    with pytest.raises(ValueError):
        Backoff(jitter=1.5)


async def test_a_callers_own_http_client_is_used_and_left_open(
    mock: respx.MockRouter, tmp_path: Path
) -> None:
    submit = mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
    mock.get(polling_url("task-1")).mock(return_value=ready())
    mock.get(url__startswith="https://delivery-eu1.bfl.ai/").mock(return_value=image())
    async with httpx.AsyncClient(headers={"x-trace": "mine"}, follow_redirects=True) as own:
        async with AsyncBFL(**{**FAST, "http_client": own}) as client:
            await client.generate("flux-2-pro", prompt="x", output_dir=tmp_path)
        assert not own.is_closed
        request = submit.calls.last.request
        assert request.headers["x-trace"] == "mine" and request.headers["x-key"] == KEY
        assert "x-key" not in own.headers
        assert json.loads(request.content) == {"prompt": "x"}


@pytest.mark.parametrize(
    ("base_url", "root"),
    [
        ("https://gw.example/bfl", "https://gw.example/bfl"),
        ("https://gw.example/bfl/v1/", "https://gw.example/bfl"),
        ("https://api.bfl.ai/v1", API),
    ],
)
async def test_api_paths_go_under_the_base_urls_own_path(
    mock: respx.MockRouter, base_url: str, root: str
) -> None:
    # A gateway serving the API under a path of its own; BFL's docs write endpoints with /v1.
    submit = mock.post(f"{root}/v1/flux-2-pro").mock(return_value=accepted())
    credits = mock.get(f"{root}/v1/credits").mock(
        return_value=httpx.Response(200, json={"credits": 7.5})
    )
    async with AsyncBFL(**{**FAST, "base_url": base_url}) as client:
        await client.submit("flux-2-pro", prompt="x")
        assert await client.credits() == 7.5
    assert submit.calls.last.request.headers["x-key"] == KEY and credits.call_count == 1


class _Garbled(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"\x00 not gzip at all"


def garbled() -> httpx.Response:
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    return httpx.Response(200, headers=headers, stream=_Garbled())


async def test_an_undecodable_submit_answer_is_uncertain_and_not_retried(
    mock: respx.MockRouter,
) -> None:
    submit = mock.post(f"{API}/v1/flux-2-pro").mock(side_effect=[garbled(), accepted()])
    async with AsyncBFL(**FAST) as client:
        with pytest.raises(SubmissionUncertainError, match="DecodingError"):
            await client.submit("flux-2-pro", prompt="x")
    assert submit.call_count == 1


async def test_an_undecodable_poll_answer_is_retried(
    mock: respx.MockRouter, tmp_path: Path
) -> None:
    mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
    poll = mock.get(polling_url("task-1")).mock(side_effect=[garbled(), ready()])
    mock.get(url__startswith="https://delivery-eu1.bfl.ai/").mock(return_value=image())
    async with AsyncBFL(**FAST) as client:
        await client.generate("flux-2-pro", prompt="x", output_dir=tmp_path)
    assert poll.call_count == 2


@pytest.mark.parametrize(
    ("value", "cost"),
    [(1.5, 1.5), ("2", 2.0), (0, 0.0), (-1, None), (math.nan, None), (math.inf, None),
     ("nan", None), ("x", None), (None, None), (10**400, None)],
)  # fmt: skip
def test_only_finite_non_negative_costs_are_taken(value: Any, cost: float | None) -> None:
    assert cost_or_none(value) == cost
    assert float_or_none(math.nan) is None and float_or_none(-1) == -1.0


async def test_a_ready_answer_with_an_infinite_seed_still_gives_its_image(
    mock: respx.MockRouter,
) -> None:
    # JSON reads 1e400 as infinity, which no int holds: the paid result was lost to it.
    answer = ready().content.replace(b'"seed":42', b'"seed":1e400')
    assert b"1e400" in answer
    mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
    mock.get(polling_url("task-1")).mock(return_value=httpx.Response(200, content=answer))
    async with AsyncBFL(**FAST) as client:
        result = await client.wait(await client.submit("flux-2-pro", prompt="x"))
    assert result.seed is None and result.sample.startswith("https://delivery-eu1.bfl.ai/")


def test_retry_after_dates_without_a_zone_are_gmt_and_infinity_is_no_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # asctime (an HTTP-date every recipient must read) and `-0000` name no zone: both are GMT,
    # not the machine's local time (8 hours off on the US west coast).
    monkeypatch.setenv("TZ", "America/Los_Angeles")
    time.tzset()
    try:
        soon = time.gmtime(time.time() + 10)
        asctime = time.strftime("%a %b %d %H:%M:%S %Y", soon)
        minus_zero = time.strftime("%a, %d %b %Y %H:%M:%S -0000", soon)
        for value in (asctime, minus_zero):
            assert 8 <= (parse_retry_after(value) or 0) <= 10
    finally:
        monkeypatch.undo()
        time.tzset()
    # An infinite wait would be a submit or poll that never comes back.
    for value in ("inf", "Infinity", "1e400", "nan"):
        assert parse_retry_after(value) is None


def test_every_error_survives_pickling() -> None:
    """Errors cross processes (a process pool, a job queue's result store): one that cannot
    be rebuilt breaks the pool and hides what happened."""
    task = Task(id="t", polling_url=polling_url("t"), model="flux-2-pro")
    result = Result(task=task, sample="https://delivery-eu1.bfl.ai/x", ready_at=1.0)
    errors: list[Exception] = [
        APIError("m", status_code=418, body={"detail": "x"}),
        SubmissionUncertainError("ReadTimeout", model="flux-2-pro", params={"prompt": "x"}),
        ModerationError(task=task, kind="request", reasons=["r"]),
        WaitTimeoutError("late", task=task),
        DownloadError("broken", task=task, result=result),
        ParameterError("flux-2-pro", [Problem("width", "too big", "64-4096")]),
        UnknownModelError("flux-9", ["flux-2-pro"]),
        OutputExistsError("out/x.png", kept="out/x.part"),
        LimiterUnavailableError("down", url="redis://h"),
        BatchInUseError("j.sqlite", api="http://127.0.0.1:1"),
    ]
    for error in errors:
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error)
        assert str(again) == str(error) and vars(again) == vars(error)
