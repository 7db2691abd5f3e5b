"""The learned poll schedule and the shared poll-rate budget."""

from __future__ import annotations

import itertools
import math
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from bfl_async import AsyncBFL, Backoff, LearnedSchedule, Result, Task
from bfl_async._limits import PollBudget
from bfl_async._polling import _finish
from bfl_async._schedule import _lognormal_cdf, _Policy
from bfl_async.testing import FakeBFL

pytestmark = pytest.mark.anyio


def task(n: int, model: str = "flux-2-pro") -> Task:
    return Task(
        id=f"t{n}", polling_url=f"https://api.eu2.bfl.ai/v1/get_result?id=t{n}", model=model
    )


def teach(schedule: LearnedSchedule, model: str, median: float, sigma: float, n: int) -> None:
    """Feed `n` tasks seen ready on a 0.5 s polling grid from the first poll at 0.5 s."""
    rng = random.Random(7)
    for i in range(n):
        finish = median * math.exp(sigma * rng.gauss(0, 1))
        upper = math.ceil(finish / 0.5) * 0.5
        t = task(i, model)
        schedule.next_delay(t, 0, 0.0, None)
        if upper > 0.5:
            schedule.next_delay(t, 1, upper - 0.5, None)
        schedule.done(t, max(0.0, upper - 0.5), upper)


def first_polls(schedule: LearnedSchedule, model: str, count: int = 6) -> list[float]:
    """The poll times (seconds after acceptance) a task that stays pending would get."""
    t, elapsed, times = task(10_000, model), 0.0, []
    for attempt in range(count):
        elapsed += schedule.next_delay(t, attempt, elapsed, None)
        times.append(elapsed)
    schedule.done(t, elapsed, None)
    return times


def test_the_prior_comes_from_the_catalog() -> None:
    schedule = LearnedSchedule()
    klein, pro, unknown = (
        first_polls(schedule, m)[0] for m in ("flux-2-klein-4b", "flux-2-pro", "flux-9")
    )
    assert klein < pro < unknown
    assert 1.0 < pro < 5.0


def test_it_learns_where_tasks_finish() -> None:
    schedule = LearnedSchedule()
    teach(schedule, "flux-2-pro", median=2.0, sigma=0.3, n=64)
    times = first_polls(schedule, "flux-2-pro")
    # The first poll lands in the lower part of the learned distribution, not the prior's.
    assert 1.0 < times[0] < 2.0
    assert times[2] < 3.0
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0.05 <= g <= 1.5 for g in gaps)


@pytest.mark.parametrize(("median", "sigma"), [(4.0, 0.1), (20.0, 0.1), (4.0, 0.03)])
def test_it_learns_a_narrow_distribution(median: float, sigma: float) -> None:
    # Tasks that all take about as long (the 20 MiB benchmark's): Newton's steps swung
    # between two points, and the plan stayed the prior's (a median of 5 s, spread 0.39).
    schedule = LearnedSchedule()
    teach(schedule, "flux-2-pro", median=median, sigma=sigma, n=48)
    model = schedule._models["flux-2-pro"]
    model.fit(2.0)
    assert model.scale == pytest.approx(median, rel=0.05)
    assert model.sigma < 2 * sigma + 0.05


def test_a_lognormal_policy_scales_with_the_median() -> None:
    schedule = LearnedSchedule()
    teach(schedule, "flux-2-pro", median=2.0, sigma=0.3, n=64)
    teach(schedule, "flux-2-max", median=8.0, sigma=0.3, n=64)
    fast, slow = first_polls(schedule, "flux-2-pro")[0], first_polls(schedule, "flux-2-max")[0]
    assert slow / fast == pytest.approx(4.0, rel=0.25)


def test_the_policy_spends_the_poll_budget() -> None:
    cdf_at = _lognormal_cdf(1.0, 0.4)
    step = 3.0 / 300
    cdf = [cdf_at(k * step) for k in range(300)]
    for budget in (2.5, 3.5, 6.0):
        policy = _Policy.solve(cdf, step, budget)
        assert budget - 0.3 <= policy._expected_polls(cdf, policy.after) <= budget
    cheap, rich = _Policy.solve(cdf, step, 2.5), _Policy.solve(cdf, step, 6.0)
    assert (rich.next_poll(0.0) or 0.0) < (cheap.next_poll(0.0) or 0.0)


def brute_force_plan(
    cdf: list[float], moment: list[float], step: float, price: float
) -> list[float]:
    """Every state's optimal cost by trying every next poll: the O(grid**2) reference."""
    last = len(cdf) - 1
    cost = [0.0] * len(cdf)
    cost[last] = (1.0 - cdf[last]) * (price + 0.5)
    for i in range(last - 1, -1, -1):
        cost[i] = min(
            price * (1.0 - cdf[i])
            + j * step * (cdf[j] - cdf[i])
            - (moment[j] - moment[i])
            + cost[j]
            for j in range(i + 1, len(cdf))
        )
    return cost


def cost_of(
    cdf: list[float], moment: list[float], step: float, price: float, after: list[int]
) -> list[float]:
    """Every state's cost when following `after`."""
    last = len(cdf) - 1
    cost = [0.0] * len(cdf)
    cost[last] = (1.0 - cdf[last]) * (price + 0.5)
    for i in range(last - 1, -1, -1):
        j = after[i]
        cost[i] = (
            price * (1.0 - cdf[i])
            + j * step * (cdf[j] - cdf[i])
            - (moment[j] - moment[i])
            + cost[j]
        )
    return cost


def test_the_fast_plan_is_as_good_as_trying_every_poll_time() -> None:
    rng = random.Random(3)
    for _ in range(60):
        sigma, size = rng.uniform(0.05, 1.5), rng.choice([3, 20, 120])
        step = 1.25 * math.exp(sigma * 2.5758) / size
        cdf_at = _lognormal_cdf(1.0, sigma)
        cdf = [cdf_at(k * step) for k in range(size)]
        moment = [0.0] * size
        for k in range(1, size):
            moment[k] = moment[k - 1] + (cdf[k] - cdf[k - 1]) * (k - 0.5) * step
        price = math.exp(rng.uniform(-7.0, 2.0))
        after = _Policy._plan(cdf, moment, step, price)
        assert all(i < j for i, j in enumerate(after[:-1]))
        best = brute_force_plan(cdf, moment, step, price)
        assert cost_of(cdf, moment, step, price, after) == pytest.approx(best, abs=1e-9)


def test_a_policy_counts_its_polls_up_to_a_finish() -> None:
    cdf_at = _lognormal_cdf(1.0, 0.4)
    step = 3.0 / 300
    policy = _Policy.solve([cdf_at(k * step) for k in range(300)], step, 3.5)
    first, second = policy.times[1], policy.times[2]
    assert policy.polls_until(first / 2) == 1
    assert policy.polls_until(first) == 1
    assert policy.polls_until((first + second) / 2) == 2
    assert policy.next_poll(first) == second
    assert policy.next_poll(policy.times[-1]) is None


def test_progress_extrapolates_the_finish() -> None:
    schedule = LearnedSchedule()
    t = task(1, "flux-pro-1.1")
    schedule.next_delay(t, 0, 0.0, None)
    # Half done after 2 s: done in about 2 s more, and no later.
    assert schedule.next_delay(t, 1, 2.0, 0.5) <= 2.0
    assert schedule.next_delay(t, 2, 3.9, 0.99) == pytest.approx(0.05)


def test_still_pending_at_full_progress_polls_again_soon() -> None:
    """Progress is rounded (the fake's to 0.001) and may reach 1.0 before the task is Ready."""
    schedule = LearnedSchedule()
    t = task(1, "flux-pro-1.1")
    schedule.next_delay(t, 0, 0.0, None)
    assert schedule.next_delay(t, 1, 4.0, 1.0) == pytest.approx(0.05)
    # Still pending: its image may be being stored. Backing off as it stays overdue (no
    # later than the plan), not every 0.05 s.
    expected = []
    for attempt, elapsed in enumerate((4.05, 4.1, 4.2, 4.4, 4.8), start=2):
        plan = schedule.next_delay(t, attempt, elapsed, None)
        expected.append(max(0.05, min(plan, elapsed - 4.0)))
        assert schedule.next_delay(t, attempt, elapsed, 1.0) == pytest.approx(expected[-1])
    assert max(expected) > 0.15


def watch_with_progress(
    schedule: LearnedSchedule, n: int, model: str, duration: float, foretold: float | None
) -> tuple[float, float]:
    """One task of `duration` s: its first poll, one pending answer at a quarter of the
    way whose progress foretells `foretold` s (None: no progress), and its end, reported
    exactly. Returns the delays of its first and second polls."""
    t = task(n, model)
    first = schedule.next_delay(t, 0, 0.0, None)
    at = duration / 4
    progress = None if foretold is None else at / foretold
    second = schedule.next_delay(t, 1, at, progress)
    schedule.done(t, duration, duration)
    return first, second


def planned_first(schedule: LearnedSchedule, model: str) -> float:
    """The first poll of the plan alone, for what `schedule` knows of `model`."""
    state = schedule._model(model)
    return schedule._policy(state).times[1] * state.scale


DURATIONS = [4.0, 3.2, 5.1, 4.4, 3.6, 4.9, 2.9, 4.2, 3.9, 4.6]


def test_progress_that_foretells_ends_is_trusted() -> None:
    schedule, model = LearnedSchedule(), "flux-pro-1.1"
    on_trial = []
    for n, duration in enumerate(DURATIONS[:8]):
        planned = planned_first(schedule, model)
        first, second = watch_with_progress(schedule, n, model, duration, duration)
        assert first < planned - 0.5  # an early look, to read progress
        on_trial.append(second / (0.75 * duration))
    # On trial, no later than the foretold end, and earlier where the plan polls earlier.
    assert max(on_trial) <= 1.0 and min(on_trial) < 0.8
    assert schedule._models[model].progress_trusted
    first, second = watch_with_progress(schedule, 8, model, 4.0, 4.0)
    assert second == pytest.approx(3.0)  # trusted: at the foretold end, 3 s after the look


def test_progress_that_misleads_is_not_trusted_nor_looked_at_early() -> None:
    schedule, model = LearnedSchedule(), "flux-pro-1.1"
    for n, duration in enumerate(DURATIONS[:8]):
        watch_with_progress(schedule, n, model, duration, 0.7 * duration)  # 30 % early
    state = schedule._models[model]
    assert not state.progress_trusted and not state.look_early
    planned = planned_first(schedule, model)
    first, _ = watch_with_progress(schedule, 8, model, 4.0, 4.0)
    assert first == pytest.approx(planned)


def test_early_looks_stop_when_no_progress_comes() -> None:
    schedule, model = LearnedSchedule(), "flux-pro-1.1"
    for n, duration in enumerate(DURATIONS[:8]):
        planned = planned_first(schedule, model)
        first, _ = watch_with_progress(schedule, n, model, duration, None)
        assert first < planned - 0.5
    planned = planned_first(schedule, model)
    first, _ = watch_with_progress(schedule, 8, model, 4.0, None)
    assert first == pytest.approx(planned)


def test_an_early_look_that_finds_progress_starts_the_count_again() -> None:
    schedule, model = LearnedSchedule(), "flux-pro-1.1"
    for n, duration in enumerate(DURATIONS[:7]):
        watch_with_progress(schedule, n, model, duration, None)  # queued: no progress yet
    watch_with_progress(schedule, 7, model, 4.0, 4.0)
    for n, duration in enumerate(DURATIONS[:7], start=8):
        watch_with_progress(schedule, n, model, duration, None)
    assert schedule._models[model].look_early


def test_flux2_models_never_look_early() -> None:
    schedule = LearnedSchedule()
    for n, duration in enumerate(DURATIONS[:3]):
        planned = planned_first(schedule, "flux-2-pro")
        first, _ = watch_with_progress(schedule, n, "flux-2-pro", duration, None)
        assert first == pytest.approx(planned)


def test_past_the_horizon_it_keeps_the_last_spacing_then_backs_off_to_a_cap() -> None:
    schedule = LearnedSchedule()
    teach(schedule, "flux-2-pro", median=2.0, sigma=0.2, n=32)
    model = schedule._models["flux-2-pro"]
    t = task(1)
    schedule.next_delay(t, 0, 0.0, None)
    policy = model.policy
    assert policy is not None
    horizon = policy.times[-1] * model.scale
    gap = (policy.times[-1] - policy.times[-2]) * model.scale
    assert 0.05 < gap < 1.0
    # Just past the horizon (a long task, the one a batch waits for): the plan's spacing,
    # not a quarter of the task's age.
    assert schedule.next_delay(t, 5, horizon + 0.1, None) == pytest.approx(gap)
    # A task that outlives the horizon by far spreads its polls out, up to the cap.
    assert schedule.next_delay(t, 6, horizon + 20.0, None) == pytest.approx(5.0)
    assert schedule.next_delay(t, 7, horizon + 200.0, None) == pytest.approx(10.0)


def test_pending_tasks_count_and_are_forgotten_when_done() -> None:
    schedule = LearnedSchedule()
    t = task(1)
    schedule.next_delay(t, 0, 0.0, None)
    schedule.next_delay(t, 1, 3.0, None)
    model = schedule._models["flux-2-pro"]
    assert model.pending == {"t1": 3.0}
    schedule.done(t, 3.0, None)  # moderated, failed or cancelled: nothing learned
    assert model.pending == {} and len(model.seen) == 0


def test_reported_finishes_are_learned_as_moments() -> None:
    """FLUX.1 reports when a task ended: the fit takes each as a moment, not an interval."""
    rng = random.Random(3)
    finishes = [2.0 * math.exp(0.3 * rng.gauss(0, 1)) for _ in range(64)]
    schedule = LearnedSchedule()
    for i, finish in enumerate(finishes):
        t = task(i, "flux-pro-1.1")
        schedule.next_delay(t, 0, 0.0, None)
        schedule.done(t, finish, finish)
    model = schedule._models["flux-pro-1.1"]
    model.fit(2.0)
    logs = [math.log(f) for f in finishes]
    # The sample's own lognormal, give or take the prior's pull (two tasks' worth).
    assert model.scale == pytest.approx(math.exp(statistics.mean(logs)), rel=0.02)
    assert model.sigma == pytest.approx(statistics.pstdev(logs), abs=0.02)


async def test_a_reported_end_narrows_the_bracket_to_the_moment() -> None:
    accepted_at = anyio.current_time() - 3.0  # accepted 3 s ago; its answer came just now
    now = time.time()

    def result(
        end_time: float | None = None,
        start_time: float | None = None,
        duration: float | None = None,
    ) -> Result:
        return Result(
            task=task(1),
            sample="https://x/1.png",
            ready_at=now,
            end_time=end_time,
            start_time=start_time,
            duration=duration,
        )

    # Ended 0.4 s before the answer: 2.6 s after acceptance, between polls at 2.0 and 3.0.
    finish, same = _finish(result(end_time=now - 0.4), 2.0, 3.0, accepted_at)
    assert finish == same == pytest.approx(2.6, abs=0.01)
    finish, same = _finish(result(start_time=now - 2.9, duration=2.5), 2.0, 3.0, accepted_at)
    assert finish == same == pytest.approx(2.6, abs=0.01)
    # A clock a little off: moved inside the bracket. Far off: the bracket is kept.
    assert _finish(result(end_time=now - 1.2), 2.0, 3.0, accepted_at) == (2.0, 2.0)
    assert _finish(result(end_time=now + 3600.0), 2.0, 3.0, accepted_at) == (2.0, 3.0)
    # FLUX.2 reports no end: the bracket.
    assert _finish(result(start_time=now - 2.9), 2.0, 3.0, accepted_at) == (2.0, 3.0)


async def test_the_client_learns_flux1_finishes_exactly() -> None:
    schedule = LearnedSchedule()
    fake = FakeBFL(generation_time=0.3)
    async with AsyncBFL(
        api_key=fake.api_key, http_client=fake.client(), poll_schedule=schedule
    ) as client:
        for model in ("flux-pro-1.1", "flux-2-pro"):
            await client.wait(await client.submit(model, prompt="a fox"))
    ((lower, upper),) = schedule._models["flux-pro-1.1"].seen
    assert lower == upper == pytest.approx(0.3, abs=0.1)
    ((lower, upper),) = schedule._models["flux-2-pro"].seen
    assert lower < 0.3 < upper


def test_bad_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        LearnedSchedule(polls_per_task=0.5)
    assert "3.9" in repr(LearnedSchedule())


async def test_the_client_reports_every_watch_to_its_schedule(tmp_path: Path) -> None:
    schedule = LearnedSchedule()
    fake = FakeBFL(generation_time=0.2)
    async with (
        AsyncBFL(api_key=fake.api_key, http_client=fake.client(), poll_schedule=schedule) as client,
        anyio.create_task_group() as tg,
    ):
        for n in range(3):
            tg.start_soon(
                lambda n=n: client.generate("flux-2-klein-4b", prompt=str(n), output_dir=tmp_path)
            )
    model = schedule._models["flux-2-klein-4b"]
    assert len(model.seen) == 3 and model.pending == {}
    assert all(0.0 <= lower < upper for lower, upper in model.seen)


async def test_the_next_poll_counts_from_when_the_last_one_left_not_from_its_answer() -> None:
    """A slow answer must not push the plan back: polls 0.3 s apart stay 0.3 s apart."""

    class Every:
        def next_delay(
            self, task: Task, attempt: int, elapsed: float, progress: float | None
        ) -> float:
            return 0.3

        def urgency(self, task: Task, pending_at: float, elapsed: float) -> float:
            return 0.0

        def done(self, task: Task, lower: float, upper: float | None) -> None:
            pass

    fake = FakeBFL(generation_time=1.0, slow_seconds=0.25)
    async with AsyncBFL(
        api_key=fake.api_key, http_client=fake.client(), poll_schedule=Every()
    ) as c:
        task = await c.submit("flux-2-klein-4b", prompt="a fox")
        fake.fail_next("poll", "slow")  # the first poll's answer comes 0.25 s late
        await c.wait(task)
    first, second = fake.poll_times[:2]
    assert second - first < 0.45  # 0.3 s after the first poll left; 0.55 s after its answer


# --- the poll-rate budget ----------------------------------------------------------------


async def leave(budget: PollBudget, left: list[float]) -> None:
    """One poll's turn in `budget`; when it left goes into `left`."""
    await budget.send()
    left.append(anyio.current_time())


async def test_budget_keeps_polls_apart() -> None:
    budget = PollBudget(200.0)  # 0.0051 s apart
    left: list[float] = []
    async with anyio.create_task_group() as tg:
        for _ in range(40):
            tg.start_soon(leave, budget, left)
    # Paced, never in bursts: a server's window cannot catch two polls together.
    assert len(left) == 40
    assert min(b - a for a, b in itertools.pairwise(left)) >= 1.02 / 200 - 1e-6


async def in_turn(budget: PollBudget, urgencies: list[float | None]) -> list[int]:
    """The order in which polls of these urgencies, all waiting for one busy budget, leave."""
    left: list[int] = []

    async def poll(n: int, urgency: float | None) -> None:
        await budget.send(None if urgency is None else (lambda: urgency))
        left.append(n)

    await budget.send()  # the budget is busy: the next turn is a gap away
    async with anyio.create_task_group() as tg:
        for n, urgency in enumerate(urgencies):
            tg.start_soon(poll, n, urgency)
            await anyio.sleep(0.005)  # they come in this order
    return left


async def test_budget_lets_the_most_urgent_poll_go_first() -> None:
    # All four wait for the turn a gap after the busy budget's last poll; turns go by urgency.
    assert await in_turn(PollBudget(10.0), [0.1, 0.7, 0.3, 0.9]) == [3, 1, 2, 0]


async def test_budget_takes_equally_urgent_polls_in_the_order_they_came() -> None:
    assert await in_turn(PollBudget(10.0), [None, None, None]) == [0, 1, 2]
    assert await in_turn(PollBudget(10.0), [0.5, 0.5, 0.5]) == [0, 1, 2]
    # The plain backoff rates every poll alike: its polls go in the order they came.
    assert Backoff().urgency(task(1), 1.0, 5.0) == Backoff().urgency(task(2), 0.0, 9.0) == 0.0


async def test_budget_asks_for_urgency_when_the_turn_comes() -> None:
    budget = PollBudget(10.0)
    rising = {"urgency": 0.0}
    left: list[str] = []

    async def poll(name: str, urgency: Callable[[], float]) -> None:
        await budget.send(urgency)
        left.append(name)

    await budget.send()
    async with anyio.create_task_group() as tg:
        tg.start_soon(poll, "steady", lambda: 0.5)
        await anyio.sleep(0.005)
        tg.start_soon(poll, "rising", lambda: rising["urgency"])
        await anyio.sleep(0.005)
        rising["urgency"] = 1.0  # more urgent than the other by the time the turn comes
    assert left == ["rising", "steady"]


async def test_an_urgency_that_raises_fails_its_own_poll_only() -> None:
    budget = PollBudget(10.0)  # 0.102 s apart
    left: list[tuple[str, float]] = []
    failed: list[str] = []

    def broken() -> float:
        raise ZeroDivisionError("a custom schedule's bug")

    async def poll(name: str, urgency: Callable[[], float]) -> None:
        try:
            await budget.send(urgency)
        except ZeroDivisionError:
            failed.append(name)
        else:
            left.append((name, anyio.current_time() - started))

    await budget.send()
    started = anyio.current_time()
    async with anyio.create_task_group() as tg:
        tg.start_soon(poll, "leader", lambda: 0.5)  # it hands out the turns, and asks
        await anyio.sleep(0.005)
        tg.start_soon(poll, "broken", broken)
        await anyio.sleep(0.005)
        tg.start_soon(poll, "last", lambda: 0.1)
    assert failed == ["broken"]
    assert [name for name, _ in left] == ["leader", "last"]
    # The broken poll took no turn: the last poll left one gap after the leader, not two.
    assert left[1][1] - left[0][1] < 0.15


async def test_an_urgency_that_raised_once_is_asked_afresh_at_the_next_turn() -> None:
    budget = PollBudget(5.0)  # 0.204 s apart: far more than the steps below take
    answers: list[float | None] = [None, 0.5]  # None: raise

    def flaky() -> float:
        answer = answers.pop(0)
        if answer is None:
            raise ZeroDivisionError("once")
        return answer

    left: list[str] = []

    async def poll(name: str, urgency: Callable[[], float]) -> None:
        await budget.send(urgency)
        left.append(name)

    await budget.send()
    with anyio.fail_after(3.0):
        async with anyio.create_task_group() as tg:
            tg.start_soon(poll, "leader", lambda: 0.0)
            await anyio.wait_all_tasks_blocked()  # queued in this order, whatever the clock
            tg.start_soon(poll, "first", lambda: math.inf)  # goes before the failed one
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(poll, "flaky", flaky)
    assert left == ["first", "flaky", "leader"]  # not failed by what it raised before


async def test_a_cancelled_poll_gives_up_its_turn() -> None:
    budget = PollBudget(10.0)  # 0.102 s apart
    left: list[str] = []

    async def poll(name: str) -> None:
        await budget.send()
        left.append(name)

    await budget.send()
    started = anyio.current_time()
    with anyio.fail_after(1.0):
        async with anyio.create_task_group() as tg, anyio.create_task_group() as doomed:
            doomed.start_soon(poll, "leader")  # first in line: it hands out the turns
            await anyio.sleep(0.005)
            tg.start_soon(poll, "next")
            await anyio.sleep(0.005)
            doomed.cancel_scope.cancel()
    assert left == ["next"]
    assert anyio.current_time() - started < 0.3  # at its turn, not stuck behind the cancelled


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_poll_cancelled_as_it_is_handed_the_lead_passes_it_on() -> None:
    budget = PollBudget(5.0)  # 0.204 s apart: far more than the steps below take
    await budget.send()  # the free turn: the next ones queue
    doomed = anyio.CancelScope()
    left: list[str] = []

    def leader_urgency() -> float:
        doomed.cancel()  # as the leader takes its turn and hands the lead to the next in line
        return 1.0

    async def poll(name: str, urgency: Callable[[], float]) -> None:
        await budget.send(urgency)
        left.append(name)

    async def cancelled() -> None:
        with doomed:
            await poll("doomed", lambda: 0.0)

    with anyio.fail_after(3.0):
        async with anyio.create_task_group() as tg:
            tg.start_soon(poll, "leader", leader_urgency)
            await anyio.wait_all_tasks_blocked()  # queued in this order, whatever the clock
            tg.start_soon(cancelled)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(poll, "last", lambda: 0.0)
    assert left == ["leader", "last"]


async def test_budget_send_is_immediate_when_free() -> None:
    budget = PollBudget(5.0)
    with anyio.fail_after(0.5):
        await budget.send()
    with pytest.raises(ValueError, match="at least 1"):
        PollBudget(0.5)
    assert "5.0" in repr(budget)


async def test_budget_send_holds_polls_that_would_leave_together() -> None:
    budget = PollBudget(5.0)  # 0.204 s apart
    with anyio.fail_after(0.5):
        await budget.send()
    with anyio.move_on_after(0.1) as late:
        await budget.send()
    assert late.cancelled_caught


async def test_budget_send_spaces_polls_that_a_stalled_loop_wakes_together() -> None:
    budget = PollBudget(20.0)  # 0.051 s apart
    left: list[float] = []
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(leave, budget, left)
        await anyio.sleep(0.01)  # the first has left; the others sleep until their turn
        time.sleep(0.2)  # noqa: ASYNC251 - the loop stalls past both turns: they wake together
    gaps = [b - a for a, b in itertools.pairwise(left)]
    assert len(gaps) == 2 and min(gaps) >= 0.05


# --- which poll goes first, and the last of a batch --------------------------------------


def test_urgency_is_how_long_a_task_has_likely_been_ended_and_unseen() -> None:
    schedule = LearnedSchedule()
    t = task(1)
    schedule.next_delay(t, 0, 0.0, None)
    model = schedule._models["flux-2-pro"]
    # E[(elapsed - T)+ | T > pending_at] for the fitted lognormal, by simulation.
    rng = random.Random(5)
    draws = [model.scale * math.exp(model.sigma * rng.gauss(0, 1)) for _ in range(200_000)]
    for pending_at, elapsed in ((0.0, 3.0), (3.0, 4.5), (5.0, 5.5), (8.0, 10.0)):
        later = [d for d in draws if d > pending_at]
        expected = sum(max(0.0, elapsed - d) for d in later) / len(later)
        assert schedule.urgency(t, pending_at, elapsed) == pytest.approx(expected, rel=0.03)
    assert schedule.urgency(t, 4.0, 4.0) == 0.0
    # A poll held back grows more urgent; a task found pending just now is the least urgent.
    assert schedule.urgency(t, 3.0, 4.0) < schedule.urgency(t, 3.0, 4.5)
    assert schedule.urgency(t, 3.9, 4.5) < schedule.urgency(t, 3.0, 4.5)


def test_with_trusted_progress_urgency_is_the_time_past_the_foretold_end() -> None:
    schedule, model = LearnedSchedule(), "flux-pro-1.1"
    for n, duration in enumerate(DURATIONS[:8]):
        watch_with_progress(schedule, n, model, duration, duration)
    t = task(99, model)
    schedule.next_delay(t, 0, 0.0, None)
    schedule.next_delay(t, 1, 1.0, 0.25)  # foretells its end at 4 s
    assert schedule.urgency(t, 1.0, 3.5) == 0.0
    assert schedule.urgency(t, 1.0, 4.3) == pytest.approx(0.3)


def plan_gap(schedule: LearnedSchedule, model: str, k: int) -> tuple[float, float]:
    """The plan's k-th poll time (s after acceptance) and the gap to the next."""
    state = schedule._model(model)
    times = [x * state.scale for x in schedule._policy(state).times]
    return times[k], times[k + 1] - times[k]


def test_the_last_task_left_of_a_batch_is_polled_often() -> None:
    schedule = LearnedSchedule()
    batch = [task(n) for n in range(5)]
    for t in batch:
        schedule.next_delay(t, 0, 0.0, None)
    for t in batch:
        schedule.next_delay(t, 1, 2.0, None)
    for t in batch[:-1]:
        schedule.done(t, 2.0, 3.0)
    at, gap = plan_gap(schedule, "flux-2-pro", 3)
    assert gap > 0.3
    # Alone now: everyone waiting on the batch waits on it.
    assert schedule.next_delay(batch[-1], 2, at, None) == pytest.approx(0.15)


def test_a_task_alone_or_in_a_pair_keeps_its_plan() -> None:
    schedule = LearnedSchedule()
    alone = task(1)
    schedule.next_delay(alone, 0, 0.0, None)
    at, gap = plan_gap(schedule, "flux-2-pro", 3)
    assert schedule.next_delay(alone, 1, at, None) == pytest.approx(gap)
    schedule.done(alone, at, None)
    pair = [task(2), task(3)]
    for t in pair:
        schedule.next_delay(t, 0, 0.0, None)
        schedule.next_delay(t, 1, 2.0, None)
    schedule.done(pair[0], 2.0, None)
    at, gap = plan_gap(schedule, "flux-2-pro", 3)
    assert schedule.next_delay(pair[1], 2, at, None) == pytest.approx(gap)


# --- odd inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("elapsed", "progress"),
    [(0.0, 0.5), (1.0, 1e-320)],
    ids=["read-at-acceptance", "next-to-nothing"],
)
def test_progress_that_foretells_no_end_is_not_judged(elapsed: float, progress: float) -> None:
    """Progress read with no time elapsed (a resumed task's first poll, on a coarse clock)
    foretells an end at 0, and a subnormal one an end past any float: `done`, which runs as
    the watch ends, must not raise (it would take the paid result's place) nor learn NaN."""
    schedule, model = LearnedSchedule(), "flux-pro-1.1"
    t = task(1, model)
    schedule.next_delay(t, 0, 0.0, None)
    assert 0.05 <= schedule.next_delay(t, 1, elapsed, progress) <= 10.0
    schedule.done(t, 2.0, 2.5)
    assert list(schedule._models[model].misses) == []


def test_pending_at_full_progress_before_its_foretold_end_still_backs_off() -> None:
    """Progress that foretold a late end, then reached 1.0 early: polled again soon, then
    less often, as when it foretold right, not every 0.05 s until that end."""
    schedule = LearnedSchedule()
    t = task(1, "flux-pro-1.1")
    schedule.next_delay(t, 0, 0.0, None)
    schedule.next_delay(t, 1, 0.5, 0.05)  # foretells its end at 10 s
    expected = []
    for attempt, elapsed in enumerate((4.0, 4.05, 4.1, 4.2, 4.4, 4.8), start=2):
        plan = schedule.next_delay(t, attempt, elapsed, None)
        expected.append(max(0.05, min(plan, elapsed - 4.0)))
        assert schedule.next_delay(t, attempt, elapsed, 1.0) == pytest.approx(expected[-1])
    assert max(expected) > 0.15


def test_an_end_that_is_not_finite_teaches_nothing() -> None:
    """One watch said to end at no finite time (a wrapping schedule's mistake) would pull the
    fit to a spread of 3 and polls 10 s apart for the next `window` tasks."""
    schedule = LearnedSchedule()
    teach(schedule, "flux-2-pro", median=2.0, sigma=0.3, n=64)
    t = task(-1)
    schedule.next_delay(t, 0, 0.0, None)
    schedule.done(t, math.inf, math.inf)
    teach(schedule, "flux-2-pro", median=2.0, sigma=0.3, n=64)
    assert 1.0 < first_polls(schedule, "flux-2-pro")[0] < 2.0


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("polls_per_task", math.nan),
        ("polls_per_task", math.inf),
        ("window", 0),
        ("window", 256.0),
        ("prior_weight", -1.0),
        ("prior_weight", math.nan),
        ("prior_sigma", 0.0),
        ("prior_sigma", math.inf),
    ],
)
def test_bad_options_are_refused_when_made(option: str, value: float) -> None:
    """Not at the first poll, where the error would fail a paid task's watch."""
    with pytest.raises(ValueError, match=option):
        LearnedSchedule(**{option: value})  # type: ignore[arg-type]
