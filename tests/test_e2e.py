"""End to end against FakeBFL over real HTTP on loopback, on asyncio and trio."""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from bfl_async import AsyncBFL, Backoff, GeneratedImage, Task
from bfl_async.testing import FakeBFL

BOTH = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
pytestmark = pytest.mark.anyio


def fast_client(fake: FakeBFL, **kwargs: Any) -> AsyncBFL:
    options: dict[str, Any] = {
        "api_key": fake.api_key,
        "base_url": fake.base_url,
        "poll_schedule": Backoff(initial=0.01, factor=1.5, maximum=0.02, jitter=0.1),
        "retry_base_delay": 0.01,
        "poll_rate": 5000.0,
        "close_grace": 5.0,
    }
    return AsyncBFL(**{**options, **kwargs})


def never(model: str, rng: random.Random) -> float:
    return 3600.0


@asynccontextmanager
async def ended_when_full(
    fake: FakeBFL, client: AsyncBFL, limit: int = 24, batch: int = 4, pool: str = "standard"
) -> AsyncIterator[None]:
    """End the fake's oldest tasks, a few at a time, only while the account is full (or
    nothing is queued any more), so peaks are exact however slow this machine is today.
    Before the jobs have queued, nothing is queued yet: on a slow machine the first tasks
    are accepted while the last jobs are still on their way to the limiter."""
    queued = False

    async def drive() -> None:
        nonlocal queued
        while True:
            now = time.monotonic()
            running = [t for t in fake.tasks.values() if t.in_flight(now)]
            waiting = client.limiter.waiting(pool)
            queued = queued or waiting > 0
            full = fake.in_flight(pool) >= limit or (queued and waiting == 0)
            if running and full:
                oldest = sorted(running, key=lambda t: t.created_at)[:batch]
                fake.finish_now(*(t.id for t in oldest))
            await anyio.sleep(0.002)

    async with anyio.create_task_group() as tg:
        tg.start_soon(drive)
        yield
        tg.cancel_scope.cancel()


async def check_images(fake: FakeBFL, images: list[GeneratedImage]) -> None:
    """Every image is on disk, whole, with the bytes the fake serves for its task."""
    async with httpx.AsyncClient() as plain:
        for image in images:
            served = await plain.get(fake.sign_url(image.task_id))
            assert served.status_code == 200
            assert image.path.read_bytes() == served.content
            assert image.path.stem == image.task_id


def check_keys(fake: FakeBFL) -> None:
    assert set(fake.keys_seen["api"]) == {fake.api_key}
    assert set(fake.keys_seen["polling"]) == {fake.api_key}
    assert fake.keys_seen["delivery"] and set(fake.keys_seen["delivery"]) == {None}


@BOTH
async def test_96_gathered_generates_fill_the_limits_exactly_and_never_429(
    tmp_path: Path,
) -> None:
    async with FakeBFL(generation_time=never) as fake, fast_client(fake) as client:
        jobs = [("flux-kontext-max" if n % 4 == 0 else "flux-2-pro", n) for n in range(96)]
        images: list[GeneratedImage] = []

        async def one(model: str, n: int) -> None:
            images.append(
                await client.generate(model, prompt=f"fox {n}", output_dir=tmp_path, seed=n)
            )

        async with ended_when_full(fake, client), anyio.create_task_group() as tg:
            for model, n in jobs:
                tg.start_soon(one, model, n)
        assert fake.rate_limited == 0
        # Whether 6 kontext-max tasks ever run together here depends on which tasks the
        # fake ends first (and on trio's scheduling order); the next test fills that pool.
        assert fake.peak_in_flight["standard"] == 24
        assert 1 <= fake.peak_in_flight["kontext-max"] <= 6
        assert fake.submits == 96 and fake.duplicate_submits == 0
        assert len(images) == 96 and len(list(tmp_path.iterdir())) == 96
        await check_images(fake, images)
        check_keys(fake)
        assert client.limiter.in_use() == 0


@BOTH
async def test_kontext_max_jobs_fill_their_pool_of_6_exactly(tmp_path: Path) -> None:
    async with FakeBFL(generation_time=never) as fake, fast_client(fake) as client:
        full = ended_when_full(fake, client, limit=6, pool="kontext-max")
        async with full, anyio.create_task_group() as tg:
            for n in range(18):
                tg.start_soon(
                    functools.partial(
                        client.generate, "flux-kontext-max", prompt=f"fox {n}", output_dir=tmp_path
                    )
                )
        assert fake.peak_in_flight["kontext-max"] == 6
        assert fake.rate_limited == 0 and fake.submits == 18
        assert client.limiter.in_use() == 0


async def test_asyncio_gather_of_hundreds_just_works(tmp_path: Path) -> None:
    async with FakeBFL(generation_time=never) as fake, fast_client(fake) as client:
        async with ended_when_full(fake, client):
            images = await asyncio.gather(
                *(
                    client.generate("flux-2-klein-4b", prompt=f"cat {n}", output_dir=tmp_path)
                    for n in range(200)
                )
            )
        assert len({image.path for image in images}) == 200
        assert fake.rate_limited == 0 and fake.peak_in_flight["standard"] == 24


async def test_a_hidden_lower_limit_is_learned_from_429s(tmp_path: Path) -> None:
    # Someone else holds half of the account: the server allows 12, the client believes 24.
    async with (
        FakeBFL(generation_time=never, limits={"standard": 12}) as fake,
        fast_client(fake) as client,
    ):
        busy: list[int] = []  # the server's in-flight count while submits are queued

        async def monitor() -> None:
            while True:
                if fake.submits > 24 and client.limiter.waiting():
                    busy.append(fake.in_flight("standard"))
                await anyio.sleep(0.001)

        async with (
            ended_when_full(fake, client, limit=12, batch=1),
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(monitor)
            outcomes = [
                o
                async for o in client.generate_many(
                    [{"model": "flux-2-pro", "prompt": f"owl {n}"} for n in range(96)],
                    output_dir=tmp_path,
                )
            ]
            tg.cancel_scope.cancel()
        assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
        assert fake.submits == 96 and fake.duplicate_submits == 0
        # A few refusals when the client first over-reaches (and one now and then to
        # correct an estimate), never a storm: fewer than one per job in flight.
        assert 0 < fake.rate_limited <= 12
        # In flight settles at the hidden limit: never above it, and kept full.
        assert fake.peak_in_flight["standard"] == 12
        assert busy and sum(busy) / len(busy) >= 11


@BOTH
async def test_cancelling_100_generates_halfway_keeps_every_slot_until_its_task_ends(
    tmp_path: Path,
) -> None:
    async with FakeBFL(generation_time=never) as fake, fast_client(fake) as client:
        accepted: list[Task] = []
        finished: list[GeneratedImage] = []

        async def one(n: int) -> None:
            finished.append(
                await client.generate(
                    "flux-2-pro",
                    prompt=f"heron {n}",
                    output_dir=tmp_path,
                    on_submitted=accepted.append,
                )
            )

        halfway = anyio.Event()

        async def one_of_100(n: int) -> None:
            await one(n)
            if len(finished) == 50:
                halfway.set()

        async with ended_when_full(fake, client), anyio.create_task_group() as tg:
            for n in range(100):
                tg.start_soon(one_of_100, n)
            with anyio.fail_after(20):
                await halfway.wait()
            tg.cancel_scope.cancel()

        # Queued submits were dropped at once; accepted tasks are still owned and watched.
        assert client.limiter.waiting() == 0
        watched = client.in_flight
        assert client.limiter.in_use() == len(watched) > 0
        assert {t.id for t in watched} <= {t.id for t in accepted}
        assert fake.submits == len(accepted) < 100
        # Never freed before the server ends the task, and freed once it has.
        with anyio.fail_after(5):  # the client sees the tasks the driver ended last
            while client.limiter.in_use() != fake.in_flight("standard"):
                await anyio.sleep(0.001)
        for task in sorted(client.in_flight, key=lambda t: fake.tasks[t.id].created_at):
            in_use = client.limiter.in_use()
            assert in_use == fake.in_flight("standard")
            fake.finish_now(task.id)
            with anyio.fail_after(5):
                while client.limiter.in_use() == in_use:
                    await anyio.sleep(0.001)
            assert client.limiter.in_use() == in_use - 1
        assert fake.in_flight("standard") == 0

        more = [
            await client.wait(task)
            for task in accepted
            if task.id not in {image.task_id for image in finished}
        ]
        assert len(more) == len(accepted) - len(finished)

        async with ended_when_full(fake, client), anyio.create_task_group() as tg:
            for n in range(48):
                tg.start_soon(one, 100 + n)
        assert fake.rate_limited == 0
        assert fake.peak_in_flight["standard"] == 24


async def test_credits_and_a_resumed_handle_on_the_fake(tmp_path: Path) -> None:
    async with FakeBFL(generation_time=0.05, credits=100.0) as fake:
        async with fast_client(fake, close_grace=0.0) as first:
            task = await first.submit("flux-2-pro", prompt="lynx", width=1024, height=1024)
            assert task.cost is not None and task.cost > 0
            assert await first.credits() == pytest.approx(100.0 - task.cost)
            saved = task.model_dump_json()
        async with fast_client(fake) as second:
            result = await second.wait(Task.model_validate_json(saved))
            path = await second.download(result, tmp_path)
        assert path.suffix == ".jpg" and path.stat().st_size > 0
        assert fake.submits == 1
