"""One worker process of tests/test_workers.py: a batch of jobs through a shared RedisLimiter.

python tests/batch_worker.py BASE_URL REDIS_URL OUTPUT_DIR JOBS PREFIX
Prints one JSON line at the end: how many images were saved, and the 429s it met.
"""

from __future__ import annotations

import json
import sys

import anyio

from bfl_async import AsyncBFL, Backoff
from bfl_async.redis import RedisLimiter


async def main(base_url: str, redis_url: str, output_dir: str, jobs: int, prefix: str) -> None:
    limiter = RedisLimiter(redis_url, namespace="workers", lease_ttl=5.0)
    requests = [
        {"model": "flux-2-klein-4b", "prompt": f"{prefix} job {n}", "width": 256, "height": 256}
        for n in range(jobs)
    ]
    async with AsyncBFL(
        base_url=base_url,
        limiter=limiter,
        poll_schedule=Backoff(initial=0.05, factor=1.5, maximum=0.2, jitter=0.1),
        poll_rate=400.0,
        retry_base_delay=0.05,
    ) as client:
        states: dict[str, int] = {}
        async with client.batch(requests, output_dir) as batch:
            async for record in batch:
                states[record.state] = states.get(record.state, 0) + 1
    print(json.dumps({"states": states, "worker": limiter.worker_id}), flush=True)


if __name__ == "__main__":
    base, redis, out, count, prefix = sys.argv[1:6]
    anyio.run(main, base, redis, out, int(count), prefix)
