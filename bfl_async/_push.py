"""What the client needs to take task ends pushed by webhooks instead of polling for them."""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import anyio

from ._models import Task
from ._polling import PollSchedule
from .webhooks import WebhookEvent

__all__ = ["EarlyEvents", "FirstNow", "Slowed", "poll_answer"]

logger = logging.getLogger("bfl_async")


class Slowed:
    """A PollSchedule `factor` times slower than `inner`: the safety net under webhooks.

    With a webhook configured the push is what ends a watch; polls only make sure a lost
    delivery never loses a result, so they can be rare, but no more than `maximum` seconds
    apart (unless `inner` asks for longer): a result URL lives about 10 minutes.
    """

    def __init__(self, inner: PollSchedule, factor: float = 10.0, maximum: float = 120.0) -> None:
        self.inner = inner
        self.factor = factor
        self.maximum = maximum

    def next_delay(self, task: Task, attempt: int, elapsed: float, progress: float | None) -> float:
        """The inner schedule's delay, times `factor`, at most `maximum` or the inner delay."""
        delay = self.inner.next_delay(task, attempt, elapsed, progress)
        return min(delay * self.factor, max(delay, self.maximum))

    def urgency(self, task: Task, pending_at: float, elapsed: float) -> float:
        """The inner schedule's."""
        return self.inner.urgency(task, pending_at, elapsed)

    def done(self, task: Task, lower: float, upper: float | None) -> None:
        """Passed on: a slow poll that found the task ready is still a valid observation."""
        self.inner.done(task, lower, upper)


class EarlyEvents:
    """Terminal events for tasks the client does not know (yet), kept `ttl` seconds.

    A webhook can overtake the submit's answer; the watch started from that answer picks
    its event up here. At most `size` are kept (the oldest go first). An event that goes
    unclaimed (expired, evicted, or still kept at `close`) is logged with its result URL:
    received here, it is the only trace of a task this client never saw accepted, say one
    whose submit was uncertain, and paid for (WARNING); relayed from another process, that
    process may well have claimed it (INFO). `clock` is for tests.
    """

    def __init__(
        self,
        ttl: float = 120.0,
        size: int = 4096,
        *,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        self.ttl = ttl
        self.size = size
        self._clock = clock
        self._events: OrderedDict[str, tuple[float, WebhookEvent, bool]] = OrderedDict()
        self._added: anyio.Event | None = None  # made by `run`, on the event loop

    def __len__(self) -> int:
        return len(self._events)

    def add(self, event: WebhookEvent, *, relayed: bool = False) -> bool:
        """Keep `event`; False if one for its task is kept already (a duplicate).

        `relayed`: the event came from another process (a shared limiter passes each one to
        every process), so its going unclaimed here is routine.
        """
        self._expire()
        if event.task_id in self._events:
            return False
        self._events[event.task_id] = (self._clock() + self.ttl, event, relayed)
        while len(self._events) > self.size:
            self._drop("was evicted unclaimed (too many kept)")
        if self._added is not None:
            self._added.set()
        return True

    def pop(self, task_id: str) -> WebhookEvent | None:
        """The kept event of `task_id`, removed; None if there is none."""
        self._expire()
        kept = self._events.pop(task_id, None)
        return kept[1] if kept is not None else None

    async def run(self) -> None:
        """Drop (and log) each event as it expires, until cancelled.

        Without it an event goes only when the next one comes or a watch starts, which on a
        quiet server can be hours: its result URL, the only trace of a paid task, would be
        logged long dead. `clock` must then be `anyio.current_time` (the default).
        """
        try:
            while True:
                self._added = added = anyio.Event()
                self._expire()
                first = next(iter(self._events.values()), None)
                with anyio.move_on_after(math.inf if first is None else first[0] - self._clock()):
                    await added.wait()
        finally:
            self._added = None

    def close(self) -> None:
        """Drop every kept event, each logged as unclaimed: the client closes."""
        while self._events:
            self._drop("was still unclaimed when the client closed")

    def _expire(self) -> None:
        now = self._clock()
        while self._events:
            expires, _, _ = next(iter(self._events.values()))
            if expires > now:
                return
            self._drop(f"expired unclaimed after {self.ttl:g} s")

    def _drop(self, how: str) -> None:
        _, (_, event, relayed) = self._events.popitem(last=False)
        sample = event.result.get("sample") if event.result else None
        url = f", result URL {sample}" if isinstance(sample, str) else ""
        if relayed:
            logger.info(
                "the webhook event of task %s (%s%s), relayed from another process, %s; "
                "the process that submitted the task most likely claimed it",
                event.task_id,
                event.status,
                url,
                how,
            )
            return
        logger.warning(
            "the webhook event of task %s (%s%s) %s: this client never saw that task "
            "accepted. It may be one whose submit was uncertain (SubmissionUncertainError), "
            "paid for: check your BFL dashboard%s",
            event.task_id,
            event.status,
            url,
            how,
            "; the result URL serves its image for about 10 minutes after the task ended"
            if url
            else "",
        )


def poll_answer(event: WebhookEvent) -> dict[str, Any]:
    """The event as the poll answer it stands for, so one code path reads both."""
    return {"status": event.status, "result": event.result, "details": event.details}


class FirstNow:
    """`inner`, but the first poll goes at once: a push said the task ended."""

    def __init__(self, inner: PollSchedule) -> None:
        self.inner = inner

    def next_delay(self, task: Task, attempt: int, elapsed: float, progress: float | None) -> float:
        """0 for the first poll, then the inner schedule's delay."""
        return 0.0 if attempt == 0 else self.inner.next_delay(task, attempt, elapsed, progress)

    def urgency(self, task: Task, pending_at: float, elapsed: float) -> float:
        """Before the first poll, above all others: that poll will find the task ended."""
        return math.inf if pending_at == 0 else self.inner.urgency(task, pending_at, elapsed)

    def done(self, task: Task, lower: float, upper: float | None) -> None:
        """Passed on to the inner schedule."""
        self.inner.done(task, lower, upper)
