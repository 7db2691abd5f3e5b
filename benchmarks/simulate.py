"""The flux2-96 polling workload in simulated time, to see where detection delay comes from.

`polling.py` runs for 25 minutes and its figures move by a few hundredths from run to run
on a shared machine: the median of 96 delays alone has a standard error near 0.03 s. Here
the same workload (96 jobs, lognormal generation time of median 4 s and sigma 0.4, 24
slots) runs the real `AsyncBFL`, `LearnedSchedule` and `PollBudget` against an in-process
`FakeBFL` on trio's `MockClock`, which jumps ahead whenever every task waits: no network
and no CPU noise: 60 seeded runs of each variant take about a minute (polls due at the same
instant, and as urgent, are ordered by object identity, so medians still move by a hundredth
or two from run to run).

It compares the default client with variants that take one cost away at a time: the shared
poll budget (no budget), learning (the schedule told the true distribution: "oracle"), and
the plan itself (the mean-optimal plan's own figures with the distribution known and polls
leaving exactly on time: "plan alone", also on the very durations of `polling.py`'s five
seeds); and one that takes a gain away: polls held by a busy budget going in turn rather
than the most urgent first.

    python benchmarks/simulate.py [--seeds 60]    (writes results/simulate.json)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
import trio.testing
from fake_server import generation_times, in_submit_order
from polling import WORKLOADS, list_schedule, peak_rate, percentile

import bfl_async._client
import bfl_async._polling
import bfl_async._schedule
import bfl_async.testing._fake
from bfl_async import AsyncBFL, LearnedSchedule, Task
from bfl_async.testing import FakeBFL

HERE = Path(__file__).resolve().parent
WORKLOAD = WORKLOADS["flux2-96"]
MODEL, JOBS, SLOTS = WORKLOAD.model, WORKLOAD.jobs, WORKLOAD.slots
MEDIAN, SIGMA = WORKLOAD.median, WORKLOAD.sigma
EPOCH = 1.7e9


class _VirtualTime:
    """`time.time()` and `time.monotonic()` on trio's clock, for the fake and the client."""

    @staticmethod
    def monotonic() -> float:
        return trio.current_time()

    @staticmethod
    def time() -> float:
        return EPOCH + trio.current_time()


for module in (bfl_async.testing._fake, bfl_async._polling, bfl_async._client):
    module.time = _VirtualTime  # type: ignore[attr-defined]


def durations(seed: int) -> list[float]:
    """The generation times of `polling.py`'s flux2-96 workload for this seed."""
    return generation_times(f"{WORKLOAD.name}/{seed}", MEDIAN, SIGMA, JOBS)


async def one_run(seed: int, options: dict[str, Any]) -> dict[str, float]:
    times = durations(seed)
    fake = FakeBFL(generation_time=in_submit_order(times))
    started = trio.current_time()
    seen: list[tuple[str, float]] = []
    async with AsyncBFL(api_key=fake.api_key, http_client=fake.client(), **options) as client:

        async def job(n: int) -> None:
            task = await client.submit(MODEL, prompt=f"job {n}")
            result = await client.wait(task)
            seen.append((task.id, result.ready_at))

        async with trio.open_nursery() as nursery:
            for n in range(JOBS):
                nursery.start_soon(job, n)
    delays = [ready_at - fake.tasks[task_id].end_time for task_id, ready_at in seen]
    makespan = max(ready_at for _, ready_at in seen) - (EPOCH + started)
    return {
        "makespan_ratio": makespan / list_schedule(times, SLOTS),
        "detect_p50": percentile(delays, 50),
        "detect_p90": percentile(delays, 90),
        "detect_mean": statistics.mean(delays),
        "polls_per_task": fake.polls / fake.submits,
        "peak_polls_per_s": peak_rate(fake.poll_times),
    }


def told_the_truth() -> Callable[[], None]:
    """Make the schedule's prior the workload's true distribution, held fixed, and undo it."""
    schedule, catalog = bfl_async._schedule, bfl_async._schedule.CATALOG
    explore = schedule._EXPLORE
    truth = {**catalog, MODEL: dataclasses.replace(catalog[MODEL], typical_seconds=MEDIAN)}
    schedule.CATALOG, schedule._EXPLORE = truth, 0.0  # type: ignore[assignment]

    def undo() -> None:
        schedule.CATALOG, schedule._EXPLORE = catalog, explore

    return undo


PLANNED = LearnedSchedule().polls_per_task
FIVE_SEEDS_PLANNED = 3.5


def oracle() -> LearnedSchedule:
    """A schedule that keeps the prior `told_the_truth` gives it, whatever it sees."""
    return LearnedSchedule(PLANNED, prior_weight=1e9, prior_sigma=SIGMA)


class InTurn(LearnedSchedule):
    """The default schedule, but polls held by the budget go first come, first served."""

    def urgency(self, task: Task, pending_at: float, elapsed: float) -> float:
        return 0.0


# (label, the AsyncBFL options of one run (a schedule learns: a new one per run), told the truth)
VARIANTS: list[tuple[str, Callable[[], dict[str, Any]], bool]] = [
    ("bfl_async defaults", dict, False),
    ("held polls in turn", lambda: {"poll_schedule": InTurn()}, False),
    ("no poll budget", lambda: {"poll_rate": None}, False),
    ("oracle", lambda: {"poll_schedule": oracle()}, True),
    ("oracle, no poll budget", lambda: {"poll_rate": None, "poll_schedule": oracle()}, True),
]


def plan_alone(
    polls_per_task: float = PLANNED, finishes: list[float] | None = None
) -> dict[str, float]:
    """The mean-optimal plan's own figures: distribution known, no budget, no latency; for
    20,000 tasks drawn from the workload's distribution, or for the given finishes."""
    policy = LearnedSchedule(polls_per_task)._solved(SIGMA, polls_per_task)
    times = [t * MEDIAN for t in policy.times]
    if finishes is None:
        draw = random.Random(0)
        finishes = [MEDIAN * math.exp(SIGMA * draw.gauss(0.0, 1.0)) for _ in range(20000)]
    delays, polls = [], []
    for finish in finishes:
        k = policy.polls_until(finish / MEDIAN)
        if k < len(times):
            delays.append(times[k] - finish)
            polls.append(k)
    return {
        "detect_p50": percentile(delays, 50),
        "detect_p90": percentile(delays, 90),
        "detect_mean": statistics.mean(delays),
        "polls_per_task": statistics.mean(polls),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=60, help="seeded runs per variant (60)")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "simulate.json")
    args = parser.parse_args(argv)
    rows: dict[str, dict[str, float]] = {}
    for label, options, truth in VARIANTS:
        undo = told_the_truth() if truth else (lambda: None)
        try:
            runs = []
            for seed in range(args.seeds):
                clock = trio.testing.MockClock(autojump_threshold=0)
                trio._core._run._r.seed(seed)  # trio shuffles its run queue: the same way
                runs.append(trio.run(one_run, seed, options(), clock=clock))
        finally:
            undo()
        rows[label] = {key: statistics.median([run[key] for run in runs]) for key in runs[0]}
    rows[f"plan alone ({PLANNED:g} polls)"] = plan_alone()
    # polling.py's own five seeds, planned for about as many polls as its targets allow.
    alone = [plan_alone(FIVE_SEEDS_PLANNED, durations(seed)) for seed in range(5)]
    rows[f"plan alone, seeds 0-4 ({FIVE_SEEDS_PLANNED:g})"] = {
        key: statistics.median(row[key] for row in alone) for key in alone[0]
    }
    keys = ["makespan_ratio", "detect_p50", "detect_p90", "detect_mean", "polls_per_task"]
    keys.append("peak_polls_per_s")
    print(f"flux2-96 in simulated time, median of {args.seeds} seeded runs")
    print(f"{'':30}" + "".join(f"{key:>18}" for key in keys))
    for label, row in rows.items():
        cells = (f"{row[key]:18.3f}" if key in row else f"{'':>18}" for key in keys)
        print(f"{label:30}" + "".join(cells))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"seeds": args.seeds, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
