"""Webhooks: verification, the client ending watches on pushed events, FakeBFL's deliveries."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import respx

from bfl_async import (
    AsyncBFL,
    Backoff,
    GenerationError,
    Limiter,
    ModerationError,
    SubmissionUncertainError,
    Task,
    TaskNotFoundError,
    WaitTimeoutError,
    WebhookEvent,
    WebhookPayloadError,
    WebhookVerificationError,
    sign_webhook,
    verify_webhook,
)
from bfl_async._push import EarlyEvents, FirstNow, Slowed
from bfl_async.testing import FakeBFL

from .helpers import API, FAST, KEY, accepted, poll_answer, polling_url, ready, signed_url

BOTH = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
SECRET = "whsec-0123456789-SECRET"
HOOK = "https://app.example.com/bfl/webhook"


def payload(task_id: str = "task-1", status: str = "SUCCESS", **extra: Any) -> bytes:
    body: dict[str, Any] = {"task_id": task_id, "status": status, **extra}
    if status in ("SUCCESS", "Ready") and "result" not in extra:
        body["result"] = {"sample": signed_url(), "seed": 7, "prompt": "a fox"}
    return json.dumps(body).encode()


def event(task_id: str = "task-1", status: str = "SUCCESS", **extra: Any) -> WebhookEvent:
    body = payload(task_id, status, **extra)
    return verify_webhook(body, sign_webhook(body, SECRET), SECRET)


# -- verify_webhook / sign_webhook ---------------------------------------------------------


def test_hmac_signature_is_the_sha256_of_the_raw_body() -> None:
    body = payload()
    headers = sign_webhook(body, SECRET)
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers == {"X-BFL-Signature": f"sha256={digest}"}
    got = verify_webhook(body, headers, SECRET)
    assert got.task_id == "task-1"
    assert got.status == "Ready"
    assert got.terminal
    assert got.result is not None and got.result["seed"] == 7
    assert got.raw == json.loads(body)


def test_secret_echo_scheme() -> None:
    body = payload(status="Ready")
    headers = sign_webhook(body, SECRET, scheme="secret")
    assert headers == {"X-Webhook-Secret": SECRET}
    assert verify_webhook(body, headers, SECRET).status == "Ready"


@pytest.mark.parametrize(
    "header", ["x-bfl-signature", "X-BFL-SIGNATURE", "X-Bfl-Signature", "x-webhook-secret"]
)
def test_header_names_are_case_insensitive(header: str) -> None:
    body = payload()
    value = (
        SECRET
        if header == "x-webhook-secret"
        else f"sha256={hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()}"
    )
    assert verify_webhook(body, {header: value}, SECRET).task_id == "task-1"
    assert verify_webhook(body, httpx.Headers({header: value}), SECRET).task_id == "task-1"


def test_signature_without_prefix_or_in_upper_case_is_accepted() -> None:
    body = payload()
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert verify_webhook(body, {"X-BFL-Signature": digest.upper()}, SECRET).task_id == "task-1"
    assert verify_webhook(body, {"X-BFL-Signature": f" SHA256={digest} "}, SECRET)


@pytest.mark.parametrize(
    ("headers_of", "why"),
    [
        (lambda body: {}, "neither"),
        (lambda body: {"content-type": "application/json"}, "neither"),
        (lambda body: sign_webhook(body, "another-secret"), "does not match"),
        (lambda body: sign_webhook(body + b" ", SECRET), "does not match"),
        (lambda body: sign_webhook(body, "another-secret", scheme="secret"), "does not match"),
        (lambda body: {"X-BFL-Signature": "sha256=zz\u00e9"}, "does not match"),
        (lambda body: {"X-Webhook-Secret": SECRET[:-1]}, "does not match"),
        (lambda body: {"X-Webhook-Secret": ""}, "does not match"),
    ],
)
def test_forged_deliveries_are_refused(headers_of: Callable[[bytes], Any], why: str) -> None:
    body = payload()
    with pytest.raises(WebhookVerificationError, match=why) as caught:
        verify_webhook(body, headers_of(body), SECRET)
    assert SECRET not in str(caught.value) and SECRET not in repr(caught.value)


def test_one_valid_scheme_is_enough() -> None:
    body = payload()
    headers = {"X-BFL-Signature": "sha256=00", **sign_webhook(body, SECRET, scheme="secret")}
    assert verify_webhook(body, headers, SECRET).task_id == "task-1"


@pytest.mark.parametrize("valid_first", [True, False])
def test_a_signature_header_sent_twice_counts_every_value(valid_first: bool) -> None:
    # A stale or extra signature beside the right one: frameworks keep both (Starlette) or
    # join them with a comma (httpx); neither the order nor the form may refuse it.
    starlette = pytest.importorskip("starlette.datastructures")
    body = payload()
    valid = sign_webhook(body, SECRET)["X-BFL-Signature"]
    stale = sign_webhook(body, "the-previous-secret")["X-BFL-Signature"]
    values = [valid, stale] if valid_first else [stale, valid]
    raw = [(b"x-bfl-signature", value.encode()) for value in values]
    assert verify_webhook(body, starlette.Headers(raw=raw), SECRET).task_id == "task-1"
    joined = httpx.Headers([("X-BFL-Signature", value) for value in values])
    assert verify_webhook(body, joined, SECRET).task_id == "task-1"
    forged = [(b"x-bfl-signature", stale.encode())] * 2
    with pytest.raises(WebhookVerificationError, match="does not match"):
        verify_webhook(body, starlette.Headers(raw=forged), SECRET)


def test_forged_and_malformed_is_a_verification_error() -> None:
    with pytest.raises(WebhookVerificationError):
        verify_webhook(b"not json", {"X-Webhook-Secret": "nope"}, SECRET)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"status": "SUCCESS"}', "no task_id"),
        (b'{"task_id": 3, "status": "SUCCESS"}', "no task_id"),
        (b'{"task_id": "", "status": "SUCCESS"}', "no task_id"),
        (b'{"task_id": "t"}', "no status"),
        (b'{"task_id": "t", "status": null}', "no status"),
        (b'{"task_id": "t", "status": "SUCCESS", "result": "http://x"}', "malformed result"),
        (b'{"task_id": "t", "status": "SUCCESS", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
         "nested too deeply"),
    ],
)  # fmt: skip
def test_malformed_bodies_raise_a_typed_error(body: bytes, why: str) -> None:
    with pytest.raises(WebhookPayloadError, match=why):
        verify_webhook(body, sign_webhook(body, SECRET), SECRET)


@pytest.mark.parametrize(
    ("sent", "normalised", "terminal"),
    [
        ("SUCCESS", "Ready", True),
        ("Ready", "Ready", True),
        ("ready", "Ready", True),
        ("Pending", "Pending", False),
        ("PENDING", "Pending", False),
        ("Request Moderated", "Request Moderated", True),
        ("CONTENT_MODERATED", "Content Moderated", True),
        ("Error", "Error", True),
        ("FAILED", "Error", True),
        ("Task not found", "Task not found", True),
        ("TASK_NOT_FOUND", "Task not found", True),
        ("Warming up", "Warming up", False),
    ],
)
def test_statuses_are_normalised_to_the_poll_vocabulary(
    sent: str, normalised: str, terminal: bool
) -> None:
    got = event(status=sent)
    assert (got.status, got.terminal) == (normalised, terminal)


def test_id_is_accepted_as_the_task_id() -> None:
    body = b'{"id": "task-9", "status": "Error", "details": {"message": "boom"}}'
    got = verify_webhook(body, sign_webhook(body, SECRET), SECRET)
    assert (got.task_id, got.status, got.details) == ("task-9", "Error", {"message": "boom"})


@pytest.mark.parametrize(
    ("extra", "details"),
    [
        ({"error": "content_policy_violation", "message": "the prompt breaks the policy"},
         "content_policy_violation: the prompt breaks the policy"),
        ({"error": "out of memory"}, "out of memory"),
        ({"error": None, "message": "timed out"}, "timed out"),
        ({"details": "kept", "error": "not used"}, "kept"),
        ({}, None),
    ],
)  # fmt: skip
def test_a_failure_says_why_in_details_or_in_error_and_message(
    extra: dict[str, Any], details: Any
) -> None:
    # BFL's guide shows failed deliveries with the reason in `error` and `message`.
    assert event(status="Error", **extra).details == details


def test_secrets_and_schemes_are_checked() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        verify_webhook(b"{}", {}, "")
    with pytest.raises(ValueError, match="non-empty"):
        sign_webhook(b"{}", "")
    with pytest.raises(ValueError, match="unknown webhook scheme"):
        sign_webhook(b"{}", SECRET, scheme="bearer")  # type: ignore[arg-type]


# -- the pieces the client uses ------------------------------------------------------------


def test_slowed_schedule_stretches_delays_and_passes_observations_on() -> None:
    seen: list[tuple[float, float | None]] = []

    class Recorder(Backoff):
        def urgency(self, task: Task, pending_at: float, elapsed: float) -> float:
            return elapsed - pending_at

        def done(self, task: Task, lower: float, upper: float | None) -> None:
            seen.append((lower, upper))

    inner = Recorder(initial=0.5, factor=2.0, maximum=4.0, jitter=0.0)
    task = Task(id="t", polling_url=polling_url("t"), model="flux-2-pro")
    slowed = Slowed(inner)
    assert [slowed.next_delay(task, n, 0.0, None) for n in range(5)] == [5, 10, 20, 40, 40]
    slowed.done(task, 1.0, 2.0)
    now = FirstNow(inner)
    assert [now.next_delay(task, n, 0.0, None) for n in range(3)] == [0.0, 1.0, 2.0]
    now.done(task, 3.0, None)
    assert seen == [(1.0, 2.0), (3.0, None)]
    # Urgency passes through, but a pushed end's first poll goes before any other.
    assert slowed.urgency(task, 1.0, 1.5) == 0.5
    assert now.urgency(task, 0.0, 0.2) == math.inf
    assert now.urgency(task, 1.0, 1.5) == 0.5


def test_slowed_polls_find_a_result_long_before_its_url_expires() -> None:
    task = Task(id="t", polling_url=polling_url("t"), model="flux-2-max")
    # A schedule polling long tasks each minute: ten times slower, a lost push would leave
    # a Ready task unseen ten minutes, past the life of its result URL.
    minute = Slowed(Backoff(initial=60.0, factor=1.0, maximum=60.0, jitter=0.0))
    assert minute.next_delay(task, 3, 200.0, None) == 120.0
    # Never faster than the schedule itself asks.
    rare = Slowed(Backoff(initial=300.0, factor=1.0, maximum=300.0, jitter=0.0))
    assert rare.next_delay(task, 0, 0.0, None) == 300.0


@pytest.mark.anyio
async def test_early_events_are_kept_briefly_and_boundedly() -> None:
    early = EarlyEvents(ttl=60.0, size=2)
    assert early.add(event("a")) and early.add(event("b"))
    assert not early.add(event("b"))
    assert early.add(event("c"))
    assert len(early) == 2
    assert early.pop("a") is None
    popped = early.pop("b")
    assert popped is not None and popped.task_id == "b"
    expired = EarlyEvents(ttl=-1.0)
    expired.add(event("a"))
    assert expired.pop("a") is None and len(expired) == 0


class Clock:
    """A clock for `EarlyEvents` that moves only when told: expiry without waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def sample_of(body: bytes) -> str:
    sample = json.loads(body)["result"]["sample"]
    assert isinstance(sample, str)
    return sample


def url_of(ready: WebhookEvent) -> str:
    assert ready.result is not None and isinstance(ready.result["sample"], str)
    return ready.result["sample"]


def test_an_early_event_expiring_unclaimed_is_logged_with_its_result_url(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="bfl_async")
    clock = Clock()
    early = EarlyEvents(ttl=120.0, clock=clock)
    paid = event("paid-7")
    assert early.add(paid)
    assert early.add(event("claimed"))
    clock.now = 119.0
    assert early.pop("claimed") is not None  # claimed in time: nothing to say
    assert caplog.records == []
    clock.now = 120.0
    assert early.pop("unknown") is None
    [record] = caplog.records
    assert record.name == "bfl_async" and record.levelno == logging.WARNING
    message = record.getMessage()
    assert "paid-7" in message and "Ready" in message and url_of(paid) in message
    assert "SubmissionUncertainError" in message and "dashboard" in message
    assert SECRET not in caplog.text
    assert len(early) == 0


def test_early_events_evicted_or_left_at_close_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="bfl_async")
    early = EarlyEvents(size=1, clock=Clock())
    first = event("first")
    early.add(first)
    early.add(event("failed", "FAILED"))  # the store is full: "first" goes
    [evicted] = caplog.records
    assert evicted.levelno == logging.WARNING
    assert "first" in evicted.getMessage() and "evicted" in evicted.getMessage()
    assert url_of(first) in evicted.getMessage()
    early.close()
    assert len(early) == 0
    closed = caplog.records[1]
    assert closed.levelno == logging.WARNING and "closed" in closed.getMessage()
    assert "task failed (Error)" in closed.getMessage()
    assert "result URL" not in closed.getMessage()  # a failed task has none to give


def test_a_relayed_early_event_unclaimed_here_is_logged_at_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="bfl_async")
    clock = Clock()
    early = EarlyEvents(ttl=120.0, clock=clock)
    theirs = event("theirs")
    assert early.add(theirs, relayed=True)
    clock.now = 121.0
    assert early.pop("unknown") is None
    [record] = caplog.records
    assert record.levelno == logging.INFO  # another process most likely claimed it
    assert "theirs" in record.getMessage() and url_of(theirs) in record.getMessage()
    assert "relayed" in record.getMessage()


@BOTH
@pytest.mark.anyio
async def test_run_logs_an_unclaimed_event_when_it_expires_not_when_the_next_comes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # On a quiet server no later event or watch may come for hours: the only trace of a
    # paid task, its result URL, must be logged while it still serves the image.
    caplog.set_level(logging.DEBUG, logger="bfl_async")
    early = EarlyEvents(ttl=0.05)
    early.add(event("before-run"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(early.run)
        with anyio.fail_after(5):
            while len(early):
                await anyio.sleep(0.01)
            await anyio.wait_all_tasks_blocked()  # `run` waits for the next event
            paid = event("paid-7")
            early.add(paid)
            while len(early):
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    first, second = caplog.records
    assert first.levelno == second.levelno == logging.WARNING
    assert "before-run" in first.getMessage() and "expired" in first.getMessage()
    assert "paid-7" in second.getMessage() and url_of(paid) in second.getMessage()


@BOTH
@pytest.mark.anyio
async def test_a_client_logs_a_push_nobody_claims_when_it_expires(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="bfl_async")
    async with AsyncBFL(
        api_key=KEY, webhook_url="https://app.example/bfl/webhook", webhook_secret=SECRET
    ) as client:
        client._early.ttl = 0.05
        body = payload("nobody-waits")
        client.handle_webhook(body, sign_webhook(body, SECRET))
        with anyio.fail_after(5):
            while len(client._early):  # no other event, watch or close comes to expire it
                await anyio.sleep(0.01)
        [logged] = [r for r in caplog.records if "nobody-waits" in r.getMessage()]
        assert logged.levelno == logging.WARNING and "expired" in logged.getMessage()
        assert json.loads(body)["result"]["sample"] in logged.getMessage()


# -- the client, against respx -------------------------------------------------------------


@pytest.fixture
def mock() -> AsyncIterator[respx.MockRouter]:
    with respx.mock(assert_all_mocked=True, assert_all_called=False) as router:
        yield router


SLOW_POLLS = Backoff(initial=1.0, factor=1.0, maximum=1.0, jitter=0.0)
"""Slowed 10 times by a webhook: a first poll after 10 s, far past any test's deadline."""


def hooked(**kwargs: Any) -> AsyncBFL:
    options = {
        **FAST,
        "poll_schedule": SLOW_POLLS,
        "webhook_url": HOOK,
        "webhook_secret": SECRET,
        **kwargs,
    }
    return AsyncBFL(**options)


def test_webhook_options_are_checked_and_the_secret_never_shows() -> None:
    with pytest.raises(ValueError, match="together"):
        AsyncBFL(api_key=KEY, webhook_url=HOOK)
    with pytest.raises(ValueError, match="together"):
        AsyncBFL(api_key=KEY, webhook_secret=SECRET)
    with pytest.raises(ValueError, match="together"):
        AsyncBFL(api_key=KEY, webhook_url=HOOK, webhook_secret="")
    for bad in (SECRET + "\n", " " + SECRET, SECRET + "-\u00e9t\u00e9"):  # never echoed intact
        with pytest.raises(ValueError, match="printable ASCII") as caught:
            AsyncBFL(api_key=KEY, webhook_url=HOOK, webhook_secret=bad)
        assert SECRET not in str(caught.value)
    with pytest.raises(ValueError, match="absolute http"):
        AsyncBFL(api_key=KEY, webhook_url="ftp://x.test/hook", webhook_secret=SECRET)
    with pytest.raises(ValueError, match="absolute http"):
        AsyncBFL(api_key=KEY, webhook_url="/bfl/webhook", webhook_secret=SECRET)
    with pytest.raises(ValueError, match="absolute http"):  # not httpx's InvalidURL
        AsyncBFL(api_key=KEY, webhook_url="http://[::1/hook", webhook_secret=SECRET)
    with pytest.raises(TypeError, match="must be str"):  # else every delivery would fail
        AsyncBFL(api_key=KEY, webhook_url=HOOK, webhook_secret=SECRET.encode())  # type: ignore[arg-type]
    client = hooked()
    assert client.webhook_url == HOOK
    assert SECRET not in repr(client) and SECRET not in str(vars(client).get("webhook_url"))
    assert AsyncBFL(api_key=KEY).webhook_url is None


@pytest.mark.anyio
async def test_submits_carry_the_clients_webhook_unless_the_call_has_its_own(
    mock: respx.MockRouter,
) -> None:
    submit = mock.post(f"{API}/v1/flux-2-pro").mock(
        side_effect=[accepted("t1"), accepted("t2"), accepted("t3")]
    )
    mock.get(polling_url("t1")).mock(return_value=poll_answer("Pending", "t1"))
    mock.get(polling_url("t2")).mock(return_value=poll_answer("Pending", "t2"))
    mock.get(polling_url("t3")).mock(return_value=poll_answer("Pending", "t3"))
    async with hooked(close_grace=0.0) as client:
        ours = await client.submit("flux-2-pro", prompt="a fox")
        theirs = await client.submit(
            "flux-2-pro", prompt="a fox", webhook_url="https://other.test/h", webhook_secret="o"
        )
        await client.submit_raw("flux-2-pro", {"prompt": "a fox"})
        # Pushes to another URL never reach this client: that task is polled at full rate.
        assert client._watches[ours.id].pushed and not client._watches[theirs.id].pushed
    bodies = [json.loads(call.request.content) for call in submit.calls]
    assert [b["webhook_url"] for b in bodies] == [HOOK, "https://other.test/h", HOOK]
    assert [b["webhook_secret"] for b in bodies] == [SECRET, "o", SECRET]


@BOTH
@pytest.mark.anyio
async def test_a_delivered_event_ends_the_watch_at_once_and_frees_the_slot(
    mock: respx.MockRouter,
) -> None:
    mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
    poll = mock.get(polling_url("task-1")).mock(return_value=poll_answer("Pending"))
    async with hooked() as client:
        task = await client.submit("flux-2-pro", prompt="a fox")
        assert client.limiter.in_use("standard") == 1
        assert client.deliver(event()) is True
        result = await client.wait(task, timeout=5.0)
        assert client.limiter.in_use("standard") == 0
        assert client.in_flight == []
        assert client.deliver(event()) is False  # at-least-once: the copy changes nothing
        assert (await client.wait(task)) is result
    assert result.seed == 7 and result.polls == 0
    assert result.sample.startswith("https://delivery-eu1.bfl.ai/")
    assert poll.call_count == 0


@pytest.mark.anyio
async def test_a_handled_delivery_is_not_failed_by_passing_it_on(
    mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
    mock.get(polling_url("task-1")).mock(return_value=poll_answer("Pending"))

    class Unpublishable(Limiter):
        def publish(self, event: WebhookEvent) -> None:
            raise ValueError("cannot be serialised")

    async with hooked(limiter=Unpublishable()) as client:
        task = await client.submit("flux-2-pro", prompt="a fox")
        body = payload()
        with caplog.at_level(logging.ERROR, logger="bfl_async"):
            client.handle_webhook(body, sign_webhook(body, SECRET))  # no 500 for BFL to retry
        assert (await client.wait(task, timeout=5.0)).seed == 7
    assert "passing the webhook event of task task-1 on failed" in caplog.text


@BOTH
@pytest.mark.anyio
async def test_an_event_overtaking_the_submit_answer_is_kept(mock: respx.MockRouter) -> None:
    async with hooked() as client:

        def answer(request: httpx.Request) -> httpx.Response:
            assert client.deliver(event("task-1")) is True
            assert client.deliver(event("task-1")) is False
            return accepted("task-1")

        mock.post(f"{API}/v1/flux-2-pro").mock(side_effect=answer)
        poll = mock.get(polling_url("task-1")).mock(return_value=poll_answer("Pending"))
        task = await client.submit("flux-2-pro", prompt="a fox")
        result = await client.wait(task, timeout=5.0)
        assert poll.call_count == 0
        assert result.seed == 7


@BOTH
@pytest.mark.anyio
async def test_a_rebuilt_handle_picks_up_a_kept_event(mock: respx.MockRouter) -> None:
    poll = mock.get(polling_url("task-9")).mock(return_value=poll_answer("Pending", "task-9"))
    task = Task(id="task-9", polling_url=polling_url("task-9"), model="flux-2-pro")
    async with hooked() as client:
        client.deliver(event("task-9"))
        result = await client.wait(task, timeout=5.0)
    assert result.task.id == "task-9" and poll.call_count == 0


@pytest.mark.parametrize(
    ("status", "extra", "error", "match"),
    [
        ("Content Moderated", {"details": {"Moderation Reasons": ["Nudity"]}}, ModerationError,
         "Nudity"),
        ("Request Moderated", {}, ModerationError, "moderated"),
        ("FAILED", {"details": "out of memory"}, GenerationError, "out of memory"),
        ("Error", {"error": "content_policy_violation", "message": "prompt refused"},
         GenerationError, "content_policy_violation: prompt refused"),
        ("Task not found", {}, TaskNotFoundError, "does not know"),
    ],
)  # fmt: skip
@pytest.mark.anyio
async def test_a_pushed_failure_ends_the_wait_with_its_error(
    mock: respx.MockRouter, status: str, extra: dict[str, Any], error: type[Exception], match: str
) -> None:
    mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
    mock.get(polling_url("task-1")).mock(return_value=poll_answer("Pending"))
    async with hooked() as client:
        task = await client.submit("flux-2-pro", prompt="a fox")
        client.deliver(event(status=status, **extra))
        with pytest.raises(error, match=match):
            await client.wait(task, timeout=5.0)
        assert client.limiter.in_use("standard") == 0


@BOTH
@pytest.mark.anyio
async def test_a_pushed_ready_without_result_is_polled_at_once(mock: respx.MockRouter) -> None:
    mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
    poll = mock.get(polling_url("task-1")).mock(return_value=ready(seed=11))
    async with hooked() as client:
        task = await client.submit("flux-2-pro", prompt="a fox")
        client.deliver(event(status="SUCCESS", result=None))
        result = await client.wait(task, timeout=5.0)
    assert result.seed == 11 and poll.call_count == 1


@BOTH
@pytest.mark.anyio
async def test_a_push_that_says_where_the_image_is_ends_the_polls_a_push_without_began(
    mock: respx.MockRouter,
) -> None:
    # The polling host lags (still Pending) after a push said Ready without its URL; the
    # next push carries it: it must not be dropped as a copy, the only URL there may be.
    mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
    poll = mock.get(polling_url("task-1")).mock(return_value=poll_answer("Pending"))
    async with hooked() as client:
        task = await client.submit("flux-2-pro", prompt="a fox")
        assert client.deliver(event(status="SUCCESS", result=None)) is True
        with anyio.fail_after(5):
            while not poll.call_count:  # polled at once for the URL
                await anyio.sleep(0.01)
        assert client.deliver(event(result={"sample": signed_url(), "seed": 3})) is True
        with anyio.fail_after(5):
            result = await client.wait(task)
        assert client.deliver(event(result={"sample": signed_url(), "seed": 4})) is False
    assert result.seed == 3 and result.sample.startswith("https://delivery-eu1.bfl.ai/")


@pytest.mark.anyio
async def test_tasks_found_by_polls_with_no_push_ever_heard_are_warned_of_once(
    mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    # A webhook URL BFL cannot reach shows only as results ten times slower: say so.
    fast = Backoff(initial=0.01, factor=1.0, maximum=0.01, jitter=0.0)  # slowed: 0.1 s
    mock.post(f"{API}/v1/flux-2-pro").mock(
        side_effect=[accepted("t1"), accepted("t2"), accepted("t3")]
    )
    for n in (1, 2, 3):
        mock.get(polling_url(f"t{n}")).mock(return_value=ready(f"t{n}"))
    async with hooked(poll_schedule=fast) as client:
        for _ in (1, 2):
            await client.wait(await client.submit("flux-2-pro", prompt="a fox"), timeout=5)
    warned = [r for r in caplog.records if "none has reached this client" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert HOOK in warned[0].getMessage() and SECRET not in caplog.text
    caplog.clear()
    async with hooked(poll_schedule=fast) as client:
        client.deliver(event("someone-else"))  # one push heard: the URL works
        await client.wait(await client.submit("flux-2-pro", prompt="a fox"), timeout=5)
    assert "none has reached this client" not in caplog.text


@BOTH
@pytest.mark.anyio
async def test_a_task_left_to_a_webhook_is_polled_at_once_when_the_client_closes(
    mock: respx.MockRouter,
) -> None:
    mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
    poll = mock.get(polling_url("task-1")).mock(return_value=ready(seed=5))
    async with hooked(close_grace=2.0) as client:
        task = await client.submit("flux-2-pro", prompt="a fox")
        started = anyio.current_time()
    # Its push will not come (the server hearing them stops too), and its slowed first poll
    # would be 10 s away: closing polls it now and keeps the result.
    assert anyio.current_time() - started < 1.5
    assert poll.call_count == 1
    assert client._watches[task.id].outcome().seed == 5


@pytest.mark.anyio
async def test_non_terminal_and_forged_deliveries_change_nothing(mock: respx.MockRouter) -> None:
    mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
    mock.get(polling_url("task-1")).mock(return_value=poll_answer("Pending"))
    async with hooked(close_grace=0.0) as client:
        task = await client.submit("flux-2-pro", prompt="a fox")
        assert client.deliver(event(status="Pending")) is False
        body = payload()
        with pytest.raises(WebhookVerificationError):
            client.handle_webhook(body, sign_webhook(body, "guess"))
        with pytest.raises(WebhookPayloadError):
            client.handle_webhook(b"[]", sign_webhook(b"[]", SECRET))
        with pytest.raises(WaitTimeoutError):
            await client.wait(task, timeout=0.05)
        assert client.in_flight == [task]
        assert client.limiter.in_use("standard") == 1
        got = client.handle_webhook(body, sign_webhook(body, SECRET, scheme="secret"))
        assert got.task_id == "task-1"
        assert (await client.wait(task, timeout=5.0)).seed == 7


@pytest.mark.anyio
async def test_handle_webhook_needs_a_secret() -> None:
    async with AsyncBFL(**FAST) as client:
        with pytest.raises(RuntimeError, match="no webhook secret"):
            client.handle_webhook(payload(), sign_webhook(payload(), SECRET))
        # A per-call webhook verified by the caller can still be handed over.
        assert client.deliver(event("unknown")) is True


@pytest.mark.anyio
async def test_without_a_webhook_the_normal_schedule_polls(mock: respx.MockRouter) -> None:
    mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
    poll = mock.get(polling_url("task-1")).mock(return_value=ready())
    async with AsyncBFL(**{**FAST, "poll_schedule": SLOW_POLLS}) as client:
        task = await client.submit("flux-2-pro", prompt="a fox")
        with anyio.fail_after(5):
            await client.wait(task)
    assert poll.call_count == 1


# -- end to end: FakeBFL on loopback delivering to the client ------------------------------


Receiver = Callable[[httpx.Request], Awaitable[httpx.Response]]


def receiver(client_box: list[AsyncBFL], log: list[bool], fail_first: int = 0) -> Receiver:
    """A webhook endpoint as an httpx transport handler: verify, hand over, answer."""
    failures = [fail_first]

    async def receive(request: httpx.Request) -> httpx.Response:
        if failures[0] > 0:
            failures[0] -= 1
            return httpx.Response(503)
        body = await request.aread()
        try:
            event = verify_webhook(body, request.headers, SECRET)
        except WebhookVerificationError:
            return httpx.Response(401)
        log.append(client_box[0].deliver(event))
        return httpx.Response(204)

    return receive


def loopback_client(fake: FakeBFL, **kwargs: Any) -> AsyncBFL:
    options: dict[str, Any] = {
        "api_key": fake.api_key,
        "base_url": fake.base_url,
        "poll_schedule": SLOW_POLLS,
        "retry_base_delay": 0.01,
        "poll_rate": None,
        "close_grace": 5.0,
        "webhook_url": HOOK,
        "webhook_secret": SECRET,
        **kwargs,
    }
    return AsyncBFL(**options)


@BOTH
@pytest.mark.anyio
@pytest.mark.parametrize("scheme", ["signature", "secret"])
async def test_fake_webhooks_resolve_generate_without_polls(tmp_path: Path, scheme: Any) -> None:
    box: list[AsyncBFL] = []
    log: list[bool] = []
    times = [0.02 * (i % 5) for i in range(12)]
    fake = FakeBFL(
        limits={"standard": 4},
        generation_time=lambda model, rng: times.pop(),
        webhook_scheme=scheme,
        webhook_copies=2,
        webhook_transport=httpx.MockTransport(receiver(box, log)),
    )
    async with fake, loopback_client(fake, limits={"standard": 4}) as client:
        box.append(client)
        with anyio.fail_after(5):
            images = [
                outcome.image
                async for outcome in client.generate_many(
                    [{"model": "flux-2-pro", "prompt": f"fox {i}"} for i in range(12)],
                    output_dir=tmp_path,
                )
            ]
    assert all(image is not None and image.path.exists() for image in images)
    assert fake.polls == 0
    assert fake.rate_limited == 0 and fake.peak_in_flight["standard"] <= 4
    assert fake.webhooks.delivered == 24 and fake.webhooks.failed == 0
    assert sorted(log) == [False] * 12 + [True] * 12


@BOTH
@pytest.mark.anyio
async def test_a_lost_webhook_is_caught_by_slowed_polling(tmp_path: Path) -> None:
    box: list[AsyncBFL] = []
    log: list[bool] = []
    fake = FakeBFL(
        generation_time=0.0,
        webhook_retries=1,
        webhook_retry_delay=0.0,
        webhook_transport=httpx.MockTransport(receiver(box, log, fail_first=2)),
    )
    fast = Backoff(initial=0.01, factor=1.0, maximum=0.01, jitter=0.0)  # slowed: 0.1 s
    async with fake, loopback_client(fake, poll_schedule=fast) as client:
        box.append(client)
        with anyio.fail_after(5):
            image = await client.generate("flux-2-pro", prompt="a fox", output_dir=tmp_path)
    assert image.path.exists()
    assert fake.webhooks.attempts == 2 and fake.webhooks.failed == 1
    assert log == [] and fake.polls >= 1


@pytest.mark.anyio
async def test_fake_retries_failed_deliveries_and_finish_now_sends_at_once() -> None:
    box: list[AsyncBFL] = []
    log: list[bool] = []
    fake = FakeBFL(
        generation_time=3600.0,
        webhook_retry_delay=0.001,
        webhook_transport=httpx.MockTransport(receiver(box, log, fail_first=2)),
    )
    async with fake, loopback_client(fake) as client:
        box.append(client)
        task = await client.submit("flux-2-pro", prompt="a fox")
        await anyio.sleep(0.05)
        assert fake.webhooks.attempts == 0
        fake.finish_now(task.id)
        with anyio.fail_after(5):
            await client.wait(task)
    assert (fake.webhooks.attempts, fake.webhooks.delivered, fake.webhooks.failed) == (3, 1, 0)
    assert [task_id for task_id, _ in fake.webhooks.sent] == [task.id]
    assert log == [True] and fake.polls == 0


@pytest.mark.anyio
async def test_fake_delivers_failures_and_unsigned_hooks_as_sent() -> None:
    received: list[httpx.Request] = []

    async def record(request: httpx.Request) -> httpx.Response:
        await request.aread()
        received.append(request)
        return httpx.Response(200)

    fake = FakeBFL(
        generation_time=0.0,
        outcome=lambda model, body: "Content Moderated" if body["prompt"] == "bad" else "Ready",
        webhook_transport=httpx.MockTransport(record),
    )
    async with fake, httpx.AsyncClient() as http:
        delivery = fake.delivery_base_url
        for prompt, extra in (("bad", {"webhook_secret": SECRET}), ("good", {})):
            answer = await http.post(
                f"{fake.base_url}/v1/flux-2-pro",
                json={"prompt": prompt, "webhook_url": "http://hook.test/x", **extra},
                headers={"x-key": fake.api_key},
            )
            assert answer.status_code == 200
        with anyio.fail_after(5):
            while len(received) < 2:
                await anyio.sleep(0.005)
    by_prompt = {fake.tasks[json.loads(r.content)["task_id"]].body["prompt"]: r for r in received}
    moderated = verify_webhook(by_prompt["bad"].content, by_prompt["bad"].headers, SECRET)
    assert moderated.status == "Content Moderated"
    assert moderated.details == {"Moderation Reasons": ["Explicit Content"]}
    unsigned = by_prompt["good"]
    assert "x-bfl-signature" not in unsigned.headers and "x-webhook-secret" not in unsigned.headers
    body = json.loads(unsigned.content)
    assert body["status"] == "SUCCESS"
    assert body["result"]["sample"].startswith(delivery)


def test_fake_webhook_options_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown webhook scheme"):
        FakeBFL(webhook_scheme="bearer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="copies"):
        FakeBFL(webhook_copies=0)
    with pytest.raises(ValueError, match="retries"):
        FakeBFL(webhook_retries=-1)


@pytest.mark.anyio
async def test_an_unreachable_webhook_url_gives_up_and_polling_still_finishes() -> None:
    fake = FakeBFL(generation_time=0.0, webhook_retries=2, webhook_retry_delay=0.001)
    fast = Backoff(initial=0.01, factor=1.0, maximum=0.01, jitter=0.0)
    # Port 1 on loopback: nothing listens there, so every attempt is refused.
    async with (
        fake,
        loopback_client(fake, poll_schedule=fast, webhook_url="http://127.0.0.1:1/hook") as client,
    ):
        with anyio.fail_after(5):
            result = await client.wait(await client.submit("flux-2-pro", prompt="a fox"))
            while fake.webhooks.failed < 1:
                await anyio.sleep(0.005)
    assert result.polls >= 1
    assert (fake.webhooks.attempts, fake.webhooks.delivered) == (3, 0)


@pytest.mark.anyio
async def test_the_clients_webhook_secret_is_redacted_from_errors(
    mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="bfl_async")
    mock.post(f"{API}/v1/flux-2-pro").mock(side_effect=httpx.ReadTimeout("slow"))
    async with hooked() as client:
        with pytest.raises(SubmissionUncertainError) as caught:
            await client.submit("flux-2-pro", prompt="a fox")
    error = caught.value
    # Resubmitted with the same client, its own webhook (and secret) are added again.
    assert "webhook_url" not in error.params and "webhook_secret" not in error.params
    for text in (str(error), repr(error), repr(error.params), caplog.text):
        assert SECRET not in text


@pytest.mark.anyio
async def test_a_push_for_a_task_whose_submit_was_uncertain_is_not_dropped_silently(
    mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="bfl_async")
    mock.post(f"{API}/v1/flux-2-pro").mock(side_effect=httpx.ReadTimeout("answer lost"))
    async with hooked() as client:
        client._early.ttl = 0.0  # kept until the next look, not two minutes
        with pytest.raises(SubmissionUncertainError):
            await client.submit("flux-2-pro", prompt="a fox")
        body = payload("paid-7")  # BFL created the task, and pushes its end
        client.handle_webhook(body, sign_webhook(body, SECRET))
        client.deliver(event("later"))  # the next push looks the kept ones over
    [record] = [r for r in caplog.records if "paid-7" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert sample_of(body) in record.getMessage() and "dashboard" in record.getMessage()
    assert SECRET not in caplog.text and KEY not in caplog.text


@pytest.mark.anyio
async def test_a_push_nobody_claimed_is_logged_when_the_client_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="bfl_async")
    url = signed_url()
    ours = WebhookEvent(task_id="ours", status="Ready", result={"sample": url})
    relayed = WebhookEvent(task_id="theirs", status="Ready", result={"sample": url})
    async with hooked() as client:
        assert client.deliver(ours)  # received here: the only trace of a paid task
        assert client._deliver_relayed(relayed)  # another worker's: it may be claimed there
    unclaimed = [r for r in caplog.records if "unclaimed when the client closed" in r.getMessage()]
    assert [(r.args[0], r.levelname) for r in unclaimed] == [  # type: ignore[index]
        ("ours", "WARNING"), ("theirs", "INFO")
    ]  # fmt: skip
