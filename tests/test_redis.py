"""RedisLimiter against a real redis-server: leases, fairness, the shared poll budget,
webhook events across workers, and Redis lost at start or mid-run.

Each `RedisLimiter` stands for one worker process: it has its own id, connections and
acquirer, so several in one test process meet in Redis exactly as processes would.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import statistics
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from bfl_async import AsyncBFL, Backoff, LimiterUnavailableError, ModerationError, sign_webhook
from bfl_async.redis import RedisLimiter, RedisPollBudget, redact_url
from bfl_async.testing import FakeBFL

from .redis_server import RedisServer, free_port

pytestmark = pytest.mark.anyio

KEY = "redis-test-key-SECRET-77aa"
SECRET = "hook-secret-1234"
HOOK = "https://app.test/bfl/webhook"
FAST_POLLS = Backoff(initial=0.01, factor=1.0, maximum=0.01, jitter=0.0)


@asynccontextmanager
async def limiters(
    server: RedisServer, n: int, **options: Any
) -> AsyncIterator[list[RedisLimiter]]:
    async with AsyncExitStack() as stack:
        made = []
        for _ in range(n):
            limiter = RedisLimiter(server.url, namespace="t", **options)
            made.append(await stack.enter_async_context(limiter))
        yield made


async def eventually(condition: Callable[[], Any], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not await _value(condition()):
            await anyio.sleep(0.01)


async def _value(value: Any) -> Any:
    return await value if hasattr(value, "__await__") else value


def commands(server: RedisServer) -> int:
    """Commands clients have sent Redis so far: `total_commands_processed` counts the
    commands a script runs too, so count the script calls themselves (INFO commandstats)
    and the plain commands a limiter sends (PING, PUBLISH, SUBSCRIBE...)."""
    text = server.command("INFO", "commandstats").decode()
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"cmdstat_(\w+):calls=(\d+)", text)}
    return sum(counts.get(name, 0) for name in CLIENT_COMMANDS)


# What the limiter sends itself; its scripts' inner calls (ZADD, ZRANGE...) are not counted.
CLIENT_COMMANDS = ("evalsha", "eval", "script", "ping", "subscribe", "get", "set", "client")


def connections(server: RedisServer) -> int:
    text = server.command("CLIENT", "LIST").decode()
    return sum(1 for line in text.splitlines() if " addr=" in line)


async def test_leases_are_shared_between_processes(redis: RedisServer) -> None:
    async with limiters(redis, 2, limits={"standard": 2}) as (a, b):
        first = await a.acquire("standard")
        await a.acquire("standard")
        assert (await a.usage())[0] == 2
        got: list[object] = []

        async def take() -> None:
            got.append(await b.acquire("standard"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(take)
            await eventually(lambda: b.waiting() == 1)
            await anyio.sleep(0.1)
            assert got == []  # A holds both: B waits
            first.release()
            first.release()  # once only
            await eventually(lambda: len(got) == 1)
        assert (await b.usage())[0] == 2
        assert a.in_use() == 1 and b.in_use() == 1


async def test_a_kontext_max_slot_counts_in_both_pools(redis: RedisServer) -> None:
    async with limiters(redis, 2, limits={"standard": 2, "kontext-max": 1}) as (a, b):
        kontext = await a.acquire("kontext-max")
        assert (await a.usage("standard"))[0] == 1
        assert (await a.usage("kontext-max"))[0] == 1
        await b.acquire("standard")
        with anyio.move_on_after(0.3) as waited:  # standard is full: 1 kontext + 1 standard
            await b.acquire("standard")
        assert waited.cancelled_caught
        kontext.release()
        with anyio.fail_after(5):
            await b.acquire("standard")


async def test_a_dead_workers_slots_come_back_after_the_ttl_not_sooner(
    redis: RedisServer,
) -> None:
    ttl = 0.6
    async with limiters(redis, 1, limits={"standard": 1}, lease_ttl=ttl) as (survivor,):
        dead = RedisLimiter(redis.url, namespace="t", limits={"standard": 1}, lease_ttl=ttl)
        await dead.start()
        await dead.acquire("standard")
        # Held (and renewed) well past its TTL while the worker lives.
        with anyio.move_on_after(2 * ttl) as waited:
            await survivor.acquire("standard")
        assert waited.cancelled_caught
        await dead.aclose()  # stops renewing; the slot is not released: its task may run on
        died = time.monotonic()
        with anyio.fail_after(ttl + 2):
            await survivor.acquire("standard")
        back = time.monotonic() - died
        assert ttl - dead._heartbeat - 0.05 <= back <= ttl + 0.5, back


async def test_a_lost_lease_is_noticed_and_counted_once(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with limiters(redis, 1, lease_ttl=0.6) as (a,):
        slot = await a.acquire("standard")
        slot.accepted()
        await eventually(lambda: a.usage(), 2)
        redis.command("DEL", "t:lease:standard")  # as if it expired while the process stalled
        await eventually(lambda: a.lost_leases == 1)
        assert "lease of a watched task expired" in caplog.text
        assert (await a.usage())[0] == 1  # put back once, not twice
        for _ in range(3):  # renewed again, never counted twice
            await anyio.sleep(a._heartbeat)
            assert (await a.usage())[0] == 1
        assert a.lost_leases == 1
        slot.release()
        await eventually(lambda: _taken(a, 0))


async def _taken(limiter: RedisLimiter, n: int) -> bool:
    return (await limiter.usage())[0] == n


async def test_a_cancelled_waiter_gives_its_place_back(redis: RedisServer) -> None:
    async with limiters(redis, 2, limits={"standard": 1}) as (a, b):
        held = await a.acquire("standard")
        with anyio.move_on_after(0.2):
            await b.acquire("standard")
        assert b.waiting() == 0
        await eventually(lambda: _waiting(a, 0))
        held.release()
        with anyio.fail_after(5):
            await a.acquire("standard")


async def _waiting(limiter: RedisLimiter, n: int) -> bool:
    return (await limiter.usage())[2] == n


async def test_no_worker_waits_more_than_twice_the_mean(redis: RedisServer) -> None:
    """3 workers with 2, 4 and 6 submit loops on 4 slots: one FIFO of all waiting submits,
    so the busy worker gets more slots and the quiet one waits no longer (measured after
    the first round, which fills the slots)."""
    waits: dict[int, list[float]] = {0: [], 1: [], 2: []}
    async with limiters(redis, 3, limits={"standard": 4}) as workers:

        async def loop(worker: int) -> None:
            for round_ in range(8):
                asked = anyio.current_time()
                slot = await workers[worker].acquire("standard")
                if round_:
                    waits[worker].append(anyio.current_time() - asked)
                await anyio.sleep(0.05)
                slot.release()

        async with anyio.create_task_group() as tg:
            for worker, loops in enumerate((2, 4, 6)):
                for _ in range(loops):
                    tg.start_soon(loop, worker)
    every = [w for ws in waits.values() for w in ws]
    mean = statistics.mean(every)
    means = {worker: statistics.mean(ws) for worker, ws in waits.items()}
    print(
        f"fairness: mean {mean * 1000:.1f} ms, per worker "
        + ", ".join(f"{m * 1000:.1f}" for m in means.values())
        + f" ms, longest {max(every) * 1000:.1f} ms"
    )
    assert mean > 0.05  # they did wait: 12 loops on 4 slots
    for worker_mean in means.values():
        assert worker_mean <= 2 * mean
    assert max(every) <= 2 * mean


async def test_waiting_does_not_poll_redis_nor_hold_a_connection_per_waiter(
    redis: RedisServer,
) -> None:
    async with limiters(redis, 2, limits={"standard": 1}, lease_ttl=3.0) as (a, b):
        held = await a.acquire("standard")
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(b.acquire, "standard")
            await eventually(lambda: b.waiting() == 20)
            await anyio.sleep(0.1)
            before = commands(redis)
            await anyio.sleep(1.0)  # 20 waiters wait a second
            during = commands(redis) - before
            # a heartbeat a second at most per worker (min(ttl, ticket ttl) / 3 = 1 s)
            print(f"Redis commands while 20 waiters waited 1 s: {during}")
            assert during <= 10  # heartbeats, expiry timers, pub/sub health checks
            # 2 workers: at most 4 pooled connections and 1 pub/sub each, whatever waits
            assert connections(redis) <= 2 * 5 + 1
            before = commands(redis)
            held.release()
            await eventually(lambda: b.in_use() == 1)
            print(f"Redis commands for one release and the grant it wakes: "
                  f"{commands(redis) - before}")  # fmt: skip
            tg.cancel_scope.cancel()


async def test_one_acquire_is_one_redis_call(redis: RedisServer) -> None:
    async with limiters(redis, 1) as (a,):
        await a.acquire("standard")  # scripts loaded
        before = commands(redis)
        for _ in range(10):
            await a.acquire("standard")
        per = (commands(redis) - before) / 10
        print(f"Redis commands per uncontended acquire: {per}")
        assert per <= 1.5


async def test_the_poll_budget_is_shared_by_every_worker(redis: RedisServer) -> None:
    async with limiters(redis, 3) as workers:
        budgets = [RedisPollBudget(w, per_second=20.0) for w in workers]
        sent: list[float] = []

        async def poll(budget: RedisPollBudget) -> None:
            for _ in range(8):
                await budget.send()
                sent.append(time.monotonic())

        async with anyio.create_task_group() as tg:
            for budget in budgets:
                for _ in range(2):
                    tg.start_soon(poll, budget)
    sent.sort()
    # 48 polls at 20 per second together: at most 21 in any one-second window.
    for i, start in enumerate(sent):
        assert sum(1 for t in sent[i:] if t < start + 1.0) <= 21
    assert sent[-1] - sent[0] >= 47 / 20 * 0.95


async def test_a_shared_budget_that_is_not_a_whole_number_paces_at_the_one_below(
    redis: RedisServer,
) -> None:
    async with limiters(redis, 2) as workers:
        budgets = [RedisPollBudget(w, per_second=2.5) for w in workers]
        sent: list[float] = []

        async def poll(budget: RedisPollBudget) -> None:
            for _ in range(3):
                await budget.send()
                sent.append(time.monotonic())

        async with anyio.create_task_group() as tg:
            for budget in budgets:
                tg.start_soon(poll, budget)
    sent.sort()
    # 2 a second, not 3: any three polls span a second (0.82 s at 1.02 / 2.5 apart).
    assert min(sent[i + 2] - sent[i] for i in range(len(sent) - 2)) > 0.95


async def test_a_webhook_verified_on_one_worker_reaches_the_waiter_on_another(
    redis: RedisServer,
) -> None:
    fake = FakeBFL(api_key=KEY, generation_time=30.0)
    options: dict[str, Any] = dict(
        api_key=KEY, webhook_url=HOOK, webhook_secret=SECRET, poll_schedule=FAST_POLLS,
        retry_base_delay=0.01, close_grace=0.0,
    )  # fmt: skip
    async with (
        AsyncBFL(http_client=fake.client(), limiter=RedisLimiter(redis.url), **options) as a,
        AsyncBFL(http_client=fake.client(), limiter=RedisLimiter(redis.url), **options) as b,
    ):
        task = await b.submit("flux-2-pro", prompt="a fox")
        body = json.dumps(
            {
                "task_id": task.id,
                "status": "Request Moderated",
                "details": {"Moderation Reasons": ["test"]},
            }
        ).encode()
        event = a.handle_webhook(body, sign_webhook(body, SECRET))  # A does not know it
        assert event.task_id == task.id
        with anyio.fail_after(5), pytest.raises(ModerationError):
            await b.wait(task)  # the fake would answer Pending for 30 s: the push ended it
        assert b.limiter.in_use() == 0


async def test_redis_unreachable_at_start_is_a_typed_error_without_the_password() -> None:
    url = f"redis://:hunter2pw@127.0.0.1:{free_port()}/0"
    with pytest.raises(LimiterUnavailableError) as caught:
        async with AsyncBFL(api_key=KEY, limiter=url):
            pass
    message = str(caught.value)
    assert "127.0.0.1" in message and "hunter2pw" not in message
    assert caught.value.url == redact_url(url) and "***" in caught.value.url
    assert "hunter2pw" not in repr(RedisLimiter(url))
    with pytest.raises(ValueError, match="not a Redis URL"):
        RedisLimiter("http://:hunter2pw@x")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        ("redis://app:pw@h:1/0?password=pw&db=1", "redis://app:***@h:1/0?password=***&db=1"),
        ("unix:///run/redis.sock?db=0&password=pw", "unix:///run/redis.sock?db=0&password=***"),
        ("redis://h:6379/0", "redis://h:6379/0"),
    ],
)
def test_the_password_is_hidden_wherever_redis_reads_it(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert redact_url(url) in repr(RedisLimiter(url))


@pytest.mark.parametrize("password", ["s3cr/et+Key=", "s3cr?et", "s3cr#et", "123/s3cret"])
def test_a_password_with_unencoded_url_characters_is_hidden_too(password: str) -> None:
    """An Azure key is base64 (`/`, `+`, `=`), and people paste it as it is: urlsplit and
    redis-py then end the host at its `/`, and used to show the password as the URL."""
    url = f"redis://:{password}@cache.example.com:6380/0"
    assert redact_url(url) == "redis://:***@cache.example.com:6380/0"
    try:
        limiter = RedisLimiter(url)
    except ValueError as exc:  # redis-py cannot read it: said so, without the password
        shown = str(exc)
        assert "percent-encode" in shown and exc.__cause__ is None
    else:  # "123" reads as a port: it fails at start, with the redacted URL
        shown = repr(limiter) + limiter.url
    assert "s3cr" not in shown and "cache.example.com:6380" in shown


async def test_two_clients_entered_together_share_one_connected_limiter(
    redis: RedisServer,
) -> None:
    limiter = RedisLimiter(redis.url, namespace="t")
    fake = FakeBFL(api_key=KEY, generation_time=0.01)

    async def use() -> None:
        options = {"api_key": KEY, "http_client": fake.client(), "poll_schedule": FAST_POLLS}
        async with AsyncBFL(limiter=limiter, **options) as client:  # the second one waits
            await client.wait(await client.submit("flux-2-pro", prompt="x"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(use)
        tg.start_soon(use)
    assert fake.submits == 2


async def test_a_client_entering_while_the_last_one_closes_gets_a_running_limiter(
    redis: RedisServer,
) -> None:
    """Clients made per request around one shared limiter: the last one's `aclose()` (still
    flushing a release) and the next one's `start()` used to overlap, and the close stopped
    the loops and closed the connection the start had just made: every submit then failed
    with "start the RedisLimiter first"."""
    limiter = RedisLimiter(redis.url, namespace="t")
    await limiter.start()
    slot = await limiter.acquire("standard")
    flushing, go_on = anyio.Event(), anyio.Event()
    drop = limiter._scripts["DROP"]

    async def slow_drop(**kwargs: Any) -> Any:
        flushing.set()
        await go_on.wait()
        return await drop(**kwargs)

    limiter._scripts["DROP"] = slow_drop
    slot.release()  # the close flushes it
    async with anyio.create_task_group() as tg:
        tg.start_soon(limiter.aclose)
        await flushing.wait()
        tg.start_soon(limiter.start)
        with anyio.move_on_after(0.3):  # the start connects meanwhile (or waits its turn)
            await eventually(lambda: limiter._users == 1)
        go_on.set()
    try:
        with anyio.fail_after(5):
            (await limiter.acquire("standard")).release()
        assert (await limiter.usage())[0] <= 1
    finally:
        await limiter.aclose()
    assert limiter._tasks == [] and limiter._redis is None


async def test_bfl_limiter_url_selects_the_redis_limiter(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BFL_LIMITER_URL", redis.url)
    fake = FakeBFL(api_key=KEY, generation_time=0.01)
    async with AsyncBFL(api_key=KEY, http_client=fake.client(), poll_schedule=FAST_POLLS) as c:
        assert isinstance(c.limiter, RedisLimiter)
        await c.wait(await c.submit("flux-2-klein-4b", prompt="a fox"))
        assert isinstance(c._poll_budget, RedisPollBudget)
        assert c.limiter.namespace == "bfl"


def test_bfl_limiter_namespace_keeps_two_accounts_on_one_redis_apart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BFL_LIMITER_URL", "redis://127.0.0.1:1/0")  # made, never connected
    monkeypatch.setenv("BFL_LIMITER_NAMESPACE", "account-b")
    limiter = AsyncBFL(api_key=KEY).limiter
    assert isinstance(limiter, RedisLimiter) and limiter.namespace == "account-b"
    with pytest.raises(ValueError, match="namespace"):
        RedisLimiter("redis://127.0.0.1:1/0", namespace=" ")


async def test_redis_lost_mid_run_stops_submits_and_keeps_paid_tasks(
    redis: RedisServer, tmp_path: Path
) -> None:
    fake = FakeBFL(api_key=KEY, generation_time=0.5)
    limiter = RedisLimiter(redis.url, limits={"standard": 2})
    async with AsyncBFL(
        api_key=KEY, http_client=fake.client(), limiter=limiter, poll_schedule=FAST_POLLS,
        retry_base_delay=0.01,
    ) as client:  # fmt: skip
        paid = [await client.submit("flux-2-klein-4b", prompt=f"paid {n}") for n in range(2)]
        async with anyio.create_task_group() as tg:
            failures: list[BaseException] = []

            async def queued(n: int) -> None:
                try:
                    await client.submit("flux-2-klein-4b", prompt=f"queued {n}")
                except LimiterUnavailableError as exc:
                    failures.append(exc)

            for n in range(3):
                tg.start_soon(queued, n)
            await eventually(lambda: limiter.waiting() == 3)
            redis.stop()
            stopped = time.monotonic()
        print(f"waiting submits told Redis is gone after {time.monotonic() - stopped:.3f} s")
        assert time.monotonic() - stopped < 2  # told at once, not at the next timer
        assert len(failures) == 3  # the waiters were told, none was sent
        assert "no new submits" in str(failures[0])
        with pytest.raises(LimiterUnavailableError):
            await client.submit("flux-2-klein-4b", prompt="after")
        assert fake.submit_attempts == 2
        for task in paid:  # the paid tasks are still watched and downloaded
            result = await client.wait(task)
            assert (await client.download(result, tmp_path)).is_file()
        assert KEY not in str(failures[0])


async def test_429s_still_lower_the_shared_limit(redis: RedisServer) -> None:
    """Someone else uses the key: BFL takes 3 of ours, not 24. The workers drop to what it
    accepted, together, instead of each hammering it."""
    fake = FakeBFL(api_key=KEY, generation_time=0.2, limits={"standard": 3})
    options: dict[str, Any] = dict(
        api_key=KEY, poll_schedule=FAST_POLLS, retry_base_delay=0.01, poll_rate=None
    )
    async with (
        AsyncBFL(http_client=fake.client(), limiter=RedisLimiter(redis.url), **options) as a,
        AsyncBFL(http_client=fake.client(), limiter=RedisLimiter(redis.url), **options) as b,
    ):
        tasks = []
        async with anyio.create_task_group() as tg:
            for n in range(12):
                client = a if n % 2 else b

                async def one(client: AsyncBFL = client, n: int = n) -> None:
                    tasks.append(
                        await client.wait(await client.submit("flux-2-klein-4b", prompt=f"x {n}"))
                    )

                tg.start_soon(one)
        assert len(tasks) == 12
        _, limit, _ = await a.limiter.usage()  # type: ignore[attr-defined]
        print(f"429s with a hidden limit of 3: {fake.rate_limited}; shared limit now {limit}")
        assert limit <= 4
        assert fake.rate_limited <= 12  # the first burst, then the shared limit holds


async def test_a_closing_client_leaves_the_leases_of_running_tasks_to_expire(
    redis: RedisServer,
) -> None:
    fake = FakeBFL(api_key=KEY, generation_time=30.0)
    async with limiters(redis, 1, lease_ttl=0.6) as (other,):
        limiter = RedisLimiter(redis.url, namespace="t", lease_ttl=0.6)
        async with AsyncBFL(
            api_key=KEY, http_client=fake.client(), limiter=limiter, close_grace=0.0,
            poll_schedule=FAST_POLLS,
        ) as client:  # fmt: skip
            await client.submit("flux-2-klein-4b", prompt="still running")
        closed = time.monotonic()
        assert (await other.usage())[0] == 1  # BFL still counts it
        await eventually(lambda: _taken(other, 0), 3)
        assert time.monotonic() - closed >= 0.2


async def test_neither_the_api_key_nor_the_webhook_secret_reaches_redis(
    redis: RedisServer,
) -> None:
    import redis as redis_client

    fake = FakeBFL(api_key=KEY, generation_time=0.05)
    async with AsyncBFL(
        api_key=KEY, http_client=fake.client(), limiter=RedisLimiter(redis.url),
        webhook_url=HOOK, webhook_secret=SECRET, poll_schedule=FAST_POLLS,
    ) as client:  # fmt: skip
        task = await client.submit("flux-2-klein-4b", prompt="a fox")
        body = json.dumps({"task_id": task.id, "status": "Error"}).encode()
        client.handle_webhook(body, sign_webhook(body, SECRET))
        with pytest.raises(Exception):  # noqa: B017 - GenerationError; only Redis matters here
            await client.wait(task)
        slot = await client.limiter.acquire("standard")
        slot.accepted()
        slot.refused()
        await eventually(lambda: redis.command("EXISTS", "bfl:adapt").startswith(b":1"))
        seen: list[str] = []
        store = redis_client.Redis.from_url(redis.url, decode_responses=True)
        try:
            for key in store.scan_iter("*"):
                seen.append(key)
                kind = store.type(key)
                if kind == "hash":
                    seen += [f"{k}={v}" for k, v in store.hgetall(key).items()]
                elif kind == "zset":
                    seen += store.zrange(key, 0, -1)
                elif kind == "string":
                    seen.append(str(store.get(key)))
        finally:
            store.close()
        slot.release()
    text = "\n".join(seen)
    assert "bfl:lease:standard" in text and "bfl:adapt" in text
    assert KEY not in text and SECRET not in text


def test_the_redis_extra_is_named_when_it_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    monkeypatch.delitem(sys.modules, "bfl_async.redis", raising=False)
    with pytest.raises(ImportError, match=r"bfl-async\[redis\]"):
        importlib.import_module("bfl_async.redis")
    with pytest.raises(ImportError, match=r"bfl-async\[redis\]"):
        AsyncBFL(api_key=KEY, limiter="redis://127.0.0.1:1/0")
    import bfl_async  # the core never needs it

    assert "RedisLimiter" not in bfl_async.__all__


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_under_trio_the_redis_limiter_says_it_is_asyncio_only() -> None:
    with pytest.raises(RuntimeError, match="asyncio only"):
        async with AsyncBFL(api_key=KEY, limiter=RedisLimiter("redis://127.0.0.1:1/0")):
            pass


async def test_a_batch_losing_redis_saves_what_it_paid_for_and_submits_nothing_more(
    redis: RedisServer, tmp_path: Path
) -> None:
    jobs = [{"model": "flux-2-klein-4b", "prompt": f"job {n}", "name": f"j{n}"} for n in range(8)]
    fake = FakeBFL(api_key=KEY, generation_time=0.5)
    records = []
    client = AsyncBFL(
        api_key=KEY, http_client=fake.client(), poll_schedule=FAST_POLLS, retry_base_delay=0.01,
        limiter=RedisLimiter(redis.url, limits={"standard": 3}),
    )  # fmt: skip

    async def stop_redis() -> None:
        await eventually(lambda: fake.submits == 3)
        redis.stop()

    async with client, client.batch(jobs, tmp_path) as batch, anyio.create_task_group() as tg:
        tg.start_soon(stop_redis)
        async for record in batch:
            records.append(record)
    states = {r.name: r.state for r in records}
    print("batch after Redis was lost:", batch.counts())
    assert fake.submits == 3  # nothing more was sent once Redis was gone
    assert sorted(n for n, s in states.items() if s == "downloaded") == sorted(
        t.body["prompt"].replace("job ", "j") for t in fake.tasks.values()
    )  # the three paid tasks were watched and saved
    failed = [r for r in records if r.state == "failed"]
    assert len(failed) == 5 and all(r.error_type == "LimiterUnavailableError" for r in failed)


async def test_a_heartbeat_prepared_before_a_grant_does_not_queue_the_ticket_again(
    redis: RedisServer,
) -> None:
    """The heartbeat renews the tickets it saw waiting; one granted meanwhile (its lease is
    there) must not go back in the queue, where it would take a slot nobody uses."""
    async with limiters(redis, 1) as (a,):
        slot = await a.acquire("standard")
        lease = slot.lease  # the ticket's id became the lease's
        stale_heartbeat = [a.namespace, 60_000, 60_000, 0, 1, lease, "standard"]
        lost, requeued = await a._scripts["HEARTBEAT"](args=stale_heartbeat)
        assert (lost, requeued) == ([], [])
        assert (await a.usage())[2] == 0  # no ticket left waiting
        slot.release()
        await eventually(lambda: _taken(a, 0))
        # Granted and released before the heartbeat: queued again by it, then dropped.
        lost, requeued = await a._scripts["HEARTBEAT"](args=stale_heartbeat)
        assert requeued == [lease]
        for stale in requeued:  # what the heartbeat loop does with it
            a._enqueue("DROP", stale, "standard,kontext-max")
        await eventually(lambda: _waiting(a, 0))


async def test_a_release_redis_missed_is_sent_again_after_the_next_heartbeat(
    redis: RedisServer,
) -> None:
    """A release lost to a Redis blip would keep its slot taken for the lease's whole TTL
    (here 60 s): it goes again once a heartbeat gets through (every 0.1 s here)."""
    async with limiters(redis, 1, limits={"standard": 1}, lease_ttl=60.0, ticket_ttl=0.3) as (a,):
        drop, failed = a._scripts["DROP"], []

        async def flaky(**kwargs: Any) -> Any:
            if not failed:
                failed.append(True)
                raise RedisConnectionError("a blip")
            return await drop(**kwargs)

        a._scripts["DROP"] = flaky
        slot = await a.acquire("standard")
        slot.accepted()
        slot.release()
        await eventually(lambda: failed)
        await eventually(lambda: _taken(a, 0))
        again = await a.acquire("standard")  # the slot is free for the next submit
        again.release()


async def test_closing_ends_a_loop_whose_cancellation_was_lost(redis: RedisServer) -> None:
    """An await can lose a cancellation (redis-py has had such races, `asyncio.wait_for`
    has one up to Python 3.11). A background loop that carried on would make `aclose()`,
    a worker's shutdown, wait for ever: it stops anyway, at its next turn."""
    limiter = RedisLimiter(redis.url, namespace="t", lease_ttl=0.3)
    await limiter.start()
    inside = anyio.Event()

    async def losing_the_cancellation(**_: Any) -> list[list[str]]:
        inside.set()
        with contextlib.suppress(BaseException):  # what the racy awaits do
            await anyio.sleep(30)
        return [[], []]

    limiter._scripts["HEARTBEAT"] = losing_the_cancellation
    with anyio.fail_after(5):
        await inside.wait()
    started = time.monotonic()
    with anyio.fail_after(5):
        await limiter.aclose()
    assert limiter._tasks == []
    assert time.monotonic() - started < 1  # the next turn, not a timeout


async def test_a_waiter_cancelled_before_its_ticket_reached_redis_leaves_no_ticket(
    redis: RedisServer,
) -> None:
    """A ticket can reach Redis after the release sent when its waiter was cancelled (the
    acquirer's call was still waiting for a connection, or reloading its script after a
    restart). It was queued then, for no one: at the head of the FIFO, every worker kept
    the next free slot for it until its `ticket_ttl` ran out."""
    options: dict[str, Any] = dict(limits={"standard": 1}, ticket_ttl=30.0, lease_ttl=30.0)
    async with limiters(redis, 3, **options) as (a, b, c):
        held = await a.acquire("standard")
        grant, sent, go_on, done = b._scripts["GRANT"], anyio.Event(), anyio.Event(), []

        async def delayed_grant(**kwargs: Any) -> Any:
            sent.set()
            await go_on.wait()
            answer = await grant(**kwargs)
            done.append(answer)
            return answer

        b._scripts["GRANT"] = delayed_grant
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.acquire, "standard")
            await sent.wait()
            tg.cancel_scope.cancel()  # the submit gives up while its ticket is on its way
        assert b._ops is not None
        await b._ops.join()  # its release reached Redis first
        go_on.set()
        await eventually(lambda: done)
        held.release()
        with anyio.fail_after(3):  # at once, not after the forgotten ticket's 30 s
            (await c.acquire("standard")).release()
        assert (await c.usage())[2] == 0


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("lease_ttl", math.inf),
        ("lease_ttl", math.nan),
        ("ticket_ttl", math.nan),
        ("ticket_ttl", 0.0),
        ("connect_timeout", math.nan),
        ("connect_timeout", -1.0),
        ("probe_after", math.nan),
        ("probe_after", math.inf),
    ],
)
def test_a_duration_that_is_not_a_finite_number_is_refused_when_made(
    option: str, value: float
) -> None:
    """`lease_ttl=inf` ("never expire") stopped the acquirer at the first submit, which then
    waited for ever; a NaN did the same, or failed a background loop's every turn."""
    with pytest.raises(ValueError, match=rf"^{option} must be .*not {value!r}"):
        RedisLimiter("redis://127.0.0.1:1/0", **{option: value})


async def test_a_release_redis_missed_is_sent_again_when_the_worker_stops(
    redis: RedisServer,
) -> None:
    """A worker stopping after a Redis blip (a failover restarts them all) left the releases
    that Redis missed to the next heartbeat, which never came: their slots stayed taken for
    the lease's TTL (here 60 s) while the other workers waited."""
    options: dict[str, Any] = dict(limits={"standard": 2}, lease_ttl=60.0, ticket_ttl=60.0)
    async with limiters(redis, 1, **options) as (other,):
        a = RedisLimiter(redis.url, namespace="t", **options)
        await a.start()
        drop, failed = a._scripts["DROP"], []

        async def flaky(**kwargs: Any) -> Any:
            if not failed:
                failed.append(True)
                raise RedisConnectionError("a blip")
            return await drop(**kwargs)

        a._scripts["DROP"] = flaky
        (await a.acquire("standard")).release()
        await eventually(lambda: failed)
        (await a.acquire("standard")).release()  # Redis answers again
        await a.aclose()  # before a heartbeat (every 20 s here)
        assert (await other.usage())[0] == 0


async def test_a_worker_whose_pub_sub_connection_was_cut_still_sends_its_releases_at_stop(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A cut pub/sub connection (a proxy's idle timeout, a failover) marked Redis as gone
    until the next heartbeat, even once subscribed again: a worker stopping meanwhile did
    not send its last releases, and their slots stayed taken for the lease's TTL."""
    a = RedisLimiter(redis.url, namespace="t", lease_ttl=60.0, ticket_ttl=60.0)
    await a.start()
    slot = await a.acquire("standard")
    await eventually(lambda: _subscribed(redis))
    redis.command("CLIENT", "KILL", "TYPE", "pubsub")
    await eventually(lambda: "unreachable while listening" in caplog.text)
    await eventually(lambda: "answers again" in caplog.text)  # subscribed again
    slot.release()
    await a.aclose()  # before a heartbeat (every 20 s here)
    assert redis.command("ZCARD", "t:lease:standard") == b":0\r\n"


def _subscribed(redis: RedisServer) -> bool:
    return redis.command("PUBSUB", "NUMSUB", "t:released").endswith(b":1\r\n")


async def test_workers_forked_after_the_limiter_was_made_each_count_their_slots(
    redis: RedisServer,
) -> None:
    """A limiter made at import, then forked into workers (gunicorn --preload, a prefork
    pool): every worker had the same id, so their leases were one member of the set. With
    a limit of 2, three workers held a slot each and Redis counted one."""
    made = RedisLimiter(redis.url, namespace="t", limits={"standard": 2})
    async with AsyncExitStack() as stack:
        a, b, c = [
            await stack.enter_async_context(copy.deepcopy(made))  # what a fork gives each
            for _ in range(3)
        ]
        await a.acquire("standard")
        await b.acquire("standard")
        assert (await c.usage())[0] == 2
        with anyio.move_on_after(0.3) as waited:
            await c.acquire("standard")
        assert waited.cancelled_caught
        assert len({a.worker_id, b.worker_id, c.worker_id}) == 3


async def test_usage_says_what_is_wrong_in_the_library_s_own_errors(redis: RedisServer) -> None:
    """A health check calling `usage()` got redis-py's own exceptions (a KeyError for an
    unknown pool), which a handler of `BFLError` does not catch."""
    url = redis.url.replace("redis://", "redis://:hunter2pw@")
    redis.command("CONFIG", "SET", "requirepass", "hunter2pw")
    async with RedisLimiter(url, namespace="t", connect_timeout=1.0) as limiter:
        with pytest.raises(ValueError, match="unknown pool 'kontext'; known: standard"):
            await limiter.usage("kontext")
        assert (await limiter.usage())[0] == 0
        redis.stop()
        with pytest.raises(LimiterUnavailableError) as caught:
            await limiter.usage()
        assert "hunter2pw" not in str(caught.value) and caught.value.url == redact_url(url)
