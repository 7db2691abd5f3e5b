"""An arq worker that generates images, sharing one BFL account's limits with every other
worker through the same Redis (see README.md beside this file).

    BFL_API_KEY=... BFL_LIMITER_URL=redis://localhost:6379/0 arq bfl_worker.WorkerSettings

arq delivers a job at least once: a worker that dies mid-job has its jobs run again by
another one. So each job's record lives in Redis, written around the submit exactly as the
batch journal does it: `submitting` before the POST, the task handle the moment BFL accepts.
A rerun finding a handle waits for that task (paid once); one finding `submitting` without
a handle cannot know whether BFL created a task, so it is left `uncertain`, never resent.

Settings come from the environment: BFL_LIMITER_URL (the Redis of the queue and the
limiter), BFL_OUTPUT_DIR (default images/), BFL_LEASE_TTL (seconds, default 120: longer than
a task lives), BFL_JOB_TIMEOUT (default 900), BFL_MAX_JOBS (jobs at once per worker,
default 24), BFL_BASE_URL and BFL_API_KEY as for the client.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any, ClassVar

from arq import Retry
from arq.connections import RedisSettings
from arq.worker import Worker

from bfl_async import (
    AsyncBFL,
    BFLError,
    DownloadError,
    DownloadRefusedError,
    LimiterUnavailableError,
    SubmissionUncertainError,
    Task,
    TaskError,
    WaitTimeoutError,
)
from bfl_async.redis import RedisLimiter

logger = logging.getLogger("bfl_worker")

REDIS_URL = os.environ.get("BFL_LIMITER_URL", "redis://localhost:6379/0")
RECORDS = "bfl-jobs"
"""Job records are hashes at `bfl-jobs:<job id>`: state, task (the handle), path, error."""


def record_key(job_id: str) -> str:
    return f"{RECORDS}:{job_id}"


async def startup(ctx: dict[str, Any]) -> None:
    """One client (and one limiter) per worker process, for all its jobs.

    arq calls startup and shutdown from different tasks, and a client's task group must be
    left in the task that entered it: a task of its own holds the client open.
    """
    limiter = RedisLimiter(REDIS_URL, lease_ttl=float(os.environ.get("BFL_LEASE_TTL", "120")))
    opened: asyncio.Future[AsyncBFL] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def hold() -> None:
        try:
            async with AsyncBFL(limiter=limiter, wait_timeout=None) as client:
                opened.set_result(client)
                await stop.wait()
        except BaseException as exc:
            if not opened.done():
                opened.set_exception(exc)
            raise

    ctx["bfl_task"] = asyncio.create_task(hold())
    ctx["bfl_stop"] = stop
    ctx["bfl"] = await opened
    ctx["worker_id"] = limiter.worker_id
    ctx["output_dir"] = Path(os.environ.get("BFL_OUTPUT_DIR", "images"))
    logger.warning("bfl worker %s ready", limiter.worker_id)


async def shutdown(ctx: dict[str, Any]) -> None:
    """Close the client: it waits a while for tasks in flight (their jobs rerun elsewhere)."""
    if "bfl_task" in ctx:
        ctx["bfl_stop"].set()
        await ctx["bfl_task"]


async def generate(ctx: dict[str, Any], job_id: str, request: dict[str, Any]) -> dict[str, Any]:
    """Generate one image (`request`: model, prompt, other parameters) as `<job_id>.<ext>`."""
    client: AsyncBFL = ctx["bfl"]
    redis = ctx["redis"]  # arq's own connection to the same Redis
    key = record_key(job_id)
    record = {k.decode(): v.decode() for k, v in (await redis.hgetall(key)).items()}
    if record.get("state") in ("done", "failed", "uncertain"):
        return record  # a redelivery of a job that already ended
    if record.get("task"):
        task = Task.model_validate_json(record["task"])  # paid before: wait for it, not again
        logger.info("job %s: re-attaching to task %s", job_id, task.id)
    elif record.get("state") == "submitting":
        # A worker died while this job's submit was on its way: BFL may have created (and
        # charged for) a task, or not. Nobody can tell; a person decides.
        error = "a worker died while submitting; check the BFL dashboard before resubmitting"
        await redis.hset(key, mapping={"state": "uncertain", "error": error})
        return {"state": "uncertain", "error": error}
    else:
        params = dict(request)
        model = params.pop("model")

        async def before_send() -> None:
            await redis.hset(key, mapping={"state": "submitting", "worker": ctx["worker_id"]})

        async def on_submitted(task: Task) -> None:
            await redis.hset(key, mapping={"state": "submitted", "task": task.model_dump_json()})

        try:
            task = await client.submit(
                model, before_send=before_send, on_submitted=on_submitted, **params
            )
        except LimiterUnavailableError:
            raise Retry(defer=5) from None  # nothing was sent: try again once Redis is back
        except SubmissionUncertainError as exc:
            await redis.hset(key, mapping={"state": "uncertain", "error": str(exc)})
            return {"state": "uncertain", "error": str(exc)}
        except BFLError as exc:  # refused before any task existed: no credits, a bad key...
            await redis.hset(key, mapping={"state": "failed", "error": str(exc)})
            return {"state": "failed", "error": str(exc)}
    try:
        result = await client.wait(task)
        path = await client.download(result, ctx["output_dir"], name=job_id, overwrite=True)
    except (WaitTimeoutError, DownloadError) as exc:
        if not isinstance(exc, DownloadRefusedError):
            # Still running, or a broken download: a rerun waits for (or fetches) the same
            # task, paid once.
            raise Retry(defer=5) from None
        await redis.hset(key, mapping={"state": "failed", "error": str(exc)})
        return {"state": "failed", "error": str(exc)}
    except TaskError as exc:  # moderated, failed, expired: nothing more will come of it
        await redis.hset(key, mapping={"state": "failed", "error": str(exc)})
        return {"state": "failed", "error": str(exc)}
    await redis.hset(key, mapping={"state": "done", "path": str(path)})
    return {"state": "done", "path": str(path)}


class WorkerSettings:
    """For `arq bfl_worker.WorkerSettings`."""

    functions: ClassVar[list[Any]] = [generate]
    on_startup = startup
    on_shutdown = shutdown
    redis_settings = RedisSettings.from_dsn(REDIS_URL)
    max_jobs = int(os.environ.get("BFL_MAX_JOBS", "24"))
    job_timeout = int(os.environ.get("BFL_JOB_TIMEOUT", "900"))
    poll_delay = 0.1


def main(burst: bool = False) -> None:
    """Run a worker in this process (`burst`: stop once the queue is empty)."""
    settings = {k: v for k, v in vars(WorkerSettings).items() if not k.startswith("__")}
    Worker(burst=burst, **settings).run()


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    main(burst="--burst" in sys.argv)
