"""Put every job of a JSONL file (model, prompt, ..., optional name) on the arq queue.

    BFL_LIMITER_URL=redis://localhost:6379/0 python enqueue.py jobs.jsonl

A job's id is its name (or its line number): enqueueing the same file twice adds nothing,
as arq keeps one job per id.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings


def read_jobs(path: str) -> list[tuple[str, dict[str, Any]]]:
    """`(job id, request)` for each job of the file."""
    jobs = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.startswith("#"):
                continue
            request = json.loads(line)
            jobs.append((str(request.pop("name", f"line-{number}")), request))
    return jobs


async def enqueue(jobs: list[tuple[str, dict[str, Any]]], redis_url: str) -> int:
    """Enqueue the jobs not on the queue yet; return how many were added."""
    pool = await create_pool(RedisSettings.from_dsn(redis_url))
    added = 0
    try:
        for job_id, request in jobs:
            if await pool.enqueue_job("generate", job_id, request, _job_id=job_id):
                added += 1
    finally:
        await pool.aclose()
    return added


if __name__ == "__main__":
    url = os.environ.get("BFL_LIMITER_URL", "redis://localhost:6379/0")
    print(f"{asyncio.run(enqueue(read_jobs(sys.argv[1]), url))} jobs enqueued")
