"""A FakeBFL in its own process, driven line by line on stdin, for the benchmarks.

Commands (one a line; each answer is one line on stdout):

- `reset {"rng": "flux2-96/0", "median": 4.0, "sigma": 0.4, "count": 96, "image_bytes": null,
  "delivery_rate": null}`
  stops the running fake, if any, and starts a fresh one. The k-th accepted submit gets the
  k-th generation time of a lognormal sequence drawn from `rng` (cycled past `count`), so every
  client sees the same times in submit order. Answers `ready {"api": URL, "polling": URL,
  "delivery": URL}`.
- `dump PATH` writes the fake's public counters to PATH as JSON; answers `dumped`.
- `quit` stops the fake and exits.

Run by `benchmarks/polling.py`; only the public `bfl_async.testing` API is used.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
import anyio.to_thread

from bfl_async.testing import FakeBFL

API_KEY = "bench-key"


def generation_times(rng: str, median: float, sigma: float, count: int) -> list[float]:
    """`count` lognormal generation times (median `median`, log-sd `sigma`) seeded by `rng`."""
    draw = random.Random(rng)
    return [median * math.exp(sigma * draw.gauss(0.0, 1.0)) for _ in range(count)]


def in_submit_order(times: list[float]) -> Callable[[str, random.Random], float]:
    """A FakeBFL `generation_time` that hands out `times` in the order tasks are accepted."""
    order = itertools.cycle(times)
    return lambda model, rng: next(order)


def snapshot(fake: FakeBFL) -> dict[str, Any]:
    """The fake's public counters, as JSON-ready data."""
    return {
        "tasks": [
            {
                "id": task.id,
                "model": task.model,
                "start_time": task.start_time,
                "end_time": task.end_time,
                "duration": task.duration,
                "polls": task.polls,
            }
            for task in sorted(fake.tasks.values(), key=lambda t: t.created_at)
        ],
        "poll_times": fake.poll_times,
        "polls": fake.polls,
        "submits": fake.submits,
        "submit_attempts": fake.submit_attempts,
        "rate_limited": fake.rate_limited,
        "downloads": fake.downloads,
        "peak_in_flight": fake.peak_in_flight,
        "server_errors": [repr(error) for error in fake.server_errors],
    }


def say(line: str) -> None:
    """Answer one command."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def stop(stack: AsyncExitStack) -> None:
    """Stop a fake; its request errors were already counted in the last dump."""
    try:
        await stack.aclose()
    except RuntimeError as exc:
        print(f"fake_server: {exc}", file=sys.stderr)


async def serve() -> None:
    """Read commands until `quit` or end of input."""
    stack: AsyncExitStack | None = None
    fake: FakeBFL | None = None
    try:
        while True:
            line = await anyio.to_thread.run_sync(sys.stdin.readline)
            command, _, argument = line.strip().partition(" ")
            if command in ("", "quit"):
                return
            if command == "reset":
                if stack is not None:
                    await stop(stack)
                spec = json.loads(argument)
                times = generation_times(spec["rng"], spec["median"], spec["sigma"], spec["count"])
                fake = FakeBFL(
                    api_key=API_KEY,
                    generation_time=in_submit_order(times),
                    image_bytes=spec.get("image_bytes"),
                    delivery_rate=spec.get("delivery_rate"),
                    credits=1e9,
                )
                stack = AsyncExitStack()
                await stack.enter_async_context(fake)
                urls = {
                    "api": fake.base_url,
                    "polling": fake.polling_base_url,
                    "delivery": fake.delivery_base_url,
                }
                say("ready " + json.dumps(urls))
            elif command == "dump" and fake is not None:
                await anyio.Path(argument).write_text(json.dumps(snapshot(fake)))
                say("dumped")
            else:
                say(f"error unknown command {line.strip()!r}")
    finally:
        if stack is not None:
            await stop(stack)


if __name__ == "__main__":
    anyio.run(serve)
