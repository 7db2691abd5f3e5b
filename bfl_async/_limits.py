"""In-flight slots: one per task, per pool, held from before the submit until the task ends.

BFL counts a task in flight from its accepted submit until it is terminal (24 per account on
standard models, 6 on `flux-kontext-max`). A pool hands out slots in FIFO order, and adapts
when the server says 429 (someone else uses the same key): it drops to what the server
accepted, and grows back once the 429s have stopped for a while.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import anyio

if TYPE_CHECKING:
    from .webhooks import WebhookEvent

__all__ = [
    "DEFAULT_LIMITS",
    "InFlightLimiter",
    "InFlightSlot",
    "Limiter",
    "PollBudget",
    "Slot",
]

DEFAULT_LIMITS: Mapping[str, int] = {"standard": 24, "kontext-max": 6}


@runtime_checkable
class InFlightSlot(Protocol):
    """One task's claim on its pool(s), as `AsyncBFL` uses it."""

    @property
    def released(self) -> bool:
        """True once the slot has been given back."""
        ...

    def accepted(self) -> None:
        """BFL accepted the task: it is in flight on the server until it is terminal."""
        ...

    def refused(self) -> None:
        """BFL answered 429 to the submit this slot was taken for."""
        ...

    def release(self) -> None:
        """Give the slot back (exactly once; later calls do nothing)."""
        ...

    def abandon(self) -> None:
        """The client closes while the task is still in flight: stop holding the slot
        without saying the task ended (a shared lease then lapses with its TTL)."""
        ...


@runtime_checkable
class InFlightLimiter(Protocol):
    """What `AsyncBFL(limiter=...)` needs: slots per pool, and the work shared with them.

    `Limiter` keeps the slots of one process; `bfl_async.redis.RedisLimiter` shares them
    (and the poll budget, and webhook events) between every process using one account.
    The client calls `start()` when it is entered and `aclose()` when it closes; both may
    be called by several clients sharing one limiter.
    """

    async def acquire(self, pool: str, *, front: bool = False) -> InFlightSlot:
        """Wait for a slot in `pool` (FIFO; `front` jumps the queue, for a retried submit)."""
        ...

    def claim(self, pool: str) -> InFlightSlot:
        """Take a slot at once for a task already in flight on BFL's side."""
        ...

    def in_use(self, pool: str = "standard") -> int:
        """Slots this process holds in `pool`."""
        ...

    def limit(self, pool: str = "standard") -> int:
        """The pool's effective limit."""
        ...

    def waiting(self, pool: str = "standard") -> int:
        """Submits of this process queued for a slot in `pool`."""
        ...

    def poll_budget(self, per_second: float) -> PollBudget:
        """The budget every poll of the client takes its turn in."""
        ...

    def publish(self, event: WebhookEvent) -> None:
        """Pass a verified webhook event on to the other processes (if shared)."""
        ...

    def subscribe(self, deliver: Callable[[WebhookEvent], object]) -> Callable[[], None]:
        """Call `deliver` with the events other processes publish; returns an unsubscribe."""
        ...

    async def start(self) -> None:
        """Connect what needs connecting; raise a `BFLError` if that fails."""
        ...

    async def aclose(self) -> None:
        """Undo one `start()`."""
        ...


@dataclass(eq=False)
class _Waiter:
    event: anyio.Event = field(default_factory=anyio.Event)
    granted: bool = False


class _Pool:
    """One pool's counters and its FIFO queue."""

    def __init__(self, name: str, limit: int, probe_after: float) -> None:
        if limit < 1:
            raise ValueError(f"the limit of pool {name!r} must be at least 1, not {limit}")
        self.name = name
        self.limit = limit
        self.effective = float(limit)
        self.in_use = 0
        self.accepted = 0
        self.probe_after = probe_after
        self.last_refusal = -math.inf
        self.waiters: deque[_Waiter] = deque()

    @property
    def capacity(self) -> int:
        return max(1, int(self.effective))

    def try_take(self, front: bool) -> bool:
        if self.in_use < self.capacity and (front or not self.waiters):
            self.in_use += 1
            return True
        return False

    def grant(self) -> None:
        while self.waiters and self.in_use < self.capacity:
            waiter = self.waiters.popleft()
            waiter.granted = True
            self.in_use += 1
            waiter.event.set()

    def give_back(self, accepted: bool) -> None:
        self.in_use -= 1
        if accepted:
            self.accepted -= 1
        self.grant()

    async def take(self, front: bool) -> None:
        if self.try_take(front):
            return
        waiter = _Waiter()
        if front:
            self.waiters.appendleft(waiter)
        else:
            self.waiters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self.give_back(accepted=False)
            else:
                self.waiters.remove(waiter)
            raise

    def on_accepted(self) -> None:
        self.accepted += 1
        # The server took it, so it has room for at least this many of ours (resumed
        # handles, claimed over the limit, lift it no higher than configured).
        self.effective = min(float(self.limit), max(self.effective, float(self.accepted)))
        if anyio.current_time() - self.last_refusal >= self.probe_after:
            self.effective = min(float(self.limit), self.effective + 1.0)
        self.grant()

    def on_refused(self) -> None:
        self.effective = float(max(1, min(self.capacity, self.accepted)))
        self.last_refusal = anyio.current_time()


class Slot:
    """One task's claim on its pool(s); `release()` gives it back exactly once."""

    def __init__(self, pools: tuple[_Pool, ...]) -> None:
        self._pools = pools
        self._accepted = False
        self._released = False

    def __repr__(self) -> str:
        state = "released" if self._released else "accepted" if self._accepted else "held"
        return f"<Slot {'+'.join(p.name for p in self._pools)} {state}>"

    @property
    def released(self) -> bool:
        """True once the slot has been given back."""
        return self._released

    def accepted(self) -> None:
        """BFL accepted the task: it is in flight on the server until it is terminal."""
        if not self._accepted and not self._released:
            self._accepted = True
            for pool in self._pools:
                pool.on_accepted()

    def refused(self) -> None:
        """BFL answered 429: it is at its limit for this key, so lower ours."""
        for pool in self._pools:
            pool.on_refused()

    def release(self) -> None:
        """Give the slot back, to the first task waiting in the queue."""
        if self._released:
            return
        self._released = True
        for pool in self._pools:
            pool.give_back(self._accepted)

    def abandon(self) -> None:
        """Released: this process's limiter has no one left to count the task for."""
        self.release()


class Limiter:
    """Per-pool FIFO in-flight limiter, sized to the account's limits.

    A `flux-kontext-max` task holds a slot in its own pool and, unless `separate_pools`,
    one in the standard pool too: BFL does not document whether it counts against the 24,
    and assuming it does is the reading that never earns a 429.

    Every client has one (`client.limiter`); size it with `AsyncBFL(limits=...)`.

    ```python
    client.limiter.in_use("standard"), client.limiter.waiting("standard")
    ```
    """

    def __init__(
        self,
        limits: Mapping[str, int] | None = None,
        *,
        separate_pools: bool = False,
        probe_after: float = 30.0,
    ) -> None:
        merged = {**DEFAULT_LIMITS, **(limits or {})}
        self._pools = {name: _Pool(name, n, probe_after) for name, n in merged.items()}
        self._separate = separate_pools

    def __repr__(self) -> str:
        pools = ", ".join(f"{p.name}={p.in_use}/{p.capacity}" for p in self._pools.values())
        return f"<Limiter {pools}>"

    def _pools_for(self, pool: str) -> tuple[_Pool, ...]:
        if pool not in self._pools:
            raise ValueError(f"unknown pool {pool!r}; known: {', '.join(self._pools)}")
        if pool == "standard" or self._separate:
            return (self._pools[pool],)
        # Always in this order, so two tasks never wait on each other's pools.
        return (self._pools[pool], self._pools["standard"])

    async def acquire(self, pool: str, *, front: bool = False) -> Slot:
        """Wait for a slot in `pool` (FIFO; `front` jumps the queue, for a retried submit)."""
        pools = self._pools_for(pool)
        taken: list[_Pool] = []
        try:
            for p in pools:
                await p.take(front)
                taken.append(p)
            # A free slot is taken without waiting, and a waiter granted one as it was
            # cancelled wakes normally: either way, a cancelled caller must not submit.
            await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            for p in taken:
                p.give_back(accepted=False)
            raise
        return Slot(pools)

    def claim(self, pool: str) -> Slot:
        """Take a slot at once for a task already in flight on BFL's side (a resumed handle).

        It may put the pool over its limit for a while: BFL counts the task anyway, so new
        submits must wait for it.
        """
        pools = self._pools_for(pool)
        for p in pools:
            p.in_use += 1
        slot = Slot(pools)
        slot.accepted()
        return slot

    def in_use(self, pool: str = "standard") -> int:
        """Slots held in `pool` right now (queued submits not counted)."""
        return self._pools[pool].in_use

    def limit(self, pool: str = "standard") -> int:
        """The pool's effective limit: the configured one, lowered after 429s."""
        return self._pools[pool].capacity

    def waiting(self, pool: str = "standard") -> int:
        """Submits queued for a slot in `pool`."""
        return len(self._pools[pool].waiters)

    def poll_budget(self, per_second: float) -> PollBudget:
        """A budget for this process's polls alone."""
        return PollBudget(per_second)

    def publish(self, event: WebhookEvent) -> None:
        """Nothing to do: every task of this limiter is watched in this process."""

    def subscribe(self, deliver: Callable[[WebhookEvent], object]) -> Callable[[], None]:
        """Nothing is ever published to a process-local limiter."""
        return lambda: None

    async def start(self) -> None:
        """Nothing to connect."""

    async def aclose(self) -> None:
        """Nothing to close."""


class PollBudget:
    """At most `per_second` polls in any sliding one-second window, shared by all tasks.

    BFL answers polls with `X-Ratelimit-Limit: 1200` (per minute): however many tasks are in
    flight, the client's polls together stay under that. Polls are paced, at least
    `1 / per_second` s apart (a little more, for the jitter of the network and the event
    loop; a rate that is not a whole number paces at the whole number below it), never in
    bursts that a server's window would count together. When more polls are due than that
    lets out, the most urgent goes first: the poll schedule rates each (for
    `LearnedSchedule`, how long its task has likely been waiting to be seen), so a poll that
    would likely find a task pending waits, not one that would likely find it done.
    """

    def __init__(self, per_second: float = 20.0) -> None:
        if not 1 <= per_second < math.inf:
            raise ValueError(
                f"the poll budget (poll_rate) must be at least 1 poll a second and finite, "
                f"not {per_second!r}; poll_rate=None turns it off"
            )
        self.per_second = per_second
        # Any `floor(per_second) + 1` polls span more than a second: 2.5 paces at 2 a second.
        self._gap = (1.0 + _MARGIN) / math.floor(per_second)
        self._next_send = -math.inf
        self._waiting: list[_Turn] = []
        self._leader: _Turn | None = None  # the waiting poll that hands out the next turn

    def __repr__(self) -> str:
        return f"PollBudget(per_second={self.per_second})"

    async def send(self, urgency: Callable[[], float] | None = None) -> None:
        """Wait for this poll's turn: `gap` after the last poll really left, with no more
        urgent poll waiting. `urgency()` is asked when a turn comes up; polls without one,
        or equally urgent, go in the order they came. If it raises, this poll (and no other)
        raises it, without taking a turn."""
        now = anyio.current_time()
        if not self._waiting and now >= self._next_send:
            self._next_send = now + self._gap
            return
        turn = _Turn(urgency)
        self._waiting.append(turn)
        try:
            while not turn.granted:
                if self._leader is None:
                    self._leader = turn
                if self._leader is not turn:
                    await turn.woken()
                    continue
                now = anyio.current_time()
                if now < self._next_send:
                    await anyio.sleep(self._next_send - now)
                    continue
                best = max(self._waiting, key=_Turn.rate)
                self._waiting.remove(best)
                best.granted = True
                if best.error is None:
                    self._next_send = now + self._gap
                best.wake()
        finally:
            if not turn.granted:
                self._waiting.remove(turn)
            if self._leader is turn:
                self._leader = None
            # Also when this poll was woken to lead and cancelled before it could: the lead
            # passes on, or the polls behind it would wait for a poll that never comes.
            if self._leader is None and self._waiting:
                self._waiting[0].wake()
        if turn.error is not None:
            raise turn.error


class _Turn:
    """A poll waiting for its turn in a `PollBudget`."""

    def __init__(self, urgency: Callable[[], float] | None) -> None:
        self.urgency = urgency
        self.granted = False
        self.error: Exception | None = None  # what `urgency` raised, for this poll to raise
        self._event = anyio.Event()

    def rate(self) -> float:
        if self.urgency is None:
            return 0.0
        self.error = None  # asked again: only what this answer raises counts
        try:
            return self.urgency()
        except Exception as exc:
            # Raised in the poll that hands out the turn, it would fail another task's
            # watch: this poll goes first, to raise it in its own.
            self.error = exc
            return math.inf

    def wake(self) -> None:
        self._event.set()

    async def woken(self) -> None:
        await self._event.wait()
        self._event = anyio.Event()


_MARGIN = 0.02
