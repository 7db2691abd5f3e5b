"""The clients the polling benchmark compares, each run alone in its own process.

    python benchmarks/clients.py CLIENT --api URL --model MODEL --jobs N --slots S \\
        --out DIR --report PATH [--poll-rate R]

CLIENT is one of:

- `bfl_async`: `AsyncBFL` with its defaults, or with `--poll-rate R` the budget variant
  `AsyncBFL(poll_rate=R, poll_schedule=LearnedSchedule(polls_per_task=3.9 * R / 20))`.
- `seeds-fixed`: BFL's integration guide ("bfl-api" skill), async example: httpx, an
  `asyncio.Semaphore` held over submit and polling, a poll every 2 s.
- `seeds-backoff`: the same, polling with the guide's recommended exponential backoff
  (0.5 s doubling, capped at 10 s, plus up to 10 % jitter).
- `blackforest`: BFL's official Python client (`pip install blackforest`), synchronous mode
  (its own poll loop, 1 s apart), one job per thread of a `ThreadPoolExecutor`, images
  fetched with `requests` and written to disk.

Every client submits the same N jobs, saves each image to DIR, and writes a JSON report:
per job the task id, when it saw the task Ready (epoch), when its download started and when
the file was saved; the workload's start and end; its CPU seconds (user + system, all
threads, for the workload only: imports and the construction of the client objects come
before) and its peak RSS (the process's own high-water mark).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import random
import resource
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

API_KEY = "bench-key"
CLIENTS = ("bfl_async", "seeds-fixed", "seeds-backoff", "blackforest")
_ASYNC_IO = ("httpcore", "anyio._backends._asyncio", "anyio._core._sockets", "anyio.streams.tls")
IMPORTS = {
    "bfl_async": ("bfl_async", *_ASYNC_IO),
    "seeds-fixed": ("httpx", *_ASYNC_IO),
    "seeds-backoff": ("httpx", *_ASYNC_IO),
    "blackforest": ("requests", "blackforest", "blackforest.types.general.client_config", "netrc"),
}
"""Imported before measuring, so CPU seconds count the workload and not the imports: httpx
imports httpcore only when its first transport is made, anyio its event-loop backend at its
first call, and requests `netrc` at its first request. Each report lists the modules still
first imported inside the measured work (`imported_during_run`)."""


@dataclass
class Job:
    """What one client saw of one job (times are `time.time()`)."""

    index: int
    task_id: str | None = None
    seen: float | None = None
    """When the client saw the task Ready."""
    download_start: float | None = None
    saved: float | None = None
    """When the image was on disk."""
    error: str | None = None


@dataclass
class Config:
    """One run's parameters, from the command line."""

    client: str
    api: str
    model: str
    jobs: int
    slots: int
    out: Path
    poll_rate: float | None


def prompt(index: int) -> str:
    """The prompt of job `index`; every client sends the same ones."""
    return f"benchmark job {index}: a lighthouse on a cliff at dawn"


# -- bfl_async -----------------------------------------------------------------------------


def planned_polls(poll_rate: float) -> float:
    """`LearnedSchedule`'s polls per task for poll budget R: its default, times R / 20."""
    from bfl_async import LearnedSchedule

    return LearnedSchedule().polls_per_task * poll_rate / 20


def make_bfl_async(config: Config) -> Any:
    """`AsyncBFL` with its defaults, or with the poll budget `config.poll_rate`."""
    from bfl_async import AsyncBFL, LearnedSchedule

    if config.poll_rate is None:
        return AsyncBFL(api_key=API_KEY, base_url=config.api)
    return AsyncBFL(
        api_key=API_KEY,
        base_url=config.api,
        poll_rate=config.poll_rate,
        poll_schedule=LearnedSchedule(polls_per_task=planned_polls(config.poll_rate)),
    )


async def run_bfl_async(config: Config, client: Any) -> list[Job]:
    """All jobs at once through `AsyncBFL.generate`: the client does the rest."""
    async with client:

        async def one(index: int) -> Job:
            job = Job(index)
            try:
                image = await client.generate(
                    config.model, prompt=prompt(index), output_dir=config.out
                )
            except Exception as exc:
                job.error = repr(exc)
                return job
            job.saved = time.time()
            job.task_id = image.task.id
            job.seen = image.result.ready_at
            job.download_start = job.saved - image.timings.download
            return job

        return list(await asyncio.gather(*(one(index) for index in range(config.jobs))))


# -- the seeds' async example --------------------------------------------------------------


async def poll_fixed(
    http: Any, polling_url: str, headers: dict[str, str]
) -> tuple[dict[str, Any], float]:
    """The guide's poll loop: poll, and if not done, sleep 2 s."""
    while True:
        response = await http.get(polling_url, headers=headers)
        data = response.json()
        if data["status"] == "Ready":
            return data["result"], time.time()
        if data["status"] not in ("Pending",):
            raise RuntimeError(f"task ended {data['status']}: {data.get('details')}")
        await asyncio.sleep(2)


async def poll_backoff(
    http: Any, polling_url: str, headers: dict[str, str], max_attempts: int = 40
) -> tuple[dict[str, Any], float]:
    """The guide's recommended poll loop: exponential backoff from 0.5 s, capped at 10 s,
    with up to 10 % jitter."""
    base_delay, max_delay = 0.5, 10.0
    for attempt in range(max_attempts):
        response = await http.get(polling_url, headers=headers)
        data = response.json()
        if data["status"] == "Ready":
            return data["result"], time.time()
        if data["status"] not in ("Pending",):
            raise RuntimeError(f"task ended {data['status']}: {data.get('details')}")
        delay = min(base_delay * (2**attempt), max_delay)
        jitter = random.uniform(0, delay * 0.1)
        await asyncio.sleep(delay + jitter)
    raise TimeoutError("max polling attempts exceeded")


Poller = Callable[[Any, str, dict[str, str]], Awaitable[tuple[dict[str, Any], float]]]


def make_seeds_client() -> Any:
    """The guide's shared `httpx.AsyncClient` (built before the measured work, like every
    client: it loads the CA bundle, some 30 ms of CPU that the loopback's http never uses)."""
    import httpx

    return httpx.AsyncClient(timeout=60.0)


async def run_seeds(config: Config, poll: Poller, http: Any) -> list[Job]:
    """The guide's `AsyncRateLimitedClient`: a semaphore of `slots` held over submit and
    polling; then each image is fetched whole (`response.content`) and written to disk."""
    semaphore = asyncio.Semaphore(config.slots)
    headers = {"x-key": API_KEY}

    async with http:

        async def submit(body: dict[str, Any], max_retries: int = 5) -> dict[str, Any]:
            # The guide's 429 handling: wait Retry-After * 2**attempt.
            for attempt in range(max_retries):
                response = await http.post(
                    f"{config.api}/v1/{config.model}", json=body, headers=headers
                )
                if response.status_code == 429:
                    retry_after = int(response.headers.get("Retry-After", 5))
                    await asyncio.sleep(retry_after * (2**attempt))
                    continue
                response.raise_for_status()
                data: dict[str, Any] = response.json()
                return data
            raise RuntimeError("max retries exceeded due to rate limiting")

        async def one(index: int) -> Job:
            job = Job(index)
            try:
                async with semaphore:
                    data = await submit({"prompt": prompt(index)})
                    job.task_id = data["id"]
                    result, job.seen = await poll(http, data["polling_url"], headers)
                job.download_start = time.time()
                response = await http.get(result["sample"])
                response.raise_for_status()
                (config.out / f"{job.task_id}.jpg").write_bytes(response.content)
                job.saved = time.time()
            except Exception as exc:
                job.error = repr(exc)
            return job

        return list(await asyncio.gather(*(one(index) for index in range(config.jobs))))


# -- blackforest ---------------------------------------------------------------------------


def run_blackforest(config: Config) -> list[Job]:
    """`BFLClient.generate(model, inputs, ClientConfig(sync=True))` on a pool of `slots`
    threads, one client per thread (the client keeps an unlocked dict of polling URLs and a
    `requests.Session`); then `requests.get(sample)` and the bytes written to disk."""
    import requests
    from blackforest import BFLClient
    from blackforest.types.general.client_config import ClientConfig

    local = threading.local()

    def client() -> BFLClient:
        if not hasattr(local, "client"):
            local.client = BFLClient(api_key=API_KEY, base_url=config.api)
        own: BFLClient = local.client
        return own

    def one(index: int) -> Job:
        job = Job(index)
        try:
            answer = client().generate(
                config.model, {"prompt": prompt(index)}, ClientConfig(sync=True)
            )
            job.seen = time.time()
            job.task_id = answer.id
            job.download_start = time.time()
            response = requests.get(answer.result["sample"], timeout=60)
            response.raise_for_status()
            (config.out / f"{job.task_id}.jpg").write_bytes(response.content)
            job.saved = time.time()
        except Exception as exc:
            job.error = repr(exc)
        return job

    with ThreadPoolExecutor(max_workers=config.slots) as pool:
        return list(pool.map(one, range(config.jobs)))


# -- running one client --------------------------------------------------------------------


def peak_rss_kb() -> int:
    """This process's peak resident set (KiB). Linux's `VmHWM`, not `ru_maxrss`: a child
    started from a large parent reports at least the parent's peak there."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run(config: Config) -> dict[str, Any]:
    """Run the workload with one client and measure it."""
    if config.client not in CLIENTS:
        raise SystemExit(f"unknown client {config.client!r}; known: {', '.join(CLIENTS)}")
    for module in IMPORTS[config.client]:
        importlib.import_module(module)
    # The client objects are built before measuring, for every client alike.
    work: Callable[[], list[Job]]
    if config.client == "bfl_async":
        client = make_bfl_async(config)
        work = lambda: asyncio.run(run_bfl_async(config, client))  # noqa: E731
    elif config.client == "blackforest":  # a client per worker thread, made as it starts
        work = lambda: run_blackforest(config)  # noqa: E731
    else:
        poll = poll_fixed if config.client == "seeds-fixed" else poll_backoff
        http = make_seeds_client()
        work = lambda: asyncio.run(run_seeds(config, poll, http))  # noqa: E731
    modules = set(sys.modules)
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.time()
    jobs = work()
    ended = time.time()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "client": config.client,
        "poll_rate": config.poll_rate,
        "started": started,
        "ended": ended,
        "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "maxrss_kb": peak_rss_kb(),
        "bfl_async_from": getattr(sys.modules.get("bfl_async"), "__file__", None),
        # Modules first imported inside the measured work: their import is counted as CPU.
        "imported_during_run": sorted(set(sys.modules) - modules),
        "jobs": [asdict(job) for job in jobs],
    }


def main() -> None:
    """Parse the command line, run, write the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("client", choices=CLIENTS)
    parser.add_argument("--api", required=True, help="the fake's API base URL")
    parser.add_argument("--model", required=True)
    parser.add_argument("--jobs", type=int, required=True)
    parser.add_argument("--slots", type=int, default=24, help="semaphore / thread pool size")
    parser.add_argument("--out", type=Path, required=True, help="directory for the images")
    parser.add_argument("--report", type=Path, required=True, help="where to write the JSON")
    parser.add_argument("--poll-rate", type=float, default=None, help="bfl_async budget R")
    args = parser.parse_args()
    config = Config(
        client=args.client,
        api=args.api,
        model=args.model,
        jobs=args.jobs,
        slots=args.slots,
        out=args.out,
        poll_rate=args.poll_rate,
    )
    config.out.mkdir(parents=True, exist_ok=True)
    report = run(config)
    args.report.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
