"""`RedisLimiter`: one account's in-flight limits, shared by every process through Redis.

```
limiter = RedisLimiter("redis://localhost:6379/0", namespace="bfl")
async with AsyncBFL(limiter=limiter) as client:  # or BFL_LIMITER_URL=redis://...
    ...
```
Slots are leases with a TTL (`lease_ttl`, default 120 s: longer than a task lives), renewed
while their task is watched; a dead worker's slots come back when its tasks would have
ended. Waiting submits of all processes form one FIFO in Redis; each process has one
acquirer that feeds its local waiters, woken by a pub/sub message when a slot comes free
(never a busy loop, never a connection per waiter). The poll budget and webhook events are
shared the same way. asyncio only (it runs on `redis.asyncio`). Needs the `redis` extra:
`pip install 'bfl-async[redis]'`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import anyio

try:
    import redis.asyncio as aioredis
    from redis.asyncio.connection import parse_url
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "bfl_async.redis needs the redis package: install it with pip install 'bfl-async[redis]'"
    ) from exc

from . import _redis_scripts as scripts
from ._errors import LimiterUnavailableError
from ._limits import DEFAULT_LIMITS, PollBudget
from .webhooks import WebhookEvent

__all__ = ["RedisLimiter", "RedisPollBudget", "redact_url"]

logger = logging.getLogger("bfl_async")

_CONNECTIONS = 4  # acquirer, writer, heartbeat and polls share these; pub/sub has its own
_STOP = "STOP"  # the writer's last op


def redact_url(url: str) -> str:
    """`url` with its password (if any, before the host or as `?password=`, both of which
    redis-py reads) replaced by `***`, for messages and reprs."""
    parts = urlsplit(url)
    netloc, query = parts.netloc, parts.query
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")  # the host as written: [::1]:6379
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(key == "password" for key, _ in pairs):
        hidden = [(key, "***" if key == "password" else value) for key, value in pairs]
        query = urlencode(hidden, safe="*")
    shown = url
    if (netloc, query) != (parts.netloc, parts.query):
        # Put together as written (urlunsplit would turn unix:///path into unix:/path).
        shown = f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
        shown += f"#{parts.fragment}" if parts.fragment else ""
    # A password with an unencoded / ? or # (a base64 key, say) ends the host early for
    # urlsplit and redis-py: the last @ is where its writer meant the password to end.
    scheme, _, rest = shown.partition("://")
    userinfo, at, host = rest.rpartition("@")
    user = userinfo.partition(":")[0]
    if at and ":" in userinfo and userinfo != f"{user}:***":
        shown = f"{scheme}://{user}:***@{host}"
    return shown


@dataclass(eq=False)
class _Waiter:
    id: str
    pools: tuple[str, ...]
    front: bool
    event: asyncio.Event = field(default_factory=asyncio.Event)
    registered: bool = False
    slot: _LeaseSlot | None = None
    error: BaseException | None = None


class _LeaseSlot:
    """A lease in Redis; what it tells Redis goes through the limiter's writer, in order."""

    def __init__(self, limiter: RedisLimiter, lease: str, pools: tuple[str, ...]) -> None:
        self._limiter = limiter
        self.lease = lease
        self.pools = pools
        self.is_accepted = False
        self._released = False

    def __repr__(self) -> str:
        state = "released" if self._released else "accepted" if self.is_accepted else "held"
        return f"<LeaseSlot {'+'.join(self.pools)} {state}>"

    @property
    def released(self) -> bool:
        """True once the slot has been given back."""
        return self._released

    def accepted(self) -> None:
        """BFL accepted the task: the lease now also counts as accepted (for 429s)."""
        if not self.is_accepted and not self._released:
            self.is_accepted = True
            self._limiter._on_accepted(self)

    def refused(self) -> None:
        """BFL answered 429: lower the account's shared limit to what it accepted."""
        self._limiter._on_refused(self)

    def release(self) -> None:
        """Give the lease back (once): the next waiter of any process gets it."""
        if not self._released:
            self._released = True
            self._limiter._on_release(self)

    def abandon(self) -> None:
        """Stop renewing the lease, but leave it: BFL still counts the task, so the slot
        comes back when the lease expires, as if this process had died."""
        if not self._released:
            self._released = True
            self._limiter._held.pop(self.lease, None)


class RedisLimiter:
    """In-flight slots per pool, shared by every process that uses the same Redis and
    `namespace` (one namespace per BFL account).

    `limits` and `separate_pools` are those of `Limiter` (24 standard, 6 kontext-max, a
    kontext-max task in both pools); give every process the same. `lease_ttl` must cover
    a task's longest life: the slots of a worker that dies come back after it, not sooner.
    `ticket_ttl` is how long a waiting submit of a dead process keeps its place in the
    queue. Raises `LimiterUnavailableError` when Redis cannot be reached at `start()`, and
    to waiting submits when it is lost later (tasks already accepted stay watched).
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "bfl",
        limits: Mapping[str, int] | None = None,
        separate_pools: bool = False,
        lease_ttl: float = 120.0,
        ticket_ttl: float = 15.0,
        probe_after: float = 30.0,
        connect_timeout: float = 5.0,
    ) -> None:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"not a Redis URL: {redact_url(url)!r} (redis://[:password@]host[:port][/db])"
            )
        try:
            parse_url(url)
        except ValueError:  # its message may quote a piece of the password
            raise ValueError(
                f"cannot read the Redis URL {redact_url(url)!r}: percent-encode any of "
                "/ ? # @ : in its password"
            ) from None
        # NaN or infinity would fail only later, in the background loops, with submits waiting.
        positive = {
            "lease_ttl": lease_ttl,
            "ticket_ttl": ticket_ttl,
            "connect_timeout": connect_timeout,
        }
        for name, value in positive.items():
            if not 0 < value < math.inf:
                raise ValueError(
                    f"{name} must be a positive, finite number of seconds, not {value!r}"
                )
        if not 0 <= probe_after < math.inf:
            raise ValueError(
                f"probe_after must be a finite number of seconds >= 0, not {probe_after!r}"
            )
        if not namespace or namespace != namespace.strip():
            raise ValueError(
                f"namespace must be a non-empty name without spaces around it, not {namespace!r}"
            )
        merged = {**DEFAULT_LIMITS, **(limits or {})}
        for name, n in merged.items():
            if n < 1:
                raise ValueError(f"the limit of pool {name!r} must be at least 1, not {n}")
        self._url = url
        self.url = redact_url(url)
        """The Redis URL, password redacted."""
        self.namespace = namespace
        self.lease_ttl = lease_ttl
        self.ticket_ttl = ticket_ttl
        self.probe_after = probe_after
        self._connect_timeout = connect_timeout
        self._limits = merged
        self._all_pools = ",".join(merged)
        self._separate = separate_pools
        self._heartbeat = min(lease_ttl, ticket_ttl) / 3
        self._me = f"{uuid.uuid4().hex[:16]}:"
        self._numbers = itertools.count(1)
        self._waiters: dict[str, _Waiter] = {}
        self._new: list[_Waiter] = []
        self._held: dict[str, _LeaseSlot] = {}
        self._subscribers: list[Callable[[WebhookEvent], object]] = []
        self._ops: asyncio.Queue[tuple[str, tuple[Any, ...]]] | None = None
        self._wake: asyncio.Event | None = None
        self._redis: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._poll_script: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._users = 0
        # start() and aclose() one at a time: a second user waits for the first one's
        # connect, a new one for the last one's close (which would stop its loops).
        self._turns = asyncio.Lock()
        self._down = False
        self._closing = False
        self._undropped: dict[str, str] = {}  # releases Redis missed: lease -> its pools
        self.lost_leases = 0
        """Leases found expired while their task was still watched (then put back)."""

    def __repr__(self) -> str:
        return f"<RedisLimiter {self.url} namespace={self.namespace!r}>"

    @property
    def worker_id(self) -> str:
        """This process's id in Redis: its leases and tickets are named `<worker_id>:<n>`.
        A new one is taken each time the limiter connects."""
        return self._me.rstrip(":")

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (the first call) and start the acquirer, heartbeat, writer and listener."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "RedisLimiter runs on asyncio only (redis.asyncio); under trio, use the "
                "in-process Limiter"
            ) from None
        async with self._turns:
            if self._users == 0:
                await self._connect()
            self._users += 1

    async def _connect(self) -> None:
        pool = aioredis.BlockingConnectionPool.from_url(
            self._url,
            max_connections=_CONNECTIONS,
            timeout=self._connect_timeout,
            socket_connect_timeout=self._connect_timeout,
            socket_timeout=max(self._connect_timeout, 5.0),
            decode_responses=True,
        )
        client = aioredis.Redis(connection_pool=pool)
        # Taken here, not when made: a limiter made at import and forked into workers
        # (gunicorn --preload) would give them all one id, and their leases would count once.
        self._me = f"{uuid.uuid4().hex[:16]}:"
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise LimiterUnavailableError(
                f"cannot reach the Redis limiter at {self.url} ({_reason(exc)}); check that "
                "Redis runs there, or unset BFL_LIMITER_URL to limit this process alone",
                url=self.url,
            ) from None
        self._redis = client
        self._scripts = {
            name: client.register_script(getattr(scripts, name))
            for name in ("GRANT", "HEARTBEAT", "DROP", "CLAIM", "ACCEPTED", "REFUSED", "USAGE")
        }
        self._poll_script = client.register_script(scripts.POLL)
        self._ops = asyncio.Queue()
        self._wake = asyncio.Event()
        self._down = False
        self._closing = False
        self._tasks = [
            asyncio.create_task(loop(), name=f"bfl-redis-{loop.__name__.strip('_')}")
            for loop in (self._acquirer, self._heartbeats, self._writer, self._listener)
        ]

    async def aclose(self) -> None:
        """Undo one `start()`; the last one flushes pending releases and disconnects.

        Slots still held stay leased until their TTL: their tasks may still be running.
        """
        async with self._turns:
            if self._users == 0:
                return
            self._users -= 1
            if self._users > 0:
                return
            self._fail_waiters(RuntimeError("the limiter was closed"))
            if self._ops is not None and not self._down:
                while self._undropped:  # no heartbeat will send them again now
                    self._enqueue("DROP", *self._undropped.popitem())
                with anyio.move_on_after(self._connect_timeout):
                    await self._ops.join()
            await self._stop()
            self._poll_script = None
            if self._redis is not None:
                await self._redis.aclose()
                self._redis = None

    async def _stop(self) -> None:
        """End the background loops, for sure: a cancellation can be lost (redis-py has had
        such races; `asyncio.wait_for` has one up to Python 3.11), so each loop also stops
        at its next turn once `_closing` is set, and the cancel is repeated meanwhile."""
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        if self._ops is not None:
            self._ops.put_nowait((_STOP, ()))
        pending = set(self._tasks)
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=1.0)
        for task in self._tasks:
            if not task.cancelled() and task.exception() is not None:
                logger.error(
                    "the Redis limiter's %s task failed", task.get_name(), exc_info=task.exception()
                )
        self._tasks = []

    async def __aenter__(self) -> RedisLimiter:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- slots -------------------------------------------------------------------------

    def _pools_for(self, pool: str) -> tuple[str, ...]:
        if pool not in self._limits:
            raise ValueError(f"unknown pool {pool!r}; known: {', '.join(self._limits)}")
        if pool == "standard" or self._separate:
            return (pool,)
        return (pool, "standard")

    def _running(self) -> None:
        if self._redis is None or self._wake is None:
            raise RuntimeError("start the RedisLimiter first (AsyncBFL does it when entered)")

    async def acquire(self, pool: str, *, front: bool = False) -> _LeaseSlot:
        """Wait for a slot in `pool`, in the FIFO of every process's waiting submits."""
        pools = self._pools_for(pool)
        self._running()
        assert self._wake is not None
        waiter = _Waiter(f"{self._me}{next(self._numbers)}", pools, front)
        self._waiters[waiter.id] = waiter
        self._new.append(waiter)
        self._wake.set()
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.slot is not None:
                waiter.slot.release()
            else:
                self._waiters.pop(waiter.id, None)
                if waiter in self._new:
                    self._new.remove(waiter)
                if waiter.registered:
                    self._enqueue("DROP", waiter.id, ",".join(pools))
            raise
        if waiter.error is not None:
            raise waiter.error
        assert waiter.slot is not None
        return waiter.slot

    def claim(self, pool: str) -> _LeaseSlot:
        """A slot at once for a task already in flight (a resumed handle), over the limit if
        need be: BFL counts the task anyway."""
        pools = self._pools_for(pool)
        self._running()
        lease = f"{self._me}{next(self._numbers)}"
        slot = _LeaseSlot(self, lease, pools)
        slot.is_accepted = True
        self._held[lease] = slot
        self._enqueue("CLAIM", lease, ",".join(pools), self._ms(self.lease_ttl))
        return slot

    def in_use(self, pool: str = "standard") -> int:
        """Slots this process holds in `pool` (`usage()` tells the whole account's)."""
        return sum(1 for slot in self._held.values() if pool in slot.pools)

    def limit(self, pool: str = "standard") -> int:
        """The pool's configured limit (`usage()` tells the one lowered after 429s)."""
        return self._limits[pool]

    def waiting(self, pool: str = "standard") -> int:
        """Submits of this process waiting for a slot in `pool`."""
        return sum(1 for waiter in self._waiters.values() if pool in waiter.pools)

    async def usage(self, pool: str = "standard") -> tuple[int, int, int]:
        """The whole account's `(slots taken, effective limit, submits waiting in all pools)`.
        Raises `LimiterUnavailableError` when Redis does not answer."""
        self._pools_for(pool)  # a known pool, or a ValueError naming them
        self._running()
        try:
            taken, limit, waiting = await self._scripts["USAGE"](
                args=[self.namespace, pool, self._limits[pool]]
            )
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from None
        return int(taken), int(limit), int(waiting)

    def _on_release(self, slot: _LeaseSlot) -> None:
        self._held.pop(slot.lease, None)
        self._enqueue("DROP", slot.lease, ",".join(slot.pools))

    def _on_accepted(self, slot: _LeaseSlot) -> None:
        self._enqueue(
            "ACCEPTED",
            slot.lease,
            self._ms(self.lease_ttl),
            self._ms(self.probe_after),
            *self._limit_args(slot.pools),
        )

    def _on_refused(self, slot: _LeaseSlot) -> None:
        self._enqueue("REFUSED", *self._limit_args(slot.pools))

    def _limit_args(self, pools: tuple[str, ...]) -> list[Any]:
        return [x for pool in pools for x in (pool, self._limits[pool])]

    @staticmethod
    def _ms(seconds: float) -> int:
        return max(1, round(seconds * 1000))

    # --- the poll budget and webhook events --------------------------------------------

    def poll_budget(self, per_second: float) -> PollBudget:
        """A budget shared by every process: together their polls stay under `per_second`."""
        return RedisPollBudget(self, per_second)

    def publish(self, event: WebhookEvent) -> None:
        """Send a verified webhook event to every process (the one watching its task ends
        the watch; the others keep it a while, in case its submit's answer is late)."""
        if self._ops is not None:
            self._enqueue("PUBLISH", event.model_dump_json())

    def subscribe(self, deliver: Callable[[WebhookEvent], object]) -> Callable[[], None]:
        """Call `deliver` (on this loop) with each event any process publishes."""
        self._subscribers.append(deliver)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(deliver)

        return unsubscribe

    # --- background work ---------------------------------------------------------------

    def _enqueue(self, op: str, *args: Any) -> None:
        if self._ops is not None:
            self._ops.put_nowait((op, args))

    def _fail_waiters(self, error: BaseException) -> None:
        for waiter in list(self._waiters.values()):
            waiter.error = error
            waiter.event.set()
            if waiter.registered:
                self._enqueue("DROP", waiter.id, ",".join(waiter.pools))
        self._waiters.clear()
        self._new.clear()

    def _unavailable(self, exc: BaseException) -> LimiterUnavailableError:
        return LimiterUnavailableError(
            f"lost the Redis limiter at {self.url} ({_reason(exc)}): no new submits until it "
            "answers again, to stay under the account's limit. Tasks already submitted are "
            "still watched and downloaded",
            url=self.url,
        )

    def _outage(self, exc: BaseException, doing: str) -> None:
        if not self._down:
            self._down = True
            logger.warning("Redis limiter at %s unreachable while %s: %s", self.url, doing, exc)

    def _back(self) -> None:
        if self._down:
            self._down = False
            logger.warning("Redis limiter at %s answers again", self.url)

    async def _acquirer(self) -> None:
        """The one task granting this process's waiters their slots, from the shared FIFO."""
        assert self._wake is not None
        wake = self._wake
        timeout: float | None = None
        while not self._closing:
            if not self._waiters:
                timeout = None
            with anyio.move_on_after(timeout):
                await wake.wait()
            wake.clear()
            if not self._waiters:
                continue
            new, self._new = self._new, []
            for waiter in new:
                waiter.registered = True
            args: list[Any] = [
                self.namespace,
                self._me,
                self._ms(self.lease_ttl),
                self._ms(self.ticket_ttl),
                len(self._limits),
                *itertools.chain.from_iterable(self._limits.items()),
                len(new),
            ]
            for waiter in new:
                args += [waiter.id, ",".join(waiter.pools), "1" if waiter.front else "0"]
            try:
                granted, wake_ms = await self._scripts["GRANT"](args=args)
            except Exception as exc:  # never leave waiters waiting on a dead acquirer
                if isinstance(exc, RedisError | OSError):
                    self._outage(exc, "acquiring a slot")
                else:
                    logger.exception("the Redis limiter's acquirer failed")
                self._fail_waiters(self._unavailable(exc))
                continue
            self._back()
            for lease in granted:
                got = self._waiters.pop(lease, None)
                if got is None:  # cancelled meanwhile: free the lease (again, harmlessly)
                    self._enqueue("DROP", lease, self._all_pools)
                    continue
                got.slot = _LeaseSlot(self, lease, got.pools)
                self._held[lease] = got.slot
                got.event.set()
            # Woken by a release message; this timer only catches an expiry, or a message
            # lost while the pub/sub connection was down.
            wake_at = int(wake_ms) / 1000 if int(wake_ms) >= 0 else self._heartbeat
            timeout = min(max(wake_at, 0.005), self._heartbeat)

    async def _heartbeats(self) -> None:
        """Renew the leases of the tasks this process watches, and its tickets."""
        while not self._closing:
            await asyncio.sleep(self._heartbeat)
            slots = list(self._held.values())
            waiters = [w for w in self._waiters.values() if w.registered]
            args: list[Any] = [
                self.namespace,
                self._ms(self.lease_ttl),
                self._ms(self.ticket_ttl),
                len(slots),
            ]
            for slot in slots:
                args += [slot.lease, ",".join(slot.pools), "1" if slot.is_accepted else "0"]
            args.append(len(waiters))
            for waiter in waiters:
                args += [waiter.id, ",".join(waiter.pools)]
            try:
                lost, requeued = await self._scripts["HEARTBEAT"](args=args)
            except (RedisError, OSError) as exc:
                self._outage(exc, "renewing leases")
                continue
            except Exception:
                logger.exception("renewing the leases in Redis failed")
                continue
            self._back()
            # Releases lost while Redis was away, sent again: their slots would otherwise
            # stay taken until their leases' TTL.
            while self._undropped:
                self._enqueue("DROP", *self._undropped.popitem())
            # A slot released, or a ticket granted and released, while this call was on
            # its way was put back by it: take it away again.
            for stale in [*lost, *requeued]:
                if stale not in self._held and stale not in self._waiters:
                    self._enqueue("DROP", stale, self._all_pools)
            for lease in lost:
                if lease in self._held:
                    self.lost_leases += 1
                    logger.warning(
                        "the lease of a watched task expired before it was renewed (this "
                        "process stalled, or Redis lost it); it was put back, once: BFL "
                        "still counts the task"
                    )
            if requeued and self._wake is not None:
                self._wake.set()

    async def _writer(self) -> None:
        """Tell Redis, in order, what slots did: released, accepted, refused, claimed."""
        assert self._ops is not None and self._redis is not None
        while not self._closing:
            op, args = await self._ops.get()
            if op == _STOP:
                self._ops.task_done()
                break
            try:
                if op == "PUBLISH":
                    await self._redis.publish(f"{self.namespace}:events", args[0])
                elif op == "DROP":  # remembered a while if its GRANT is still on its way
                    keep = self._ms(max(self.lease_ttl, self.ticket_ttl))
                    await self._scripts[op](args=[self.namespace, *args, keep])
                else:
                    await self._scripts[op](args=[self.namespace, *args])
            except (RedisError, OSError) as exc:
                # A lost release is sent again after the next heartbeat that gets through;
                # a lost claim comes back with that heartbeat itself.
                if op == "DROP":
                    self._undropped[args[0]] = args[1]
                self._outage(exc, "updating a slot")
            except Exception:
                logger.exception("updating a slot in Redis failed (%s)", op)
            else:
                self._back()
            finally:
                self._ops.task_done()

    async def _listener(self) -> None:
        """One pub/sub connection: release messages wake the acquirer; events are delivered."""
        assert self._wake is not None
        released, events = f"{self.namespace}:released", f"{self.namespace}:events"
        # Its own connection, which may stay silent for ever: no read timeout, but a PING
        # now and then to notice a dead connection.
        client = aioredis.Redis.from_url(
            self._url,
            socket_connect_timeout=self._connect_timeout,
            health_check_interval=max(1.0, self._heartbeat),
            decode_responses=True,
        )
        try:
            await self._listen(client, released, events)
        finally:
            await client.aclose()

    async def _listen(self, client: aioredis.Redis, released: str, events: str) -> None:
        assert self._wake is not None
        delay = 0.1
        while not self._closing:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(released, events)
                self._back()
                delay = 0.1
                self._wake.set()  # anything freed while not subscribed
                while not self._closing:
                    message = await pubsub.get_message(timeout=self._heartbeat)
                    if message is None:
                        continue
                    if message["channel"] == released:
                        self._wake.set()
                    elif message["channel"] == events:
                        self._deliver(message["data"])
            except (RedisError, OSError) as exc:
                self._outage(exc, "listening for released slots")
                self._wake.set()  # waiting submits learn at once whether Redis is gone
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._heartbeat)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _deliver(self, data: str) -> None:
        try:
            event = WebhookEvent.model_validate_json(data)
        except ValueError:
            logger.warning("ignored a malformed webhook event on %s:events", self.namespace)
            return
        for deliver in list(self._subscribers):
            try:
                deliver(event)
            except Exception:
                logger.exception("delivering the webhook event of task %s failed", event.task_id)


class RedisPollBudget(PollBudget):
    """A `PollBudget` whose last step is shared through Redis: the polls of every process
    leave at least `1 / per_second` apart. Without Redis it paces this process alone."""

    def __init__(self, limiter: RedisLimiter, per_second: float = 20.0) -> None:
        super().__init__(per_second)
        self._limiter = limiter
        self._gap_us = round(1_000_000 * self._gap)  # the same pacing, shared
        self._warned = False
        self._skip_until = 0.0

    def __repr__(self) -> str:
        return f"RedisPollBudget(per_second={self.per_second}, {self._limiter!r})"

    async def send(self, urgency: Callable[[], float] | None = None) -> None:
        """Take this process's turn, then the account's next free moment."""
        await super().send(urgency)
        script = self._limiter._poll_script
        if script is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._skip_until:
            return
        try:
            wait_us = await script(args=[self._limiter.namespace, self._gap_us])
        except (RedisError, OSError) as exc:
            # Not every poll should wait for a connect timeout: ask again in a while.
            self._skip_until = loop.time() + self._limiter._heartbeat
            if not self._warned:
                self._warned = True
                logger.warning(
                    "shared poll budget unavailable (%s); pacing this process's polls alone",
                    _reason(exc),
                )
            return
        self._warned = False
        if int(wait_us) > 0:
            await asyncio.sleep(int(wait_us) / 1_000_000)


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
