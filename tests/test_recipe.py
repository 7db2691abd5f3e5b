"""The arq recipe's job function (examples/workers/bfl_worker.py), run in process: what it
records in Redis around a submit decides whether a rerun may pay again."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from bfl_async import AsyncBFL, Backoff
from bfl_async.testing import FakeBFL
from tests.redis_server import RedisServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "workers"))
import bfl_worker

pytestmark = pytest.mark.anyio
REQUEST = {"model": "flux-2-klein-4b", "prompt": "a fox"}


@pytest.fixture
async def store(redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """arq's kind of connection (bytes) to the recipe's Redis."""
    connection = aioredis.Redis.from_url(redis.url)
    yield connection
    await connection.aclose()


def context(client: AsyncBFL, store: aioredis.Redis, tmp_path: Path) -> dict[str, Any]:
    return {"bfl": client, "redis": store, "worker_id": "w1", "output_dir": tmp_path}


def client_of(fake: FakeBFL) -> AsyncBFL:
    return AsyncBFL(fake.api_key, http_client=fake.client(), poll_schedule=Backoff(initial=0.01))


async def test_a_job_is_generated_once_and_a_redelivery_changes_nothing(
    store: aioredis.Redis, tmp_path: Path
) -> None:
    fake = FakeBFL(generation_time=0.01)
    async with client_of(fake) as client:
        ctx = context(client, store, tmp_path)
        first = await bfl_worker.generate(ctx, "job-1", dict(REQUEST))
        again = await bfl_worker.generate(ctx, "job-1", dict(REQUEST))
    assert first["state"] == "done" and Path(first["path"]).is_file()
    assert again["state"] == "done" and again["path"] == first["path"]
    assert fake.submits == 1


async def test_a_refused_submit_is_recorded_failed_not_left_submitting(
    store: aioredis.Redis, tmp_path: Path
) -> None:
    fake = FakeBFL(generation_time=0.01, credits=0.0)
    async with client_of(fake) as client:
        outcome = await bfl_worker.generate(context(client, store, tmp_path), "job-2", REQUEST)
    assert outcome["state"] == "failed" and "credits" in outcome["error"].lower()
    assert (await store.hget("bfl-jobs:job-2", "state")) == b"failed"
    assert fake.submits == 0


async def test_a_job_found_submitting_without_a_handle_is_uncertain_and_not_resent(
    store: aioredis.Redis, tmp_path: Path
) -> None:
    await store.hset("bfl-jobs:job-3", mapping={"state": "submitting", "worker": "dead"})
    fake = FakeBFL(generation_time=0.01)
    async with client_of(fake) as client:
        outcome = await bfl_worker.generate(context(client, store, tmp_path), "job-3", REQUEST)
    assert outcome["state"] == "uncertain"
    assert fake.submit_attempts == 0
