"""CPU per poll: bfl_async's own connections against httpx's default ones, side by side.

bfl_async's client runs its connections on asyncio's transports (`bfl_async._network`); an
`httpx.AsyncClient()` passed as `http_client` runs them through anyio, as httpx does by
default. Both poll the same FakeBFL (in another process, `fake_server.py`, so its CPU is
not counted): 24 tasks of 2 s each, watched together with a fixed poll interval and no poll
budget, once dense (every 2 ms: the HTTP stack's cost) and once sparse (every 250 ms: each
poll also wakes the event loop from its timer, as in a real batch). Rounds alternate
between the two clients; the figure is the median over rounds of the client process's CPU
time per poll.

    python benchmarks/transport.py [--rounds 5]    (writes results/transport.json)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bfl_async import AsyncBFL, Backoff

sys.path.insert(0, str(Path(__file__).parent))
from polling import WORKLOADS, FakeServer

API_KEY = "bench-key"
TASKS = 24
REGIMES = {"dense": 0.002, "sparse": 0.25}
WORKLOAD = dataclasses.replace(WORKLOADS["flux2-96"], name="transport", median=2.0, sigma=0.0)


async def poll_round(api: str, interval: float, own_client: bool) -> tuple[float, int]:
    """CPU seconds spent and polls made while 24 tasks are watched to the end."""
    http = None if own_client else httpx.AsyncClient(timeout=60.0)
    try:
        async with AsyncBFL(
            api_key=API_KEY,
            base_url=api,
            http_client=http,
            poll_schedule=Backoff(initial=interval, factor=1.0, maximum=interval, jitter=0.0),
            poll_rate=None,
        ) as client:
            tasks = await asyncio.gather(
                *(client.submit("flux-2-pro", prompt=f"cpu {i}") for i in range(TASKS))
            )
            before = time.process_time()
            results = await asyncio.gather(*(client.wait(task) for task in tasks))
            spent = time.process_time() - before
    finally:
        if http is not None:
            await http.aclose()
    return spent, sum(result.polls for result in results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).parent / "results" / "transport.json"
    )
    args = parser.parse_args()
    fake = FakeServer(dict(os.environ))
    per_poll: dict[str, dict[str, list[float]]] = {
        regime: {"bfl_async": [], "httpx default": []} for regime in REGIMES
    }
    try:
        for regime, interval in REGIMES.items():
            for round_ in range(args.rounds):
                order = [True, False] if round_ % 2 == 0 else [False, True]
                for own in order:
                    urls = fake.reset(WORKLOAD, round_)
                    spent, polls = asyncio.run(poll_round(urls["api"], interval, own))
                    label = "bfl_async" if own else "httpx default"
                    per_poll[regime][label].append(1e6 * spent / polls)
    finally:
        fake.close()
    report: dict[str, Any] = {}
    print(f"CPU microseconds per poll, median of {args.rounds} rounds ({TASKS} tasks of 2 s)")
    print(f"{'regime':<8} {'bfl_async':>10} {'httpx default':>14} {'ratio':>6}")
    for regime, figures in per_poll.items():
        ours = statistics.median(figures["bfl_async"])
        theirs = statistics.median(figures["httpx default"])
        report[regime] = {
            "interval_s": REGIMES[regime],
            "bfl_async_us": ours,
            "httpx_default_us": theirs,
            "ratio": ours / theirs,
            "rounds": figures,
        }
        print(f"{regime:<8} {ours:>10.0f} {theirs:>14.0f} {ours / theirs:>6.2f}")
    args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
