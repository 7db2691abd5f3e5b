"""The wait loop: every poll answer of the contract, Retry-After, the budget, cancellation."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from trio.testing import MockClock

from bfl_async import (
    APIError,
    Backoff,
    GenerationError,
    ModerationError,
    Task,
    TaskNotFoundError,
)
from bfl_async._http import API as Api
from bfl_async._limits import PollBudget
from bfl_async._polling import watch_task

from .helpers import API, KEY, error_answer, failed, moderated, poll_answer, polling_url, ready

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both backends."""
    return str(request.param)


TASK = Task(id="task-1", polling_url=polling_url("task-1"), model="flux-2-pro")


class Every:
    """Polls `delay` s apart, noting how each watch ended."""

    def __init__(self, delay: float = 0.001) -> None:
        self.delay = delay
        self.ended: list[tuple[float, float | None]] = []

    def next_delay(self, task: Task, attempt: int, elapsed: float, progress: float | None) -> float:
        return self.delay

    def urgency(self, task: Task, pending_at: float, elapsed: float) -> float:
        return 0.0

    def done(self, task: Task, lower: float, upper: float | None) -> None:
        self.ended.append((lower, upper))


def answering(
    *answers: httpx.Response | Exception,
) -> tuple[httpx.AsyncClient, list[httpx.Request]]:
    """A client whose polls get `answers` in turn (the last one again once they run out)."""
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        answer = answers[min(len(sent), len(answers) - 1)]
        sent.append(request)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.AsyncClient(transport=httpx.MockTransport(handler)), sent


async def watch(client: httpx.AsyncClient, schedule: Any = None, **options: Any) -> Any:
    async with client:
        return await watch_task(
            Api(client, KEY, API),
            TASK,
            schedule or Every(),
            accepted_at=anyio.current_time(),
            retry_base_delay=0.001,
            **options,
        )


# --- every answer of the contract ----------------------------------------------------------


async def test_pending_then_ready_gives_the_result_and_tells_the_schedule() -> None:
    client, sent = answering(poll_answer("Pending"), poll_answer("Pending"), ready(seed=2**40))
    schedule = Every()
    result = await watch(client, schedule)
    assert (result.seed, result.polls, len(sent)) == (2**40, 3, 3)
    assert all(r.headers["x-key"] == KEY and str(r.url) == TASK.polling_url for r in sent)
    [(lower, upper)] = schedule.ended
    assert upper is not None and 0 < lower <= upper


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (moderated("Request Moderated"), ModerationError),
        (moderated("Content Moderated"), ModerationError),
        (failed(), GenerationError),
        (poll_answer("Task not found"), TaskNotFoundError),
        (error_answer(404), TaskNotFoundError),
    ],
)
async def test_terminal_answers_end_the_watch_with_their_error(
    answer: httpx.Response, error: type[Exception]
) -> None:
    client, sent = answering(poll_answer("Pending"), answer)
    schedule = Every()
    with pytest.raises(error) as caught:
        await watch(client, schedule)
    assert caught.value.task == TASK  # type: ignore[attr-defined]
    assert len(sent) == 2 and schedule.ended[0][1] is None


async def test_unknown_statuses_warn_once_each_and_polling_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, sent = answering(
        poll_answer("Generating"),
        poll_answer("Failed"),
        poll_answer("Generating"),
        poll_answer("Failed"),
        ready(),
    )
    with caplog.at_level(logging.WARNING, logger="bfl_async"):
        result = await watch(client)
    assert result.polls == len(sent) == 5
    warned = [r.getMessage() for r in caplog.records if "unknown status" in r.getMessage()]
    assert len(warned) == 2 and "'Generating'" in warned[0] and "'Failed'" in warned[1]


# --- Retry-After ---------------------------------------------------------------------------


@pytest.mark.parametrize("code", [429, 503])
async def test_retry_after_on_a_refused_poll_is_obeyed(
    planned_waits: list[float], code: int
) -> None:
    client, sent = answering(error_answer(code, retry_after="7"), ready())
    await watch(client)
    assert len(sent) == 2
    assert 7.0 <= planned_waits[1] <= 7.0 * 1.25  # the wait before the second poll


@pytest.mark.parametrize("code", [408, 425])
async def test_a_poll_answered_timeout_or_too_early_is_repeated(code: int) -> None:
    # A load balancer's 408: the task, paid, is not lost to it.
    client, sent = answering(httpx.Response(code, text="<html>Request Timeout</html>"), ready())
    result = await watch(client)
    assert len(sent) == 2 and result.sample


@pytest.mark.parametrize("code", [400, 403, 418])
async def test_a_poll_error_carries_the_task_which_may_still_finish(code: int) -> None:
    client, _ = answering(httpx.Response(code, json={"detail": "no"}))
    with pytest.raises(APIError, match=r"wait\(e.task\) polls it again") as caught:
        await watch(client)
    assert caught.value.task == TASK and caught.value.status_code == code


async def test_retry_after_on_a_normal_answer_is_advice() -> None:
    pending = poll_answer("Pending")
    pending.headers["Retry-After"] = "30"
    client, sent = answering(pending, ready())
    with anyio.fail_after(5):
        await watch(client)
    assert len(sent) == 2


# --- the budget and cancellation -----------------------------------------------------------


async def test_every_poll_takes_its_turn_in_the_budget() -> None:
    client, sent = answering(poll_answer("Pending"), error_answer(503, retry_after="0"), ready())
    turns: list[int] = []

    class Counting(PollBudget):
        async def send(self, urgency: Callable[[], float] | None = None) -> None:
            turns.append(len(sent))
            await super().send(urgency)

    await watch(client, budget=Counting(1000.0))
    assert turns == [0, 1, 2]


async def test_a_cancelled_watch_tells_the_schedule_and_frees_its_turn() -> None:
    client, _ = answering(poll_answer("Pending"))
    schedule = Every(delay=3600.0)
    budget = PollBudget(1000.0)
    with anyio.move_on_after(0.05) as scope:
        await watch(client, schedule, budget=budget)
    assert scope.cancelled_caught
    assert schedule.ended == [(0.0, None)]
    with anyio.fail_after(1):
        await budget.send()


async def test_backoff_is_capped_and_jittered() -> None:
    schedule = Backoff(initial=1.0, factor=2.0, maximum=5.0, jitter=0.1)
    delays = [schedule.next_delay(TASK, n, 0.0, None) for n in range(10)]
    assert 0.9 <= delays[0] <= 1.1 and all(4.5 <= d <= 5.5 for d in delays[4:])
    with pytest.raises(ValueError, match="maximum >= initial"):
        Backoff(initial=2.0, maximum=1.0)


@pytest.mark.parametrize("anyio_backend", [("trio", {"clock": MockClock(autojump_threshold=0)})])
@pytest.mark.parametrize("rate", [1.0, 2.5, 6.67, 20.0])
async def test_the_budget_lets_no_more_than_its_rate_into_any_second(rate: float) -> None:
    budget = PollBudget(rate)
    left: list[float] = []

    async def poll() -> None:
        await budget.send()
        left.append(anyio.current_time())

    async with anyio.create_task_group() as tg:  # on a mock clock: virtual seconds
        for _ in range(3 * math.ceil(rate)):
            tg.start_soon(poll)
    most = math.floor(rate)
    spans = [left[n + most] - left[n] for n in range(len(left) - most)]
    assert min(spans) > 1.0  # no `most + 1` polls within a second


@pytest.mark.parametrize("rate", [0.5, math.nan, math.inf])
def test_a_budget_below_one_poll_a_second_or_not_a_number_is_refused(rate: float) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        PollBudget(rate)
