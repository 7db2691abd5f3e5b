"""Polling a task until it is terminal, on a configurable schedule.

Polls are idempotent, so every transient failure (connection trouble, timeouts, 429, 5xx,
a garbled answer) is retried; what ends a watch is a terminal status or an error that
polling again cannot fix (a revoked key, an unknown task).
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Mapping
from typing import Any, Protocol

import anyio
import httpx

from ._errors import (
    GenerationError,
    ModerationError,
    TaskNotFoundError,
)
from ._http import (
    API,
    body_of,
    error_from_response,
    float_or_none,
    int_or_none,
    parse_retry_after,
    retry_delay,
)
from ._limits import PollBudget
from ._models import Result, Task

__all__ = ["Backoff", "PollSchedule", "watch_task"]

logger = logging.getLogger("bfl_async")

TERMINAL = frozenset({"Ready", "Request Moderated", "Content Moderated", "Error", "Task not found"})
# Answers a poll is repeated after: a request timeout (a load balancer's), too early, too many.
_TRANSIENT = frozenset({408, 425, 429})
_EMPTY_READY = 3  # Ready answers without a result URL taken as glitches before giving up
_CLOCK_SLACK = 0.5  # seconds the API's reported end may fall outside the polls' bracket


class PollSchedule(Protocol):
    """Decides when to poll a pending task next: `Backoff`, `LearnedSchedule`, or your own.

    ```python
    class EverySecond:
        def next_delay(self, task, attempt, elapsed, progress):
            return 1.0

        def urgency(self, task, pending_at, elapsed):
            return 0.0

        def done(self, task, lower, upper):
            pass

    AsyncBFL(poll_schedule=EverySecond())
    ```
    """

    def next_delay(self, task: Task, attempt: int, elapsed: float, progress: float | None) -> float:
        """Seconds from `elapsed` to poll number `attempt` of `task` (0 is the first poll).

        `elapsed` is the time since the task was accepted: now for attempt 0, then when the
        last poll, which found it pending, was sent (its answer's round trip is not waited
        again); `progress` the last fraction the API reported (FLUX.1 models), or None.
        """
        ...

    def urgency(self, task: Task, pending_at: float, elapsed: float) -> float:
        """How urgent a poll of `task` is now, `elapsed` s after its acceptance, the last
        poll having found it pending at `pending_at` (0 before the first poll). When more
        polls are due than the poll budget lets out, the most urgent goes first; return a
        constant for first come, first served. What it raises fails that task's watch, as
        from `next_delay`."""
        ...

    def done(self, task: Task, lower: float, upper: float | None) -> None:
        """The watch of `task` ended. If it was found ready, that happened between `lower`
        seconds after acceptance (the last poll that found it pending, or 0) and `upper`
        (the poll that found it ready), or exactly at `lower == upper` where the API
        reported when it ended (FLUX.1); `upper` is None when it ended any other way."""
        ...


class Backoff:
    """Exponential backoff with jitter: `initial`, times `factor` each poll, at most `maximum`.

    The plain schedule; `jitter` spreads polls of tasks submitted together by ±that fraction.
    Also the schedule for tests against a fake whose tasks take milliseconds.

    ```python
    AsyncBFL(poll_schedule=Backoff(initial=1.0, factor=1.5, maximum=5.0))
    ```
    """

    def __init__(
        self,
        initial: float = 1.0,
        factor: float = 1.5,
        maximum: float = 5.0,
        jitter: float = 0.1,
    ) -> None:
        if initial <= 0 or factor < 1 or maximum < initial or not 0 <= jitter < 1:
            raise ValueError(
                "Backoff needs initial > 0, factor >= 1, maximum >= initial, 0 <= jitter < 1"
            )
        self.initial = initial
        self.factor = factor
        self.maximum = maximum
        self.jitter = jitter

    def __repr__(self) -> str:
        return (
            f"Backoff(initial={self.initial}, factor={self.factor}, "
            f"maximum={self.maximum}, jitter={self.jitter})"
        )

    def next_delay(self, task: Task, attempt: int, elapsed: float, progress: float | None) -> float:
        """Seconds before the next poll: `initial * factor**attempt`, capped, jittered."""
        base = min(self.maximum, self.initial * self.factor ** min(attempt, 64))
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)

    def urgency(self, task: Task, pending_at: float, elapsed: float) -> float:
        """All alike: polls held by the poll budget go in the order they came."""
        return 0.0

    def done(self, task: Task, lower: float, upper: float | None) -> None:
        """Plain backoff learns nothing."""


def has_sample(body: Mapping[str, Any]) -> bool:
    """Whether a poll answer (or a push, read as one) says where the image is."""
    result = body.get("result")
    return isinstance(result, dict) and isinstance(result.get("sample"), str)


def _terminal(task: Task, body: Mapping[str, Any], polls: int) -> Result:
    """The Result of a terminal poll answer, or the TaskError it stands for."""
    status = body["status"]
    details = body.get("details")
    if status == "Ready":
        if not has_sample(body):
            raise GenerationError(
                f"task {task.id} is Ready but BFL's answers carry no result URL, so its image "
                "cannot be fetched; the task is paid for: report its id to BFL",
                task=task,
            )
        result = body["result"]
        return Result(
            task=task,
            sample=result["sample"],
            seed=int_or_none(result.get("seed")),
            prompt=result.get("prompt") if isinstance(result.get("prompt"), str) else None,
            start_time=float_or_none(result.get("start_time")),
            end_time=float_or_none(result.get("end_time")),
            duration=float_or_none(result.get("duration")),
            ready_at=time.time(),
            polls=polls,
            raw=result,
        )
    if status in ("Request Moderated", "Content Moderated"):
        reasons: list[str] = []
        if isinstance(details, dict):
            found = details.get("Moderation Reasons", [])
            reasons = [str(r) for r in found] if isinstance(found, list) else [str(found)]
        kind = "request" if status == "Request Moderated" else "content"
        raise ModerationError(task=task, kind=kind, reasons=reasons)
    if status == "Error":
        why = f": {details}" if details else ""
        raise GenerationError(
            f"task {task.id} failed on BFL's side{why}; submitting again may work", task=task
        )
    raise TaskNotFoundError(
        f"BFL does not know task {task.id} (wrong or expired id); its result is gone",
        task=task,
    )


def _finish(result: Result, lower: float, upper: float, accepted_at: float) -> tuple[float, float]:
    """When `result`'s task finished, in seconds after acceptance: between the polls that
    bracket it, or the exact moment where the API reports its end (FLUX.1's `end_time`, or
    `start_time + duration`). The API's clock may disagree with ours: a reported end well
    outside the polls' bracket is not trusted, one just outside it is moved in."""
    end = result.end_time
    if end is None and result.start_time is not None and result.duration is not None:
        end = result.start_time + result.duration
    if end is None:
        return lower, upper
    # Seconds from the end to the answer that showed it, on the wall clock, taken back
    # from the moment of that answer on ours.
    finish = anyio.current_time() - accepted_at - (result.ready_at - end)
    if not lower - _CLOCK_SLACK <= finish <= upper + _CLOCK_SLACK:
        return lower, upper
    finish = min(upper, max(lower, finish))
    return finish, finish


def _urgency(schedule: PollSchedule, task: Task, accepted_at: float, pending_at: float) -> float:
    return schedule.urgency(task, pending_at, anyio.current_time() - accepted_at)


async def watch_task(
    api: API,
    task: Task,
    schedule: PollSchedule,
    *,
    accepted_at: float,
    budget: PollBudget | None = None,
    retry_base_delay: float = 0.5,
) -> Result:
    """Poll `task` until it is terminal; return its Result or raise its TaskError.

    `accepted_at` is the `anyio.current_time()` at which BFL accepted the task; every poll
    first takes its turn in the shared `budget`; failed polls are retried after
    `retry_base_delay`, doubling, at most 30 s. The schedule hears how the watch ended.
    """
    attempt = 0
    polls = 0
    failures = 0
    pending_at = 0.0  # seconds after acceptance of the last poll that found it pending
    ready_by: float | None = None
    progress: float | None = None
    empty_ready = 0
    warned: set[str] = set()
    now = anyio.current_time()
    at = now + schedule.next_delay(task, 0, now - accepted_at, None)
    try:
        poll = api.prepare("GET", task.polling_url)  # built once, sent at every poll
        while True:
            await anyio.sleep(max(0.0, at - anyio.current_time()))
            if budget is not None:
                await budget.send(
                    functools.partial(_urgency, schedule, task, accepted_at, pending_at)
                )
            polls += 1
            sent_at = anyio.current_time() - accepted_at
            try:
                response = await api.send(poll)
            except httpx.HTTPError as exc:  # transport failures, an undecodable answer...
                failures += 1
                logger.debug("poll of task %s failed (%s); retrying", task.id, type(exc).__name__)
                at = anyio.current_time() + retry_delay(retry_base_delay, failures)
                continue
            code = response.status_code
            if code in _TRANSIENT or code >= 500:
                failures += 1
                logger.debug("poll of task %s answered %d; retrying", task.id, code)
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                at = anyio.current_time() + retry_delay(retry_base_delay, failures, retry_after)
                continue
            if code == 404:
                raise TaskNotFoundError(
                    f"the polling URL of task {task.id} answered 404; the task is unknown there",
                    task=task,
                )
            if code != 200:
                raise error_from_response(response, f"polling task {task.id}", task)
            body = body_of(response)
            status = body.get("status") if isinstance(body, dict) else None
            if not isinstance(body, dict) or not isinstance(status, str):
                failures += 1
                logger.warning("poll of task %s: malformed answer; retrying", task.id)
                at = anyio.current_time() + retry_delay(retry_base_delay, failures)
                continue
            if status == "Ready" and not has_sample(body) and empty_ready < _EMPTY_READY:
                empty_ready += 1
                failures += 1
                logger.warning("task %s is Ready without a result URL; asking again", task.id)
                at = anyio.current_time() + retry_delay(retry_base_delay, failures)
                continue
            failures = 0
            if status in TERMINAL:
                result = _terminal(task, body, polls)
                ready_by = sent_at
                pending_at, ready_by = _finish(result, pending_at, ready_by, accepted_at)
                return result
            pending_at = sent_at
            if status != "Pending" and status not in warned:
                warned.add(status)
                logger.warning(
                    "task %s has unknown status %r; still polling until it is terminal",
                    task.id,
                    status,
                )
            raw_progress = body.get("progress")
            progress = float_or_none(raw_progress) if raw_progress is not None else progress
            attempt += 1
            # From when this poll left, not when its answer came: the plan is in time since
            # acceptance, and a round trip per poll would push every later poll back.
            at = accepted_at + pending_at + schedule.next_delay(task, attempt, pending_at, progress)
    finally:
        schedule.done(task, pending_at, ready_by)
